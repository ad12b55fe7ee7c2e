"""The llama-server command line and environment (`launch`).

Covers: `--host 127.0.0.1 --port N` appended after the profile's effective args unless the profile pins
them (the seed's "Default Arguments"); where the node reaches the instance (loopback for wildcards);
a bad pinned port refused with the fix; LD_LIBRARY_PATH led by the real binary's folder (symlink resolved),
kept after; a Hugging Face source found in either flag form and swapped for `-m <file>`; `~` and relative
model paths resolved against the config folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llamesh_agent import launch
from llamesh_api import cookbook


def test_defaults_are_appended() -> None:
    profile = cookbook.Profile(id="p", model_path="/m.gguf", llama_server_args="-np 2")
    argv = launch.argv(Path("/bin/llama-server"), profile.effective_args(), port=8200)
    assert argv == ["/bin/llama-server", "-np", "2", "-m", "/m.gguf", "-c", "0", "--fit", "off",
                    "--host", "127.0.0.1", "--port", "8200"]  # fmt: skip


def test_pinned_host_and_port_win() -> None:
    args = cookbook.Profile(
        id="p", model_path="/m.gguf", llama_server_args="--host=0.0.0.0 --port 9000"
    ).effective_args()
    argv = launch.argv(Path("/bin/llama-server"), args, port=8200)
    assert argv.count("--host") == 1 and argv.count("--port") == 1 and "8200" not in argv
    assert launch.pinned_port(args) == 9000
    assert launch.connect_host(args) == "127.0.0.1"  # a wildcard bind is reached on loopback
    assert launch.connect_host(["--host", "10.1.2.3"]) == "10.1.2.3"
    assert launch.pinned_port(["-m", "x"]) is None


def test_bad_pinned_port() -> None:
    with pytest.raises(launch.LaunchError, match="not a TCP port"):
        launch.pinned_port(["--port", "http"])


def test_ld_library_path_leads_with_the_real_binary_folder(tmp_path: Path) -> None:
    real = tmp_path / "builds" / "abc" / "bin"
    real.mkdir(parents=True)
    (real / "llama-server").write_text("")
    link = tmp_path / "llama-server"
    link.symlink_to(real / "llama-server")
    assert launch.child_env(link, {})["LD_LIBRARY_PATH"] == str(real)
    assert launch.child_env(link, {"LD_LIBRARY_PATH": "/opt/cuda"})["LD_LIBRARY_PATH"] == f"{real}:/opt/cuda"


def test_hugging_face_source_is_swapped_for_the_file() -> None:
    profile = cookbook.Profile(id="p", hf_repo="org/repo", hf_file="m-Q4_K_M.gguf", llama_server_args="-c 512")
    args = profile.effective_args()
    assert launch.hf_source(args) == launch.HfSource(repo="org/repo", filename="m-Q4_K_M.gguf")
    assert launch.with_local_model(args, Path("/cache/m.gguf")) == ["-c", "512", "--fit", "off", "-m", "/cache/m.gguf"]
    in_args = ["--hf-repo=org/repo:Q8_0", "-ngl", "99"]
    assert launch.hf_source(in_args) == launch.HfSource(repo="org/repo:Q8_0", filename=None)
    assert launch.with_local_model(in_args, Path("/m")) == ["-ngl", "99", "-m", "/m"]
    assert launch.hf_source(["-m", "/m"]) is None


def test_model_paths_expand_home_and_resolve_against_the_config_folder(tmp_path: Path) -> None:
    home = str(Path("~").expanduser())
    args = ["-m", "~/models/a.gguf", "--alias", "x", "--model=rel/b.gguf", "-c", "0"]
    assert launch.with_resolved_model_path(args, base_dir=tmp_path) == [
        "-m",
        f"{home}/models/a.gguf",
        "--alias",
        "x",
        f"--model={tmp_path}/rel/b.gguf",
        "-c",
        "0",
    ]
    absolute = ["-m", "/abs/c.gguf"]
    assert launch.with_resolved_model_path(absolute, base_dir=tmp_path) == absolute

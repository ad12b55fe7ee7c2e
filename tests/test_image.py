"""The container image (charts/image/Dockerfile), tested without a container engine: the linter, the
file's promises, and the very command its build runs.

Covers: hadolint finds nothing; every COPY source exists in the repository; the runtime stage runs as a
non-root numeric user, its entry point is `llamesh` and its default command parses as a llamesh command;
the build step (`llamesh build-llama --config charts/image/build-config.yaml` with the Dockerfile's
`LLAMESH_LLAMA_CPP__BUILD_ARGS`) produces a llama-server that starts (here it reuses the machine's cached
build of the same source and flags; only the paths differ from the image's).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from llamesh_operator import cli

ROOT = Path(__file__).parent.parent
DOCKERFILE = ROOT / "charts" / "image" / "Dockerfile"
BIN = Path(sys.executable).parent


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_hadolint_is_clean() -> None:
    completed = subprocess.run([str(BIN / "hadolint"), str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_copy_sources_exist_and_the_runtime_is_non_root_llamesh() -> None:
    steps = instructions()
    for keyword, rest in steps:
        if keyword == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    runtime = steps[max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM") :]
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    (entrypoint,) = [json.loads(rest) for keyword, rest in runtime if keyword == "ENTRYPOINT"]
    (command,) = [json.loads(rest) for keyword, rest in runtime if keyword == "CMD"]
    assert entrypoint == ["llamesh"]
    parsed = cli._parser().parse_args(command)
    assert parsed.command == "gateway" and str(parsed.config) == "/etc/llamesh/config.yaml"


def test_the_build_step_makes_a_llama_server_that_runs(tmp_path: Path) -> None:
    build_args = next(
        rest for keyword, rest in instructions() if keyword == "ARG" and rest.startswith("LLAMA_BUILD_ARGS")
    )
    default_flags = build_args.split("=", 1)[1].strip("'")
    image_config = yaml.safe_load((ROOT / "charts" / "image" / "build-config.yaml").read_text())["llama_cpp"]
    examples = yaml.safe_load((ROOT / "examples" / "config.yaml").read_text())["llama_cpp"]
    assert image_config["pypi_package"] == examples["pypi_package"]  # the build the suite already made
    env = {
        **os.environ,
        "LLAMESH_LLAMA_CPP__BUILD_ARGS": default_flags,  # as the Dockerfile passes it
        "LLAMESH_LLAMA_CPP__CACHE_DIR": str(Path("~/.cache/llamesh").expanduser()),  # the image uses /opt/...
        "LLAMESH_LLAMA_CPP__BINARY_PATH": str(tmp_path / "bin" / "llama-server"),
    }
    completed = subprocess.run(
        [str(BIN / "llamesh"), "build-llama", "--config", str(ROOT / "charts" / "image" / "build-config.yaml")],
        capture_output=True, text=True, env=env, timeout=1800, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    version = subprocess.run(
        [str(tmp_path / "bin" / "llama-server"), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert "version" in (version.stdout + version.stderr)

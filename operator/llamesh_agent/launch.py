"""The exact command line and environment one llama-server process starts with.

The profile's effective args (`Profile.effective_args()`: model source, `-c 0`, `--fit off` already added)
get `--host 127.0.0.1 --port <allocated>` appended, unless the profile pins `--host` or `--port` itself, which
the seed's "Default Arguments" lets it do. A Hugging Face source (`-hfr`/`-hff`) is swapped for `-m <file>`
once the agent has downloaded the file, so llama-server never reaches the network. The child's
`LD_LIBRARY_PATH` starts with the folder of the real binary (symlink resolved): the shared libraries of a
llama.cpp build sit next to it.

Pure functions only; starting the process is the supervisor's job.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from llamesh_api import launch_args

DEFAULT_HOST = "127.0.0.1"
HOST_FLAGS = ("--host",)
PORT_FLAGS = ("--port",)
HF_FILE_FLAGS = ("-hff", "--hf-file")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


class LaunchError(ValueError):
    """The profile's arguments cannot be turned into a command line."""


@dataclasses.dataclass(frozen=True)
class HfSource:
    repo: str  # may carry a quantization tag after ':' (llama-server's `-hfr org/name:Q4_K_M`)
    filename: str | None


def pinned_port(args: Sequence[str]) -> int | None:
    """The `--port` the profile sets, if any."""
    value = launch_args.flag_value(args, PORT_FLAGS)
    if value is None:
        return None
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise LaunchError(f"--port {value!r} in llama_server_args is not a TCP port; use 1-65535 or leave it out")
    return int(value)


def connect_host(args: Sequence[str], *, default: str = DEFAULT_HOST) -> str:
    """Where the instance is reached: the profile's `--host`, or `default` for a wildcard or none."""
    host = launch_args.flag_value(args, HOST_FLAGS)
    return default if host is None or host in _WILDCARD_HOSTS else host


def argv(binary: Path, args: Sequence[str], *, port: int, host: str = DEFAULT_HOST) -> list[str]:
    """The full command line; `host` and `port` are used unless the profile pins them."""
    command = [str(binary), *args]
    if not launch_args.has_flag(args, HOST_FLAGS):
        command += ["--host", host]
    if not launch_args.has_flag(args, PORT_FLAGS):
        command += ["--port", str(port)]
    return command


def child_env(binary: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the binary's folder first in LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    lib_dir = str(binary.resolve().parent)
    existing = env.get("LD_LIBRARY_PATH", "")
    env["LD_LIBRARY_PATH"] = f"{lib_dir}:{existing}" if existing else lib_dir
    return env


def hf_source(args: Sequence[str]) -> HfSource | None:
    """The Hugging Face repository (and file) the args download from, if they name one."""
    repo = launch_args.flag_value(args, launch_args.HF_REPO_FLAGS)
    if repo is None:
        return None
    return HfSource(repo=repo, filename=launch_args.flag_value(args, HF_FILE_FLAGS))


def with_local_model(args: Sequence[str], model_path: Path) -> list[str]:
    """`args` with `-hfr`/`-hff` (and their values) replaced by `-m model_path`."""
    kept = launch_args.without_flags(args, (*launch_args.HF_REPO_FLAGS, *HF_FILE_FLAGS))
    return [*kept, "-m", str(model_path)]


def with_resolved_model_path(args: Sequence[str], *, base_dir: Path) -> list[str]:
    """`args` with the `-m`/`--model` file's `~` expanded and a relative path taken from `base_dir`.

    Cookbook paths are written relative to the config's folder (the seed's rule), and llama-server
    would read them relative to its own working directory and never expand `~`.
    """
    resolved: list[str] = []
    expect_path = False
    for word in args:
        if expect_path:
            resolved.append(str(_resolve(word, base_dir)))
            expect_path = False
        elif word in launch_args.MODEL_FLAGS:
            resolved.append(word)
            expect_path = True
        elif any(word.startswith(flag + "=") for flag in launch_args.MODEL_FLAGS):
            flag, _, value = word.partition("=")
            resolved.append(f"{flag}={_resolve(value, base_dir)}")
        else:
            resolved.append(word)
    return resolved


def _resolve(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path

"""llama-server launch arguments: parsing `llama_server_args`, the effective argv, and the args hash.

The args hash keys everything learned about a profile (memory peaks, parsed model params, latency):
the same flags give the same hash whatever the profile is called, and `--host`/`--port`, which vary per
instance, never take part. It follows the seed: `key=value` flags are split, the model source, `-c 0`
and `--fit off` are added unless the profile sets them, then SHA-256 over the sorted, filtered argv.

Starting processes, allocating ports and reading logs are the agent's business, not this module's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shlex
from collections.abc import Iterable, Sequence

MODEL_FLAGS = ("-m", "--model")
HF_REPO_FLAGS = ("-hfr", "--hf-repo")
CTX_FLAGS = ("-c", "--ctx-size")
FIT_FLAGS = ("--fit",)
EMBEDDING_FLAGS = ("--embedding", "--embeddings")
RERANK_FLAGS = ("--rerank", "--reranking")
PER_INSTANCE_FLAGS = ("--host", "--port")


class ArgsError(ValueError):
    """`llama_server_args` cannot be parsed."""


def split_args(value: str | Sequence[str]) -> list[str]:
    """A shell-style string (or an already split list) as argv words."""
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise ArgsError(f"cannot split {value!r} shell-style ({exc}); check quotes and escapes") from exc
    return [str(word) for word in value]


def has_flag(args: Iterable[str], flags: Sequence[str]) -> bool:
    """Whether any word is one of `flags`, alone or as `flag=value` (case-insensitive, like the seed)."""
    for word in args:
        normalized = word.strip().lower()
        if any(normalized == flag or normalized.startswith(flag + "=") for flag in flags):
            return True
    return False


def flag_value(args: Sequence[str], flags: Sequence[str]) -> str | None:
    """The value given to the last of `flags`, in either `flag value` or `flag=value` form."""
    found: str | None = None
    for index, word in enumerate(args):
        for flag in flags:
            if word == flag and index + 1 < len(args):
                found = args[index + 1]
            elif word.startswith(flag + "="):
                found = word.partition("=")[2]
    return found


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where the weights come from, as the profile says (`model_path` or `hf_repo`/`hf_file`)."""

    model_path: str | None = None
    hf_repo: str | None = None
    hf_file: str | None = None


def effective_args(profile_args: Sequence[str], *, source: ModelSource) -> list[str]:
    """The argv (without the binary, `--host` and `--port`) an instance of this profile runs with."""
    args: list[str] = []
    for word in profile_args:
        if word.startswith("-") and "=" in word:
            flag, _, value = word.partition("=")
            args += [flag, value]
        else:
            args.append(word)
    if not has_flag(profile_args, MODEL_FLAGS) and not has_flag(profile_args, HF_REPO_FLAGS):
        if source.hf_repo:
            args += ["-hfr", source.hf_repo]
            if source.hf_file:
                args += ["-hff", source.hf_file]
        elif source.model_path:
            args += ["-m", source.model_path]
    if not has_flag(profile_args, CTX_FLAGS):
        args += ["-c", "0"]
    if not has_flag(profile_args, FIT_FLAGS):
        args += ["--fit", "off"]
    return args


def without_flags(args: Sequence[str], flags: Sequence[str]) -> list[str]:
    """`args` without `flags` and their values, in both `flag value` and `flag=value` forms."""
    kept: list[str] = []
    skip_next = False
    for word in args:
        if skip_next:
            skip_next = False
            continue
        if word in flags:
            skip_next = True
            continue
        if any(word.startswith(flag + "=") for flag in flags):
            continue
        kept.append(word)
    return kept


def args_hash(args: Sequence[str]) -> str:
    """SHA-256 of the launch args, without the per-instance `--host`/`--port`, as 16 hex digits."""
    kept = without_flags(args, PER_INSTANCE_FLAGS)
    # Sorted, NUL-separated, first 8 bytes in hex: the seed's format, so learned data keys agree.
    digest = hashlib.sha256()
    for word in sorted(kept):
        digest.update(word.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]

"""Hugging Face model files, downloaded by the agent itself into a cache, so llama-server gets `-m <file>`.

A profile with `hf_repo` (or `-hfr` in its args) would make llama-server download on its own, invisibly and
without a deadline the agent controls. Instead `fetch` returns a cached file at once when there is one, and
otherwise runs `huggingface_hub.hf_hub_download` in a child process (`python -m llamesh_agent.downloads`):
a child can be killed when the deadline passes or the instance goes away, which a thread cannot. The child
reports on stdout, one JSON object a line; the parent watches the partial file grow and reports progress.
The cache lookup and the partial file's size are read in worker threads, never on the event loop.

The hub is `HF_ENDPOINT` when set (huggingface_hub honours it; tests point it at a local server). Without
`hf_file`, the file is chosen the way llama-server chooses it: the repo's `.gguf` whose name carries the
`:tag` of `hf_repo` (default `Q4_K_M`), else the first `.gguf`. Multi-file (split) models and multimodal
projector files are not fetched; see the agent's open issues.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import huggingface_hub
from huggingface_hub import errors as hf_errors

from llamesh_agent import orphans

DEFAULT_TAG = "Q4_K_M"
_SPLIT_PART = re.compile(r"-(\d{5})-of-\d{5}\.gguf$", re.IGNORECASE)
_KILL_GRACE_S = 2.0


class DownloadError(Exception):
    """A model file could not be downloaded."""


class DownloadTimeout(DownloadError):
    pass


@dataclasses.dataclass(frozen=True)
class Progress:
    filename: str | None
    downloaded_bytes: int
    total_bytes: int | None

    def describe(self) -> str:
        got = f"{self.downloaded_bytes / 1e6:.1f} MB"
        if self.total_bytes:
            return f"{got} of {self.total_bytes / 1e6:.1f} MB ({100 * self.downloaded_bytes / self.total_bytes:.0f}%)"
        return got


class OnProgress(Protocol):
    def __call__(self, progress: Progress, /) -> None: ...


def split_tag(repo: str) -> tuple[str, str | None]:
    """`org/name:Q8_0` as ("org/name", "Q8_0")."""
    name, sep, tag = repo.partition(":")
    return name, (tag if sep and tag else None)


def choose_gguf(files: Sequence[str], tag: str | None) -> str | None:
    """The file llama-server would pick from a repo's file list for `tag`."""
    candidates = sorted(
        name
        for name in files
        if name.lower().endswith(".gguf") and "mmproj" not in name.lower() and not _later_split_part(name)
    )
    wanted = (tag or DEFAULT_TAG).lower()
    tagged = [name for name in candidates if wanted in Path(name).name.lower()]
    if tagged:
        return tagged[0]
    if tag is not None:
        return None  # an explicit tag that matches nothing is an error, not a silent substitute
    return candidates[0] if candidates else None


def _later_split_part(name: str) -> bool:
    """Whether `name` is part 2 or later of a split GGUF (`...-00002-of-00003.gguf`)."""
    match = _SPLIT_PART.search(name)
    return match is not None and int(match[1]) > 1


def cached_file(repo: str, filename: str, *, cache_dir: Path, revision: str | None = None) -> Path | None:
    """The cached copy of `filename`, if the cache holds one for `revision` (default: main)."""
    found = huggingface_hub.try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


async def fetch(
    repo: str,
    filename: str | None,
    *,
    cache_dir: Path,
    timeout_s: float,
    on_progress: OnProgress | None = None,
    progress_interval_s: float = 1.0,
    revision: str | None = None,
) -> Path:
    """The local path of the model file, downloading it first when the cache does not have it."""
    repo_name, tag = split_tag(repo)
    if filename is not None:
        # The cache lookup reads and stats files: a worker thread's job, not the event loop's.
        hit = await asyncio.to_thread(cached_file, repo_name, filename, cache_dir=cache_dir, revision=revision)
        if hit is not None:
            return hit
    command = [sys.executable, "-m", "llamesh_agent.downloads", "--repo", repo_name, "--cache-dir", str(cache_dir)]
    command += ["--file", filename] if filename else (["--tag", tag] if tag else [])
    command += ["--revision", revision] if revision else []
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    child = await asyncio.create_subprocess_exec(
        *command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
        preexec_fn=orphans.preexec_fn(),
    )
    watcher = _ChildWatcher(child, cache_dir=cache_dir, repo=repo_name)
    what = f"{repo}/{filename}" if filename else repo
    try:
        async with asyncio.timeout(timeout_s):
            return await watcher.result(on_progress=on_progress, interval_s=progress_interval_s)
    except TimeoutError:
        raise DownloadTimeout(
            f"downloading {what} from Hugging Face took longer than {timeout_s:g} s "
            f"({watcher.last_progress.describe()} so far); raise download_timeout_seconds in the profile"
        ) from None
    finally:
        await watcher.close()


class _ChildWatcher:
    """Reads the download child's reports and the partial file's size until it finishes."""

    def __init__(self, child: asyncio.subprocess.Process, *, cache_dir: Path, repo: str) -> None:
        self._child = child
        self._blobs = cache_dir / f"models--{repo.replace('/', '--')}" / "blobs"
        self.last_progress = Progress(filename=None, downloaded_bytes=0, total_bytes=None)
        self._stderr = asyncio.create_task(_read_all(child.stderr))

    async def result(self, *, on_progress: OnProgress | None, interval_s: float) -> Path:
        assert self._child.stdout is not None
        filename: str | None = None
        total: int | None = None
        next_report = time.monotonic() + interval_s
        while True:
            raw: bytes | None = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):  # not wait_for: python/cpython#86296
                    raw = await self._child.stdout.readline()
            if raw == b"":
                await self._child.wait()
                stderr = (await self._stderr).strip().splitlines()[-10:]
                raise DownloadError(f"the download process exited with {self._child.returncode}: {' / '.join(stderr)}")
            report = _decode(raw) if raw else {}
            if report.get("event") == "done":
                return Path(str(report["path"]))
            if report.get("event") == "error":
                raise DownloadError(str(report.get("message")))
            if report.get("event") == "file":
                filename, total = str(report.get("filename")), _int(report.get("size"))
            if on_progress is not None and time.monotonic() >= next_report:
                partial = await asyncio.to_thread(_partial_bytes, self._blobs)  # a glob and a stat per file
                self.last_progress = Progress(filename, partial, total)
                on_progress(self.last_progress)
                next_report = time.monotonic() + interval_s

    async def close(self) -> None:
        """Stop the child if it still runs, and reap it."""
        child = self._child
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(_KILL_GRACE_S):
                    await child.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await child.wait()
        await asyncio.gather(self._stderr, return_exceptions=True)
        if child.stdout is not None:
            with contextlib.suppress(Exception):
                await child.stdout.read()


async def _read_all(stream: asyncio.StreamReader | None) -> str:
    return (await stream.read()).decode(errors="replace") if stream is not None else ""


def _partial_bytes(blobs: Path) -> int:
    try:
        return sum(path.stat().st_size for path in blobs.glob("*.incomplete"))
    except OSError:
        return 0


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        report = json.loads(raw)
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- the child process ------------------------------------------------------------------------------


def _emit(**report: object) -> None:
    print(json.dumps(report), flush=True)


def _download(args: argparse.Namespace) -> Path:
    endpoint = os.environ.get("HF_ENDPOINT") or None
    filename = args.file
    if filename is None:
        files = huggingface_hub.HfApi(endpoint=endpoint).list_repo_files(args.repo, revision=args.revision)
        filename = choose_gguf(files, args.tag)
        if filename is None:
            wanted = f"a .gguf file tagged {args.tag}" if args.tag else "a .gguf file"
            raise DownloadError(f"{args.repo} has no {wanted}; set hf_file in the profile")
    url = huggingface_hub.hf_hub_url(args.repo, filename, revision=args.revision, endpoint=endpoint)
    size = huggingface_hub.get_hf_file_metadata(url).size
    _emit(event="file", filename=filename, size=size)
    path = huggingface_hub.hf_hub_download(
        args.repo, filename, revision=args.revision, cache_dir=args.cache_dir, endpoint=endpoint
    )
    if not isinstance(path, str):
        raise DownloadError(f"huggingface_hub returned {path!r} instead of a path")
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download one model file from Hugging Face (llamesh agent).")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--file")
    parser.add_argument("--tag")
    parser.add_argument("--revision")
    parser.add_argument("--cache-dir", required=True)
    args = parser.parse_args(argv)
    what = f"{args.repo}/{args.file}" if args.file else args.repo
    try:
        path = _download(args)
    except hf_errors.RepositoryNotFoundError:
        _emit(event="error", message=f"Hugging Face repository {args.repo} not found; check hf_repo in the profile")
    except hf_errors.RemoteEntryNotFoundError:
        _emit(event="error", message=f"{args.repo} has no file {args.file}; check hf_file in the profile")
    except Exception as exc:  # the process boundary: whatever went wrong becomes one report
        _emit(event="error", message=f"cannot download {what}: {exc}")
    else:
        _emit(event="done", path=str(path))
        return 0
    return 1


if __name__ == "__main__":
    raise SystemExit(main())

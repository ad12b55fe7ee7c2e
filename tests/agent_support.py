"""Helpers shared by the agent's tests (tests/test_agent_*.py): stand-in binaries and polling.

- `fake_binary`: an executable script that runs the rig's fake llama-server with whatever arguments the
  supervisor gives it, so the agent's code path is the one it takes with the real binary;
- `stubborn_binary`: a tiny HTTP server that answers 200 to everything and ignores SIGTERM, for the
  SIGKILL-after-grace path;
- `eventually`: poll an async or plain condition until it holds, with a generous deadline (the test machine
  is small and shared);
- `FakeHub` and `serve_hub`: enough of huggingface.co (resolve and tree URLs, the headers huggingface_hub
  checks) on a local port, with HF_ENDPOINT pointing at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar

import pytest
from aiohttp import web

from rig import processes, waiting

eventually = waiting.eventually  # the suite's one polling helper, re-exported for these tests

T = TypeVar("T")

_STUBBORN_SERVER = """
import asyncio, signal, sys

signal.signal(signal.SIGTERM, signal.SIG_IGN)
port = int(sys.argv[sys.argv.index("--port") + 1])
print("stubborn server: ignoring SIGTERM", flush=True)

async def answer(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")
    await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(answer, "127.0.0.1", port)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def _script(path: Path, body: str) -> Path:
    path.write_text(body)
    path.chmod(0o755)
    return path


def fake_binary(folder: Path) -> Path:
    """An executable that runs the fake llama-server (faults come from FAKE_LLAMA_* in the environment)."""
    return _script(
        folder / "fake-llama-server",
        f'#!/bin/sh\nexec {sys.executable} {processes.FAKE_LLAMA_SERVER} "$@"\n',
    )


def stubborn_binary(folder: Path) -> Path:
    """An executable that serves 200 on every path and ignores SIGTERM."""
    server = folder / "stubborn_server.py"
    server.write_text(_STUBBORN_SERVER)
    return _script(folder / "stubborn-llama-server", f'#!/bin/sh\nexec {sys.executable} {server} "$@"\n')


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped does not count)."""
    return processes.is_alive(pid)


def cmdline_of(pid: int) -> list[str]:
    """The argv a running process was started with."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")


def environ_of(pid: int) -> dict[str, str]:
    """The environment a running process started with."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (entry.decode(errors="replace").partition("=") for entry in entries if b"=" in entry)
    return {key: value for key, _, value in pairs}


# --- a stand-in for huggingface.co ------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "llamesh/tiny-chat-GGUF"


class FakeHub:
    """Enough of huggingface.co for hf_hub_download and list_repo_files."""

    def __init__(self, files: dict[str, bytes], *, stall: bool = False) -> None:
        self.files = files
        self.stall = stall
        self.requests: list[str] = []
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/api/models/{org}/{name}/tree/{revision}", self.tree)
        app.router.add_route("*", "/{org}/{name}/resolve/{revision}/{filename:.+}", self.resolve)
        return app

    async def tree(self, request: web.Request) -> web.Response:
        self.requests.append(f"{request.method} {request.path}")
        if f"{request.match_info['org']}/{request.match_info['name']}" != REPO:
            return web.Response(status=404, headers={"X-Error-Code": "RepoNotFound"})
        entries = [
            {"type": "file", "path": name, "size": len(body), "oid": hashlib.sha1(body).hexdigest()}
            for name, body in self.files.items()
        ]
        return web.json_response(entries)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path}")
        if f"{request.match_info['org']}/{request.match_info['name']}" != REPO:
            return web.Response(status=404, headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "no repo"})
        body = self.files.get(request.match_info["filename"])
        if body is None:
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        headers = {
            "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
            "X-Repo-Commit": COMMIT,
            "Content-Length": str(len(body)),
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            return web.Response(headers=headers)
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        if self.stall:
            await response.write(body[: len(body) // 4])
            await self.release.wait()  # until the test ends
            return response
        await response.write(body)
        await response.write_eof()
        return response


@contextlib.asynccontextmanager
async def serve_hub(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeHub]:
    runner = web.AppRunner(hub.app(), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    try:
        yield hub
    finally:
        hub.release.set()
        await runner.cleanup()

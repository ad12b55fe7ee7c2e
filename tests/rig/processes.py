"""Start, watch and stop the child processes tests run: llama-server (real or fake), later llamesh itself.

A child's stdout and stderr go to one log file, so a failing test can show what the child said; helpers put
the log's tail into their error messages. Children are `subprocess.Popen` objects rather than asyncio ones,
so a child started under one event loop can be stopped under another (session fixtures, function loops).
On Linux a child is also killed if the test process dies, so an interrupted run leaves no server behind.

Looking at processes a child started (the llama-servers under `llamesh serve` or an agent) goes through
`descendants` and `is_alive`: a process may exit, turn into a zombie or vanish between being listed and being
looked at, so each is looked at once, when listed (`Seen` keeps its command line), and one that is gone by
then is left out instead of failing the test with psutil's NoSuchProcess/ZombieProcess/AccessDenied.

Deliberately not here: restarts, back-off, or parsing what a child logs; that is the agent's job, and the
agent's tests exercise the agent's own code for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil

FAKE_LLAMA_SERVER = Path(__file__).with_name("fake_llama_server.py")
_PR_SET_PDEATHSIG = 1
# Loaded before any fork: the child may only make the prctl call, not load libraries.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class RigError(Exception):
    """A child process of the test rig misbehaved."""


class ChildExited(RigError):
    """The child exited while it was expected to run."""


class ChildNotHealthy(RigError):
    """The child's /health did not answer 200 before the deadline."""


@dataclass
class Child:
    """A started child process and the file its output goes to."""

    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


@dataclass(frozen=True)
class Seen:
    """A process as it was when listed: its pid and command line, read once, so later looks cannot fail."""

    process: psutil.Process
    argv: tuple[str, ...]

    @property
    def pid(self) -> int:
        return self.process.pid

    def flag(self, name: str) -> str | None:
        """The value after `name` on its command line (`--port`), if it was given."""
        return self.argv[self.argv.index(name) + 1] if name in self.argv[:-1] else None

    def is_alive(self) -> bool:
        return is_alive(self.process)

    def kill(self) -> None:
        """SIGKILL, unless it is gone already."""
        with contextlib.suppress(psutil.NoSuchProcess):
            self.process.kill()


def is_alive(process: psutil.Process | int) -> bool:
    """Whether it still runs: gone, or a zombie waiting to be reaped, is not running."""
    try:
        found = process if isinstance(process, psutil.Process) else psutil.Process(process)
        return found.is_running() and found.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess is one too
        return False
    except psutil.AccessDenied:
        return True  # it exists; this user may only not look at it


def descendants(pid: int, *, matching: str = "") -> list[Seen]:
    """The running processes below `pid` whose command line contains `matching`.

    One that exits, turns zombie or cannot be read while it is looked at is left out, and so is everything
    when `pid` itself is gone: the answer is what runs now, never an exception about what just stopped.
    """
    try:
        below = psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
    found = []
    for process in below:
        try:
            with process.oneshot():
                if process.status() == psutil.STATUS_ZOMBIE:
                    continue
                argv = tuple(process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if argv and matching in " ".join(argv):
            found.append(Seen(process, argv))
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the kernel's pick; racy only in theory)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def fake_llama_server_argv(*args: str) -> list[str]:
    """The command line that runs the fake llama-server with this interpreter."""
    return [sys.executable, str(FAKE_LLAMA_SERVER), *args]


def start(argv: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None) -> Child:
    """Start `argv` with its output appended to `log_path`; `env` adds to (not replaces) os.environ."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=_die_with_parent if _LIBC is not None else None,
        )
    return Child(process=process, log_path=log_path)


async def wait_healthy(child: Child, base_url: str, *, deadline_s: float = 60.0) -> float:
    """Poll `base_url`/health until it answers 200; return the seconds it took."""
    started = time.monotonic()
    last_answer = "no answer yet"
    timeout = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            if child.process.poll() is not None:
                raise ChildExited(
                    f"{child.process.args!r} exited with {child.process.returncode} before /health answered 200;"
                    f" log {child.log_path}:\n{child.log_tail()}"
                )
            try:
                async with session.get(f"{base_url}/health") as response:
                    if response.status == 200:
                        return time.monotonic() - started
                    last_answer = f"{response.status} {await response.text()}"
            except (TimeoutError, aiohttp.ClientError) as exc:
                last_answer = repr(exc)
            if time.monotonic() - started > deadline_s:
                raise ChildNotHealthy(
                    f"{base_url}/health did not answer 200 within {deadline_s:.0f} s (last: {last_answer});"
                    f" log {child.log_path}:\n{child.log_tail()}"
                )
            await asyncio.sleep(0.05)


async def wait_exited(child: Child, *, deadline_s: float) -> int | None:
    """Wait up to `deadline_s` for the child to exit; its exit status, or None if it still runs."""
    try:
        return await asyncio.to_thread(child.process.wait, deadline_s)
    except subprocess.TimeoutExpired:
        return None


async def stop(child: Child, *, grace_s: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after `grace_s`; return the exit status (negative: the signal that ended it)."""
    if child.process.poll() is None:
        child.process.send_signal(signal.SIGTERM)
        if await wait_exited(child, deadline_s=grace_s) is None:
            child.process.kill()
    # Reaps the child and closes the Popen object, so no ResourceWarning is left behind.
    return await asyncio.to_thread(child.process.wait)


@contextlib.asynccontextmanager
async def running(
    argv: Sequence[str],
    *,
    log_path: Path,
    base_url: str,
    env: Mapping[str, str] | None = None,
    deadline_s: float = 60.0,
    wait: bool = True,
) -> AsyncIterator[Child]:
    """Start a server, wait until its /health answers 200 (unless `wait` is off, for faults that never get
    there), and stop it on the way out, whatever happens."""
    child = start(argv, log_path=log_path, env=env)
    try:
        if wait:
            await wait_healthy(child, base_url, deadline_s=deadline_s)
        yield child
    finally:
        await stop(child)


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: ask Linux to SIGTERM it when its parent dies.

    Linux ties this to the parent *thread*, so call `start` from the event loop's thread, not a worker.
    """
    assert _LIBC is not None
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

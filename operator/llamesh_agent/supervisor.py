"""One llama-server child process: start it, know when it serves, notice when it dies, stop it.

The lifecycle is an explicit state machine (`State`, allowed moves in `TRANSITIONS`):

    IDLE ──► STARTING ──► READY ──► STOPPING ──► STOPPED
     │        │  ▲   │      │           ▲
     │        ▼  │   │      └─► EXITED  │      (it exited on its own after serving: a crash)
     │      BACKOFF ─┼──────────────────┤      (an attempt failed; the next one gets a new port)
     │        │      └──────► FAILED    │      (the last attempt failed)
     └────────┴─────────────────────────┘      (stopped before or between attempts)

READY means `/health` answered 200, polled every few tens of milliseconds with a short per-probe timeout,
so a server that accepts connections but never answers cannot outlast the startup budget. A process that
exits before that, or a budget that runs out, fails the attempt; up to `max_attempts` attempts are made,
each on a fresh port. Stopping is SIGTERM, then SIGKILL after `stop_grace_s`. `stop()` is final: nothing
is restarted after it, and a process that exits while being stopped is STOPPED, not EXITED.

The child's stdout and stderr share one pipe, read as lines by `childpipe` (eagerly while starting, in
bursts once READY, so that a serving child's output wakes the event loop, shared with the gateway under
`llamesh serve`, once per burst and not per piece of a line). Each line goes to a ring buffer (for error
messages), through the startup-log parser, and to a log file through `childlog`, whose thread does the
writing: the event loop does no file I/O per line. The file is complete once the
supervisor reports the child gone. One `asyncio.Lock` per supervisor serialises spawning and stopping.

Not here: restarting after a crash (the instance is reported failed and replaced by the operator and
gateway), downloads, or anything about the store.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import enum
import logging
import os
import shlex
import signal
import subprocess
import time
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from llamesh_agent import childlog, childpipe, launch, orphans, ports, startup_log

log = logging.getLogger(__name__)

_READER_DRAIN_S = 2.0


class State(enum.Enum):
    IDLE = "idle"  # nothing started yet
    STARTING = "starting"  # a process runs, /health has not answered 200 yet
    BACKOFF = "backoff"  # an attempt failed, the next one follows
    READY = "ready"  # /health answered 200
    STOPPING = "stopping"  # SIGTERM sent (SIGKILL after the grace period)
    STOPPED = "stopped"  # stopped on request
    EXITED = "exited"  # exited on its own after it was ready
    FAILED = "failed"  # no attempt became ready

    @property
    def is_terminal(self) -> bool:
        return not TRANSITIONS[self]


TRANSITIONS: Mapping[State, frozenset[State]] = types.MappingProxyType(
    {
        State.IDLE: frozenset({State.STARTING, State.STOPPED, State.FAILED}),
        State.STARTING: frozenset({State.READY, State.BACKOFF, State.FAILED, State.STOPPING}),
        State.BACKOFF: frozenset({State.STARTING, State.FAILED, State.STOPPED}),
        State.READY: frozenset({State.STOPPING, State.EXITED}),
        State.STOPPING: frozenset({State.STOPPED}),
        State.STOPPED: frozenset(),
        State.EXITED: frozenset(),
        State.FAILED: frozenset(),
    }
)


class SupervisorError(Exception):
    """Base of the supervisor's errors."""


class IllegalTransition(SupervisorError):
    pass


@dataclasses.dataclass(frozen=True)
class Settings:
    startup_timeout_s: float = 60.0  # per attempt: spawn until /health answers 200
    max_attempts: int = 3
    stop_grace_s: float = 10.0  # SIGTERM, then SIGKILL after this long
    health_interval_s: float = 0.025
    probe_timeout_s: float = 1.0
    retry_delay_s: float = 0.5
    tail_lines: int = 100  # kept for error messages
    message_lines: int = 20  # of those, put into failure messages
    host: str = "127.0.0.1"  # where llama-server listens unless the profile pins --host (a pod's IP on Kubernetes)


@dataclasses.dataclass(frozen=True)
class Attempt:
    number: int
    host: str
    port: int
    pid: int


class OnSpawn(Protocol):
    async def __call__(self, attempt: Attempt, /) -> None: ...


class Supervisor:
    """Runs one llama-server (with retries) and reports what it does; see the module docstring."""

    def __init__(
        self,
        *,
        binary: Path,
        args: Sequence[str],
        log_path: Path,
        port_allocator: ports.PortAllocator,
        settings: Settings | None = None,
        env: Mapping[str, str] | None = None,
        on_spawn: OnSpawn | None = None,
    ) -> None:
        self._binary = binary
        self._args = list(args)
        self._log_path = log_path
        self._ports = port_allocator
        self._settings = settings or Settings()
        self._base_env = env
        self._on_spawn = on_spawn
        self._host = launch.connect_host(self._args, default=self._settings.host)
        self._pinned_port = launch.pinned_port(self._args)

        self._lock = asyncio.Lock()
        self._state = State.IDLE
        self._done = asyncio.Event()
        self._stop_requested = False
        self._process: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._exited = asyncio.Event()
        self._port: int | None = None
        self._attempts = 0
        self._exit_code: int | None = None
        self._failure: str | None = None
        self._killed = False
        self._ready_monotonic: float | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=self._settings.tail_lines)
        self._parser = startup_log.LogParser()

    # --- what callers read ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    @property
    def attempts(self) -> int:
        return self._attempts

    @property
    def exit_code(self) -> int | None:
        return self._exit_code

    @property
    def failure(self) -> str | None:
        """Why the last attempt failed, or why a ready process exited."""
        return self._failure

    @property
    def killed(self) -> bool:
        """Whether a stop needed SIGKILL."""
        return self._killed

    @property
    def startup_params(self) -> dict[str, Any]:
        return self._parser.params

    def tail(self, lines: int | None = None) -> list[str]:
        kept = list(self._tail)
        return kept if lines is None else kept[-lines:]

    # --- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> State:
        """Make attempts until one is READY, all failed, or `stop()` was called; return the state then."""
        if self.state is not State.IDLE:  # the property: mypy must not narrow _state for the whole method
            raise SupervisorError(f"start() needs state idle, not {self.state.value}")
        async with aiohttp.ClientSession() as session:
            for number in range(1, self._settings.max_attempts + 1):
                async with self._lock:
                    if self._stop_requested:
                        break
                    failure = await self._spawn(number)
                if failure is None:
                    if self._on_spawn is not None and self._process is not None and self._port is not None:
                        attempt = Attempt(number=number, host=self._host, port=self._port, pid=self._process.pid)
                        await self._on_spawn(attempt)
                    failure = await self._await_healthy(session)
                async with self._lock:
                    if self._state is not State.STARTING:
                        break  # stop() took over
                    if self._stop_requested:
                        await self._stop_locked()
                        break
                    if failure is None:
                        self._ready_monotonic = time.monotonic()
                        self._transition(State.READY)
                        log.info(
                            "%s: ready on %s:%s (attempt %d)",
                            self._log_path.stem,
                            self._host,
                            self._port,
                            number,
                            extra=self._fields("llama_server_ready", attempt=number),
                        )
                        break
                    await self._terminate()
                    self._failure = failure
                    log.warning(
                        "%s: %s",
                        self._log_path.stem,
                        failure,
                        extra=self._fields("llama_server_attempt_failed", attempt=number),
                    )
                    if number == self._settings.max_attempts:
                        self._transition(State.FAILED)
                        break
                    self._transition(State.BACKOFF)
                await asyncio.sleep(self._settings.retry_delay_s)
        return self._state

    async def wait(self) -> State:
        """Until the supervisor reaches a final state (STOPPED, EXITED or FAILED)."""
        await self._done.wait()
        return self._state

    async def stop(self) -> State:
        """SIGTERM, SIGKILL after the grace period; never followed by a restart. Safe to call at any time."""
        self._stop_requested = True
        async with self._lock:
            await self._stop_locked()
        return self._state

    # --- internals ----------------------------------------------------------------------------------

    def _transition(self, new: State) -> None:
        if new not in TRANSITIONS[self._state]:
            raise IllegalTransition(f"llama-server supervisor cannot go from {self._state.value} to {new.value}")
        log.debug(
            "%s: %s -> %s",
            self._log_path.stem,
            self._state.value,
            new.value,
            extra=self._fields("llama_server_state", state=new.value, previous=self._state.value),
        )
        self._state = new
        if new.is_terminal:
            self._ports.release(self._port)
            self._done.set()

    async def _spawn(self, number: int) -> str | None:
        """Start attempt `number` (lock held); a failure message, or None when a process runs."""
        self._attempts = number
        previous = self._port
        try:
            self._port = self._pinned_port or self._ports.allocate()
        except ports.PortError as exc:
            self._failure = str(exc)
            self._transition(State.FAILED)
            return str(exc)
        if previous != self._port:
            self._ports.release(previous)  # only now, so a retry never gets the port that just failed
        self._transition(State.STARTING)
        self._watcher = None
        command = launch.argv(self._binary, self._args, port=self._port, host=self._settings.host)
        self._exited = asyncio.Event()
        self._exit_code = None
        env = await asyncio.to_thread(launch.child_env, self._binary, self._base_env)  # resolves a symlink
        output, child_output = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=subprocess.DEVNULL,
                stdout=child_output,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C meant for the agent does not reach its children first
                preexec_fn=orphans.preexec_fn(),
            )
        except OSError as exc:
            os.close(output)
            self._process = None
            return f"cannot run {self._binary}: {exc.strerror or exc} (attempt {number}/{self._settings.max_attempts})"
        finally:
            os.close(child_output)  # the child holds its own copy; the pipe ends when the child's ends
        self._process = process
        header = (
            f"--- {_now()} attempt {number}/{self._settings.max_attempts}, pid {process.pid}: {shlex.join(command)}"
        )
        reader = asyncio.create_task(self._read(output, header=header))
        self._watcher = asyncio.create_task(self._watch(process, reader))
        return None

    async def _await_healthy(self, session: aiohttp.ClientSession) -> str | None:
        """Poll /health until 200 (None), the process exits, the budget ends, or a stop is asked for."""
        settings = self._settings
        url = f"http://{self._host}:{self._port}/health"
        deadline = time.monotonic() + settings.startup_timeout_s
        probe_timeout = aiohttp.ClientTimeout(total=settings.probe_timeout_s)
        where = f"attempt {self._attempts}/{settings.max_attempts}"
        while True:
            if self._stop_requested:
                return "stopped while starting"
            if self._exited.is_set():
                return f"llama-server exited with {describe_exit(self._exit_code)} before it was ready ({where})"
            try:
                async with session.get(url, timeout=probe_timeout) as response:
                    if response.status == 200:
                        return None
            except (aiohttp.ClientError, TimeoutError, OSError):
                pass
            if time.monotonic() >= deadline:
                return (
                    f"llama-server did not answer 200 on /health within {settings.startup_timeout_s:g} s ({where}); "
                    "raise startup_timeout_seconds in the profile if the model needs longer to load"
                )
            await asyncio.sleep(settings.health_interval_s)

    async def _stop_locked(self) -> None:
        if self._state in (State.IDLE, State.BACKOFF):
            self._transition(State.STOPPED)
        elif self._state in (State.STARTING, State.READY):
            self._transition(State.STOPPING)
            await self._terminate()
            self._transition(State.STOPPED)

    async def _terminate(self) -> None:
        """SIGTERM, then SIGKILL after the grace period; returns once the process is reaped."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            _signal(process, signal.SIGTERM)
            try:
                async with asyncio.timeout(self._settings.stop_grace_s):  # not wait_for: python/cpython#86296
                    await process.wait()
            except TimeoutError:
                log.warning(
                    "%s: pid %d ignored SIGTERM for %g s; sending SIGKILL",
                    self._log_path.stem,
                    process.pid,
                    self._settings.stop_grace_s,
                    extra=self._fields("llama_server_killed", pid=process.pid),
                )
                self._killed = True
                _signal(process, signal.SIGKILL)
                await process.wait()
        if self._watcher is not None:
            await self._watcher

    async def _watch(self, process: asyncio.subprocess.Process, reader: asyncio.Task[None]) -> None:
        code = await process.wait()
        done, _ = await asyncio.wait({reader}, timeout=_READER_DRAIN_S)
        if not done:  # something else holds the pipe open; the log is complete enough
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        self._exit_code = code
        self._exited.set()
        # No await between this check and the transition: stop() cannot slip in between.
        if process is self._process and self._state is State.READY and not self._stop_requested:
            served = time.monotonic() - (self._ready_monotonic or time.monotonic())
            lines = "\n".join(self.tail(self._settings.message_lines))
            self._failure = (
                f"llama-server exited with {describe_exit(code)} after serving for {served:.0f} s; "
                f"last lines of {self._log_path}:\n{lines}"
            )
            log.warning(
                "%s: %s", self._log_path.stem, self._failure, extra=self._fields("llama_server_exited", exit_code=code)
            )
            self._transition(State.EXITED)

    async def _read(self, fd: int, *, header: str) -> None:
        """The child's output, line by line, to the log file, the tail and the startup parser (see childpipe)."""
        log_file = childlog.ChildLog(self._log_path)
        log_file.write(header)

        def on_line(line: str) -> None:
            log_file.write(line)
            self._tail.append(line)
            self._parser.feed(line)

        try:
            pipe = os.fdopen(fd, "rb", buffering=0)  # the transport owns and closes it
            transport, output = await asyncio.get_running_loop().connect_read_pipe(
                lambda: childpipe.LinePipe(on_line, gather=lambda: self._state is State.READY), pipe
            )
            try:
                await output.closed
            finally:
                transport.close()
        finally:
            await log_file.close()

    def _fields(self, event: str, **fields: object) -> dict[str, object]:
        """A log record's `extra`: the event, and which instance (the log file is named after it)."""
        return {"event": event, "instance_id": self._log_path.stem, "port": self._port, **fields}


def describe_exit(code: int | None) -> str:
    """`code 1` or `signal SIGKILL` for a return code as asyncio reports it."""
    if code is None:
        return "an unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _signal(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")

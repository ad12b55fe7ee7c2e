"""The llama-server supervisor: its state machine, and real child processes (the fake llama-server).

Covers:
- the transition table: every state present, terminal states final, READY reachable only from STARTING,
  an illegal move raises;
- exit descriptions (code vs signal);
- a healthy start: READY with port, pid, parsed startup lines, a log file; stop is SIGTERM and releases the port;
- exit_on_start: three attempts, each on a new port, then FAILED with the exit code and log lines;
- never_healthy: FAILED when the startup budget runs out; hang_health: per-probe timeout keeps the budget;
- a crash after READY: EXITED with the exit code and the last lines;
- a child ignoring SIGTERM gets SIGKILL after the grace period;
- stop while starting: STOPPED, no further attempt; stop is final;
- a binary that cannot run; a port pinned in llama_server_args; LD_LIBRARY_PATH given to the child;
- no orphans: killing the agent's process (SIGKILL, no cleanup) takes its llama-server down with it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from agent_support import environ_of, eventually, fake_binary, pid_alive, stubborn_binary
from llamesh_agent import ports, supervisor
from llamesh_agent.supervisor import State

FAST = supervisor.Settings(startup_timeout_s=30, stop_grace_s=5, retry_delay_s=0.05)


def make(tmp_path: Path, binary: Path, *args: str, settings: supervisor.Settings = FAST) -> supervisor.Supervisor:
    return supervisor.Supervisor(
        binary=binary,
        args=["-m", "tiny.gguf", *args],
        log_path=tmp_path / "logs" / "instance.log",
        port_allocator=ports.PortAllocator(),
        settings=settings,
    )


# --- the table -----------------------------------------------------------------------------------


def test_every_state_has_a_row() -> None:
    assert set(supervisor.TRANSITIONS) == set(State)


def test_terminal_states_are_final() -> None:
    assert {state for state in State if state.is_terminal} == {State.STOPPED, State.EXITED, State.FAILED}


def test_ready_only_after_starting() -> None:
    assert [state for state, targets in supervisor.TRANSITIONS.items() if State.READY in targets] == [State.STARTING]


def test_exited_only_from_ready_and_stopped_only_after_stopping_or_before_a_process() -> None:
    assert [s for s, t in supervisor.TRANSITIONS.items() if State.EXITED in t] == [State.READY]
    assert {s for s, t in supervisor.TRANSITIONS.items() if State.STOPPED in t} == {
        State.IDLE,
        State.BACKOFF,
        State.STOPPING,
    }


async def test_illegal_transition_raises(tmp_path: Path) -> None:
    sup = make(tmp_path, tmp_path / "nothing")
    with pytest.raises(supervisor.IllegalTransition, match="from idle to ready"):
        sup._transition(State.READY)


@pytest.mark.parametrize(("code", "text"), [(1, "code 1"), (0, "code 0"), (-9, "signal SIGKILL"), (None, "unknown")])
def test_describe_exit(code: int | None, text: str) -> None:
    assert text in supervisor.describe_exit(code)


# --- real children -------------------------------------------------------------------------------


async def test_healthy_start_then_stop(tmp_path: Path) -> None:
    allocator = ports.PortAllocator()
    sup = supervisor.Supervisor(
        binary=fake_binary(tmp_path),
        args=["-m", "tiny.gguf", "-np", "3", "-c", "3072"],
        log_path=tmp_path / "logs" / "ok.log",
        port_allocator=allocator,
        settings=FAST,
    )
    assert await sup.start() is State.READY
    assert sup.port in allocator.held and sup.pid is not None and sup.attempts == 1
    async with aiohttp.ClientSession() as session, session.get(f"http://{sup.host}:{sup.port}/health") as response:
        assert response.status == 200
    await eventually(lambda: sup.startup_params.get("n_slots"), what="the slots line")
    assert sup.startup_params == {"n_slots": 3, "n_ctx": 1024}
    pid = sup.pid
    assert await sup.stop() is State.STOPPED
    assert not pid_alive(pid) and not sup.killed
    assert sup.port not in allocator.held
    log_text = (tmp_path / "logs" / "ok.log").read_text()
    assert "attempt 1/3" in log_text and "initializing, n_slots = 3" in log_text


async def test_exit_on_start_retries_on_new_ports_then_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_LLAMA_FAULT", "exit_on_start")
    seen: list[supervisor.Attempt] = []

    async def on_spawn(attempt: supervisor.Attempt) -> None:
        seen.append(attempt)

    sup = supervisor.Supervisor(
        binary=fake_binary(tmp_path),
        args=["-m", "broken.gguf"],
        log_path=tmp_path / "broken.log",
        port_allocator=ports.PortAllocator(),
        settings=FAST,
        on_spawn=on_spawn,
    )
    assert await sup.start() is State.FAILED
    assert [attempt.number for attempt in seen] == [1, 2, 3]
    assert len({attempt.port for attempt in seen}) == 3
    assert sup.failure is not None and "exited with code 1 before it was ready (attempt 3/3)" in sup.failure
    assert any("error loading model" in line for line in sup.tail())
    assert await sup.wait() is State.FAILED


async def test_never_healthy_fails_when_the_budget_runs_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_LLAMA_FAULT", "never_healthy")
    settings = supervisor.Settings(startup_timeout_s=1.5, max_attempts=1, stop_grace_s=5)
    sup = make(tmp_path, fake_binary(tmp_path), settings=settings)
    started = time.monotonic()
    assert await sup.start() is State.FAILED
    assert time.monotonic() - started < 15
    assert sup.failure is not None and "did not answer 200 on /health within 1.5 s" in sup.failure
    assert sup.pid is None


async def test_hanging_health_is_bounded_per_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_LLAMA_FAULT", "hang_health")
    settings = supervisor.Settings(startup_timeout_s=1.5, max_attempts=1, probe_timeout_s=0.3, stop_grace_s=5)
    sup = make(tmp_path, fake_binary(tmp_path), settings=settings)
    started = time.monotonic()
    assert await sup.start() is State.FAILED
    assert time.monotonic() - started < 15


async def test_crash_after_ready_is_exited_with_code_and_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_LLAMA_FAULT", "crash_mid_stream")
    sup = make(tmp_path, fake_binary(tmp_path))
    assert await sup.start() is State.READY
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            body = {"messages": [{"role": "user", "content": "hi"}]}
            async with session.post(f"http://{sup.host}:{sup.port}/v1/chat/completions", json=body) as response:
                await response.read()
    assert await sup.wait() is State.EXITED
    assert sup.exit_code == 1
    assert sup.failure is not None and "exited with code 1 after serving" in sup.failure
    assert "fake crash" in sup.failure
    assert await sup.stop() is State.EXITED  # nothing left to stop, and no restart


async def test_sigterm_ignored_gets_sigkill_after_grace(tmp_path: Path) -> None:
    settings = supervisor.Settings(startup_timeout_s=30, stop_grace_s=0.5)
    sup = make(tmp_path, stubborn_binary(tmp_path), settings=settings)
    assert await sup.start() is State.READY
    pid = sup.pid
    assert pid is not None
    started = time.monotonic()
    assert await sup.stop() is State.STOPPED
    assert sup.killed
    assert 0.4 < time.monotonic() - started < 10
    assert not pid_alive(pid)


async def test_stop_while_starting_is_final(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_LLAMA_STARTUP_DELAY_MS", "20000")
    sup = make(tmp_path, fake_binary(tmp_path))
    starting = asyncio.create_task(sup.start())
    await eventually(lambda: sup.pid, what="a spawned process")
    pid = sup.pid
    assert pid is not None
    assert await sup.stop() is State.STOPPED
    assert await starting is State.STOPPED
    assert sup.attempts == 1 and not pid_alive(pid)
    with pytest.raises(supervisor.SupervisorError):
        await sup.start()


async def test_stop_before_start(tmp_path: Path) -> None:
    sup = make(tmp_path, fake_binary(tmp_path))
    assert await sup.stop() is State.STOPPED
    assert await sup.wait() is State.STOPPED


async def test_binary_that_cannot_run(tmp_path: Path) -> None:
    sup = make(tmp_path, tmp_path / "no-such-llama-server")
    assert await sup.start() is State.FAILED
    assert sup.failure is not None and "cannot run" in sup.failure and "no-such-llama-server" in sup.failure
    assert sup.attempts == 3


async def test_port_pinned_in_args_is_used(tmp_path: Path) -> None:
    pinned = ports.ephemeral_port()
    sup = make(tmp_path, fake_binary(tmp_path), "--port", str(pinned))
    try:
        assert await sup.start() is State.READY
        assert sup.port == pinned
    finally:
        await sup.stop()


async def test_child_gets_ld_library_path(tmp_path: Path) -> None:
    real = tmp_path / "build" / "bin"
    real.mkdir(parents=True)
    target = fake_binary(real)
    link = tmp_path / "llama-server"
    link.symlink_to(target)
    sup = make(tmp_path, link)
    try:
        assert await sup.start() is State.READY
        assert sup.pid is not None
        assert environ_of(sup.pid)["LD_LIBRARY_PATH"].split(":")[0] == str(real)
    finally:
        await sup.stop()


_AGENT_SCRIPT = """
import asyncio, sys
from pathlib import Path
from llamesh_agent import ports, supervisor

async def main():
    sup = supervisor.Supervisor(binary=Path(sys.argv[1]), args=["-m", "x.gguf"], log_path=Path(sys.argv[2]),
                                port_allocator=ports.PortAllocator())
    assert await sup.start() is supervisor.State.READY
    print(sup.pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_children_die_with_a_killed_agent(tmp_path: Path) -> None:
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _AGENT_SCRIPT, str(fake_binary(tmp_path)), str(tmp_path / "orphan.log"),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert agent.stdout is not None
    async with asyncio.timeout(60):
        child_pid = int(await agent.stdout.readline())
    assert pid_alive(child_pid)
    agent.kill()
    await agent.wait()
    await eventually(lambda: not pid_alive(child_pid), within_s=30, what="the orphan to be terminated")

"""Scheduled llama.cpp updates, draining onto a swapped binary, and the automatic rollback of a bad one.

Covered:
- the pure rules: `updates.judge` (roll back at the failure threshold, trusted once too few failures are left
  possible, only the first starts count), `updates.starts_of` (failed spawn attempts, a crash soon after
  ready, a start that lasted or was stopped on request, not yet known), and the planner's version-aware drain
  (Ready instances whose version differs from their node's drain; unknown versions and starting instances do
  not; the replacement binds under max_instances 1 while the old one drains);
- the schedule: the first check comes an interval after start, not at it; a check while a build runs is
  skipped; the agent's probation judges only args that ran on an earlier binary and rolls back once;
- with the real build manager (fake llama.cpp trees built by the real cmake, see test_build_manager.py) and
  the real agent, operator and gateway over the fault-injecting fake llama-server: a no-op check swaps and
  drains nothing; a scheduled check that finds a new revision swaps the binary under a client load with every
  request answered 200, the old instance drained and a new one on the new binary serving; a new revision
  that fails its smoke test is never swapped; one whose instances fail to start is rolled back (binary_path
  points at the previous build again, the node's status says so), requests are served by the previous build
  again, and later checks do not swap the bad revision back in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import openai
import pytest
from aiohttp import test_utils

import gateway_support as gs
import test_build_manager as fake_builds
from llamesh_agent import build, node_agent, sampling, updates
from llamesh_api import config, resources, store
from llamesh_operator import controller, planning
from llamesh_proxy import app as gateway_app
from rig import processes, waiting

NOW = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)
POLICY = updates.Policy()  # the defaults: 3 bad among the first 5 starts, a 2 minute crash window


# --- the pure rules -------------------------------------------------------------------------------

S, F, C = updates.Start.SERVED, updates.Start.FAILED, updates.Start.CRASHED


@pytest.mark.parametrize(
    ("starts", "verdict"),
    [
        ([], updates.Verdict.WATCHING),
        ([F, F], updates.Verdict.WATCHING),
        ([F, C, F], updates.Verdict.ROLL_BACK),
        ([S, F, S, C, F], updates.Verdict.ROLL_BACK),
        ([S, S, F], updates.Verdict.WATCHING),  # 2 failures of the 5 are still possible... and 3 needed
        ([S, S, S], updates.Verdict.TRUSTED),  # at most 2 of the first 5 can fail now
        ([S, S, S, F, F, F, F], updates.Verdict.TRUSTED),  # later failures are not the new binary's first
    ],
)
def test_judge(starts: list[updates.Start], verdict: updates.Verdict) -> None:
    assert updates.judge(starts, POLICY) == verdict


def _instance(
    name: str = "i1",
    *,
    phase: resources.Phase,
    version: str | None = "2-new",
    node_name: str = "n1",
    args_hash: str = "h1",
    ready_s_ago: float | None = None,
    stopped_s_ago: float | None = None,
    attempts: int = 1,
    drain: bool = False,
) -> resources.LlamaInstance:
    def ago(seconds: float | None) -> datetime.datetime | None:
        return None if seconds is None else NOW - datetime.timedelta(seconds=seconds)

    return resources.LlamaInstance(
        metadata=resources.ObjectMeta(name=name, uid=f"uid-{name}"),
        spec=resources.InstanceSpec(
            model="m", profile="default", args_hash=args_hash, node_name=node_name, drain=drain
        ),
        status=resources.InstanceStatus(
            phase=phase,
            llama_cpp_version=version,
            ready_at=ago(ready_s_ago),
            stopped_at=ago(stopped_s_ago),
            spawn_attempts=attempts,
        ),
    )


@pytest.mark.parametrize(
    ("instance", "starts"),
    [
        (_instance(phase=resources.Phase.FAILED, attempts=3, stopped_s_ago=1), [F, F, F]),
        (_instance(phase=resources.Phase.FAILED, attempts=0), []),  # failed before spawning (a download)
        (_instance(phase=resources.Phase.FAILED, attempts=2, ready_s_ago=30, stopped_s_ago=20), [F, C]),
        (_instance(phase=resources.Phase.FAILED, ready_s_ago=900, stopped_s_ago=10), [S]),  # lived its window
        (_instance(phase=resources.Phase.READY, ready_s_ago=121), [S]),
        (_instance(phase=resources.Phase.STOPPED, ready_s_ago=5, stopped_s_ago=1), [S]),  # stopped on request
        (_instance(phase=resources.Phase.READY, ready_s_ago=5), None),  # may still crash
        (_instance(phase=resources.Phase.STARTING), None),
    ],
)
def test_starts_of(instance: resources.LlamaInstance, starts: list[updates.Start] | None) -> None:
    assert updates.starts_of(instance, now=NOW, crash_window=POLICY.crash_window) == starts


def _plan(instances: list[resources.LlamaInstance], *, node_version: str | None) -> list[planning.Action]:
    model = gs.model("m", gs.profile("default", max_instances=1))
    args_hash = model.spec.profiles[0].args_hash()
    for each in instances:
        each.spec.args_hash = args_hash
    node = resources.LlamaNode(
        metadata=resources.ObjectMeta(name="n1"),
        spec=resources.NodeSpec(max_instances=2),
        status=resources.NodeStatus(ready=True, llama_cpp_version=node_version),
    )
    world = planning.World(models=[model], instances=instances, nodes=[node], defaults=config.ModelDefaults())
    return [a for a in planning.plan(world, now=NOW) if not isinstance(a, planning.SetModelStatus)]


def test_planner_drains_instances_of_another_llama_cpp_and_binds_their_replacement() -> None:
    old = _instance("old", phase=resources.Phase.READY, version="1-old", ready_s_ago=5)
    replacement = _instance("new", phase=resources.Phase.PENDING, version=None, node_name="")

    assert _plan([old, replacement], node_version="2-new") == [
        planning.Drain("old", "llama_cpp_updated: llama.cpp 1-old -> 2-new"),
        planning.Bind("new", "n1"),  # max_instances 1: a draining instance does not count
    ]
    old.spec.drain = True
    assert _plan([old, replacement], node_version="2-new") == [planning.Bind("new", "n1")]


@pytest.mark.parametrize(
    ("instance", "node_version"),
    [
        (_instance(phase=resources.Phase.READY, version="2-new", ready_s_ago=5), "2-new"),  # same binary
        (_instance(phase=resources.Phase.READY, version=None, ready_s_ago=5), "2-new"),  # unknown: keep
        (_instance(phase=resources.Phase.READY, version="1-old", ready_s_ago=5), None),  # the node has no binary
        (_instance(phase=resources.Phase.STARTING, version="1-old"), "2-new"),  # drained once Ready
    ],
)
def test_planner_leaves_instances_it_cannot_call_outdated(
    instance: resources.LlamaInstance, node_version: str | None
) -> None:
    assert _plan([instance], node_version=node_version) == []


# --- the schedule and the probation, with stand-ins for the build manager ------------------------


@dataclasses.dataclass
class FakeRollback:
    from_version: str
    to_version: str
    reason: str
    at: datetime.datetime = NOW

    def describe(self) -> str:
        return f"llama.cpp {self.from_version} was rolled back to {self.to_version}: {self.reason}"


@dataclasses.dataclass
class FakeBinary:
    """The build manager as `updates` sees it: builds are counted, rollbacks go back one version."""

    binary_path: Path
    status: gs.BuildStatus = dataclasses.field(default_factory=lambda: gs.BuildStatus(llama_cpp_version="1-old"))
    builds: list[float] = dataclasses.field(default_factory=list)  # loop times when build() was called
    rollbacks: list[str] = dataclasses.field(default_factory=list)

    async def build(self, *, force: bool = False) -> None:
        self.builds.append(asyncio.get_running_loop().time())

    async def roll_back(self, *, reason: str) -> FakeRollback:
        self.rollbacks.append(reason)
        bad, self.status.llama_cpp_version = self.status.llama_cpp_version or "", "1-old"
        return FakeRollback(bad, "1-old", reason)


async def test_the_first_check_comes_an_interval_after_start_and_none_runs_beside_a_build(tmp_path: Path) -> None:
    binary = FakeBinary(tmp_path / "llama-server")
    changes: list[None] = []
    schedule = updates.Updates(binary, interval_s=0.5, on_change=lambda: changes.append(None))
    started = asyncio.get_running_loop().time()
    task = asyncio.create_task(schedule.run())
    try:
        await waiting.eventually(lambda: schedule.checks >= 2, what="two scheduled checks")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert binary.builds[0] - started >= 0.5
    assert binary.builds[1] - binary.builds[0] >= 0.5
    assert changes  # the node is published after each check

    binary.status.is_building = True  # a requested rebuild runs
    await schedule.check()
    assert len(binary.builds) == schedule.checks == 2  # skipped: no second build beside the running one


async def test_scheduling_off_returns_at_once(tmp_path: Path) -> None:
    binary = FakeBinary(tmp_path / "llama-server")
    await asyncio.wait_for(updates.Updates(binary, interval_s=0, on_change=lambda: None).run(), timeout=5)
    assert binary.builds == []


async def test_probation_judges_proven_args_only_and_rolls_back_once(tmp_path: Path) -> None:
    binary = FakeBinary(tmp_path / "llama-server")
    schedule = updates.Updates(binary, interval_s=0, on_change=lambda: None)
    proven = _instance("served-before", phase=resources.Phase.READY, version="1-old", ready_s_ago=60)
    schedule.observe([proven], node_name="n1", now=NOW)

    binary.status.llama_cpp_version = "2-new"  # a swap
    unproven = _instance("new-model", phase=resources.Phase.FAILED, args_hash="h2", attempts=3, stopped_s_ago=1)
    elsewhere = _instance("other-node", phase=resources.Phase.FAILED, node_name="n2", attempts=3)
    schedule.observe([proven, unproven, elsewhere], node_name="n1", now=NOW)
    assert binary.rollbacks == []  # a failing new model or another node's instance does not blame the binary

    failing = _instance("failing", phase=resources.Phase.FAILED, attempts=3, stopped_s_ago=1)
    schedule.observe([proven, unproven, failing], node_name="n1", now=NOW)
    await waiting.eventually(lambda: schedule.last_rollback, what="the rollback")

    assert binary.rollbacks == ["3 of its first 3 starts failed or crashed"]
    assert (
        schedule.last_rollback == "llama.cpp 2-new was rolled back to 1-old: 3 of its first 3 starts failed or crashed"
    )
    schedule.observe([proven, unproven, failing], node_name="n1", now=NOW)
    await asyncio.sleep(0)
    assert len(binary.rollbacks) == 1  # going back is no new binary on probation

    binary.status.llama_cpp_version = "3-newer"
    fine = [_instance(f"ok{n}", phase=resources.Phase.READY, version="3-newer", ready_s_ago=200) for n in range(3)]
    schedule.observe([proven, *fine], node_name="n1", now=NOW)
    failing.status.llama_cpp_version = "3-newer"
    schedule.observe([proven, *fine, failing], node_name="n1", now=NOW)  # trusted already: no longer judged
    await asyncio.sleep(0)
    assert len(binary.rollbacks) == 1


# --- the real build manager, agent, operator and gateway ---------------------------------------

SERVER_SCRIPT = """\
#!/bin/sh
case "$1" in
  --version) echo "version: 0.5.0-dev (build {build}, commit {commit})" >&2; exit 0;;
  --help) echo "  {help_text}"; exit 0;;
esac
{fault}
exec {python} {fake_server} "$@"
"""


def _server_script(build_number: int, *, fault: str = "", help_text: str = "--port PORT   port to listen on") -> str:
    """A "llama-server" build of the fake: answers the smoke test itself and serves with the fake server."""
    return SERVER_SCRIPT.format(
        build=build_number,
        commit=f"{build_number}{build_number}{build_number}abc",
        help_text=help_text,
        fault=f"export FAKE_LLAMA_FAULT={shlex.quote(fault)}" if fault else "",
        python=shlex.quote(sys.executable),
        fake_server=shlex.quote(str(processes.FAKE_LLAMA_SERVER)),
    )


def _version(build_number: int) -> str:
    return f"{build_number}-{build_number}{build_number}{build_number}abc"


def _git(*args: str, cwd: Path) -> None:
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "PATH": "/usr/bin:/bin",
    }
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def _source(root: Path) -> Path:
    """A git work tree CMake "builds" into bin/llama-server (see test_build_manager.py); revision 1."""
    root.mkdir(parents=True)
    (root / "CMakeLists.txt").write_text(fake_builds.CMAKE_LISTS)
    (root / "build.sh").write_text(fake_builds.BUILD_SCRIPT)
    (root / "llama-server.sh").write_text(_server_script(1))
    _git("init", "-q", "-b", "main", cwd=root)
    _git("add", ".", cwd=root)
    _git("commit", "-q", "-m", "revision 1", cwd=root)
    return root


async def _new_revision(source: Path, script: str) -> None:
    """Commit a new llama-server.sh: the next scheduled check finds a new revision to build."""
    (source / "llama-server.sh").write_text(script)
    await asyncio.to_thread(_git, "commit", "-q", "-am", "a new revision", cwd=source)


@dataclasses.dataclass
class Served:
    store: store.MemoryStore
    manager: build.BuildManager
    client: openai.AsyncOpenAI

    async def node(self) -> resources.LlamaNode:
        node = await self.store.get(resources.LlamaNode, gs.NODE)
        assert node is not None
        return node

    async def instances(self) -> list[resources.LlamaInstance]:
        return (await self.store.list(resources.LlamaInstance)).items

    async def ask(self) -> str:
        answer = await self.client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=4
        )
        return answer.choices[0].message.content or ""

    async def checks_pass(self, count: int) -> None:
        """Until `count` more scheduled checks have finished (each ends with a new `last_build_at`)."""
        seen: list[datetime.datetime | None] = [self.manager.status.last_build_at]

        def another() -> bool:
            if self.manager.status.last_build_at != seen[-1]:
                seen.append(self.manager.status.last_build_at)
            return len(seen) > count

        await waiting.eventually(another, what=f"{count} scheduled update checks")


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, source: Path, *, child_env: Mapping[str, str] | None = None) -> AsyncIterator[Served]:
    """The real build manager (checking every second), agent, operator and gateway, serving model `m`."""
    settings = gs.node_config(
        llama_cpp={
            "source": "local",
            "source_path": str(source),
            "cache_dir": str(tmp_path / "cache"),
            "binary_path": str(tmp_path / "bin" / "llama-server"),
            "build_args": [],
            "auto_update_interval_seconds": 1,
        }
    )
    manager = build.BuildManager(settings.llama_cpp, base_dir=tmp_path, progress=lambda message: None)
    await manager.ensure_binary()  # as `llamesh serve` does before it starts the agent
    memory = store.MemoryStore()
    await memory.create(gs.model("m", gs.profile("default", max_instances=1)))
    agent = node_agent.NodeAgent(
        store=memory,
        node_config=settings,
        binary=manager,
        state_dir=tmp_path / "state",
        config_dir=tmp_path,
        node_name=gs.NODE,
        timings=gs.TIMINGS,
        sampler=sampling.Sampler(None),
        models_cache_dir=tmp_path / "hf",
        child_env=child_env,
    )
    operator = controller.Controller(resource_store=memory, defaults=lambda: settings.model_defaults)
    tasks = [asyncio.create_task(agent.run()), asyncio.create_task(operator.run())]
    application = gateway_app.create_app(settings, store=memory, gateway_id=gs.GATEWAY_ID, node_name=gs.NODE)
    client = test_utils.TestClient(test_utils.TestServer(application, host="127.0.0.1"))
    try:
        await client.start_server()
        base_url = str(client.server.make_url("/v1"))
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as sdk:
            yield Served(memory, manager, sdk)
    finally:
        await client.close()
        await agent.shutdown()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _serving_instance(instances: list[resources.LlamaInstance], version: str) -> resources.LlamaInstance | None:
    """A Ready instance on `version` that the gateway has sent a request."""
    return next(
        (
            each
            for each in instances
            if each.status.phase is resources.Phase.READY
            and each.status.llama_cpp_version == version
            and each.status.last_request_at is not None
        ),
        None,
    )


async def test_a_scheduled_update_swaps_the_binary_under_load_without_a_failed_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llamesh_agent")
    source = _source(tmp_path / "llama.cpp")
    # Each answer takes a while, so that the drain finds requests in flight.
    async with serving(tmp_path, source, child_env={"FAKE_LLAMA_TOKEN_DELAY_MS": "50"}) as served:
        assert await served.ask()
        (first,) = await served.instances()
        assert first.status.llama_cpp_version == _version(1)
        first_build = served.manager.binary_path.resolve()

        await served.checks_pass(2)  # same revision: nothing swapped, nothing drained
        (still,) = await served.instances()
        assert (still.metadata.uid, still.spec.drain) == (first.metadata.uid, False)

        answers: list[str] = []
        failures: list[BaseException] = []
        stop = asyncio.Event()

        async def client_loop() -> None:
            while not stop.is_set():
                try:
                    answers.append(await served.ask())
                except Exception as exc:  # every failure is a test failure, reported below
                    failures.append(exc)

        workers = [asyncio.create_task(client_loop()) for _ in range(3)]
        try:
            await waiting.eventually(lambda: len(answers) >= 3, what="answers before the update")
            await _new_revision(source, _server_script(2))
            await waiting.eventually(
                lambda: served.manager.status.llama_cpp_version == _version(2), what="the scheduled update to swap"
            )
            before_swap_done = len(answers)
            new = await waiting.eventually(
                lambda: _newest_serving(served, _version(2)),
                within_s=60,
                what="a new instance on the new binary to serve",
            )
            await waiting.eventually(
                lambda: _gone(served, first.name), within_s=60, what="the old instance to drain and stop"
            )
            await waiting.eventually(lambda: len(answers) >= before_swap_done + 3, what="answers after the update")
        finally:
            stop.set()
            await asyncio.gather(*workers)

    assert failures == []
    assert all(answers)
    assert new.status.llama_cpp_version == _version(2)
    assert served.manager.binary_path.resolve() != first_build
    stopped = [r for r in caplog.records if getattr(r, "event", None) == "instance_terminate"]
    assert any(getattr(r, "instance_id", None) == first.name and r.reason == "llama_cpp_updated" for r in stopped)  # type: ignore[attr-defined]


async def _newest_serving(served: Served, version: str) -> resources.LlamaInstance | None:
    return _serving_instance(await served.instances(), version)


async def _gone(served: Served, name: str) -> bool:
    return await served.store.get(resources.LlamaInstance, name) is None


async def test_a_new_revision_failing_its_smoke_test_is_never_swapped_in(tmp_path: Path) -> None:
    source = _source(tmp_path / "llama.cpp")
    async with serving(tmp_path, source) as served:
        assert await served.ask()
        live = served.manager.binary_path.resolve()

        await _new_revision(source, _server_script(2, help_text="--listen ADDR"))
        await waiting.eventually(
            lambda: "does not mention --port" in (served.manager.status.last_build_error or ""),
            what="the scheduled check to fail the smoke test",
        )
        node = await waiting.eventually(lambda: _node_with_error(served), what="the node to publish the build error")

        assert served.manager.binary_path.resolve() == live
        assert node.status.llama_cpp_version == _version(1)
        (instance,) = await served.instances()
        assert not instance.spec.drain
        assert await served.ask()


async def _node_with_error(served: Served) -> resources.LlamaNode | None:
    node = await served.node()
    return node if node.status.last_build_error else None


async def test_a_new_binary_whose_instances_fail_is_rolled_back(tmp_path: Path) -> None:
    source = _source(tmp_path / "llama.cpp")
    async with serving(tmp_path, source) as served:
        assert await served.ask()  # the model's args now ran on revision 1: a failure later blames the binary
        good_build = served.manager.binary_path.resolve()

        await _new_revision(source, _server_script(2, fault="exit_on_start"))
        await waiting.eventually(
            lambda: served.manager.status.llama_cpp_version == _version(2), what="the scheduled update to swap"
        )

        async def answered() -> bool:
            try:
                return bool(await served.ask())
            except openai.APIError:
                return False  # the bad binary's instances fail to start until the rollback

        async def rolled_back() -> bool:
            # the planner drains revision 1's instance only once the node publishes revision 2, so a request
            # may still be answered by it before the rollback: keep asking until the rollback is recorded
            await answered()
            return served.manager.status.llama_cpp_version == _version(1)

        await waiting.eventually(rolled_back, within_s=120, what="the bad build to be rolled back")
        await waiting.eventually(answered, within_s=120, what="a request answered after the rollback")

        node = await served.node()
        assert served.manager.binary_path.resolve() == good_build
        assert node.status.llama_cpp_version == _version(1)
        assert node.status.last_rollback is not None and node.status.last_rollback_at is not None
        assert f"llama.cpp {_version(2)} was rolled back to {_version(1)}" in node.status.last_rollback

        async def served_by_the_previous_build() -> resources.LlamaInstance | None:
            assert await served.ask()
            return _serving_instance(await served.instances(), _version(1))

        await waiting.eventually(
            served_by_the_previous_build, interval_s=0.5, what="an instance on the previous build to serve"
        )

        await served.checks_pass(2)  # the schedule does not swap the rolled-back revision in again
        assert served.manager.binary_path.resolve() == good_build
        assert served.manager.status.llama_cpp_version == _version(1)
        assert await served.ask()

"""The node agent end to end: a MemoryStore, a NodeAgent, and the fake llama-server as real child processes.

Covers:
- publishing the LlamaNode (capacity from config, ready with a binary, not ready without one);
- a scheduled instance going Starting → Ready with host, port, pid, slots and parsed params, learned data
  in the node's status and its metrics file, and peak memory sampled;
- exit_on_start: three spawn attempts, then Failed with the exit code and the log's last lines;
- never_healthy: Failed when the startup budget runs out;
- a crash after Ready: Failed with the exit code;
- drain: Draining at once, the process stops only when in_flight is 0 and the settle time has passed;
- a deleted instance's process is stopped; a child ignoring SIGTERM is killed after the grace period;
- a scheduled instance marked to drain is Stopped without starting; a missing profile or arguments that
  make no command line are Failed; an instance left in a running phase by an earlier agent is Failed as lost;
  instances bound to other nodes are left alone;
- shutdown: every child stopped, instances Stopped, the node draining;
- rebuild requests run the build once and are counted; a failed one is shown and not retried;
- GPU telemetry through a fake NVML; a Hugging Face profile downloaded and started with `-m <cached file>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent_support import (
    REPO,
    FakeHub,
    cmdline_of,
    eventually,
    fake_binary,
    pid_alive,
    serve_hub,
    stubborn_binary,
)
from llamesh_agent import instance_runner, node_agent, sampling, supervisor
from llamesh_api import config, cookbook, resources, store, writes
from rig import tiny_models

NODE = "node-a"
Phase = resources.Phase

FAST = node_agent.Timings(
    reconcile_interval_s=0.2,
    heartbeat_interval_s=0.5,
    sample_interval_s=0.5,
    drain_settle_s=1.0,
    runner=instance_runner.RunnerSettings(
        process=supervisor.Settings(stop_grace_s=5, retry_delay_s=0.05), download_progress_interval_s=0.2
    ),
)


@dataclasses.dataclass
class FakeBuildStatus:
    is_building: bool = False
    last_build_error: str | None = None
    last_build_at: datetime.datetime | None = None
    llama_cpp_version: str | None = "1-fake"


class FakeBinary:
    """The build manager as the agent sees it; `build()` waits for `release` while it "builds"."""

    def __init__(self, path: Path) -> None:
        self.binary_path = path
        self.status = FakeBuildStatus()
        self.builds = 0
        self.release = asyncio.Event()
        self.release.set()
        self.fail_with: Exception | None = None

    async def build(self, *, force: bool = False) -> None:
        self.builds += 1
        self.status.is_building = True
        try:
            await self.release.wait()
            if self.fail_with is not None:
                raise self.fail_with
        finally:
            self.status.is_building = False
            self.status.last_build_at = store.utcnow()


@dataclasses.dataclass
class FakeProcess:
    pid: int
    usedGpuMemory: int | None


@dataclasses.dataclass
class FakeMemory:
    total: int
    used: int


class FakeNvml:
    """One 80 GiB GPU with 10 GiB in use; `vram` maps pids to the bytes they hold."""

    def __init__(self) -> None:
        self.vram: dict[int, int] = {}

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
        return ("gpu", index)

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> FakeMemory:
        return FakeMemory(total=80 * 1024**3, used=10 * 1024**3)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> list[FakeProcess]:
        return [FakeProcess(pid, used) for pid, used in self.vram.items()]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: object) -> list[FakeProcess]:
        return []

    def nvmlShutdown(self) -> None:
        pass


@dataclasses.dataclass
class Harness:
    store: store.MemoryStore
    agent: node_agent.NodeAgent
    binary: FakeBinary
    tmp_path: Path

    async def add_model(self, name: str = "tiny", **profile: Any) -> cookbook.Profile:
        fields: dict[str, Any] = {"id": "default", "model_path": "tiny.gguf", "startup_timeout_seconds": 60}
        fields.update(profile)
        spec = cookbook.ModelSpec(profiles=[cookbook.Profile(**fields)])
        await self.store.create(resources.LlamaModel(metadata=resources.ObjectMeta(name=name), spec=spec))
        return spec.profiles[0]

    async def schedule(
        self, name: str, *, model: str = "tiny", profile: str = "default", phase: Phase = Phase.SCHEDULED, **spec: Any
    ) -> None:
        """What the gateway and the operator do: an instance bound to this node.

        Another `phase` is what an earlier agent left in status: written before the binding, so this agent
        never sees the instance as merely Scheduled."""
        found = await self.store.get(resources.LlamaModel, model)
        chosen = found.spec.profile(profile) if found else None
        later = phase not in (Phase.PENDING, Phase.SCHEDULED)
        instance = resources.LlamaInstance(
            metadata=resources.ObjectMeta(name=name),
            spec=resources.InstanceSpec(
                model=model,
                profile=profile,
                args_hash=chosen.args_hash() if chosen else "none",
                node_name=None if later else NODE,
                **spec,
            ),
        )
        await self.store.create(instance)
        if later:
            await self.store.patch_status(resources.LlamaInstance, name, {"phase": phase.value})
            await self.store.patch(resources.LlamaInstance, name, {"spec": {"nodeName": NODE}})

    async def instance(self, name: str) -> resources.LlamaInstance:
        found = await self.store.get(resources.LlamaInstance, name)
        assert found is not None, f"instance {name} is gone"
        return found

    async def wait_phase(self, name: str, phase: Phase, *, within_s: float = 60) -> resources.LlamaInstance:
        async def reached() -> resources.LlamaInstance | None:
            found = await self.store.get(resources.LlamaInstance, name)
            return found if found is not None and found.status.phase is phase else None

        try:
            return await eventually(reached, within_s=within_s, what=f"{name} to be {phase.value}")
        except AssertionError:
            current = await self.store.get(resources.LlamaInstance, name)
            raise AssertionError(f"{name} never became {phase.value}; now: {current!r}") from None

    async def node(self) -> resources.LlamaNode:
        found = await self.store.get(resources.LlamaNode, NODE)
        assert found is not None
        return found

    async def update(self, name: str, mutate: Callable[[resources.LlamaInstance], None]) -> None:
        """Play the operator and the gateways: `mutate` may touch spec and status; each half goes in its own write."""
        await writes.update(self.store, resources.LlamaInstance, name, mutate)
        await writes.update_status(self.store, resources.LlamaInstance, name, mutate)


@contextlib.asynccontextmanager
async def running_agent(
    tmp_path: Path,
    *,
    binary_path: Path | None = None,
    timings: node_agent.Timings = FAST,
    nvml: sampling.Nvml | None = None,
    node_config: config.NodeConfig | None = None,
    resource_store: store.MemoryStore | None = None,
) -> AsyncIterator[Harness]:
    resource_store = resource_store or store.MemoryStore()
    binary = FakeBinary(binary_path or fake_binary(tmp_path))
    settings = node_config or config.NodeConfig(node_id=NODE, max_sysmem_mb=4096, max_instances_per_node=7)
    agent = node_agent.NodeAgent(
        store=resource_store,
        node_config=settings,
        binary=binary,
        state_dir=tmp_path / "state",
        config_dir=tmp_path,
        timings=timings,
        sampler=sampling.Sampler(nvml),
        models_cache_dir=tmp_path / "hf",
    )
    task = asyncio.create_task(agent.run())
    harness = Harness(resource_store, agent, binary, tmp_path)
    try:
        await eventually(lambda: resource_store.get(resources.LlamaNode, NODE), what="the node to be published")
        yield harness
    finally:
        await agent.shutdown()
        await task


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_agent(tmp_path) as running:
        yield running


async def passes(agent: node_agent.NodeAgent, count: int = 3) -> None:
    """Until the agent has run `count` more reconcile passes: whatever it would do, it has had the chance."""
    wanted = agent.reconcile_passes + count
    await eventually(lambda: agent.reconcile_passes >= wanted, what=f"{count} more reconcile passes")


def set_in_flight(count: int) -> Callable[[resources.LlamaInstance], None]:
    def mutate(instance: resources.LlamaInstance) -> None:
        instance.status.usage["gateway-1"] = resources.GatewayUsage(in_flight=count, last_request_at=store.utcnow())

    return mutate


def drain(reason: str) -> Callable[[resources.LlamaInstance], None]:
    def mutate(instance: resources.LlamaInstance) -> None:
        instance.spec.drain, instance.spec.drain_reason = True, reason

    return mutate


# --- the node ------------------------------------------------------------------------------------


async def test_node_is_published_with_capacity(harness: Harness) -> None:
    node = await harness.node()
    assert node.spec.max_sysmem_mb == 4096 and node.spec.max_instances == 7 and node.spec.address == "127.0.0.1"
    assert node.status.ready and not node.status.draining
    assert node.status.binary_path == str(harness.binary.binary_path)
    assert node.status.llama_cpp_version == "1-fake"
    assert node.status.gpu_telemetry_available is False and node.status.device_vram_total_mb == 0
    first = node.status.heartbeat_at
    assert first is not None
    await eventually(lambda: _heartbeat_after(harness, first), what="a second heartbeat")


async def _heartbeat_after(harness: Harness, moment: datetime.datetime) -> bool:
    beat = (await harness.node()).status.heartbeat_at
    return beat is not None and beat > moment


async def test_without_a_binary_the_node_is_not_ready_and_instances_fail(tmp_path: Path) -> None:
    async with running_agent(tmp_path, binary_path=tmp_path / "missing" / "llama-server") as h:
        node = await h.node()
        assert not node.status.ready and node.status.binary_path is None
        await h.add_model()
        await h.schedule("nobin")
        failed = await h.wait_phase("nobin", Phase.FAILED)
        assert "no llama-server binary" in failed.status.message


# --- starting ------------------------------------------------------------------------------------


async def test_scheduled_instance_becomes_ready_and_is_learned(harness: Harness) -> None:
    profile = await harness.add_model(llama_server_args="-np 2 -c 4096")
    await harness.schedule("tiny-1")
    ready = await harness.wait_phase("tiny-1", Phase.READY)
    status = ready.status
    assert status.host == "127.0.0.1" and status.port and status.pid and pid_alive(status.pid)
    assert status.ready_at is not None and status.started_at is not None and status.spawn_attempts == 1
    assert status.llama_cpp_version == "1-fake"
    await eventually(lambda: _params_of(harness, "tiny-1"), what="parsed params from /props and /v1/models")
    status = (await harness.instance("tiny-1")).status
    assert status.n_slots == 2
    assert status.parsed_model_params is not None
    assert {k: status.parsed_model_params[k] for k in ("n_slots", "n_ctx", "n_ctx_train")} == {
        "n_slots": 2,
        "n_ctx": 2048,
        "n_ctx_train": 2048,
    }
    async with aiohttp.ClientSession() as session, session.get(f"http://{status.host}:{status.port}/health") as reply:
        assert reply.status == 200

    args_hash = profile.args_hash()
    node = await eventually(lambda: _node_learned(harness, args_hash), what="learned data on the node")
    learned = node.status.learned[args_hash]
    assert learned.parsed_model_params is not None and learned.parsed_model_params["n_slots"] == 2
    assert learned.peak_sysmem_mb is not None and learned.peak_sysmem_mb > 0
    assert node.status.active_instances == 1 and node.status.llamesh_sysmem_mb > 0
    peaks = await harness.instance("tiny-1")
    assert peaks.status.peak_sysmem_mb is not None and peaks.status.peak_sysmem_mb > 0

    document = json.loads(harness.agent.learned_path.read_text())
    assert document["node_id"] == NODE and document["llama_cpp_version"] == "1-fake"
    entry = document["hashes"][args_hash]
    assert entry["display_names"] == ["tiny"]
    assert entry["parsed_model_params"]["llama_cpp_version"] == "1-fake"
    assert entry["parsed_model_params"]["params"]["n_ctx_train"] == 2048
    log_path = harness.tmp_path / "state" / "logs" / "tiny-1.log"
    # the child log is written by its own thread, a few milliseconds behind what the agent parsed
    await eventually(lambda: "initializing, n_slots = 2" in log_path.read_text(), what="the line in the child log")


async def _params_of(harness: Harness, name: str) -> bool:
    params = (await harness.instance(name)).status.parsed_model_params or {}
    return "n_ctx_train" in params


async def _node_learned(harness: Harness, args_hash: str) -> resources.LlamaNode | None:
    node = await harness.node()
    learned = node.status.learned.get(args_hash)
    ok = learned is not None and learned.parsed_model_params is not None and learned.peak_sysmem_mb
    return node if ok else None


async def test_exit_on_start_fails_after_three_attempts(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_LLAMA_FAULT", "exit_on_start")
    await harness.add_model()
    await harness.schedule("broken")
    failed = await harness.wait_phase("broken", Phase.FAILED)
    assert failed.status.spawn_attempts == 3
    assert "failed to start after 3 attempt(s)" in failed.status.message
    assert "exited with code 1" in failed.status.message
    assert "error loading model" in failed.status.message  # the log's last lines
    assert failed.status.stopped_at is not None and failed.status.pid is None
    assert harness.agent.runner("broken") is None


async def test_never_healthy_fails_when_the_budget_runs_out(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_LLAMA_FAULT", "never_healthy")
    await harness.add_model(startup_timeout_seconds=1)
    await harness.schedule("slow")
    failed = await harness.wait_phase("slow", Phase.FAILED)
    assert "did not answer 200 on /health within 1 s" in failed.status.message
    assert failed.status.spawn_attempts == 3


async def test_crash_after_ready_is_failed_with_the_exit_code(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LLAMA_FAULT", "crash_mid_stream")
    await harness.add_model()
    await harness.schedule("crashy")
    ready = await harness.wait_phase("crashy", Phase.READY)
    async with aiohttp.ClientSession() as session:
        with contextlib.suppress(aiohttp.ClientError):
            url = f"http://{ready.status.host}:{ready.status.port}/v1/chat/completions"
            async with session.post(url, json={"messages": [{"role": "user", "content": "hi"}]}) as response:
                await response.read()
    failed = await harness.wait_phase("crashy", Phase.FAILED)
    assert "exited with code 1 after serving" in failed.status.message
    assert "fake crash" in failed.status.message
    await eventually(lambda: harness.agent.runner("crashy") is None, what="the runner to end")
    await passes(harness.agent)
    assert (await harness.instance("crashy")).status.phase is Phase.FAILED  # and not restarted


# --- stopping ------------------------------------------------------------------------------------


async def test_drain_waits_for_in_flight_then_stops(harness: Harness) -> None:
    await harness.add_model()
    await harness.schedule("busy")
    ready = await harness.wait_phase("busy", Phase.READY)
    pid = ready.status.pid
    assert pid is not None
    await harness.update("busy", set_in_flight(1))
    await harness.update("busy", drain("idle"))
    draining = await harness.wait_phase("busy", Phase.DRAINING)
    assert draining.status.message == "draining (idle)"
    runner = harness.agent.runner("busy")
    assert runner is not None and runner.drain_noted_at is not None
    settled_at = runner.drain_noted_at + FAST.drain_settle_s  # the agent's clock: time.monotonic()
    await eventually(lambda: time.monotonic() > settled_at, what="the drain's settle time to pass")
    await passes(harness.agent, 2)  # passes past the settle time: with nothing in flight it would have stopped
    assert pid_alive(pid) and (await harness.instance("busy")).status.phase is Phase.DRAINING
    await harness.update("busy", set_in_flight(0))
    stopped = await harness.wait_phase("busy", Phase.STOPPED)
    assert stopped.status.message == "drained (idle)" and stopped.status.stopped_at is not None
    await eventually(lambda: not pid_alive(pid), what="the process to be gone")


async def test_drain_of_an_idle_instance_waits_the_settle_time(harness: Harness) -> None:
    await harness.add_model()
    await harness.schedule("idle")
    await harness.wait_phase("idle", Phase.READY)
    await harness.update("idle", drain("idle"))
    await harness.wait_phase("idle", Phase.DRAINING)
    noted = asyncio.get_running_loop().time()
    await harness.wait_phase("idle", Phase.STOPPED)
    assert asyncio.get_running_loop().time() - noted >= FAST.drain_settle_s * 0.8


async def test_deleting_the_instance_stops_its_process(harness: Harness) -> None:
    await harness.add_model()
    await harness.schedule("doomed")
    ready = await harness.wait_phase("doomed", Phase.READY)
    pid = ready.status.pid
    assert pid is not None
    await harness.store.delete(resources.LlamaInstance, "doomed")
    await eventually(lambda: not pid_alive(pid), what="the process to be stopped")
    await eventually(lambda: harness.agent.runner("doomed") is None, what="the runner to end")
    assert await harness.store.get(resources.LlamaInstance, "doomed") is None  # no status written back


async def test_child_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    grace = dataclasses.replace(FAST.runner.process, stop_grace_s=0.5)
    timings = dataclasses.replace(FAST, runner=dataclasses.replace(FAST.runner, process=grace))
    async with running_agent(tmp_path, binary_path=stubborn_binary(tmp_path), timings=timings) as h:
        await h.add_model()
        await h.schedule("stubborn")
        ready = await h.wait_phase("stubborn", Phase.READY)
        pid = ready.status.pid
        assert pid is not None
        await h.update("stubborn", drain("test"))
        await h.wait_phase("stubborn", Phase.STOPPED)
        assert not pid_alive(pid)
        assert "ignoring SIGTERM" in (tmp_path / "state" / "logs" / "stubborn.log").read_text()


async def test_shutdown_stops_every_child(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as h:
        await h.add_model()
        await h.schedule("one")
        await h.schedule("two")
        pids = [(await h.wait_phase(name, Phase.READY)).status.pid for name in ("one", "two")]
        await h.agent.shutdown()
        for name in ("one", "two"):
            stopped = await h.instance(name)
            assert stopped.status.phase is Phase.STOPPED and stopped.status.message == "the node is shutting down"
        assert all(pid is not None and not pid_alive(pid) for pid in pids)
        node = await h.node()
        assert node.status.draining and not node.status.ready and node.status.active_instances == 0


# --- no process ----------------------------------------------------------------------------------


async def test_scheduled_and_drained_is_stopped_without_starting(harness: Harness) -> None:
    await harness.add_model()
    await harness.schedule("never", drain=True, drain_reason="profile_changed")
    stopped = await harness.wait_phase("never", Phase.STOPPED)
    assert "drained before it started" in stopped.status.message
    assert stopped.status.pid is None and not (harness.tmp_path / "state" / "logs" / "never.log").exists()


async def test_missing_profile_fails(harness: Harness) -> None:
    await harness.add_model()
    await harness.schedule("orphan", profile="nope")
    failed = await harness.wait_phase("orphan", Phase.FAILED)
    assert "no profile 'nope'" in failed.status.message


class ModelsListedLate(store.MemoryStore):
    """A store whose first list of LlamaModel waits for `release`: the agent's instance watch comes first."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.models_asked = asyncio.Event()

    async def list(self, kind: type[store.R]) -> store.Listing[store.R]:
        if kind is resources.LlamaModel:
            self.models_asked.set()
            await self.release.wait()
        return await super().list(kind)


async def test_an_instance_listed_before_its_model_is_started_once_the_model_is(tmp_path: Path) -> None:
    # `llamesh serve` at start-up: the gateway created an instance of a cookbook model before the agent's
    # model watch listed; the instance must wait for the list, not fail for a profile it "does not have"
    late = ModelsListedLate()
    async with running_agent(tmp_path, resource_store=late) as harness:
        await harness.add_model()
        await harness.schedule("early")
        await eventually(late.models_asked.is_set, what="the agent to list the models")
        await eventually(lambda: harness.agent.reconcile_passes >= 3, what="reconcile passes before the list")
        assert (await harness.instance("early")).status.phase is Phase.PENDING  # not Failed
        late.release.set()
        await harness.wait_phase("early", Phase.READY)


class ModelWatchStalled(store.MemoryStore):
    """A store whose LlamaModel watches deliver nothing while `stalled` is set: as after an API server restart,
    when the instance watch has resumed and the model watch has not yet listed again."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = asyncio.Event()

    async def watch(
        self, kind: type[store.R], *, resource_version: str | None = None
    ) -> AsyncIterator[store.Event[store.R]]:
        async for event in super().watch(kind, resource_version=resource_version):
            if kind is resources.LlamaModel and self.stalled.is_set():
                continue
            yield event


async def test_an_instance_whose_model_the_stale_cache_lacks_is_started_from_a_live_read(tmp_path: Path) -> None:
    # the model exists in the store, but the agent's model watch has not delivered it: a live read decides,
    # so the instance is started rather than failed for "no profile" (an API-server-restart race seen in CI)
    stalled = ModelWatchStalled()
    async with running_agent(tmp_path, resource_store=stalled) as harness:
        await passes(harness.agent)
        stalled.stalled.set()
        await harness.add_model("late")
        await harness.schedule("late-one", model="late")
        await harness.wait_phase("late-one", Phase.READY)
        assert "late" not in harness.agent._models  # it was the live read, not the watch, that found it
        # a model the store does not have either is still failed, with the same message
        await harness.schedule("orphan", model="gone")
        failed = await harness.wait_phase("orphan", Phase.FAILED)
        assert "no profile 'default' of model 'gone'" in failed.status.message


async def test_arguments_that_make_no_command_line_fail(harness: Harness) -> None:
    await harness.add_model(llama_server_args="--port http")
    await harness.schedule("badargs")
    failed = await harness.wait_phase("badargs", Phase.FAILED)
    assert "cannot build the llama-server command line" in failed.status.message


async def test_instance_left_running_by_an_earlier_agent_is_lost(harness: Harness) -> None:
    await harness.add_model()
    await harness.schedule("ghost", phase=Phase.READY)
    failed = await harness.wait_phase("ghost", Phase.FAILED)
    assert "agent restarted" in failed.status.message


async def test_instances_of_other_nodes_are_left_alone(harness: Harness) -> None:
    await harness.add_model()
    other = resources.LlamaInstance(
        metadata=resources.ObjectMeta(name="elsewhere"),
        spec=resources.InstanceSpec(model="tiny", profile="default", args_hash="x", node_name="node-b"),
    )
    await harness.store.create(other)
    await passes(harness.agent)
    assert (await harness.instance("elsewhere")).phase is Phase.SCHEDULED
    assert harness.agent.runner("elsewhere") is None


# --- builds, GPUs, downloads ---------------------------------------------------------------------


async def test_rebuild_request_runs_the_build_once(harness: Harness) -> None:
    harness.binary.release.clear()

    def ask(node: resources.LlamaNode) -> None:
        node.spec.rebuild_requests += 1

    await writes.update(harness.store, resources.LlamaNode, NODE, ask)
    await eventually(lambda: harness.binary.builds == 1, what="the build to start")
    building = await eventually(_is_building(harness), what="is_building to be published")
    assert building.status.rebuilds_handled == 0
    harness.binary.release.set()
    await eventually(_handled(harness, 1), what="the request to be counted")
    node = await harness.node()
    assert not node.status.is_building and node.status.last_build_at is not None
    await passes(harness.agent)
    assert harness.binary.builds == 1


async def test_failed_rebuild_is_shown_counted_and_not_retried(harness: Harness) -> None:
    harness.binary.fail_with = RuntimeError("cmake exploded")

    def ask(node: resources.LlamaNode) -> None:
        node.spec.rebuild_requests += 1

    await writes.update(harness.store, resources.LlamaNode, NODE, ask)
    await eventually(_handled(harness, 1), what="the failed request to be counted")
    node = await harness.node()
    assert node.status.last_build_error == "rebuild failed: cmake exploded" and not node.status.is_building
    await passes(harness.agent)
    assert harness.binary.builds == 1


def _is_building(harness: Harness) -> Callable[[], Any]:
    async def check() -> resources.LlamaNode | None:
        node = await harness.node()
        return node if node.status.is_building else None

    return check


def _handled(harness: Harness, count: int) -> Callable[[], Any]:
    async def check() -> bool:
        return (await harness.node()).status.rebuilds_handled == count

    return check


async def test_gpu_telemetry_from_nvml(tmp_path: Path) -> None:
    nvml = FakeNvml()
    async with running_agent(tmp_path, nvml=nvml) as h:
        profile = await h.add_model()
        await h.schedule("gpu")
        ready = await h.wait_phase("gpu", Phase.READY)
        assert ready.status.pid is not None
        nvml.vram[ready.status.pid] = 512 * 1024**2

        async def vram_seen() -> resources.LlamaNode | None:
            node = await h.node()
            return node if node.status.llamesh_vram_mb == 512 else None

        node = await eventually(vram_seen, what="the instance's VRAM on the node")
        assert node.status.gpu_telemetry_available
        assert node.status.device_vram_total_mb == 80 * 1024 and node.status.device_vram_used_mb == 10 * 1024
        learned = node.status.learned[profile.args_hash()]
        assert learned.peak_vram_mb == 512
        assert (await h.instance("gpu")).status.peak_vram_mb == 512


async def test_hugging_face_profile_is_downloaded_then_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_models.write_chat_model(tmp_path / "chat.gguf").read_bytes()
    async with serve_hub(FakeHub({"tiny-chat-Q4_K_M.gguf": model}), monkeypatch), running_agent(tmp_path) as h:
        phases: list[Phase] = []
        recorder = asyncio.create_task(_record_phases(h, "hf", phases))
        await h.add_model(model_path=None, hf_repo=REPO, hf_file="tiny-chat-Q4_K_M.gguf", download_timeout_seconds=120)
        await h.schedule("hf")
        ready = await h.wait_phase("hf", Phase.READY)
        recorder.cancel()
        await asyncio.gather(recorder, return_exceptions=True)
        assert phases[: phases.index(Phase.READY) + 1] == [
            Phase.SCHEDULED,
            Phase.DOWNLOADING,
            Phase.STARTING,
            Phase.READY,
        ]
        assert ready.status.pid is not None
        argv = cmdline_of(ready.status.pid)
        model_file = Path(argv[argv.index("-m") + 1])
        assert model_file.is_relative_to(tmp_path / "hf")
        assert await asyncio.to_thread(model_file.read_bytes) == model
        assert "-hfr" not in argv and "-hff" not in argv


async def _record_phases(h: Harness, name: str, phases: list[Phase]) -> None:
    async for event in h.store.watch(resources.LlamaInstance):
        if event.object.name == name and (not phases or phases[-1] is not event.object.phase):
            phases.append(event.object.phase)

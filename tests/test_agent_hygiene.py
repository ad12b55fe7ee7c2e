"""The node agent's event-loop hygiene, and the production log of `llamesh serve`.

Covers:
- child (llama-server) output reaches the instance's log file in order, written by `childlog`'s thread and
  never by the event loop's; a log file that cannot be opened is reported and does not stop the child;
- the finished-uids set stays bounded: a uid is kept while the store lists its instance and forgotten once
  the instance is deleted;
- the `_apply` race: an action planned for a runner that ended before the action came (a store write of an
  earlier action awaited meanwhile) is skipped, and the rest of the pass is still carried out;
- end to end with the real llama-server: every line `llamesh serve` writes is one JSON object with a real
  `event` (never "log", never JSON inside `message`), and the seed's instance_spawn and request line are
  there with their fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

import openai
import pytest
import yaml

from agent_support import eventually, fake_binary
from llamesh_agent import build, childlog, instance_runner, node_agent, plan, ports, sampling, supervisor
from llamesh_api import config, cookbook, resources, store, writes
from rig import processes

NODE = "node-h"
Phase = resources.Phase

FAST = node_agent.Timings(
    reconcile_interval_s=0.2,
    heartbeat_interval_s=0.5,
    sample_interval_s=0.5,
    drain_settle_s=0.5,
    runner=instance_runner.RunnerSettings(process=supervisor.Settings(stop_grace_s=5, retry_delay_s=0.05)),
)


class RecordingFile:
    """A log file that notes which thread made each call on it."""

    def __init__(self, file: TextIO, threads: list[str]) -> None:
        self._file = file
        self._threads = threads

    def write(self, text: str) -> int:
        self._threads.append(threading.current_thread().name)
        return self._file.write(text)

    def flush(self) -> None:
        self._threads.append(threading.current_thread().name)
        self._file.flush()

    def close(self) -> None:
        self._threads.append(threading.current_thread().name)
        self._file.close()


# --- child logs ------------------------------------------------------------------------------------


async def test_child_output_is_written_by_the_log_thread_not_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    real_open = childlog.open_log
    monkeypatch.setattr(childlog, "open_log", lambda path: RecordingFile(real_open(path), threads))
    log_path = tmp_path / "logs" / "tiny-1.log"
    sup = supervisor.Supervisor(
        binary=fake_binary(tmp_path),
        args=["-m", "tiny.gguf", "-np", "2"],
        log_path=log_path,
        port_allocator=ports.PortAllocator(),
        settings=supervisor.Settings(startup_timeout_s=30, stop_grace_s=5),
    )
    assert await sup.start() is supervisor.State.READY
    assert await sup.stop() is supervisor.State.STOPPED

    lines = log_path.read_text().splitlines()  # complete once the supervisor reports the child gone
    assert lines[0].startswith("--- ") and "attempt 1/3" in lines[0]
    assert any("initializing, n_slots = 2" in line for line in lines)
    assert lines[1:] == sup.tail()[-(len(lines) - 1) :]  # what the child printed, in order
    loop_thread = threading.current_thread().name
    assert threads and set(threads) == {childlog.THREAD_NAME} and loop_thread != childlog.THREAD_NAME


async def test_many_lines_arrive_in_order_and_an_unwritable_log_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = childlog.ChildLog(tmp_path / "deep" / "folder" / "a.log")
    for index in range(2000):
        good.write(f"line {index}")
    await good.close()
    assert (tmp_path / "deep" / "folder" / "a.log").read_text().splitlines() == [f"line {i}" for i in range(2000)]

    (tmp_path / "not-a-folder").write_text("a file where a folder should be")
    broken = childlog.ChildLog(tmp_path / "not-a-folder" / "b.log")
    with caplog.at_level(logging.WARNING, logger="llamesh_agent.childlog"):
        broken.write("lost")
        await broken.close()  # returns all the same
    (record,) = [record for record in caplog.records if record.name == "llamesh_agent.childlog"]
    assert record.__dict__["event"] == "child_log_failed" and "b.log" in record.getMessage()


# --- the agent --------------------------------------------------------------------------------------


class GatedStore(store.MemoryStore):
    """A MemoryStore whose `get` of one instance name waits for `release` (after setting `reached`)."""

    def __init__(self, gated_name: str) -> None:
        super().__init__()
        self.gated_name = gated_name
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def get(self, kind: type[store.R], name: str) -> store.R | None:
        if kind is resources.LlamaInstance and name == self.gated_name:
            self.reached.set()
            await self.release.wait()
        return await super().get(kind, name)


class StaticBinary:
    """The build manager as the agent sees it: a binary that is there, and no rebuilds."""

    def __init__(self, path: Path) -> None:
        self.binary_path = path
        self.status = build.BuildStatus(llama_cpp_version="1-fake")

    async def build(self, *, force: bool = False) -> None:
        raise AssertionError("these tests ask for no rebuild")


@contextlib.asynccontextmanager
async def running_agent(tmp_path: Path, resource_store: store.MemoryStore) -> AsyncIterator[node_agent.NodeAgent]:
    agent = node_agent.NodeAgent(
        store=resource_store,
        node_config=config.NodeConfig(node_id=NODE, max_sysmem_mb=4096, max_instances_per_node=7),
        binary=StaticBinary(fake_binary(tmp_path)),
        state_dir=tmp_path / "state",
        config_dir=tmp_path,
        timings=FAST,
        sampler=sampling.Sampler(None),
        models_cache_dir=tmp_path / "hf",
    )
    task = asyncio.create_task(agent.run())
    try:
        await eventually(lambda: resource_store.get(resources.LlamaNode, NODE), what="the node to be published")
        yield agent
    finally:
        await agent.shutdown()
        await task


async def add_model(resource_store: store.Store) -> cookbook.Profile:
    profile = cookbook.Profile(id="default", model_path="tiny.gguf", startup_timeout_seconds=60)
    spec = cookbook.ModelSpec(profiles=[profile])
    await resource_store.create(resources.LlamaModel(metadata=resources.ObjectMeta(name="tiny"), spec=spec))
    return profile


async def schedule(resource_store: store.Store, name: str, profile: cookbook.Profile, *, node: str = NODE) -> str:
    """An instance bound to `node`, as the gateway and the operator leave it; its uid."""
    instance = resources.LlamaInstance(
        metadata=resources.ObjectMeta(name=name),
        spec=resources.InstanceSpec(model="tiny", profile="default", args_hash=profile.args_hash(), node_name=node),
    )
    created = await resource_store.create(instance)
    assert created.metadata.uid is not None
    return created.metadata.uid


async def wait_phase(resource_store: store.Store, name: str, phase: Phase) -> resources.LlamaInstance:
    async def reached() -> resources.LlamaInstance | None:
        found = await resource_store.get(resources.LlamaInstance, name)
        return found if found is not None and found.status.phase is phase else None

    return await eventually(reached, within_s=60, what=f"{name} to be {phase.value}")


async def test_finished_uids_are_forgotten_once_the_store_no_longer_lists_the_instance(tmp_path: Path) -> None:
    resource_store = store.MemoryStore()
    async with running_agent(tmp_path, resource_store) as agent:
        profile = await add_model(resource_store)
        uid_a = await schedule(resource_store, "a", profile)
        uid_b = await schedule(resource_store, "b", profile)
        await wait_phase(resource_store, "a", Phase.READY)
        await wait_phase(resource_store, "b", Phase.READY)

        def drain(instance: resources.LlamaInstance) -> None:
            instance.spec.drain, instance.spec.drain_reason = True, "idle"

        await writes.update(resource_store, resources.LlamaInstance, "a", drain)
        await wait_phase(resource_store, "a", Phase.STOPPED)
        await resource_store.delete(resources.LlamaInstance, "b")
        await eventually(lambda: agent.runner("b") is None, what="b's runner to end")

        # a is still listed (its final status might still be on its way): its uid stays; b's is forgotten.
        await eventually(lambda: agent.finished_uids == {uid_a}, what="only a's uid to be kept")
        assert uid_b not in agent.finished_uids and agent.runner("a") is None

        await resource_store.delete(resources.LlamaInstance, "a")
        await eventually(lambda: agent.finished_uids == frozenset(), what="a's uid to be forgotten too")


async def test_an_action_for_a_runner_that_ended_meanwhile_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    resource_store = GatedStore(gated_name="gate")
    real_plan = plan.plan
    armed, fired = asyncio.Event(), False

    def scripted(**kwargs: Any) -> list[plan.Action]:
        """Once armed, one pass whose first action awaits the gate, then acts on b, then on y."""
        nonlocal fired
        if armed.is_set() and not fired:
            fired = True
            return [
                plan.MarkStopped("gate", "its write waits while b's runner ends"),
                plan.Stop("b", "planned while b's runner still ran"),
                plan.MarkStopped("y", "the pass went on after b"),
            ]
        return real_plan(**kwargs)

    monkeypatch.setattr(plan, "plan", scripted)
    with caplog.at_level(logging.INFO, logger="llamesh_agent.node_agent"):
        async with running_agent(tmp_path, resource_store) as agent:
            profile = await add_model(resource_store)
            await schedule(resource_store, "y", profile, node="another-node")  # the agent leaves it alone
            await schedule(resource_store, "b", profile)
            ready = await wait_phase(resource_store, "b", Phase.READY)
            assert ready.status.pid is not None

            armed.set()
            await eventually(resource_store.reached.is_set, what="the pass to wait at the gate")
            os.kill(ready.status.pid, signal.SIGKILL)  # b's runner ends while the pass waits
            await eventually(lambda: agent.runner("b") is None, what="b's runner to end")
            resource_store.release.set()

            y = await wait_phase(resource_store, "y", Phase.STOPPED)
            assert y.status.message == "the pass went on after b"
            assert (await resource_store.get(resources.LlamaInstance, "b")) is not None
    assert fired
    failures = [record for record in caplog.records if getattr(record, "event", None) == "agent_reconcile_failed"]
    assert failures == []


# --- the production log, end to end ----------------------------------------------------------------


@pytest.mark.real
async def test_serve_writes_one_json_object_per_line_with_the_seed_events(
    tmp_path: Path, llama_server_binary: Path, chat_model: Path
) -> None:
    port = processes.free_port()
    node_config = {
        "node_id": "logs",
        "listen_addr": f"127.0.0.1:{port}",
        "metrics_path": str(tmp_path / "node-metrics.json"),
        "shutdown_grace_period_seconds": 5,
        "llama_cpp": {"enabled": False, "binary_path": str(llama_server_binary), "cache_dir": str(tmp_path / "c")},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(node_config))
    book = {"models": [{"name": "tiny", "profiles": [{"id": "default", "model_path": str(chat_model)}]}]}
    (tmp_path / "cookbook.yaml").write_text(yaml.safe_dump(book))
    llamesh = str(Path(sys.executable).parent / "llamesh")
    argv = [llamesh, "serve", "--config", str(tmp_path / "config.yaml"), "--cookbook", str(tmp_path / "cookbook.yaml")]
    child = processes.start(argv, log_path=tmp_path / "serve.log")  # stdout and stderr; serve prints no stdout
    base_url = f"http://127.0.0.1:{port}"
    try:
        await processes.wait_healthy(child, base_url, deadline_s=60)
        async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0) as client:
            chat = await client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=4,
                extra_headers={"X-Session-Id": "session-7", "X-Request-Id": "request-7"},
            )
        assert chat.choices[0].message.content
        await eventually(lambda: '"request_complete"' in child.log_text(), what="the request line")
    finally:
        await processes.stop(child, grace_s=15)

    entries = []
    for line in child.log_text().splitlines():
        entry = json.loads(line)  # every line is JSON ...
        assert isinstance(entry, dict), line  # ... one object ...
        assert entry["event"] and entry["event"] != "log", line  # ... with a real event
        assert {"timestamp", "level", "node_id"} <= set(entry) and entry["node_id"] == "logs", line
        assert not str(entry.get("message", "")).lstrip().startswith("{"), line  # no JSON inside the message
        entries.append(entry)

    def first(event: str) -> dict[str, Any]:
        found = [entry for entry in entries if entry["event"] == event]
        assert found, f"no {event} line in:\n{child.log_text()}"
        return found[0]

    spawn = first("instance_spawn")
    assert (spawn["model"], spawn["profile"], spawn["reason"]) == ("tiny", "default", "demand")
    assert isinstance(spawn["port"], int) and spawn["instance_id"].startswith("tiny-default-")
    request = first("request_complete")
    assert (request["request_id"], request["session_id"]) == ("request-7", "session-7")
    assert (request["model"], request["status"], request["instance"]) == ("tiny", 200, spawn["instance_id"])
    assert first("queue_enqueue")["request_id"] == "request-7"  # lines logged during the request carry its ids
    terminate = first("instance_terminate")
    assert (terminate["instance_id"], terminate["reason"]) == (spawn["instance_id"], "shutdown")

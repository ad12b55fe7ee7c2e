"""Helpers for the gateway's tests (tests/test_gateway_*.py): configs, cookbook objects, an agent stand-in.

- `node_config`, `profile`, `model`: small builders for what the store holds;
- `AgentSimulator`: plays operator and agent over a MemoryStore — a Pending instance is bound to the node,
  a fake llama-server child is started for it (faults per profile through FAKE_LLAMA_* variables), and it
  is marked Starting, then Ready once /health answers (or Failed if the child exits first). A drained
  instance is stopped once the gateways report nothing in flight. The real agent and operator are wired
  by `llamesh serve`; this stand-in keeps the gateway's tests about the gateway;
- `running_gateway`: the real aiohttp application on a test server, with store, agent stand-in and client;
- `eventually`: poll a condition with a generous deadline (the test machine is small and shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import test_utils, web

from llamesh_api import config, cookbook, resources, store, writes
from llamesh_proxy import app as gateway_app
from llamesh_proxy import gateway
from rig import processes, waiting

eventually = waiting.eventually  # the suite's one polling helper, re-exported for these tests

NODE = "node-a"
GATEWAY_ID = "gw-test"


def node_config(**fields: Any) -> config.NodeConfig:
    """A NodeConfig for tests; `model_defaults`/`http`/`auth` may be given as dicts."""
    fields.setdefault("node_id", NODE)
    return config.NodeConfig.model_validate(fields)


def profile(profile_id: str = "default", *args: str, **fields: Any) -> cookbook.Profile:
    fields.setdefault("model_path", "/models/x.gguf")
    return cookbook.Profile(id=profile_id, llama_server_args=list(args), **fields)


def model(name: str, *profiles: cookbook.Profile, **fields: Any) -> resources.LlamaModel:
    spec = cookbook.ModelSpec(profiles=list(profiles) or [profile()], **fields)
    return resources.LlamaModel(metadata=resources.ObjectMeta(name=name), spec=spec)


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class AgentSimulator:
    """Operator + agent stand-in: runs a fake llama-server per Pending instance and reports its phases."""

    def __init__(
        self,
        memory: store.Store,
        *,
        log_dir: Path,
        env: Mapping[str, Mapping[str, str]] | None = None,
        node_name: str = NODE,
    ) -> None:
        self.store = memory
        self.log_dir = log_dir
        self.env = env or {}  # profile id → FAKE_LLAMA_* variables
        self.node_name = node_name
        self.children: dict[str, processes.Child] = {}
        self.ports: dict[str, int] = {}
        self.started: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen: set[str] = set()

    async def register_node(self, *, binary: bool = True) -> None:
        node = resources.LlamaNode(
            metadata=resources.ObjectMeta(name=self.node_name),
            status=resources.NodeStatus(
                ready=True,
                binary_path="/opt/llama/llama-server" if binary else None,
                llama_cpp_version="b1-fake" if binary else None,
            ),
        )
        await self.store.create(node)
        await self.store.patch_status(resources.LlamaNode, self.node_name, node.status.to_wire())

    async def run(self) -> None:
        async for event in self.store.watch(resources.LlamaInstance):
            instance = event.object
            if event.type == "DELETED":
                continue
            if instance.status.phase is resources.Phase.PENDING and instance.name not in self._seen:
                self._seen.add(instance.name)
                self._spawn(self._start(instance))
            elif (
                instance.spec.drain
                and instance.status.phase is resources.Phase.READY
                and instance.status.in_flight == 0
                and instance.name in self.children
            ):
                self._spawn(self._stop(instance.name))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, instance: resources.LlamaInstance) -> None:
        name = instance.name
        port = processes.free_port()
        argv = processes.fake_llama_server_argv("--host", "127.0.0.1", "--port", str(port), "-m", f"{name}.gguf")
        child = processes.start(argv, log_path=self.log_dir / f"{name}.log", env=self.env.get(instance.spec.profile))
        self.children[name] = child
        self.ports[name] = port
        self.started.append(name)

        def bind(current: resources.LlamaInstance) -> None:
            current.spec.node_name = self.node_name

        def starting(current: resources.LlamaInstance) -> None:
            current.status.phase = resources.Phase.STARTING
            current.status.host, current.status.port, current.status.pid = "127.0.0.1", port, child.pid
            current.status.started_at = now()

        await writes.update(self.store, resources.LlamaInstance, name, bind)
        await writes.update_status(self.store, resources.LlamaInstance, name, starting)
        try:
            await processes.wait_healthy(child, f"http://127.0.0.1:{port}", deadline_s=60)
        except processes.RigError as exc:
            message = str(exc).splitlines()[0]

            def failed(current: resources.LlamaInstance) -> None:
                current.status.phase = resources.Phase.FAILED
                current.status.message = message
                current.status.stopped_at = now()

            await writes.update_status(self.store, resources.LlamaInstance, name, failed)
            return

        def ready(current: resources.LlamaInstance) -> None:
            current.status.phase = resources.Phase.READY
            current.status.ready_at = now()
            current.status.parsed_model_params = {"n_ctx": 2048, "n_ctx_train": 2048, "n_slots": 1}

        await writes.update_status(self.store, resources.LlamaInstance, name, ready)

    async def _stop(self, name: str) -> None:
        child = self.children.pop(name)
        await processes.stop(child)

        def stopped(current: resources.LlamaInstance) -> None:
            current.status.phase = resources.Phase.STOPPED
            current.status.stopped_at = now()

        await writes.update_status(self.store, resources.LlamaInstance, name, stopped)

    async def slots_busy(self, name: str) -> int:
        """How many of the fake server's slots are processing now (its /slots)."""
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{self.ports[name]}/slots") as r:
            slots: list[dict[str, Any]] = await r.json()
        return sum(1 for slot in slots if slot["is_processing"])

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(processes.stop(child, grace_s=2) for child in self.children.values()))
        self.children.clear()


def instance_names(gw: gateway.Gateway) -> list[str]:
    """Instances the gateway's catalog holds, in arrival order."""
    return [instance.name for instance in gw.catalog.instances()]


async def set_phase(memory: store.Store, name: str, phase: resources.Phase, *, port: int | None = None) -> None:
    """Play the agent for one instance: move it to `phase` (READY/STARTING with an address on `port`)."""

    def change(current: resources.LlamaInstance) -> None:
        current.status.phase = phase
        if port is not None:
            current.status.host, current.status.port = "127.0.0.1", port
        if phase is resources.Phase.READY:
            current.status.ready_at = now()
        if phase.is_terminal:
            current.status.stopped_at = now()

    await writes.update_status(memory, resources.LlamaInstance, name, change)


@dataclasses.dataclass
class Harness:
    store: store.MemoryStore
    agent: AgentSimulator
    app: web.Application
    server: test_utils.TestServer
    client: test_utils.TestClient[web.Request, web.Application]

    @property
    def gw(self) -> gateway.Gateway:
        return self.app[gateway.GATEWAY]

    @property
    def base_url(self) -> str:
        return str(self.server.make_url(""))

    def instances(self) -> list[resources.LlamaInstance]:
        return self.gw.catalog.instances()


@contextlib.asynccontextmanager
async def running_gateway(
    tmp_path: Path,
    *,
    models: Sequence[resources.LlamaModel],
    settings: config.NodeConfig | None = None,
    env: Mapping[str, Mapping[str, str]] | None = None,
    binary: bool = True,
    agent: bool = True,
) -> AsyncIterator[Harness]:
    """The gateway app on a loopback test server over a fresh MemoryStore, with the agent stand-in."""
    memory = store.MemoryStore()
    for item in models:
        await memory.create(item)
    simulator = AgentSimulator(memory, log_dir=tmp_path / "children", env=env)
    await simulator.register_node(binary=binary)
    agent_task = asyncio.create_task(simulator.run()) if agent else None
    application = gateway_app.create_app(settings or node_config(), store=memory, gateway_id=GATEWAY_ID, node_name=NODE)
    server = test_utils.TestServer(application, host="127.0.0.1")
    client = test_utils.TestClient(server)
    await client.start_server()
    try:
        yield Harness(memory, simulator, application, server, client)
    finally:
        await client.close()
        if agent_task is not None:
            agent_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await agent_task
        await simulator.close()

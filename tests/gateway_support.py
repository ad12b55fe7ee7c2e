"""Helpers for the gateway's tests (tests/test_gateway_*.py): configs, cookbook objects, the node behind it.

- `node_config`, `profile`, `model`: small builders for what the store holds;
- `running_node`: the real node agent (`NodeAgent`) and the real operator loop (`Controller`) over the test's
  MemoryStore, wired as `llamesh serve` wires them, with fast timings and the fault-injecting fake
  llama-server as the binary. A Pending instance the gateway asks for is bound by the operator, started by
  the agent and reported Starting, Ready, Failed or Stopped by it; a drained one is stopped once the gateways
  report nothing in flight. Faults are chosen per profile: `env` maps a profile id to FAKE_LLAMA_* variables,
  and the binary (a generated wrapper script, `fake_llama_binary`) sets them for a child by the model file on
  its command line, since the agent gives every child the same environment;
- `register_node`: a node as an agent would publish it, for tests that run no agent and play its part for
  the instances themselves (`set_phase`);
- `running_gateway`: the real aiohttp application on a test server, with the store, the node and a client;
- `eventually`: poll a condition with a generous deadline (the test machine is small and shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import shlex
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import test_utils, web

from llamesh_agent import instance_runner, launch, node_agent, sampling, supervisor
from llamesh_api import config, cookbook, launch_args, resources, store, writes
from llamesh_operator import controller
from llamesh_proxy import app as gateway_app
from llamesh_proxy import gateway
from rig import processes, waiting

eventually = waiting.eventually  # the suite's one polling helper, re-exported for these tests

NODE = "node-a"
GATEWAY_ID = "gw-test"
LLAMA_CPP_VERSION = "b1-fake"

# The agent's pace for tests: quick passes and heartbeats, quick retries of a failed spawn, a short grace
# before SIGKILL (a stalled fake may hold its graceful shutdown on an open request).
TIMINGS = node_agent.Timings(
    reconcile_interval_s=0.2,
    heartbeat_interval_s=0.5,
    sample_interval_s=1.0,
    drain_settle_s=1.0,
    runner=instance_runner.RunnerSettings(process=supervisor.Settings(stop_grace_s=2, retry_delay_s=0.05)),
)


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


# --- the node: the real agent and operator ----------------------------------------------------


@dataclasses.dataclass
class BuildStatus:
    is_building: bool = False
    last_build_error: str | None = None
    last_build_at: datetime.datetime | None = None
    llama_cpp_version: str | None = LLAMA_CPP_VERSION


@dataclasses.dataclass
class PrebuiltBinary:
    """The build manager as the agent sees it, for a binary that is there from the start (rebuilds do nothing)."""

    binary_path: Path
    status: BuildStatus = dataclasses.field(default_factory=BuildStatus)

    async def build(self, *, force: bool = False) -> None:
        return None


def fake_llama_binary(
    folder: Path,
    *,
    models: Sequence[resources.LlamaModel],
    env: Mapping[str, Mapping[str, str]],
    config_dir: Path,
) -> Path:
    """An executable the agent runs as llama-server: the fake one, with the FAKE_LLAMA_* variables `env` gives
    the profile (by id) whose model file is on the command line the agent built."""
    by_file: dict[str, Mapping[str, str]] = {}
    for item in models:
        for each in item.spec.profiles:
            variables = env.get(each.id)
            if not variables:
                continue
            args = launch.with_resolved_model_path(each.effective_args(), base_dir=config_dir)
            path = launch_args.flag_value(args, launch_args.MODEL_FLAGS)
            if path is None:
                raise ValueError(f"profile {item.name}:{each.id} has no model file to tell its faults by")
            if by_file.setdefault(path, variables) != variables:
                raise ValueError(f"profiles with different faults share {path}; give them different model_path values")
            if not all(name.isidentifier() for name in variables):
                raise ValueError(f"not environment variable names: {sorted(variables)}")
    unknown = set(env) - {each.id for item in models for each in item.spec.profiles}
    if unknown:
        raise ValueError(f"faults for profiles no model has: {sorted(unknown)}")
    cases = [
        f"  {shlex.quote(path)}) export {' '.join(f'{k}={shlex.quote(v)}' for k, v in variables.items())} ;;"
        for path, variables in by_file.items()
    ]
    script = "\n".join(
        [
            "#!/bin/sh",
            "# The fake llama-server, with FAKE_LLAMA_* chosen by the model file (-m) the agent passes.",
            'model=""',
            'previous=""',
            'for arg in "$@"; do',
            '  case "$previous" in -m|--model) model="$arg" ;; esac',
            '  case "$arg" in --model=*) model="${arg#--model=}" ;; esac',
            '  previous="$arg"',
            "done",
            'case "$model" in',
            *cases,
            "esac",
            f'exec {shlex.quote(sys.executable)} {shlex.quote(str(processes.FAKE_LLAMA_SERVER))} "$@"',
            "",
        ]
    )
    folder.mkdir(parents=True, exist_ok=True)
    binary = folder / "llama-server"
    binary.write_text(script)
    binary.chmod(0o755)
    return binary


@dataclasses.dataclass
class Node:
    agent: node_agent.NodeAgent
    operator: controller.Controller
    folder: Path  # the agent's config folder; children's logs are under state/logs


@contextlib.asynccontextmanager
async def running_node(
    memory: store.Store,
    tmp_path: Path,
    *,
    settings: config.NodeConfig,
    env: Mapping[str, Mapping[str, str]] | None = None,
    binary: bool = True,
) -> AsyncIterator[Node]:
    """The real agent and operator over `memory` until the block ends (then every child is stopped).

    Faults in `env` are looked up for the models `memory` holds now."""
    folder = tmp_path / "node"
    models = (await memory.list(resources.LlamaModel)).items
    if binary:
        path = fake_llama_binary(folder / "bin", models=models, env=env or {}, config_dir=folder)
    else:
        path = folder / "bin" / "missing-llama-server"
    agent = node_agent.NodeAgent(
        store=memory,
        node_config=settings,
        binary=PrebuiltBinary(path),
        state_dir=folder / "state",
        config_dir=folder,
        node_name=NODE,
        timings=TIMINGS,
        sampler=sampling.Sampler(None),
        models_cache_dir=folder / "hf",
    )
    operator = controller.Controller(resource_store=memory, defaults=lambda: settings.model_defaults)
    tasks = [
        asyncio.create_task(agent.run(), name="test-agent"),
        asyncio.create_task(operator.run(), name="test-operator"),
    ]
    try:
        await eventually(lambda: memory.get(resources.LlamaNode, NODE), what="the agent to publish its node")
        yield Node(agent, operator, folder)
    finally:
        await agent.shutdown()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def register_node(memory: store.Store, *, binary: bool = True) -> None:
    """The node as its agent would publish it, for tests that run no agent."""
    node = resources.LlamaNode(
        metadata=resources.ObjectMeta(name=NODE),
        status=resources.NodeStatus(
            ready=True,
            binary_path="/opt/llama/llama-server" if binary else None,
            llama_cpp_version=LLAMA_CPP_VERSION if binary else None,
        ),
    )
    await memory.create(node)
    await memory.patch_status(resources.LlamaNode, NODE, node.status.to_wire())


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


async def slots_busy(memory: store.Store, name: str) -> int:
    """How many of an instance's llama-server slots are processing now (its /slots)."""
    instance = await memory.get(resources.LlamaInstance, name)
    assert instance is not None and instance.status.port, f"instance {name} has no address: {instance!r}"
    url = f"http://{instance.status.host or '127.0.0.1'}:{instance.status.port}/slots"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        slots: list[dict[str, Any]] = await response.json()
    return sum(1 for slot in slots if slot["is_processing"])


# --- the gateway ------------------------------------------------------------------------------


@dataclasses.dataclass
class Harness:
    store: store.MemoryStore
    node: Node | None  # None: no agent or operator runs (the test plays them)
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

    async def slots_busy(self, name: str) -> int:
        return await slots_busy(self.store, name)


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
    """The gateway app on a loopback test server over a fresh MemoryStore, with the real agent and operator
    (`running_node`) behind it, or, with `agent=False`, only a registered node and nobody acting on instances."""
    settings = settings or node_config()
    memory = store.MemoryStore()
    for item in models:
        await memory.create(item)
    async with contextlib.AsyncExitStack() as stack:
        node = None
        if agent:
            node = await stack.enter_async_context(
                running_node(memory, tmp_path, settings=settings, env=env, binary=binary)
            )
        else:
            await register_node(memory, binary=binary)
        application = gateway_app.create_app(settings, store=memory, gateway_id=GATEWAY_ID, node_name=NODE)
        server = test_utils.TestServer(application, host="127.0.0.1")
        client = test_utils.TestClient(server)
        await client.start_server()
        stack.push_async_callback(client.close)  # before the node stops: in-flight requests end first
        yield Harness(memory, node, application, server, client)

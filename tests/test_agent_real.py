"""The node agent with the real llama-server (built by the project's build manager) on the tiny chat model.

Covers: the build manager serves as the agent's `LlamaServerBinary`; an instance goes Ready and answers a
chat completion; its parsed parameters are right (slots and per-slot context from the log and /props, the
trained context from /v1/models, the build's version); peak memory is sampled; the learned data is written
to the metrics file and a new NodeAgent on a fresh store publishes it again, and withholds the parsed
parameters when its llama.cpp version differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from agent_support import eventually, pid_alive
from llamesh_agent import build, live_binary, node_agent, sampling
from llamesh_api import config, cookbook, loading, resources, store

pytestmark = pytest.mark.real

ROOT = Path(__file__).parent.parent
NODE = "real-node"
TIMINGS = node_agent.Timings(reconcile_interval_s=0.2, heartbeat_interval_s=0.5, sample_interval_s=0.5)


@dataclasses.dataclass
class OtherVersion:
    """The same binary, reported under another llama.cpp version (as after an upgrade)."""

    binary_path: Path
    status: build.BuildStatus

    async def build(self, *, force: bool = False) -> None:
        raise AssertionError("not expected to build")


@pytest.fixture
async def build_manager(llama_server_binary: Path) -> build.BuildManager:
    settings = loading.load_node_config(ROOT / "examples" / "config.yaml", environ={}).llama_cpp
    manager = build.BuildManager(settings, base_dir=ROOT / "examples", progress=lambda message: None)
    result = await manager.ensure_binary()  # the session already built it: a smoke test, seconds
    same = await asyncio.to_thread(lambda: result.binary_path.resolve() == llama_server_binary.resolve())
    assert same
    return manager


@contextlib.asynccontextmanager
async def agent_on(
    tmp_path: Path, binary: live_binary.LlamaServerBinary, *, chat_model: Path
) -> AsyncIterator[store.MemoryStore]:
    resource_store = store.MemoryStore()
    profile = cookbook.Profile(id="default", model_path=str(chat_model), llama_server_args="-np 2 -c 1024")
    model = resources.LlamaModel(
        metadata=resources.ObjectMeta(name="tiny-chat"), spec=cookbook.ModelSpec(profiles=[profile])
    )
    await resource_store.create(model)
    agent = node_agent.NodeAgent(
        store=resource_store,
        node_config=config.NodeConfig(node_id=NODE, metrics_path="state/node-metrics.json"),
        binary=binary,
        state_dir=tmp_path / "state",
        config_dir=tmp_path,
        timings=TIMINGS,
        sampler=sampling.Sampler(None),
    )
    task = asyncio.create_task(agent.run())
    try:
        await eventually(lambda: resource_store.get(resources.LlamaNode, NODE), what="the node")
        yield resource_store
    finally:
        await agent.shutdown()
        await task


def profile_hash(chat_model: Path) -> str:
    return cookbook.Profile(id="default", model_path=str(chat_model), llama_server_args="-np 2 -c 1024").args_hash()


async def test_real_instance_ready_with_parsed_params_and_learned(
    tmp_path: Path, build_manager: build.BuildManager, chat_model: Path
) -> None:
    version = build_manager.status.llama_cpp_version
    assert version and version != "unknown"
    args_hash = profile_hash(chat_model)
    async with agent_on(tmp_path, build_manager, chat_model=chat_model) as resource_store:
        instance = resources.LlamaInstance(
            metadata=resources.ObjectMeta(name="tiny-chat-real"),
            spec=resources.InstanceSpec(model="tiny-chat", profile="default", args_hash=args_hash, node_name=NODE),
            status=resources.InstanceStatus(phase=resources.Phase.SCHEDULED),
        )
        await resource_store.create(instance)

        async def with_params() -> resources.LlamaInstance | None:
            found = await resource_store.get(resources.LlamaInstance, "tiny-chat-real")
            assert found is not None and found.status.phase is not resources.Phase.FAILED, found
            params = found.status.parsed_model_params or {}
            return found if found.status.phase is resources.Phase.READY and "n_ctx_train" in params else None

        ready = await eventually(with_params, within_s=120, what="Ready with parsed params")
        status = ready.status
        assert status.parsed_model_params is not None
        assert {key: status.parsed_model_params[key] for key in ("n_ctx", "n_ctx_train", "n_slots")} == {
            "n_ctx": 512,  # per slot: -c 1024 over -np 2
            "n_ctx_train": 2048,
            "n_slots": 2,
        }
        assert status.n_slots == 2 and status.llama_cpp_version == version
        assert status.pid is not None and pid_alive(status.pid)

        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        async with aiohttp.ClientSession() as session:
            url = f"http://{status.host}:{status.port}/v1/chat/completions"
            async with session.post(url, json=body) as response:
                assert response.status == 200
                answer = await response.json()
        assert answer["usage"]["completion_tokens"] == 4

        async def learned_on_node() -> resources.Learned | None:
            node = await resource_store.get(resources.LlamaNode, NODE)
            found = node.status.learned.get(args_hash) if node else None
            return found if found and found.parsed_model_params and found.peak_sysmem_mb else None

        learned = await eventually(learned_on_node, what="learned data on the node")
        assert learned.parsed_model_params is not None and learned.parsed_model_params["n_ctx"] == 512
        assert learned.llama_cpp_version == version
        pid = status.pid

    assert not pid_alive(pid)
    document = json.loads((tmp_path / "state" / "node-metrics.json").read_text())
    assert document["hashes"][args_hash]["parsed_model_params"]["params"]["n_slots"] == 2
    assert document["hashes"][args_hash]["display_names"] == ["tiny-chat"]

    # A new agent (a restart) on a fresh store publishes what the first one learned ...
    async with agent_on(tmp_path, build_manager, chat_model=chat_model) as resource_store:
        node = await resource_store.get(resources.LlamaNode, NODE)
        assert node is not None
        again = node.status.learned[args_hash]
        assert again.parsed_model_params == learned.parsed_model_params
        assert again.peak_sysmem_mb == learned.peak_sysmem_mb

    # ... and withholds the parsed parameters under another llama.cpp version.
    upgraded = OtherVersion(
        build_manager.binary_path, dataclasses.replace(build_manager.status, llama_cpp_version="2-new")
    )
    async with agent_on(tmp_path, upgraded, chat_model=chat_model) as resource_store:
        node = await resource_store.get(resources.LlamaNode, NODE)
        assert node is not None
        withheld = node.status.learned[args_hash]
        assert withheld.parsed_model_params is None and withheld.peak_sysmem_mb == learned.peak_sysmem_mb

"""Session fixtures shared by the suite: the real llama-server (built by the project's own build manager,
cached outside the checkout) and the tiny GGUF models the real server loads in a fraction of a second.

The binary comes from `llamesh_agent.build` with the same llama.cpp settings as examples/config.yaml
(source: pypi, CPU), so the demo and the tests share one cached build. The first run on a machine builds
it (minutes; progress goes to the terminal); later runs reuse it in seconds.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from llamesh_agent import build
from llamesh_api import loading
from llamesh_operator import planning
from rig import apiserver, tiny_models

ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def the_planner_only_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every `planning.plan` call in every test (direct, or a controller's pass) is checked to leave the world
    it was given as it found it: on bare metal the operator hands the planner the in-memory store's own
    objects (`MemoryStore.view`), so a planner that changed one would change the store. A controller's loop
    logs a failed pass and goes on, so a change is collected here and fails the test at its end."""
    plan = planning.plan
    changed: list[str] = []

    def dump(world: planning.World) -> list[dict[str, Any]]:
        return [obj.model_dump() for obj in (*world.models, *world.instances, *world.nodes)]

    def checked(world: planning.World, *, now: Any) -> list[planning.Action]:
        before = dump(world)
        actions = plan(world, now=now)
        if dump(world) != before:
            changed.append(f"planning.plan changed objects of its world (at {now})")
        return actions

    monkeypatch.setattr(planning, "plan", checked)
    yield
    assert not changed, changed


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def llama_server_binary() -> Path:
    node_config = loading.load_node_config(ROOT / "examples" / "config.yaml", environ={})

    def progress(message: str) -> None:
        print(message, file=sys.__stderr__, flush=True)  # visible even while pytest captures output

    manager = build.BuildManager(node_config.llama_cpp, base_dir=ROOT / "examples", progress=progress)
    result = await manager.ensure_binary()
    return result.binary_path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def chat_model(tiny_model_dir: Path) -> Path:
    return tiny_models.write_chat_model(tiny_model_dir / "chat.gguf")


@pytest.fixture(scope="session")
def embedding_model(tiny_model_dir: Path) -> Path:
    return tiny_models.write_embedding_model(tiny_model_dir / "embed.gguf")


@pytest.fixture(scope="session")
def reranker_model(tiny_model_dir: Path) -> Path:
    return tiny_models.write_reranker_model(tiny_model_dir / "rerank.gguf")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def real_apiserver(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[apiserver.ApiServer]:
    """One real kube-apiserver + etcd for the whole run, with the CRDs from crds/ applied."""
    async with apiserver.running(tmp_path_factory.mktemp("apiserver")) as server:
        yield server

"""Session fixtures shared by the suite: the real llama-server (built by the project's own build manager,
cached outside the checkout) and the tiny GGUF models the real server loads in a fraction of a second.

The binary comes from `llamesh_agent.build` with the same llama.cpp settings as examples/config.yaml
(source: pypi, CPU), so the demo and the tests share one cached build. The first run on a machine builds
it (minutes; progress goes to the terminal); later runs reuse it in seconds.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from llamesh_agent import build
from llamesh_api import loading
from rig import apiserver, tiny_models

ROOT = Path(__file__).parent.parent


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

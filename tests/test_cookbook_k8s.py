"""`llamesh cookbook-to-k8s` and the Kubernetes examples.

Covers: the example cookbook converts to LlamaModel manifests that read back as the same models (round
trip), leaving defaults out; a model name Kubernetes cannot take is refused with the fix and exit status 1;
the converted manifests and every file in examples/kubernetes/ are accepted by a real kube-apiserver
(server-side dry run, strict field validation against the CRDs) and parse as LlamaModels.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llamesh_api import loading, resources, store
from llamesh_operator import cli, cookbook_k8s
from rig import apiserver

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples" / "kubernetes").glob("*.yaml"))


def test_the_example_cookbook_round_trips() -> None:
    book = loading.load_cookbook(ROOT / "examples" / "cookbook.yaml")
    documents = list(yaml.safe_load_all(cookbook_k8s.render(book, namespace="ml")))
    assert [doc["metadata"] for doc in documents] == [{"name": m.name, "namespace": "ml"} for m in book.models]
    for model, document in zip(book.models, documents, strict=True):
        assert store.from_wire(resources.LlamaModel, document).spec == model.spec()
        assert "enabled" not in document["spec"]  # defaults stay out


def test_a_name_kubernetes_cannot_take_is_refused_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cookbook = tmp_path / "cookbook.yaml"
    cookbook.write_text(
        "models:\n  - name: Qwen2.5_7B\n    profiles:\n      - id: default\n        model_path: /m.gguf\n"
    )
    assert cli.main(["cookbook-to-k8s", str(cookbook)]) == 1
    err = capsys.readouterr().err
    assert "Qwen2.5_7B" in err and "not a Kubernetes object name" in err and "'qwen2.5-7b'" in err


def test_the_command_prints_yaml(tmp_path: Path) -> None:
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "llamesh"), "cookbook-to-k8s", str(ROOT / "examples" / "cookbook.yaml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert [doc["kind"] for doc in yaml.safe_load_all(completed.stdout)] == ["LlamaModel"] * len(
        loading.load_cookbook(ROOT / "examples" / "cookbook.yaml").models
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_examples_parse_as_llama_models(example: Path) -> None:
    document = yaml.safe_load(example.read_text())
    assert store.from_wire(resources.LlamaModel, document).spec.profiles


@pytest.mark.asyncio(loop_scope="session")
async def test_the_real_api_server_accepts_the_examples_and_converted_cookbook(
    real_apiserver: apiserver.ApiServer,
) -> None:
    book = loading.load_cookbook(ROOT / "examples" / "cookbook.yaml")
    documents: list[dict[str, Any]] = [yaml.safe_load(path.read_text()) for path in EXAMPLES]
    documents += cookbook_k8s.manifests(book)
    path = f"/apis/{resources.GROUP}/{resources.VERSION}/namespaces/default/llamamodels"
    async with real_apiserver.session() as session:
        for document in documents:
            async with session.post(
                path, params={"dryRun": "All", "fieldValidation": "Strict"}, json=document
            ) as response:
                text = await response.text()
                assert response.status == 201, f"{document['metadata']['name']}: {response.status} {text}"
                assert "Warning" not in response.headers or "unknown field" not in response.headers["Warning"]

"""The CRDs: crds/ matches what the models render (no drift), every schema is structural (a type on every
node, no $ref/anyOf/titles, no null defaults, free-form maps preserved), names/short names/printer
columns/status subresource are set, every field has a description (and a real API server's `kubectl explain`
shows it), and objects the code writes validate against their schema — which kmock does not check, so this
is where a real API server's refusal would show first."""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llamesh_api import cookbook, crds, resources
from rig import apiserver

CRDS_DIR = Path(__file__).parent.parent / "crds"
KUBECTL = "/usr/bin/kubectl"


def schema_of(kind: type[resources.Resource]) -> dict[str, Any]:
    schema: dict[str, Any] = crds.render(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, child in node.get("properties", {}).items():
        found += walk(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        found += walk(node["additionalProperties"], f"{path}[*]")
    if "items" in node:
        found += walk(node["items"], f"{path}[]")
    return found


def problems(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """A small OpenAPI v3 (structural subset) validator: types, nullable, required, enum, minimum."""
    if value is None:
        return [] if schema.get("nullable") else [f"{path}: null is not allowed"]
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    expected = schema["type"]
    python_types = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool}
    if not isinstance(value, python_types[expected]) or (expected == "integer" and isinstance(value, bool)):
        return [f"{path}: {value!r} is not {expected}"]
    found: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{path}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        found.append(f"{path}: {value} < {schema['minimum']}")
    if expected == "object":
        for name in schema.get("required", []):
            if name not in value:
                found.append(f"{path}.{name}: required")
        for name, child in value.items():
            if name in schema.get("properties", {}):
                found += problems(child, schema["properties"][name], f"{path}.{name}")
            elif isinstance(schema.get("additionalProperties"), dict):
                found += problems(child, schema["additionalProperties"], f"{path}.{name}")
            else:
                found.append(f"{path}.{name}: unknown field (the API server would prune it)")
    if expected == "array":
        for index, item in enumerate(value):
            found += problems(item, schema["items"], f"{path}[{index}]")
    return found


@pytest.mark.parametrize("kind", resources.RESOURCE_KINDS, ids=lambda kind: kind.kind_name)
def test_files_match_the_models(kind: type[resources.Resource]) -> None:
    rendered = crds.render(kind)
    path = CRDS_DIR / f"{rendered['metadata']['name']}.yaml"
    assert path.exists(), "run `llamesh crds --write crds/`"
    assert yaml.safe_load(path.read_text()) == rendered, "crds/ drifted: run `llamesh crds --write crds/`"


@pytest.mark.parametrize("kind", resources.RESOURCE_KINDS, ids=lambda kind: kind.kind_name)
def test_schemas_are_structural(kind: type[resources.Resource]) -> None:
    for path, node in walk(schema_of(kind)):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not {"$ref", "anyOf", "allOf", "oneOf", "title"} & set(node), path
        assert node.get("default", 0) is not None, path
        assert node.get("additionalProperties") is not False, path


@pytest.mark.parametrize("kind", resources.RESOURCE_KINDS, ids=lambda kind: kind.kind_name)
def test_names_columns_and_status_subresource(kind: type[resources.Resource]) -> None:
    crd = crds.render(kind)
    assert crd["metadata"]["name"] == f"{kind.plural}.llamesh.dev"
    assert crd["spec"]["names"]["shortNames"] == [kind.short_name]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {column["name"] for column in version["additionalPrinterColumns"]}
    assert {"Age"} < columns


def test_objects_the_code_writes_are_valid() -> None:
    now = datetime.datetime(2026, 11, 25, tzinfo=datetime.UTC)
    model = resources.LlamaModel.from_cookbook(
        cookbook.Model(
            name="m",
            profiles=[
                cookbook.Profile(id="default", model_path="/m.gguf", llama_server_args=["-c", "512"], max_instances=2),
                cookbook.Profile(id="hf", hf_repo="org/repo", hf_file="f.gguf", enabled=False),
            ],
        )
    )
    model.status = resources.ModelStatus(
        observed_generation=1,
        profiles={"default": resources.ProfileStatus(args_hash="abc", parsed_model_params={"n_ctx": 512})},
        conditions=[resources.Condition(type="Ready", status="True", last_transition_time=now)],
    )
    instance = resources.LlamaInstance(
        metadata=resources.ObjectMeta(name="m-default-abc123"),
        spec=resources.InstanceSpec(model="m", profile="default", args_hash="abc", node_name="n1", drain=True),
        status=resources.InstanceStatus(
            phase=resources.Phase.READY,
            host="127.0.0.1",
            port=8200,
            ready_at=now,
            usage={"gw": resources.GatewayUsage(in_flight=2, last_request_at=now)},
            parsed_model_params={"n_ctx": 512, "general.architecture": "llama"},
        ),
    )
    node = resources.LlamaNode(
        metadata=resources.ObjectMeta(name="n1"),
        status=resources.NodeStatus(ready=True, learned={"abc": resources.Learned(peak_sysmem_mb=100)}),
    )
    for obj in (model, instance, node):
        wire = obj.to_wire()
        schema = schema_of(type(obj))
        body = {key: wire[key] for key in ("spec", "status") if key in wire}
        assert problems(body, schema) == []


def test_the_validator_catches_what_the_api_server_refuses() -> None:
    schema = schema_of(resources.LlamaInstance)
    assert problems({"spec": {"model": "m"}}, schema) == [".spec.profile: required", ".spec.argsHash: required"]
    bad = {"spec": {"model": "m", "profile": "p", "argsHash": "a", "typo": 1}, "status": {"phase": "Running"}}
    assert len(problems(bad, schema)) == 2


def test_cli_prints_every_crd() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llamesh_operator.cli", "crds"], capture_output=True, text=True, timeout=60, check=True
    )
    names = [doc["metadata"]["name"] for doc in yaml.safe_load_all(result.stdout)]
    assert names == ["llamamodels.llamesh.dev", "llamainstances.llamesh.dev", "llamanodes.llamesh.dev"]


@pytest.mark.parametrize("kind", resources.RESOURCE_KINDS, ids=lambda kind: kind.kind_name)
def test_every_field_has_a_description(kind: type[resources.Resource]) -> None:
    undescribed = [path or "(root)" for path, node in walk(schema_of(kind)) if not node.get("description", "").strip()]
    assert undescribed == [], f"{kind.kind_name}: give these a Field(description=...): {undescribed}"


@pytest.mark.asyncio(loop_scope="session")
async def test_kubectl_explain_shows_the_profile_field_descriptions(real_apiserver: apiserver.ApiServer) -> None:
    completed = await asyncio.to_thread(
        subprocess.run,
        [KUBECTL, "explain", "llamamodels.spec.profiles", f"--api-version={resources.API_VERSION}",
         f"--kubeconfig={real_apiserver.kubeconfig_path}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    shown = " ".join(completed.stdout.split())  # kubectl wraps descriptions; compare with whitespace collapsed
    profile = schema_of(resources.LlamaModel)["properties"]["spec"]["properties"]["profiles"]
    assert " ".join(profile["description"].split()) in shown
    for field in ("idleTimeoutSeconds", "maxInstances", "llamaServerArgs", "minInstances"):
        description = profile["items"]["properties"][field]["description"]
        assert field in shown and " ".join(description.split()) in shown, f"{field}: {completed.stdout}"

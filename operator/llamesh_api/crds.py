"""CustomResourceDefinitions rendered from the resource models, so the API server and the code agree.

`crds/` holds the rendered files; a test fails when they drift from the models (`llamesh crds --write`
refreshes them). Pydantic's JSON schema is turned into a structural OpenAPI v3 schema: references
inlined, `Optional` as `nullable`, maps as `additionalProperties`, free-form objects preserved, titles
dropped. Each kind gets the status subresource, short names and printer columns that answer "is it
ready, where, how loaded" at a glance.

Applying CRDs to a cluster is the Helm chart's (or the operator's) business, not this module's.
"""

from __future__ import annotations

import copy
from typing import Any

from llamesh_api import resources

CATEGORY = "llamesh"
HEADER = "# Generated from operator/llamesh_api/resources.py by `llamesh crds --write crds/`; do not edit.\n"

_PRINTER_COLUMNS: dict[str, list[dict[str, str]]] = {
    "LlamaModel": [
        {"name": "Enabled", "type": "boolean", "jsonPath": ".spec.enabled"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyInstances"},
        {"name": "Instances", "type": "integer", "jsonPath": ".status.instances"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    "LlamaInstance": [
        {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
        {"name": "Profile", "type": "string", "jsonPath": ".spec.profile"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Node", "type": "string", "jsonPath": ".spec.nodeName"},
        {"name": "Port", "type": "integer", "jsonPath": ".status.port"},
        {"name": "Slots", "type": "integer", "jsonPath": ".status.nSlots"},
        {"name": "Draining", "type": "boolean", "jsonPath": ".spec.drain", "priority": "1"},
        {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": "1"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    "LlamaNode": [
        {"name": "Ready", "type": "boolean", "jsonPath": ".status.ready"},
        {"name": "Instances", "type": "integer", "jsonPath": ".status.activeInstances"},
        {"name": "Max", "type": "integer", "jsonPath": ".spec.maxInstances"},
        {"name": "llama.cpp", "type": "string", "jsonPath": ".status.llamaCppVersion"},
        {"name": "Building", "type": "boolean", "jsonPath": ".status.isBuilding", "priority": "1"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
}
_KEPT_KEYWORDS = ("type", "format", "description", "enum", "minimum", "maximum", "minLength", "minItems", "default")


def render(kind: type[resources.Resource]) -> dict[str, Any]:
    """The CRD (apiextensions.k8s.io/v1) of one resource kind."""
    schema = kind.model_json_schema(by_alias=True)
    defs = schema.get("$defs", {})
    properties = {
        name: _structural(schema["properties"][name], defs)
        for name in ("spec", "status")
        if name in schema["properties"]
    }
    columns = [
        {**column, "priority": int(column["priority"])} if "priority" in column else dict(column)
        for column in _PRINTER_COLUMNS[kind.kind_name]
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{kind.plural}.{resources.GROUP}"},
        "spec": {
            "group": resources.GROUP,
            "scope": "Namespaced" if kind.namespaced else "Cluster",
            "names": {
                "kind": kind.kind_name,
                "listKind": f"{kind.kind_name}List",
                "plural": kind.plural,
                "singular": kind.kind_name.lower(),
                "shortNames": [kind.short_name],
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": resources.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (kind.__doc__ or kind.kind_name).strip().splitlines()[0],
                            "properties": properties,
                            **({"required": ["spec"]} if "spec" in schema.get("required", []) else {}),
                        }
                    },
                }
            ],
        },
    }


def render_all() -> list[dict[str, Any]]:
    return [render(kind) for kind in resources.RESOURCE_KINDS]


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One pydantic JSON-schema node as a structural OpenAPI v3 node."""
    node = copy.deepcopy(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**copy.deepcopy(target), **{k: v for k, v in node.items() if k in ("description", "default")}}
    if "anyOf" in node:
        alternatives = node.pop("anyOf")
        options = [option for option in alternatives if option.get("type") != "null"]
        nullable = len(options) < len(alternatives)
        if len(options) != 1:
            raise ValueError(f"cannot render a union of {options} as a structural schema")
        merged = {**_structural(options[0], defs), **{k: v for k, v in node.items() if k in _KEPT_KEYWORDS}}
        if merged.get("default", 0) is None:
            del merged["default"]
        return {**merged, "nullable": True} if nullable else merged
    result: dict[str, Any] = {key: node[key] for key in _KEPT_KEYWORDS if key in node}
    if result.get("default", 0) is None:
        del result["default"]
    kind = node.get("type")
    if kind == "object" or "properties" in node or "additionalProperties" in node:
        result["type"] = "object"
        if "properties" in node:
            result["properties"] = {name: _structural(child, defs) for name, child in node["properties"].items()}
            if node.get("required"):
                result["required"] = list(node["required"])
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            result["additionalProperties"] = _structural(extra, defs)
        elif "properties" not in node:
            result["x-kubernetes-preserve-unknown-fields"] = True  # free-form (dict[str, Any])
    elif kind == "array":
        result["items"] = _structural(node.get("items", {}), defs)
    elif kind is None and "enum" not in node:
        result["x-kubernetes-preserve-unknown-fields"] = True  # Any
    if "enum" in node and "type" not in result:
        result["type"] = "string"
    return result

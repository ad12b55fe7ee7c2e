"""`llamesh cookbook-to-k8s`: a bare-metal cookbook.yaml as `LlamaModel` manifests for `kubectl apply`.

Each cookbook model becomes one LlamaModel whose name is the model's name and whose spec is the model's
fields in camelCase, leaving out what equals its default (the API server and every role fill those in the
same way), so the YAML stays as short as the cookbook. Reading the manifests back gives the same models
(tested both ways).

A model name that is not a Kubernetes object name (lowercase letters, digits, `-` and `.`, at most 253
characters, starting and ending with a letter or digit) is refused with the fix, rather than renamed: the
name is what OpenAI clients send as `model`, and renaming it silently would break them.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from llamesh_api import cookbook, resources

_OBJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class ConversionError(Exception):
    """The cookbook cannot be expressed as Kubernetes objects; the message names each model and the fix."""


def manifests(book: cookbook.Cookbook, *, namespace: str | None = None) -> list[dict[str, Any]]:
    problems = [_name_problem(model.name) for model in book.models]
    found = [problem for problem in problems if problem]
    if found:
        raise ConversionError("\n".join(found))
    documents = []
    for model in book.models:
        metadata: dict[str, Any] = {"name": model.name}
        if namespace:
            metadata["namespace"] = namespace
        spec = model.spec().model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)
        spec["profiles"] = [  # a profile's id is required even where it equals the default id
            {"id": profile.id, **entry} for profile, entry in zip(model.profiles, spec.get("profiles", []), strict=True)
        ]
        documents.append(
            {
                "apiVersion": resources.API_VERSION,
                "kind": resources.LlamaModel.kind_name,
                "metadata": metadata,
                "spec": spec,
            }
        )
    return documents


def render(book: cookbook.Cookbook, *, namespace: str | None = None) -> str:
    header = "# LlamaModels converted from a llamesh cookbook: kubectl apply -f this-file.yaml\n"
    return header + yaml.safe_dump_all(manifests(book, namespace=namespace), sort_keys=False, explicit_start=True)


def _name_problem(name: str) -> str | None:
    if len(name) <= 253 and _OBJECT_NAME.match(name):
        return None
    suggestion = re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-.") or "model"
    return (
        f"cookbook: models[{name!r}].name: {name!r} is not a Kubernetes object name (lowercase letters, digits, "
        f"'-' and '.') — fix: rename it, e.g. to {suggestion!r} (clients then ask for that model name)"
    )

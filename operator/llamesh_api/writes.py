"""Writes as the roles make them: a mutation of a fresh copy, sent as a merge patch of what it changed.

`update` is for metadata and spec, `update_status` for status; neither can touch the other half (the
store ignores it, as the API server's status subresource does). Each reads the object, applies the
caller's mutation to a copy, and sends only the difference (`store.merge_diff`):

- `update` names the resourceVersion it read, so a concurrent writer makes it fail with Conflict, and it
  is tried again from a fresh read (`retrying.conflicts`). Spec fields have few writers, but a lost update
  there (a drain, a binding) would strand an instance.
- `update_status` sends no version: each status field has exactly one writer (`store`'s table), so a merge
  patch of only the fields this writer changed cannot undo anyone else's, and gateways' usage reports never
  make the agent's writes conflict.

A write to an object that is gone returns None (the operator deletes finished instances; a deleted object
needs no more writes). With `uid`, a write changes nothing if the name now belongs to a newer object.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from llamesh_api import resources, retrying, store

log = logging.getLogger(__name__)

R = TypeVar("R", bound=resources.Resource)

Mutation = Callable[[R], object]


async def update(
    resource_store: store.Store, kind: type[R], name: str, mutate: Mutation[R], *, uid: str | None = None
) -> R | None:
    """Apply `mutate` to the metadata/spec of `name` (only if its uid is `uid`, when given)."""

    async def attempt() -> R | None:
        current = await resource_store.get(kind, name)
        if current is None or (uid is not None and current.metadata.uid != uid):
            return None
        before = _main(current)
        draft = current.model_copy(deep=True)
        mutate(draft)
        patch = store.merge_diff(before, _main(draft))
        if not patch:
            return current
        return await resource_store.patch(kind, name, patch, resource_version=current.metadata.resource_version)

    try:
        return await retrying.conflicts(attempt, what=f"update {kind.kind_name} {name}")
    except store.NotFound:
        return None


async def update_status(
    resource_store: store.Store, kind: type[R], name: str, mutate: Mutation[R], *, uid: str | None = None
) -> R | None:
    """Apply `mutate` to the status of `name` (only if its uid is `uid`, when given)."""
    current = await resource_store.get(kind, name)
    if current is None or (uid is not None and current.metadata.uid != uid):
        return None
    before = _status(current)
    draft = current.model_copy(deep=True)
    mutate(draft)
    patch = store.merge_diff(before, _status(draft))
    if not patch:
        return current
    try:
        return await resource_store.patch_status(kind, name, patch)
    except store.NotFound:
        return None


def _main(obj: resources.Resource) -> dict[str, Any]:
    wire = obj.to_wire()
    metadata = wire.get("metadata", {})
    return {
        "metadata": {key: metadata[key] for key in store.MUTABLE_METADATA if key in metadata},
        "spec": wire.get("spec", {}),
    }


def _status(obj: resources.Resource) -> dict[str, Any]:
    status: dict[str, Any] = obj.to_wire().get("status", {})
    return status

"""Status writes to the store, the way the agent makes every one of them.

A write is a read-modify-write (`Store.update`) retried on `Conflict`, as against a real API server where
gateways write `status.usage` of the same instance concurrently. A write to an object that is gone is not an
error (the operator deletes finished instances; a deleted instance needs no status). A write guarded by a
`uid` changes nothing if the name now belongs to a newer object.

Only the agent's own status fields are touched by the callers' mutations; that is their responsibility.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from llamesh_api import resources, store

log = logging.getLogger(__name__)

R = TypeVar("R", bound=resources.Resource)

_CONFLICT_RETRIES = 8


async def update(
    resource_store: store.Store,
    kind: type[R],
    name: str,
    mutate: Callable[[R], None],
    *,
    uid: str | None = None,
) -> R | None:
    """Apply `mutate` to the current `name` (only if its uid is `uid`, when given); None if it is gone."""

    def guarded(obj: R) -> R | None:
        if uid is not None and obj.metadata.uid != uid:
            return obj  # another object now has this name: leave it alone
        mutate(obj)
        return None

    for _ in range(_CONFLICT_RETRIES):
        try:
            return await resource_store.update(kind, name, guarded)
        except store.NotFound:
            return None
        except store.Conflict:
            continue
    log.warning("gave up writing %s %s after %d conflicts in a row", kind.kind_name, name, _CONFLICT_RETRIES)
    return None

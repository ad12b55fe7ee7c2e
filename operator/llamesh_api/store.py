"""The Store: how roles share resources, with the Kubernetes API server's rules, and its in-memory backend.

Every role talks to the others only through a Store, so the same code runs in one process (bare metal,
`MemoryStore`) or in three against the Kubernetes API server (`kube_store.KubeStore`). Both backends keep
the API server's rules, so a bare-metal test catches what a real server would refuse:

- **Spec and status are written separately** (the status subresource). `create` ignores `status`; `patch`
  merge-patches metadata and spec and ignores `status`; `patch_status` merge-patches status and ignores
  everything else. Patches are JSON merge patches (RFC 7386) of what the writer changed, never a whole
  object, so two writers of different fields never undo each other. `writes.update` / `writes.update_status`
  build those patches from a mutation and retry conflicts.
- **Optimistic concurrency**: a patch that names a `resourceVersion` fails with `Conflict` if the object
  changed since; every change stamps a new `resourceVersion`; a spec change bumps `generation`.
- **Deletion goes through finalizers**: deleting an object with finalizers only sets `deletionTimestamp`;
  it is gone when a patch clears the last finalizer. No finalizer may be added once deletion started.
- **Forward compatible reads**: objects read from a store ignore fields this version does not know
  (`from_wire`), so a newer agent's status never breaks an older gateway.
- **Watches resume**: `list` returns the collection's `resourceVersion`; `watch(resource_version=rv)`
  reports every change after it, or raises `Gone` when it is too old to resume (re-list then);
  `watch()` without a version starts with an ADDED event per existing object. `informer.Informer` is the
  one loop every role uses on top of this.

## Who writes which field (one writer per field)

| field | writer |
|---|---|
| `LlamaModel.spec`, metadata | the user (`kubectl apply`), or cookbook sync on bare metal |
| `LlamaModel.status` | operator |
| `LlamaInstance` create (`spec.model/profile/argsHash/reason`) | who asks: a gateway, the operator (min) |
| `LlamaInstance.spec.nodeName` (binding), `spec.drain`, `spec.drainReason`, delete | operator |
| `LlamaInstance.spec.drain`, `spec.drainReason` set to true by hand | a gateway's `POST /admin/drain` (never cleared) |
| `LlamaInstance.status` except `usage` | the agent of `spec.nodeName` |
| `LlamaInstance.status.usage.<gateway id>` | that gateway replica, and no other |
| `LlamaNode` (spec capacity/address, whole status) | that node's agent |
| `LlamaNode.spec.rebuildRequests` | whoever asks for a rebuild (the gateway's admin endpoint, a user) |

Binding is a spec write alone: an instance with `spec.nodeName` set and still `Pending` is the agent's to
start (`LlamaInstance.phase` reads it as `Scheduled`).

Objects handed out are copies: mutating one never changes the store (`MemoryStore.view`, for readers that
only read, is the one exception).
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import dataclasses
import datetime
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any, Generic, Literal, Protocol, TypeVar

from llamesh_api import resources

R = TypeVar("R", bound=resources.Resource)
T = TypeVar("T")

EventType = Literal["ADDED", "MODIFIED", "DELETED"]
Patch = dict[str, Any]

# The metadata fields a client may change; the rest are the server's (name, uid, versions, timestamps).
MUTABLE_METADATA = ("labels", "annotations", "finalizers", "ownerReferences")


# --- errors ---------------------------------------------------------------------------------------


class StoreError(Exception):
    """Base of the store's errors; backends map their own failures onto these."""


class NotFound(StoreError):
    """404: no such object."""


class AlreadyExists(StoreError):
    """409 AlreadyExists: create of a name that is taken."""


class Conflict(StoreError):
    """409 Conflict: the object changed since the version the write named."""


class Invalid(StoreError):
    """422: the server refused the object or the change (schema, immutable field, finalizer rules)."""


class Gone(StoreError):
    """410: a watch cannot resume from that resourceVersion; list again."""


class Forbidden(StoreError):
    """401/403: the credentials may not do this."""


class Transient(StoreError):
    """A failure that may pass: retried by `retrying`."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyRequests(Transient):
    """429: the server asks to slow down (Retry-After)."""


class ServerError(Transient):
    """5xx from the server."""


class Unavailable(Transient):
    """The server could not be reached or the connection broke."""


# --- the protocol ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Event(Generic[T]):
    type: EventType
    object: T


@dataclasses.dataclass(frozen=True)
class Listing(Generic[T]):
    """A list of objects and the collection's resourceVersion, to watch from."""

    items: list[T]
    resource_version: str


class Store(Protocol):
    async def get(self, kind: type[R], name: str) -> R | None: ...

    async def list(self, kind: type[R]) -> Listing[R]: ...

    async def create(self, obj: R) -> R:
        """Store a new object (its `status` is ignored). AlreadyExists if the name is taken."""
        ...

    async def patch(self, kind: type[R], name: str, patch: Patch, *, resource_version: str | None = None) -> R:
        """Merge-patch metadata and spec (`status` ignored); Conflict if `resource_version` is stale."""
        ...

    async def patch_status(self, kind: type[R], name: str, patch: Patch, *, resource_version: str | None = None) -> R:
        """Merge-patch `status` with `patch` (the status object's fields; everything else untouched)."""
        ...

    async def delete(self, kind: type[R], name: str) -> None:
        """Delete, or mark for deletion while finalizers remain. NotFound if absent."""
        ...

    def watch(self, kind: type[R], *, resource_version: str | None = None) -> AsyncIterator[Event[R]]:
        """Changes after `resource_version` (Gone if too old), or ADDED per object then changes."""
        ...


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def from_wire(kind: type[R], wire: dict[str, Any]) -> R:
    """An object as a store hands it out: fields this version does not know are ignored."""
    return kind.model_validate(wire, extra="ignore")


# --- JSON merge patches (RFC 7386) ----------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """`target` with `patch` applied: objects merge key by key, `None` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def merge_diff(before: dict[str, Any], after: dict[str, Any]) -> Patch:
    """The merge patch that turns `before` into `after` (empty when they are equal)."""
    patch: Patch = {}
    for key in before.keys() - after.keys():
        patch[key] = None
    for key, value in after.items():
        old = before.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            nested = merge_diff(old, value)
            if nested:
                patch[key] = nested
        elif key not in before or old != value:
            patch[key] = value
    return patch


# --- the in-memory backend ------------------------------------------------------------------------

_WATCH_HISTORY = 1000  # events kept per kind for watches that resume; older versions get Gone


class _Expired:
    """Put on a watcher's queue to end its watch with Gone."""


class MemoryStore:
    """Resources in this process, with the API server's rules and watches. Safe within one event loop."""

    def __init__(self, *, namespace: str | None = None, history: int = _WATCH_HISTORY) -> None:
        self._namespace = namespace
        self._objects: dict[str, dict[str, resources.Resource]] = {}
        self._history: dict[str, collections.deque[tuple[int, Event[resources.Resource]]]] = {}
        self._history_size = history
        self._expired_before: dict[str, int] = {}  # per kind: versions at or below this cannot be resumed
        self._watchers: dict[str, list[asyncio.Queue[Event[resources.Resource] | _Expired]]] = {}
        self._versions = itertools.count(1)
        self._version = 0

    async def get(self, kind: type[R], name: str) -> R | None:
        found = self._objects.get(kind.kind_name, {}).get(name)
        return _copy(found) if found is not None else None  # type: ignore[return-value]

    async def list(self, kind: type[R]) -> Listing[R]:
        items = [_copy(obj) for obj in self._objects.get(kind.kind_name, {}).values()]
        return Listing(items, str(self._version))  # type: ignore[arg-type]

    def view(self, kind: type[R]) -> builtins.list[R]:
        """The stored objects of `kind` themselves, not copies, for a reader that only reads (the operator's
        planner, once a second and on every change). A write never changes a stored object in place — it
        stores a new one — so a view keeps showing what was stored when it was taken; changing an object of
        it would change the store behind its rules, so `list` is for anyone who may."""
        return list(self._objects.get(kind.kind_name, {}).values())  # type: ignore[arg-type]

    async def create(self, obj: R) -> R:
        bucket = self._objects.setdefault(obj.kind_name, {})
        if obj.metadata.name in bucket:
            raise AlreadyExists(f"{obj.kind_name} {obj.metadata.name!r} already exists")
        stored = _copy(obj)
        stored.status = type(obj.status)()  # type: ignore[attr-defined]  # the status subresource's rule
        stored.metadata.uid = str(uuid.uuid4())
        stored.metadata.namespace = self._namespace if obj.namespaced else None
        stored.metadata.generation = 1
        stored.metadata.creation_timestamp = utcnow()
        stored.metadata.deletion_timestamp = None
        self._commit("ADDED", stored)
        return _copy(stored)

    async def patch(self, kind: type[R], name: str, patch: Patch, *, resource_version: str | None = None) -> R:
        current = self._current(kind, name, resource_version)
        wire = current.to_wire()
        meta_patch = {key: value for key, value in patch.get("metadata", {}).items() if key in MUTABLE_METADATA}
        wire["metadata"] = merge_patch(wire["metadata"], meta_patch)
        if "spec" in patch:
            wire["spec"] = merge_patch(wire.get("spec", {}), patch["spec"])
        updated = _validated(kind, wire)
        deleting = current.metadata.deletion_timestamp is not None
        if deleting and set(updated.metadata.finalizers) - set(current.metadata.finalizers):
            raise Invalid(f"{kind.kind_name} {name!r}: no new finalizers can be added while it is being deleted")
        if updated == current:
            return _copy(updated)
        if getattr(updated, "spec", None) != getattr(current, "spec", None):
            updated.metadata.generation = (current.metadata.generation or 0) + 1
        if deleting and not updated.metadata.finalizers:
            self._objects[kind.kind_name].pop(name)
            self._commit("DELETED", updated)
        else:
            self._commit("MODIFIED", updated)
        return _copy(updated)

    async def patch_status(self, kind: type[R], name: str, patch: Patch, *, resource_version: str | None = None) -> R:
        current = self._current(kind, name, resource_version)
        wire = current.to_wire()
        wire["status"] = merge_patch(wire.get("status", {}), patch)
        updated = _validated(kind, wire)
        if updated == current:
            return _copy(updated)
        self._commit("MODIFIED", updated)
        return _copy(updated)

    async def delete(self, kind: type[R], name: str) -> None:
        current = self._objects.get(kind.kind_name, {}).get(name)
        if current is None:
            raise NotFound(f"{kind.kind_name} {name!r} not found")
        if current.metadata.finalizers:
            if current.metadata.deletion_timestamp is None:
                marked = _copy(current)
                marked.metadata.deletion_timestamp = utcnow()
                marked.metadata.generation = (marked.metadata.generation or 0) + 1  # as the API server does
                self._commit("MODIFIED", marked)
            return
        removed = self._objects[kind.kind_name].pop(name)
        self._commit("DELETED", _copy(removed))

    async def watch(self, kind: type[R], *, resource_version: str | None = None) -> AsyncIterator[Event[R]]:
        queue: asyncio.Queue[Event[resources.Resource] | _Expired] = asyncio.Queue()
        watchers = self._watchers.setdefault(kind.kind_name, [])
        watchers.append(queue)  # subscribe before the snapshot so nothing falls between them
        try:
            if resource_version is None:
                backlog = [Event("ADDED", obj) for obj in self._objects.get(kind.kind_name, {}).values()]
            else:
                since = _version_number(resource_version)
                if since < self._expired_before.get(kind.kind_name, 0):
                    raise Gone(f"{kind.kind_name}: resourceVersion {resource_version} is too old")
                backlog = [event for version, event in self._history.get(kind.kind_name, ()) if version > since]
            seen = self._version
            for event in backlog:
                yield Event(event.type, _copy(event.object))  # type: ignore[arg-type]
            while True:
                item = await queue.get()
                if isinstance(item, _Expired):
                    raise Gone(f"{kind.kind_name}: the watch expired")
                if _version_number(item.object.metadata.resource_version or "0") <= seen:
                    continue  # already in the backlog
                yield Event(item.type, _copy(item.object))  # type: ignore[arg-type]
        finally:
            watchers.remove(queue)

    def expire_watches(self, kind: type[resources.Resource]) -> None:
        """What an API server does when its watch window moves on: open watches of `kind` end with Gone,
        and no watch can resume from a version before now. For tests of everything that watches."""
        self._expired_before[kind.kind_name] = self._version
        self._history.pop(kind.kind_name, None)
        for queue in self._watchers.get(kind.kind_name, []):
            queue.put_nowait(_Expired())

    def _current(self, kind: type[R], name: str, resource_version: str | None) -> R:
        current = self._objects.get(kind.kind_name, {}).get(name)
        if current is None:
            raise NotFound(f"{kind.kind_name} {name!r} not found")
        if resource_version is not None and resource_version != current.metadata.resource_version:
            raise Conflict(
                f"{kind.kind_name} {name!r} was modified: version {resource_version} is stale "
                f"(now {current.metadata.resource_version})"
            )
        return current  # type: ignore[return-value]

    def _commit(self, event_type: EventType, obj: resources.Resource) -> None:
        self._version = next(self._versions)
        obj.metadata.resource_version = str(self._version)
        if event_type != "DELETED":
            self._objects.setdefault(obj.kind_name, {})[obj.metadata.name] = obj
        event: Event[resources.Resource] = Event(event_type, obj)
        history = self._history.setdefault(obj.kind_name, collections.deque())
        history.append((self._version, event))
        while len(history) > self._history_size:
            dropped, _ = history.popleft()
            self._expired_before[obj.kind_name] = dropped
        for queue in self._watchers.get(obj.kind_name, []):
            queue.put_nowait(event)


def _validated(kind: type[R], wire: dict[str, Any]) -> R:
    try:
        return from_wire(kind, wire)
    except ValueError as exc:
        raise Invalid(f"{kind.kind_name} {wire.get('metadata', {}).get('name')!r}: {exc}") from exc


def _version_number(resource_version: str) -> int:
    try:
        return int(resource_version)
    except ValueError:
        raise Gone(f"resourceVersion {resource_version!r} is not one of this store's") from None


def _copy(obj: R) -> R:
    return obj.model_copy(deep=True)

"""The Store: how roles share resources — get, list, watch, create, update, delete — and its in-memory backend.

Every role talks to the others only through a Store, so the same code runs in one process (bare metal,
`MemoryStore`) or in three against the Kubernetes API server (a backend with the same protocol).
Updates are read-modify-write functions retried on conflict, like a client against a real API server:
stamped `resourceVersion`, `generation` bumped on spec changes, `uid` and `creationTimestamp` on create.

Objects handed out are copies: mutating one never changes the store. A watch starts with an ADDED event
per existing object, then reports every change in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Generic, Literal, Protocol, TypeVar

from llamesh_api import resources

R = TypeVar("R", bound=resources.Resource)

EventType = Literal["ADDED", "MODIFIED", "DELETED"]


class StoreError(Exception):
    """Base of the store's errors."""


class NotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


class Conflict(StoreError):
    """The object changed since it was read (stale resourceVersion)."""


T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Event(Generic[T]):
    type: EventType
    object: T


class Store(Protocol):
    async def get(self, kind: type[R], name: str) -> R | None: ...

    async def list(self, kind: type[R]) -> list[R]: ...

    async def create(self, obj: R) -> R: ...

    async def update(self, kind: type[R], name: str, mutate: Callable[[R], R | None]) -> R: ...

    async def delete(self, kind: type[R], name: str) -> None: ...

    def watch(self, kind: type[R]) -> AsyncIterator[Event[R]]: ...


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class MemoryStore:
    """Resources in this process, with watches. Safe to share between tasks of one event loop."""

    def __init__(self, *, namespace: str | None = None) -> None:
        self._namespace = namespace
        self._objects: dict[str, dict[str, resources.Resource]] = {}
        self._watchers: dict[str, list[asyncio.Queue[Event[resources.Resource]]]] = {}
        self._versions = itertools.count(1)

    async def get(self, kind: type[R], name: str) -> R | None:
        found = self._objects.get(kind.kind_name, {}).get(name)
        return _copy(found) if found is not None else None  # type: ignore[return-value]

    async def list(self, kind: type[R]) -> list[R]:
        return [_copy(obj) for obj in self._objects.get(kind.kind_name, {}).values()]  # type: ignore[misc]

    async def create(self, obj: R) -> R:
        bucket = self._objects.setdefault(obj.kind_name, {})
        if obj.metadata.name in bucket:
            raise AlreadyExists(f"{obj.kind_name} {obj.metadata.name!r} already exists")
        stored = _copy(obj)
        stored.metadata.uid = str(uuid.uuid4())
        stored.metadata.namespace = self._namespace
        stored.metadata.generation = 1
        stored.metadata.creation_timestamp = utcnow()
        stored.metadata.resource_version = str(next(self._versions))
        bucket[stored.metadata.name] = stored
        self._notify(Event("ADDED", stored))
        return _copy(stored)

    async def update(self, kind: type[R], name: str, mutate: Callable[[R], R | None]) -> R:
        """Apply `mutate` to a copy of the current object and store the result.

        `mutate` may change the copy in place (returning None) or return a new object. A changed spec
        bumps `generation`. Nothing changed means no new version and no event.
        """
        current = self._objects.get(kind.kind_name, {}).get(name)
        if current is None:
            raise NotFound(f"{kind.kind_name} {name!r} not found")
        draft: R = _copy(current)  # type: ignore[assignment]
        result = mutate(draft)
        updated: R = draft if result is None else result
        if updated.metadata.resource_version != current.metadata.resource_version:
            raise Conflict(f"{kind.kind_name} {name!r} was modified concurrently")
        if updated == current:
            return _copy(updated)
        if getattr(updated, "spec", None) != getattr(current, "spec", None):
            updated.metadata.generation = (current.metadata.generation or 0) + 1
        updated.metadata.resource_version = str(next(self._versions))
        self._objects[kind.kind_name][name] = updated
        self._notify(Event("MODIFIED", updated))
        return _copy(updated)

    async def delete(self, kind: type[R], name: str) -> None:
        removed = self._objects.get(kind.kind_name, {}).pop(name, None)
        if removed is None:
            raise NotFound(f"{kind.kind_name} {name!r} not found")
        self._notify(Event("DELETED", removed))

    async def watch(self, kind: type[R]) -> AsyncIterator[Event[R]]:
        queue: asyncio.Queue[Event[resources.Resource]] = asyncio.Queue()
        watchers = self._watchers.setdefault(kind.kind_name, [])
        watchers.append(queue)  # subscribe before the snapshot so nothing falls between them
        try:
            for obj in list(self._objects.get(kind.kind_name, {}).values()):
                yield Event("ADDED", _copy(obj))  # type: ignore[arg-type]
            while True:
                event = await queue.get()
                yield Event(event.type, _copy(event.object))  # type: ignore[arg-type]
        finally:
            watchers.remove(queue)

    def _notify(self, event: Event[resources.Resource]) -> None:
        for queue in self._watchers.get(event.object.kind_name, []):
            queue.put_nowait(event)


def _copy(obj: R) -> R:
    return obj.model_copy(deep=True)

"""The in-memory Store: create stamps metadata, updates bump resourceVersion (and generation only on spec
changes), no-op updates emit nothing, conflicts are detected, copies are isolated, watches replay the
existing objects then every change in order, deletes are reported."""

from __future__ import annotations

import asyncio

import pytest

from llamesh_api import resources, store


def instance(name: str = "i-1") -> resources.LlamaInstance:
    return resources.LlamaInstance(
        metadata=resources.ObjectMeta(name=name),
        spec=resources.InstanceSpec(model="m", profile="default", args_hash="abc"),
    )


async def test_create_stamps_metadata_and_refuses_duplicates() -> None:
    memory = store.MemoryStore()
    created = await memory.create(instance())
    assert created.metadata.uid and created.metadata.resource_version
    assert created.metadata.generation == 1
    assert created.metadata.creation_timestamp is not None
    with pytest.raises(store.AlreadyExists):
        await memory.create(instance())


async def test_update_versions_and_generation() -> None:
    memory = store.MemoryStore()
    created = await memory.create(instance())

    def ready(obj: resources.LlamaInstance) -> None:
        obj.status.phase = resources.Phase.READY

    status_changed = await memory.update(resources.LlamaInstance, "i-1", ready)
    assert status_changed.status.phase is resources.Phase.READY
    assert status_changed.metadata.generation == 1
    assert int(status_changed.metadata.resource_version or 0) > int(created.metadata.resource_version or 0)

    def drain(obj: resources.LlamaInstance) -> None:
        obj.spec.drain = True

    spec_changed = await memory.update(resources.LlamaInstance, "i-1", drain)
    assert spec_changed.metadata.generation == 2

    unchanged = await memory.update(resources.LlamaInstance, "i-1", drain)
    assert unchanged.metadata.resource_version == spec_changed.metadata.resource_version


async def test_stale_writes_conflict_and_missing_objects_are_not_found() -> None:
    memory = store.MemoryStore()
    await memory.create(instance())

    def stale(obj: resources.LlamaInstance) -> resources.LlamaInstance:
        obj.metadata.resource_version = "0"
        return obj

    with pytest.raises(store.Conflict):
        await memory.update(resources.LlamaInstance, "i-1", stale)
    with pytest.raises(store.NotFound):
        await memory.update(resources.LlamaInstance, "nope", lambda obj: None)
    with pytest.raises(store.NotFound):
        await memory.delete(resources.LlamaInstance, "nope")


async def test_handed_out_objects_are_copies() -> None:
    memory = store.MemoryStore()
    created = await memory.create(instance())
    created.status.phase = resources.Phase.FAILED
    fetched = await memory.get(resources.LlamaInstance, "i-1")
    assert fetched is not None and fetched.status.phase is resources.Phase.PENDING
    assert [obj.name for obj in await memory.list(resources.LlamaInstance)] == ["i-1"]
    assert await memory.list(resources.LlamaNode) == []


async def test_watch_replays_then_follows() -> None:
    memory = store.MemoryStore()
    await memory.create(instance("a"))
    seen: list[tuple[str, str]] = []

    async def consume() -> None:
        async for event in memory.watch(resources.LlamaInstance):
            seen.append((event.type, event.object.name))
            if event.type == "DELETED":
                return

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)
    await memory.create(instance("b"))
    await memory.update(resources.LlamaInstance, "b", lambda obj: setattr(obj.status, "port", 1234))
    await memory.delete(resources.LlamaInstance, "a")
    await asyncio.wait_for(consumer, 2)
    assert seen == [("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "b"), ("DELETED", "a")]

"""The Store contract, run against every backend (`store_backends`): the in-memory store of bare metal, the
Kubernetes store on the kmock emulator, and the Kubernetes store on a real kube-apiserver.

Covers: create stamps metadata and ignores status; get/list (with the list's resourceVersion); duplicate
names; spec writes bump generation, status writes do not; the status split both ways; merge patches of
different status fields by different writers both land; stale versions conflict; concurrent writers through
`writes.update` all land; deletion with finalizers (deletionTimestamp, no new finalizers, gone when cleared);
objects carrying fields this version does not know read back; watches from a version, watches without one,
Gone for an expired version; and the informer surviving an expired watch (on the real server: etcd
compaction plus an API-server restart) with its cache converged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

import store_backends
from llamesh_api import informer, resources, store, writes
from rig import apiserver, kmock_kube, waiting

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def kmock_pair() -> AsyncIterator[tuple[store_backends.Backend, kmock_kube.KubeEmulator]]:
    async with store_backends.kmock_backend() as pair:
        yield pair


@pytest_asyncio.fixture(params=["memory", "kmock", "apiserver"], loop_scope="session")
async def backend(
    request: pytest.FixtureRequest,
    real_apiserver: apiserver.ApiServer,
    kmock_pair: tuple[store_backends.Backend, kmock_kube.KubeEmulator],
) -> AsyncIterator[store_backends.Backend]:
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "memory":
            chosen = await stack.enter_async_context(store_backends.memory())
        elif request.param == "kmock":
            chosen = kmock_pair[0]
        else:
            chosen = await stack.enter_async_context(store_backends.apiserver_backend(real_apiserver))
        await chosen.cleanup()
        yield chosen
        await chosen.cleanup()


def instance(name: str = "i-1", *, finalizers: list[str] | None = None) -> resources.LlamaInstance:
    return resources.LlamaInstance(
        metadata=resources.ObjectMeta(name=name, finalizers=finalizers or []),
        spec=resources.InstanceSpec(model="m", profile="default", args_hash="abc"),
    )


async def test_create_stamps_metadata_ignores_status_and_refuses_duplicates(backend: store_backends.Backend) -> None:
    obj = instance()
    obj.status.phase = resources.Phase.READY  # a create cannot set status
    created = await backend.store.create(obj)
    assert created.metadata.uid and created.metadata.resource_version
    assert created.metadata.generation == 1
    assert created.metadata.creation_timestamp is not None
    assert created.status.phase is resources.Phase.PENDING
    with pytest.raises(store.AlreadyExists):
        await backend.store.create(instance())
    fetched = await backend.store.get(resources.LlamaInstance, "i-1")
    assert fetched is not None and fetched.metadata.uid == created.metadata.uid
    assert await backend.store.get(resources.LlamaInstance, "nope") is None
    listing = await backend.store.list(resources.LlamaInstance)
    assert [item.name for item in listing.items] == ["i-1"] and listing.resource_version


async def test_cluster_scoped_nodes(backend: store_backends.Backend) -> None:
    node = await backend.store.create(resources.LlamaNode(metadata=resources.ObjectMeta(name="host-a")))
    assert node.metadata.namespace is None
    assert [item.name for item in (await backend.store.list(resources.LlamaNode)).items] == ["host-a"]


async def test_spec_and_status_are_written_separately(backend: store_backends.Backend) -> None:
    created = await backend.store.create(instance())

    spec_changed = await backend.store.patch(
        resources.LlamaInstance, "i-1", {"spec": {"drain": True}, "status": {"phase": "Ready"}}
    )
    assert spec_changed.spec.drain is True
    assert spec_changed.status.phase is resources.Phase.PENDING  # status in a main-resource write is ignored
    assert spec_changed.metadata.generation == 2
    assert int(spec_changed.metadata.resource_version or 0) > int(created.metadata.resource_version or 0)

    status_changed = await backend.store.patch_status(resources.LlamaInstance, "i-1", {"phase": "Ready", "port": 8081})
    assert status_changed.status.phase is resources.Phase.READY and status_changed.status.port == 8081
    assert status_changed.metadata.generation == 2  # status changes never bump generation
    assert status_changed.spec.drain is True

    # writes.update / update_status only ever send their own half
    await writes.update(backend.store, resources.LlamaInstance, "i-1", lambda o: setattr(o.status, "port", 1))
    await writes.update_status(backend.store, resources.LlamaInstance, "i-1", lambda o: setattr(o.spec, "drain", False))
    after = await backend.store.get(resources.LlamaInstance, "i-1")
    assert after is not None and after.status.port == 8081 and after.spec.drain is True


async def test_status_writers_of_different_fields_never_undo_each_other(backend: store_backends.Backend) -> None:
    await backend.store.create(instance())

    async def report(gateway: str, in_flight: int) -> None:
        usage = resources.GatewayUsage(in_flight=in_flight).to_wire()
        await backend.store.patch_status(resources.LlamaInstance, "i-1", {"usage": {gateway: usage}})

    def ready(obj: resources.LlamaInstance) -> None:
        obj.status.phase = resources.Phase.READY

    await asyncio.gather(
        report("gw-a", 2), report("gw-b", 3), writes.update_status(backend.store, resources.LlamaInstance, "i-1", ready)
    )
    final = await backend.store.get(resources.LlamaInstance, "i-1")
    assert final is not None
    assert final.status.phase is resources.Phase.READY
    assert {name: usage.in_flight for name, usage in final.status.usage.items()} == {"gw-a": 2, "gw-b": 3}
    assert final.status.in_flight == 5


async def test_stale_versions_conflict_and_missing_objects_are_not_found(backend: store_backends.Backend) -> None:
    created = await backend.store.create(instance())
    await backend.store.patch(resources.LlamaInstance, "i-1", {"metadata": {"labels": {"a": "1"}}})
    with pytest.raises(store.Conflict):
        await backend.store.patch(
            resources.LlamaInstance,
            "i-1",
            {"spec": {"drain": True}},
            resource_version=created.metadata.resource_version,
        )
    with pytest.raises(store.NotFound):
        await backend.store.patch(resources.LlamaInstance, "nope", {"spec": {"drain": True}})
    with pytest.raises(store.NotFound):
        await backend.store.patch_status(resources.LlamaInstance, "nope", {"phase": "Ready"})
    with pytest.raises(store.NotFound):
        await backend.store.delete(resources.LlamaInstance, "nope")
    assert await writes.update(backend.store, resources.LlamaInstance, "nope", lambda o: None) is None


async def test_concurrent_writers_all_land(backend: store_backends.Backend) -> None:
    await backend.store.create(instance())

    def bump(obj: resources.LlamaInstance) -> None:
        obj.metadata.annotations["count"] = str(int(obj.metadata.annotations.get("count", "0")) + 1)

    await asyncio.gather(*(writes.update(backend.store, resources.LlamaInstance, "i-1", bump) for _ in range(8)))
    final = await backend.store.get(resources.LlamaInstance, "i-1")
    assert final is not None and final.metadata.annotations["count"] == "8"


async def test_deletion_waits_for_finalizers(backend: store_backends.Backend) -> None:
    await backend.store.create(instance(finalizers=["llamesh.dev/drain"]))
    await backend.store.delete(resources.LlamaInstance, "i-1")
    marked = await backend.store.get(resources.LlamaInstance, "i-1")
    assert marked is not None and marked.metadata.deletion_timestamp is not None
    await backend.store.delete(resources.LlamaInstance, "i-1")  # deleting again changes nothing
    with pytest.raises(store.Invalid):
        await backend.store.patch(
            resources.LlamaInstance, "i-1", {"metadata": {"finalizers": ["llamesh.dev/drain", "other/one"]}}
        )
    # status can still be written while it is going
    await backend.store.patch_status(resources.LlamaInstance, "i-1", {"phase": "Stopped"})

    def release(obj: resources.LlamaInstance) -> None:
        obj.metadata.finalizers.remove("llamesh.dev/drain")

    await writes.update(backend.store, resources.LlamaInstance, "i-1", release)
    await waiting.eventually(
        lambda: _absent(backend, "i-1"), within_s=10, what="the object to go once its finalizer was cleared"
    )


async def _absent(backend: store_backends.Backend, name: str) -> bool:
    return await backend.store.get(resources.LlamaInstance, name) is None


async def test_fields_this_version_does_not_know_are_ignored_on_read(backend: store_backends.Backend) -> None:
    await backend.allow_unknown_field(resources.LlamaInstance, "futureField")
    await backend.store.create(instance())

    async def written() -> bool:
        await backend.store.patch_status(resources.LlamaInstance, "i-1", {"phase": "Ready", "futureField": "x"})
        raw = await backend.raw_get(resources.LlamaInstance, "i-1")
        return backend.name == "memory" or (raw is not None and raw.get("status", {}).get("futureField") == "x")

    await waiting.eventually(written, within_s=30, what="a status with a field from a newer CRD to be kept")
    read = await backend.store.get(resources.LlamaInstance, "i-1")
    assert read is not None and read.status.phase is resources.Phase.READY
    listed = (await backend.store.list(resources.LlamaInstance)).items
    assert [item.status.phase for item in listed] == [resources.Phase.READY]


async def test_an_object_the_models_refuse_never_breaks_lists_or_watches(backend: store_backends.Backend) -> None:
    """The CRD's schema admits a profile with two model sources; the cookbook's rules do not."""
    good = {"metadata": {"name": "good"}, "spec": {"profiles": [{"id": "default", "modelPath": "/m.gguf"}]}}
    bad = {
        "kind": "LlamaModel",
        "metadata": {"name": "bad"},
        "spec": {"profiles": [{"id": "default", "modelPath": "/m.gguf", "hfRepo": "org/repo"}]},
    }
    await backend.raw_create(resources.LlamaModel, {"kind": "LlamaModel", **good})
    if backend.name == "memory":
        with pytest.raises(ValueError):  # bare metal validates on the way in (cookbook loading says where)
            await backend.raw_create(resources.LlamaModel, bad)
        return
    await backend.raw_create(resources.LlamaModel, bad)
    assert [m.name for m in (await backend.store.list(resources.LlamaModel)).items] == ["good"]
    with pytest.raises(store.Invalid, match="'bad'"):
        await backend.store.get(resources.LlamaModel, "bad")
    watcher = informer.Informer(backend.store, resources.LlamaModel)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(watcher.listed.wait(), 20)
        await backend.raw_create(resources.LlamaModel, {**bad, "metadata": {"name": "bad-two"}})
        await backend.raw_create(resources.LlamaModel, {"kind": "LlamaModel", **good, "metadata": {"name": "fine"}})
        await waiting.eventually(lambda: "fine" in watcher.cache, within_s=20, what="the informer to go on")
        assert set(watcher.cache) == {"good", "fine"} and watcher.failures == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_watch_from_a_version_reports_later_changes_in_order(backend: store_backends.Backend) -> None:
    await backend.store.create(instance("old"))
    listing = await backend.store.list(resources.LlamaInstance)
    seen: list[tuple[str, str]] = []

    async def consume() -> None:
        async for event in backend.store.watch(resources.LlamaInstance, resource_version=listing.resource_version):
            seen.append((event.type, event.object.name))
            if event.type == "DELETED":
                return

    consumer = asyncio.create_task(consume())
    await backend.store.create(instance("new"))
    await backend.store.patch_status(resources.LlamaInstance, "new", {"port": 1234})
    await backend.store.delete(resources.LlamaInstance, "old")
    await asyncio.wait_for(consumer, 20)
    assert seen == [("ADDED", "new"), ("MODIFIED", "new"), ("DELETED", "old")]


async def test_watch_without_a_version_starts_with_what_exists(backend: store_backends.Backend) -> None:
    await backend.store.create(instance("a"))
    watch = backend.store.watch(resources.LlamaInstance)
    try:
        first = await asyncio.wait_for(anext(watch), 20)
        assert (first.type, first.object.name) == ("ADDED", "a")
    finally:
        await watch.aclose()


async def test_an_expired_version_is_gone(backend: store_backends.Backend) -> None:
    await backend.store.create(instance("a"))
    old = (await backend.store.list(resources.LlamaInstance)).resource_version
    await backend.store.patch_status(resources.LlamaInstance, "a", {"port": 1})
    await backend.expire(resources.LlamaInstance)
    await backend.store.patch_status(resources.LlamaInstance, "a", {"port": 2})

    async def resume() -> None:
        async for _event in backend.store.watch(resources.LlamaInstance, resource_version=old):
            pass

    with pytest.raises(store.Gone):
        await asyncio.wait_for(resume(), 30)


async def test_the_informer_survives_expiry_and_converges(backend: store_backends.Backend) -> None:
    await backend.store.create(instance("before"))
    events: list[tuple[str, str]] = []
    watcher = informer.Informer(
        backend.store, resources.LlamaInstance, on_event=lambda e: events.append((e.type, e.object.name))
    )
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(watcher.listed.wait(), 20)
        assert set(watcher.cache) == {"before"}
        await backend.store.create(instance("during"))
        await waiting.eventually(lambda: "during" in watcher.cache, within_s=20, what="the informer to see a create")

        await backend.expire(resources.LlamaInstance)
        await backend.store.delete(resources.LlamaInstance, "before")
        await backend.store.create(instance("after"))
        await waiting.eventually(
            lambda: set(watcher.cache) == {"during", "after"}, within_s=60, what="the informer to converge"
        )
        # (whether it had to list again depends on whether its last version was still resumable: a server may
        # resume a watch from its newest version even after compaction; test_kube_store_faults forces 410)
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_real_apiserver_binaries_are_found() -> None:
    """The real-server half of this suite must run in CI, never skip: say how to get the binaries."""
    found = apiserver.assets_dir()
    assert found is not None and (Path(found) / "kube-apiserver").exists(), (
        "kube-apiserver/etcd test binaries not found: set KUBEBUILDER_ASSETS (setup-envtest use 1.36) "
        "or provide ../shared/k8s next to the checkout"
    )

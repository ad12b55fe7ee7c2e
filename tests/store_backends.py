"""The Store backends the contract suite runs against, each behind one small interface.

- `memory`: `MemoryStore`, what bare metal runs on;
- `kmock`: `KubeStore` against the fault-injecting emulator in `rig.kmock_kube` (409 storms, 429, 5xx and
  410 on cue, which a real server cannot be made to do);
- `apiserver`: `KubeStore` against the real kube-apiserver + etcd pair of `rig.apiserver`, with the CRDs
  from `crds/` applied (schemas, the status subresource, conflicts, watches and finalizers as the server
  itself decides them).

Each backend can make watches expire (`expire`: open watches end, old versions cannot be resumed), and
can admit a field the resource models do not know (`allow_unknown_field`), so forward compatibility is
tested where it matters: on the real server a field outside the CRD's schema is pruned, so a newer CRD
with that field is installed first.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from llamesh_api import kube_client, kube_store, resources, retrying, store
from rig import apiserver, kmock_kube

ROOT = Path(__file__).parent.parent


@dataclasses.dataclass
class Backend:
    name: str
    store: store.Store
    expire: Callable[[type[resources.Resource]], Awaitable[None]]
    raw_get: Callable[[type[resources.Resource], str], Awaitable[dict[str, Any] | None]]
    raw_create: Callable[[type[resources.Resource], dict[str, Any]], Awaitable[None]]
    allow_unknown_field: Callable[[type[resources.Resource], str], Awaitable[None]]
    cleanup: Callable[[], Awaitable[None]]


async def _nothing(*_args: object) -> None:
    return None


@contextlib.asynccontextmanager
async def memory() -> AsyncIterator[Backend]:
    memory_store = store.MemoryStore(namespace="default")

    async def expire(kind: type[resources.Resource]) -> None:
        memory_store.expire_watches(kind)

    async def raw_get(kind: type[resources.Resource], name: str) -> dict[str, Any] | None:
        found = await memory_store.get(kind, name)
        return found.to_wire() if found is not None else None

    async def raw_create(kind: type[resources.Resource], wire: dict[str, Any]) -> None:
        await memory_store.create(store.from_wire(kind, wire))

    yield Backend("memory", memory_store, expire, raw_get, raw_create, _nothing, _nothing)


def kube_backend(name: str, kube: kube_store.KubeStore, expire: Callable[[type[resources.Resource]], Awaitable[None]]
                 , allow: Callable[[type[resources.Resource], str], Awaitable[None]]) -> Backend:  # fmt: skip
    async def raw_get(kind: type[resources.Resource], obj_name: str) -> dict[str, Any] | None:
        try:
            return await kube.client.request("GET", kube.path(kind, obj_name))
        except store.NotFound:
            return None

    async def raw_create(kind: type[resources.Resource], wire: dict[str, Any]) -> None:
        await kube.client.request("POST", kube.path(kind), body={"apiVersion": resources.API_VERSION, **wire})

    async def cleanup() -> None:
        """Delete every object the test left (finalizers cleared first), so tests do not see each other's."""
        for kind in resources.RESOURCE_KINDS:
            for obj in (await kube.list(kind)).items:
                with contextlib.suppress(store.NotFound):
                    if obj.metadata.finalizers:
                        await kube.patch(kind, obj.name, {"metadata": {"finalizers": None}})
                    await kube.delete(kind, obj.name)

    return Backend(name, kube, expire, raw_get, raw_create, allow, cleanup)


@contextlib.asynccontextmanager
async def kmock_backend(
    *, policy: retrying.Policy = retrying.DEFAULT
) -> AsyncIterator[tuple[Backend, kmock_kube.KubeEmulator]]:
    async with kmock_kube.running() as emulator:
        connection = kube_client.Connection(
            server=str(emulator.url).rstrip("/"), namespace="default", ssl_context=False
        )
        kube = kube_store.KubeStore(kube_client.Client(connection, policy=policy), watch_timeout_s=30)

        async def expire(kind: type[resources.Resource]) -> None:
            emulator.expire_watches(kind.plural)

        try:
            yield kube_backend("kmock", kube, expire, _nothing), emulator
        finally:
            await kube.close()


@contextlib.asynccontextmanager
async def apiserver_backend(server: apiserver.ApiServer) -> AsyncIterator[Backend]:
    connection = kube_client.load(kubeconfig=str(server.kubeconfig_path))
    kube = kube_store.KubeStore(kube_client.Client(connection), watch_timeout_s=30)

    async def expire(_kind: type[resources.Resource]) -> None:
        # What really makes a version unresumable: etcd compacts its history, and the API server's watch
        # cache starts afresh after a restart. Open watches break when the server goes away.
        await apiserver.compact_etcd(server)
        await apiserver.restart_apiserver(server)

    async def allow(kind: type[resources.Resource], field: str) -> None:
        """Install a newer CRD of `kind` whose status schema also has `field` (as the next release might)."""
        crd_name = f"{kind.plural}.{resources.GROUP}"
        crd = await kube.client.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd_name}")
        status_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        if field in status_schema.get("properties", {}):
            return
        status_schema.setdefault("properties", {})[field] = {"type": "string"}
        await kube.client.request(
            "PUT",
            f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd_name}",
            body=crd,
        )

    try:
        yield kube_backend("apiserver", kube, expire, allow)
    finally:
        await kube.close()

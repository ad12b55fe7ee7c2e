"""The Store on the Kubernetes API: llamesh's custom resources as the API server keeps them.

`LlamaModel` and `LlamaInstance` live in one namespace (the store's), `LlamaNode` is cluster-scoped, all in
`llamesh.dev/v1alpha1` (the CRDs in `crds/`). Each Store method is one API call (two for nothing):

- `create` → POST (the server drops `status`: status subresource), `patch` → merge PATCH of the object
  with `metadata.resourceVersion` as the precondition when given, `patch_status` → merge PATCH of
  `/status`, `delete` → DELETE (finalizers make it a mark), `get`/`list` → GET;
- `watch` → GET `?watch=true&resourceVersion=…&timeoutSeconds=…`; an `ERROR` event with code 410 (or an
  HTTP 410) raises `store.Gone`; the stream ending at the server's timeout ends the iteration.

Objects are read with `store.from_wire`, so fields this version does not know are ignored. An object that
the API server accepted but the resource models refuse (a `LlamaModel` whose spec passes the CRD's schema
but not the cookbook's rules: two model sources, a `:` in a profile id) is left out of lists and watches
with a warning — one bad object must not stop every role's informer — and `get` raises `store.Invalid`
for it. The operator reports such a model as `Accepted=False`, with the reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar, cast

import pydantic

from llamesh_api import kube_client, resources, store

log = logging.getLogger(__name__)

R = TypeVar("R", bound=resources.Resource)

WATCH_TIMEOUT_S = 300  # the server ends each watch after this; the informer opens the next one


class KubeStore:
    def __init__(self, client: kube_client.Client, *, watch_timeout_s: int = WATCH_TIMEOUT_S) -> None:
        self.client = client
        self.namespace = client.connection.namespace
        self._watch_timeout_s = watch_timeout_s
        self._unreadable: set[tuple[str, str, str]] = set()  # (kind, name, resourceVersion) already warned of

    async def close(self) -> None:
        await self.client.close()

    def path(self, kind: type[resources.Resource], name: str | None = None, *, subresource: str = "") -> str:
        base = f"/apis/{resources.GROUP}/{resources.VERSION}"
        if kind.namespaced:
            base += f"/namespaces/{self.namespace}"
        base += f"/{kind.plural}"
        if name is not None:
            base += f"/{name}"
        if subresource:
            base += f"/{subresource}"
        return base

    def _readable(self, kind: type[R], wire: dict[str, Any]) -> R | None:
        """`wire` as an object, or None (warned once per version: reconcile passes list it again and again)."""
        try:
            return _read(kind, wire)
        except store.Invalid as exc:
            metadata = wire.get("metadata") or {}
            key = (kind.kind_name, str(metadata.get("name")), str(metadata.get("resourceVersion")))
            if key not in self._unreadable:
                self._unreadable.add(key)
                log.warning("%s; left out until it is fixed", exc)
            return None

    async def get(self, kind: type[R], name: str) -> R | None:
        try:
            wire = await self.client.request("GET", self.path(kind, name))
        except store.NotFound:
            return None
        return _read(kind, wire)

    async def list(self, kind: type[R]) -> store.Listing[R]:
        wire = await self.client.request("GET", self.path(kind))
        items = [obj for obj in (self._readable(kind, item) for item in wire.get("items", [])) if obj is not None]
        return store.Listing(items, str(wire.get("metadata", {}).get("resourceVersion", "")))

    async def create(self, obj: R) -> R:
        body = obj.to_wire()
        body.pop("status", None)
        metadata = body.setdefault("metadata", {})
        for server_field in ("uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp"):
            metadata.pop(server_field, None)
        if obj.namespaced:
            metadata["namespace"] = self.namespace
        else:
            metadata.pop("namespace", None)
        wire = await self.client.request("POST", self.path(type(obj)), body=body)
        return store.from_wire(type(obj), wire)

    async def patch(self, kind: type[R], name: str, patch: store.Patch, *, resource_version: str | None = None) -> R:
        body: dict[str, Any] = {key: value for key, value in patch.items() if key in ("metadata", "spec")}
        if resource_version is not None:
            body.setdefault("metadata", {})["resourceVersion"] = resource_version
        wire = await self.client.request(
            "PATCH", self.path(kind, name), body=body, content_type="application/merge-patch+json"
        )
        return _read(kind, wire)

    async def patch_status(
        self, kind: type[R], name: str, patch: store.Patch, *, resource_version: str | None = None
    ) -> R:
        body: dict[str, Any] = {"status": patch}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        wire = await self.client.request(
            "PATCH", self.path(kind, name, subresource="status"), body=body, content_type="application/merge-patch+json"
        )
        return _read(kind, wire)

    async def delete(self, kind: type[R], name: str) -> None:
        await self.client.request("DELETE", self.path(kind, name))

    async def watch(self, kind: type[R], *, resource_version: str | None = None) -> AsyncIterator[store.Event[R]]:
        params = {"watch": "true", "timeoutSeconds": str(self._watch_timeout_s)}
        if resource_version:
            params["resourceVersion"] = resource_version
        async for line in self.client.stream(self.path(kind), params=params, timeout_s=self._watch_timeout_s):
            event_type, wire = line.get("type"), line.get("object") or {}
            if event_type == "ERROR":
                raise kube_client.error_for(int(wire.get("code") or 500), json.dumps(wire))
            if event_type in ("ADDED", "MODIFIED", "DELETED"):
                obj = self._readable(kind, wire)
                if obj is not None:
                    yield store.Event(cast(store.EventType, event_type), obj)
            # BOOKMARK and anything newer: nothing to apply


def _read(kind: type[R], wire: dict[str, Any]) -> R:
    try:
        return store.from_wire(kind, wire)
    except pydantic.ValidationError as exc:
        name = wire.get("metadata", {}).get("name")
        raise store.Invalid(f"{kind.kind_name} {name!r} cannot be read: {_first_error(exc)}") from exc


def _first_error(exc: pydantic.ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return str(exc)
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', '')}{more}"

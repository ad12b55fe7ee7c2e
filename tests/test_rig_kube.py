"""The two Kubernetes rigs, proven with plain aiohttp requests: `rig.apiserver` (a real etcd + kube-apiserver
pair) and `rig.kmock_kube` (kmock's emulator, fixed for client stores, with faults on cue).

Covered on both rigs by the same test body (parametrized "real" / "kmock"), so the fake is held to what the
real server does:
- create, get, list (a list carries apiVersion, kind and metadata.resourceVersion); 409 AlreadyExists;
  404 NotFound; uid, creationTimestamp, generation 1 stamped;
- the status subresource: create drops status, main-resource patches keep the stored status, `/status`
  patches change only status; generation moves with spec only;
- optimistic concurrency: a stale resourceVersion in a merge patch or PUT is 409 Conflict, a PUT without one
  is 422, a no-op patch keeps the version, a failed JSON-patch `test` is 422;
- finalizers: DELETE sets deletionTimestamp (MODIFIED, generation +1) and keeps the object; a new finalizer
  is then refused (422); emptying the finalizers removes it (DELETED); DELETE without finalizers removes it
  at once and answers a Status;
- watches: from a list's resourceVersion only newer events arrive (no replayed ADDED), without a version
  ADDED for every object, label selectors and bookmarks accepted; a version older than the server keeps is
  the in-stream ERROR 410 Expired.
Real server only: it starts, CRDs are Established and served, the kubeconfig and strict TLS work, and
restarting kube-apiserver with etcd kept keeps the objects (watches that were open end; after an etcd
compaction a watch from an older version is 410 Expired; a fresh list-then-watch works).
kmock only, each fault on cue: watch 410 in-stream and as HTTP 410, a 409 conflict storm, 429 with
Retry-After, 500 and 503, ending open watches cleanly and abruptly, expiring them (end, then 410),
bookmarks; cluster-scoped and undeclared resources; the `kmock` fixture with `KubeEmulator`, seeded objects
and a DSL reaction.

The real server starts once for this module (about 5 s). Without its binaries those tests FAIL, never skip.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import kmock
import kubernetes
import pytest
import pytest_asyncio
import yaml

from rig import apiserver, kmock_kube, waiting

GROUP_VERSION = "/apis/llamesh.dev/v1alpha1"
MODELS = f"{GROUP_VERSION}/namespaces/default/llamamodels"
MERGE = {"Content-Type": "application/merge-patch+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}
MISSING_BINARIES = (
    "kube-apiserver/etcd binaries not found: set KUBEBUILDER_ASSETS to a folder holding both"
    f" (`setup-envtest use 1.36` prints one) or provide {apiserver.SHARED_ASSETS_SCRIPT}"
)
EVENT_TIMEOUT_S = 20.0

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[apiserver.ApiServer | None]:
    """The module's real API server, or None when its binaries are missing (the tests then fail)."""
    if await asyncio.to_thread(apiserver.assets_dir) is None:
        yield None
        return
    async with apiserver.running(tmp_path_factory.mktemp("kube")) as server:
        yield server


@pytest.fixture(params=["real", "kmock"])
def rig(request: pytest.FixtureRequest) -> tuple[str, apiserver.ApiServer | None]:
    """Which rig a parametrized test talks to; the real server is started only when a test needs it."""
    name: str = request.param
    return name, request.getfixturevalue("real_server") if name == "real" else None


@dataclass
class Watch:
    """An open watch stream, read one JSON event per line."""

    response: aiohttp.ClientResponse

    async def next(self, timeout_s: float = EVENT_TIMEOUT_S) -> dict[str, Any] | None:
        """The next event, or None at the end of the stream."""
        async with asyncio.timeout(timeout_s):
            line = await self.response.content.readline()
        return json.loads(line) if line else None

    async def take(self, count: int) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for _ in range(count):
            event = await self.next()
            assert event is not None, f"the watch ended after {events}"
            events.append(event)
        return events


@dataclass
class Api:
    """Plain-aiohttp access to either rig (`kube` is the emulator on the kmock rig, `server` the real one)."""

    session: aiohttp.ClientSession
    kube: kmock_kube.KubeEmulator | None = None
    server: apiserver.ApiServer | None = None

    async def call(
        self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        async with self.session.request(method, path, json=body, headers=headers) as response:
            text = await response.text()
            return response.status, json.loads(text) if text else None

    async def create(self, obj: dict[str, Any]) -> tuple[int, Any]:
        return await self.call("POST", MODELS, obj)

    async def get(self, name: str) -> tuple[int, Any]:
        return await self.call("GET", f"{MODELS}/{name}")

    async def patch(self, name: str, body: Any, *, status: bool = False) -> tuple[int, Any]:
        return await self.call("PATCH", f"{MODELS}/{name}{'/status' if status else ''}", body, headers=MERGE)

    @contextlib.asynccontextmanager
    async def watch(self, **params: str) -> AsyncIterator[Watch]:
        query = {"watch": "true", "timeoutSeconds": "60", **params}
        async with self.session.get(MODELS, params=query) as response:
            assert response.status == 200, await response.text()
            yield Watch(response)


@contextlib.asynccontextmanager
async def connect(rig: tuple[str, apiserver.ApiServer | None]) -> AsyncIterator[Api]:
    name, server = rig
    if name == "real":
        if server is None:
            pytest.fail(MISSING_BINARIES)
        async with server.session() as session:
            yield Api(session, server=server)
    else:
        async with kmock_kube.running() as kube, aiohttp.ClientSession(base_url=str(kube.url)) as session:
            yield Api(session, kube=kube)


def new_model(*, finalizers: list[str] | None = None, label: str = "") -> dict[str, Any]:
    """A valid LlamaModel with a name of its own (the real server is shared by this module's tests)."""
    metadata: dict[str, Any] = {"name": f"t-{uuid.uuid4().hex[:10]}", "labels": {"rig-test": label or "none"}}
    if finalizers:
        metadata["finalizers"] = finalizers
    return {
        "apiVersion": "llamesh.dev/v1alpha1",
        "kind": "LlamaModel",
        "metadata": metadata,
        "spec": {"profiles": [{"id": "q4"}]},
    }


# --- both rigs -------------------------------------------------------------------------------------------------


async def test_create_get_list(rig: tuple[str, apiserver.ApiServer | None]) -> None:
    async with connect(rig) as api:
        model = new_model()
        name = model["metadata"]["name"]
        status, created = await api.create(model)
        assert status == 201, created
        meta = created["metadata"]
        assert meta["name"] == name and meta["namespace"] == "default"
        assert meta["generation"] == 1 and meta["uid"] and meta["creationTimestamp"]
        assert int(meta["resourceVersion"]) > 0

        status, got = await api.get(name)
        assert status == 200 and got["metadata"]["resourceVersion"] == meta["resourceVersion"]

        status, listed = await api.call("GET", MODELS)
        assert status == 200
        assert listed["apiVersion"] == "llamesh.dev/v1alpha1" and listed["kind"] == "LlamaModelList"
        assert int(listed["metadata"]["resourceVersion"]) >= int(meta["resourceVersion"])
        assert name in [item["metadata"]["name"] for item in listed["items"]]

        status, again = await api.create(model)
        assert (status, again["kind"], again["reason"], again["code"]) == (409, "Status", "AlreadyExists", 409)
        status, missing = await api.get("no-such-model")
        assert (status, missing["reason"], missing["status"]) == (404, "NotFound", "Failure")


async def test_status_subresource(rig: tuple[str, apiserver.ApiServer | None]) -> None:
    async with connect(rig) as api:
        model = new_model()
        name = model["metadata"]["name"]
        status, created = await api.create({**model, "status": {"readyInstances": 3}})
        assert status == 201 and not created.get("status", {}).get("readyInstances"), created

        status, patched = await api.patch(name, {"spec": {"enabled": False}, "status": {"readyInstances": 5}})
        assert status == 200 and patched["spec"]["enabled"] is False
        assert not patched.get("status", {}).get("readyInstances")
        assert patched["metadata"]["generation"] == 2

        status, updated = await api.patch(
            name, {"status": {"readyInstances": 2}, "spec": {"enabled": True}}, status=True
        )
        assert status == 200
        assert updated["status"]["readyInstances"] == 2
        assert updated["spec"]["enabled"] is False  # spec is not changed through /status
        assert updated["metadata"]["generation"] == 2

        status, kept = await api.patch(name, {"metadata": {"labels": {"extra": "x"}}})
        assert status == 200 and kept["status"]["readyInstances"] == 2  # main-resource writes keep status
        assert kept["metadata"]["generation"] == 2  # metadata changes do not move generation


async def test_optimistic_concurrency(rig: tuple[str, apiserver.ApiServer | None]) -> None:
    async with connect(rig) as api:
        model = new_model()
        name = model["metadata"]["name"]
        _, created = await api.create(model)
        first_rv = created["metadata"]["resourceVersion"]
        status, patched = await api.patch(name, {"spec": {"enabled": False}})
        assert status == 200 and patched["metadata"]["resourceVersion"] != first_rv

        status, stale = await api.patch(name, {"metadata": {"resourceVersion": first_rv}, "spec": {"enabled": True}})
        assert (status, stale["reason"], stale["code"], stale["kind"]) == (409, "Conflict", 409, "Status")

        replacement = {**patched, "spec": {"profiles": [{"id": "q8"}]}}
        replacement["metadata"] = {**patched["metadata"], "resourceVersion": first_rv}
        status, stale = await api.call("PUT", f"{MODELS}/{name}", replacement)
        assert (status, stale["reason"]) == (409, "Conflict")
        del replacement["metadata"]["resourceVersion"]
        status, invalid = await api.call("PUT", f"{MODELS}/{name}", replacement)
        assert (status, invalid["reason"]) == (422, "Invalid")
        replacement["metadata"]["resourceVersion"] = patched["metadata"]["resourceVersion"]
        status, replaced = await api.call("PUT", f"{MODELS}/{name}", replacement)
        assert status == 200 and replaced["spec"]["profiles"][0]["id"] == "q8"
        assert replaced["metadata"]["generation"] == 3

        _, current = await api.get(name)
        status, unchanged = await api.patch(name, {"spec": current["spec"]})
        assert status == 200 and unchanged["metadata"]["resourceVersion"] == current["metadata"]["resourceVersion"]

        test_op = [{"op": "test", "path": "/metadata/resourceVersion", "value": first_rv}]
        status, failed = await api.call("PATCH", f"{MODELS}/{name}", test_op, headers=JSON_PATCH)
        assert (status, failed["reason"]) == (422, "Invalid")
        ops = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": current["metadata"]["resourceVersion"]},
            {"op": "add", "path": "/metadata/labels/patched", "value": "yes"},
        ]
        status, json_patched = await api.call("PATCH", f"{MODELS}/{name}", ops, headers=JSON_PATCH)
        assert status == 200 and json_patched["metadata"]["labels"]["patched"] == "yes"


async def test_finalizers_and_deletion(rig: tuple[str, apiserver.ApiServer | None]) -> None:
    async with connect(rig) as api:
        label = uuid.uuid4().hex[:8]
        model = new_model(finalizers=["llamesh.dev/test"], label=label)
        name = model["metadata"]["name"]
        _, created = await api.create(model)
        async with api.watch(
            labelSelector=f"rig-test={label}", resourceVersion=created["metadata"]["resourceVersion"]
        ) as watch:
            status, deleting = await api.call("DELETE", f"{MODELS}/{name}")
            assert status == 200 and deleting["metadata"]["deletionTimestamp"]
            assert deleting["metadata"]["generation"] == 2
            status, still = await api.get(name)
            assert status == 200 and still["metadata"]["deletionTimestamp"]

            status, refused = await api.patch(name, {"metadata": {"finalizers": ["llamesh.dev/test", "other/new"]}})
            assert (status, refused["reason"]) == (422, "Invalid")

            status, released = await api.patch(name, {"metadata": {"finalizers": None}})
            assert status == 200, released
            status, _ = await api.get(name)
            assert status == 404

            events = await watch.take(2)
            assert [event["type"] for event in events] == ["MODIFIED", "DELETED"]
            assert events[0]["object"]["metadata"]["deletionTimestamp"]
            assert events[1]["object"]["metadata"]["name"] == name

        plain = new_model(label=label)
        _, created = await api.create(plain)
        async with api.watch(
            labelSelector=f"rig-test={label}", resourceVersion=created["metadata"]["resourceVersion"]
        ) as watch:
            status, answer = await api.call("DELETE", f"{MODELS}/{plain['metadata']['name']}")
            assert status == 200 and answer["kind"] == "Status" and answer["status"] == "Success"
            event = await watch.next()
            assert event is not None and event["type"] == "DELETED"
            assert event["object"]["metadata"]["name"] == plain["metadata"]["name"]


async def test_watch_from_resource_version(rig: tuple[str, apiserver.ApiServer | None]) -> None:
    async with connect(rig) as api:
        label = uuid.uuid4().hex[:8]
        first, second = new_model(label=label), new_model(label=label)
        await api.create(first)
        status, listed = await api.call("GET", f"{MODELS}?labelSelector=rig-test%3D{label}")
        assert status == 200 and len(listed["items"]) == 1
        await api.create(second)
        await api.patch(first["metadata"]["name"], {"spec": {"enabled": False}})

        since = listed["metadata"]["resourceVersion"]
        async with api.watch(
            labelSelector=f"rig-test={label}", resourceVersion=since, allowWatchBookmarks="true"
        ) as watch:
            events = await watch.take(2)
            assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
                ("ADDED", second["metadata"]["name"]),
                ("MODIFIED", first["metadata"]["name"]),
            ]
            assert all(int(e["object"]["metadata"]["resourceVersion"]) > int(since) for e in events)
            await api.patch(second["metadata"]["name"], {"spec": {"enabled": False}})
            live = await watch.next()
            assert live is not None and (live["type"], live["object"]["metadata"]["name"]) == (
                "MODIFIED",
                second["metadata"]["name"],
            )

        async with api.watch(labelSelector=f"rig-test={label}") as watch:
            events = await watch.take(2)
            assert {e["type"] for e in events} == {"ADDED"}
            assert {e["object"]["metadata"]["name"] for e in events} == {
                first["metadata"]["name"],
                second["metadata"]["name"],
            }


async def test_watch_from_too_old_resource_version(rig: tuple[str, apiserver.ApiServer | None]) -> None:
    async with connect(rig) as api:
        # A real server keeps events since its start only; the emulator forgets them on compact().
        await api.create(new_model())
        if api.kube is not None:
            await api.create(new_model())
            api.kube.compact()
        async with api.watch(resourceVersion="1") as watch:
            event = await watch.next()
            assert event is not None and event["type"] == "ERROR", event
            assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")
            assert await watch.next() is None


# --- the real server only --------------------------------------------------------------------------------------


async def test_real_server_starts_with_crds_established(real_server: apiserver.ApiServer | None) -> None:
    if real_server is None:
        pytest.fail(MISSING_BINARIES)
    server = real_server
    async with server.session() as session:
        async with session.get("/readyz") as response:
            assert (response.status, await response.text()) == (200, "ok")
        async with session.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions") as response:
            crds = {item["metadata"]["name"]: item for item in (await response.json())["items"]}
        for name in ("llamamodels.llamesh.dev", "llamainstances.llamesh.dev", "llamanodes.llamesh.dev"):
            conditions = {c["type"]: c["status"] for c in crds[name]["status"]["conditions"]}
            assert conditions["Established"] == "True", crds[name]["status"]
        async with session.get(f"{GROUP_VERSION}/llamanodes") as response:
            assert response.status == 200 and (await response.json())["kind"] == "LlamaNodeList"
        async with session.get("/api/v1/namespaces/default") as response:
            assert response.status == 200

    config = yaml.safe_load(await asyncio.to_thread(server.kubeconfig_path.read_text))
    context = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
    assert context["namespace"] == "default" and cluster["server"] == server.url
    assert base64.b64decode(cluster["certificate-authority-data"]) == await asyncio.to_thread(server.ca_path.read_bytes)
    assert user["token"] == server.token

    def list_with_official_client() -> str:
        client = kubernetes.config.new_client_from_config(config_file=str(server.kubeconfig_path))
        with client:
            listed: Any = kubernetes.client.CustomObjectsApi(client).list_namespaced_custom_object(
                "llamesh.dev", "v1alpha1", "default", "llamamodels"
            )
            return str(listed["kind"])

    assert await asyncio.to_thread(list_with_official_client) == "LlamaModelList"

    # Strict TLS: the throwaway CA is needed, and it is enough.
    async with aiohttp.ClientSession() as untrusting:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with untrusting.get(f"{server.url}/readyz", headers=server.headers):
                pass


async def test_real_restart_keeps_etcd(real_server: apiserver.ApiServer | None) -> None:
    if real_server is None:
        pytest.fail(MISSING_BINARIES)
    server = real_server
    model = new_model()
    name = model["metadata"]["name"]
    async with server.session() as session:
        api = Api(session, server=server)
        _, created = await api.create(model)
        _, listed = await api.call("GET", MODELS)
        async with api.watch(resourceVersion=listed["metadata"]["resourceVersion"]) as open_watch:
            url_before = server.url
            assert await apiserver.compact_etcd(server) >= int(listed["metadata"]["resourceVersion"])
            await apiserver.restart_apiserver(server)
            with contextlib.suppress(aiohttp.ClientPayloadError):  # with grace_s=0 it is cut mid-stream
                assert await open_watch.next() is None, "the open watch should end when kube-apiserver stops"

    assert server.url == url_before and server.apiserver.process.poll() is None
    async with server.session() as session:
        api = Api(session, server=server)
        status, got = await api.get(name)
        assert status == 200 and got["metadata"]["uid"] == created["metadata"]["uid"]
        # Resuming from a version before the compaction and the restart: 410 Expired (the new watch cache
        # starts later, etcd has forgotten the rest); a client must list again and watch from that list.
        async with api.watch(resourceVersion=listed["metadata"]["resourceVersion"]) as watch:
            event = await watch.next()
            assert event is not None and event["type"] == "ERROR", event
            assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")
        _, relisted = await api.call("GET", MODELS)
        async with api.watch(resourceVersion=relisted["metadata"]["resourceVersion"]) as watch:
            await api.patch(name, {"spec": {"enabled": False}})
            event = await watch.next()
            assert event is not None and (event["type"], event["object"]["metadata"]["name"]) == ("MODIFIED", name)


# --- the kmock rig only: faults on cue and kmock's own features ------------------------------------------------


async def test_kmock_watch_expired_on_cue() -> None:
    async with connect(("kmock", None)) as api:
        assert api.kube is not None
        await api.create(new_model())
        api.kube.fail_next_watches()  # in-stream, like a real server
        async with api.watch() as watch:
            event = await watch.next()
            assert event is not None and event["type"] == "ERROR"
            assert (event["object"]["kind"], event["object"]["code"], event["object"]["reason"]) == (
                "Status",
                410,
                "Expired",
            )
            assert await watch.next() is None
        async with api.watch() as watch:  # the fault is spent: an ordinary watch again
            event = await watch.next()
            assert event is not None and event["type"] == "ADDED"

        api.kube.fail_next_watches(in_stream=False, plural="llamamodels")
        status, body = await api.call("GET", f"{MODELS}?watch=true")
        assert (status, body["code"], body["reason"]) == (410, 410, "Expired")


async def test_kmock_conflict_storm() -> None:
    async with connect(("kmock", None)) as api:
        assert api.kube is not None
        model = new_model()
        name = model["metadata"]["name"]
        _, created = await api.create(model)
        api.kube.fail_next(409, 2, method="PATCH")
        for _ in range(2):
            status, body = await api.patch(name, {"spec": {"enabled": False}})
            assert (status, body["reason"], body["code"]) == (409, "Conflict", 409)
        status, got = await api.get(name)
        assert status == 200 and got["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
        status, patched = await api.patch(name, {"spec": {"enabled": False}})
        assert status == 200 and patched["spec"]["enabled"] is False


async def test_kmock_throttling_and_server_errors() -> None:
    async with connect(("kmock", None)) as api:
        assert api.kube is not None
        api.kube.fail_next(429)
        async with api.session.get(MODELS) as response:
            body = await response.json()
            assert (response.status, response.headers["Retry-After"]) == (429, "1")
            assert (body["reason"], body["details"]["retryAfterSeconds"]) == ("TooManyRequests", 1)

        api.kube.fail_next(500, method="GET")
        api.kube.fail_next(503, method="POST", retry_after=3)
        status, body = await api.call("GET", MODELS)
        assert (status, body["reason"]) == (500, "InternalError")
        model = new_model()
        async with api.session.post(MODELS, json=model) as response:
            assert (response.status, response.headers["Retry-After"]) == (503, "3")
            assert (await response.json())["reason"] == "ServiceUnavailable"
        status, _ = await api.get(model["metadata"]["name"])
        assert status == 404  # the refused create changed nothing
        status, _ = await api.create(model)
        assert status == 201


async def test_kmock_disconnect_watches() -> None:
    async with connect(("kmock", None)) as api:
        kube = api.kube
        assert kube is not None
        async with api.watch() as watch:
            await waiting.eventually(lambda: kube.open_watches("llamamodels") == 1, what="the watch to open")
            assert kube.disconnect_watches() == 1
            assert await watch.next() is None  # a clean end, as when a watch times out
        await waiting.eventually(lambda: kube.open_watches() == 0, what="the watch to close")

        _, seen = await api.create(new_model())
        await api.create(new_model())
        async with api.watch(resourceVersion=str(kube.resource_version)) as watch:
            await waiting.eventually(lambda: kube.open_watches() == 1, what="the watch to open")
            assert kube.expire_watches("llamamodels") == 1  # ends it and forgets the history
            assert await watch.next() is None
        async with api.watch(resourceVersion=seen["metadata"]["resourceVersion"]) as watch:
            event = await watch.next()
            assert event is not None and (event["type"], event["object"]["code"]) == ("ERROR", 410)

        async with api.watch(resourceVersion=str(kube.resource_version)) as watch:
            await waiting.eventually(lambda: kube.open_watches() == 1, what="the watch to open")
            kube.disconnect_watches(abrupt=True)
            with pytest.raises(aiohttp.ClientPayloadError):  # what a killed kube-apiserver does too
                await watch.next()


async def test_kmock_bookmarks() -> None:
    async with connect(("kmock", None)) as api:
        kube = api.kube
        assert kube is not None
        await api.create(new_model())
        async with api.watch(allowWatchBookmarks="true", resourceVersion=str(kube.resource_version)) as watch:
            await waiting.eventually(lambda: kube.open_watches() == 1, what="the watch to open")
            assert kube.send_bookmarks() == 1
            event = await watch.next()
            assert event is not None and event["type"] == "BOOKMARK"
            assert event["object"]["kind"] == "LlamaModel"
            assert event["object"]["metadata"]["resourceVersion"] == str(kube.resource_version)


async def test_kmock_cluster_scoped_and_undeclared_resources() -> None:
    async with connect(("kmock", None)) as api:
        assert api.kube is not None
        api.kube.resources["example.dev/v1/widgets"] = kmock.ResourceInfo(
            namespaced=False, kind="Widget", subresources={"status"}
        )
        widget = {"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"a": 1}}
        status, created = await api.call("POST", "/apis/example.dev/v1/widgets", widget)
        assert status == 201 and "namespace" not in created["metadata"]
        status, _ = await api.call("GET", "/apis/example.dev/v1/namespaces/default/widgets/w")
        assert status == 404
        status, listed = await api.call("GET", "/apis/example.dev/v1/widgets")
        assert status == 200 and listed["kind"] == "WidgetList" and len(listed["items"]) == 1
        status, _ = await api.call("GET", "/apis/example.dev/v1/gadgets")
        assert status == 404


@pytest.mark.asyncio(loop_scope="function")
@pytest.mark.kmock(cls=kmock_kube.KubeEmulator)
async def test_kmock_fixture_seeded_objects_and_reactions(kmock: kmock_kube.KubeEmulator) -> None:
    assert isinstance(kmock, kmock_kube.KubeEmulator)
    kmock.objects["llamesh.dev/v1alpha1/llamamodels", "default", "seeded"] = {"spec": {"profiles": [{"id": "a"}]}}
    kmock[f"get {MODELS}/seeded"][:1] << 418
    async with aiohttp.ClientSession(base_url=str(kmock.url)) as session:
        async with session.get(f"{MODELS}/seeded") as response:
            assert response.status == 418  # the test's reaction answers first, once
        async with session.get(f"{MODELS}/seeded") as response:
            seeded = await response.json()
            assert response.status == 200
    assert seeded["metadata"]["resourceVersion"] and seeded["metadata"]["uid"]
    assert (seeded["kind"], seeded["metadata"]["namespace"]) == ("LlamaModel", "default")

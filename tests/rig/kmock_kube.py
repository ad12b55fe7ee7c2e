"""An in-process fake Kubernetes API server for custom resources, with faults on cue: kmock's emulator, fixed.

kmock 0.8's `KubernetesEmulator` stores objects and streams watches, but a Kubernetes client store cannot run
on it: it stamps no resourceVersion/uid/generation, its lists carry no resourceVersion, its watches ignore
`?resourceVersion=` (and can lose events between snapshot and subscription), it has no PUT, no optimistic
concurrency and no status subresource. `KubeEmulator` subclasses it and answers every request for a custom
resource (`/apis/{group}/{version}/[namespaces/{ns}/]{plural}[/{name}[/status]]`) with its own emulation:

- every write stamps `metadata.resourceVersion` (one global counter), `uid`, `creationTimestamp` and
  `generation` (1 on create; +1 when anything outside metadata and status changes, and when a deletion with
  finalizers starts, as the real server does); a write that changes nothing changes no version and sends no
  event, as on a real server;
- list answers carry `apiVersion`, `kind: <Kind>List` and `metadata.resourceVersion`;
- a watch subscribes and snapshots in one step; without `resourceVersion` (or with "0") it starts with ADDED
  for the current objects, with `resourceVersion=N` it replays only the events newer than N (a version older
  than the retained history, see `compact()`, gets the in-stream `ERROR` 410 Expired, as on a real server);
  `timeoutSeconds`, `allowWatchBookmarks`, `sendInitialEvents`, `labelSelector` and `fieldSelector`
  (`=`/`!=` on dotted paths such as metadata.name) work, on lists too;
- PUT and merge PATCH (`application/merge-patch+json`; strategic merge is treated the same) check a
  `metadata.resourceVersion` in the body: a stale one answers 409 Conflict; PUT without one answers 422, as a
  real server does for custom resources; JSON patch (`application/json-patch+json`) works, a failed `test`
  answers 422; POST of an existing name answers 409 AlreadyExists, anything missing 404 NotFound, all as
  Kubernetes `Status` bodies;
- the status subresource: writes to `.../NAME/status` change only `status`; create, PUT and PATCH of the main
  resource ignore `status` (create drops it, updates keep the stored one);
- DELETE of an object with finalizers sets `deletionTimestamp` (MODIFIED) and keeps it; a write that empties
  the finalizers of such an object removes it (DELETED); adding a finalizer to it answers 422; DELETE without
  finalizers removes it at once (DELETED, answered with a `Status` Success as on a real server); DELETE
  preconditions (resourceVersion, uid) are checked.

Resources must be declared, like CRDs on a real server (an undeclared one answers 404): the repository's
`crds/` are by default, more through `kmock.resources[...] = kmock.ResourceInfo(...)`. Scope
(namespaced or cluster-wide) and whether `status` is a subresource come from that declaration.

Faults on cue (each documented on its method): `fail_next()` makes the next N matching requests answer an
error (409 conflict storms, 429 with Retry-After, 500/503); `fail_next_watches()` makes the next N watch
requests answer 410 Gone (HTTP 410, or a 200 stream whose first event is ERROR 410) or another status;
`disconnect_watches()` ends every open watch stream; `compact()` forgets the event history, so watches from
an older resourceVersion get 410; `expire_watches()` does both; `send_bookmarks()` sends BOOKMARK events.

kmock's own features still work: the `kmock` pytest fixture with `@pytest.mark.kmock(cls=KubeEmulator)`,
`kmock.objects[...]` (seed objects there; they are stamped on the next request), `kmock.requests`, discovery
(/api, /apis, /version), and DSL reactions, which answer before the emulation and then change no state
(`kmock['get /apis/llamesh.dev/v1alpha1/namespaces/default/llamamodels/m1'][:1] << 418`; reactions added
with `.fallback` are ignored for custom resources).

Core resources get the same emulation once declared (all: `kmock.resources.load_bundled()`; one:
`kmock.resources["v1/events"] = kmock.ResourceInfo(namespaced=True, kind="Event")`), namespaces included:
kmock's path parser cannot read `/api/v1/namespaces[/NAME[/status]]` (every such request was a 500), so those
requests reach it under a made-up namespace, which `_handle` takes away again. Discovery answers what a real
server answers where kmock's differs: `/api/v1` says `groupVersion: v1` (kmock: `/v1`, so kubectl found no core
resource), and a subresource (`llamamodels/status`) has no short names (kmock copied its resource's, so kubectl
warned that each short name was ambiguous). With these, kopf (namespaces, discovery) and kubectl (api-resources,
apply --validate=false, get, patch, wait, delete --wait) work against it.

Deliberately not here: the OpenAPI document (kubectl's validation needs it: apply with `--validate=false`),
Table answers (kubectl shows names and ages, no printer columns), schema validation and defaulting,
server-side apply, dry-run, deletecollection, managedFields, owner-reference garbage collection, namespace
existence, RBAC; test those against the real server in `rig.apiserver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import json
import math
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal.rendering import ReactionMismatchError  # raised by reactions; not in kmock's __all__

from .apiserver import CRD_DIR, load_crds

JSON = dict[str, Any]
_REASONS = {
    400: "BadRequest",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
_HISTORY_LIMIT = 10_000  # watch events kept for ?resourceVersion= replays; older versions get 410
_LIVENESS_S = 1.0  # how often an idle watch checks whether its client went away
_MERGE_PATCH = ("application/merge-patch+json", "application/strategic-merge-patch+json")
_JSON_PATCH = "application/json-patch+json"
_VERBS = {"create", "delete", "get", "list", "patch", "update", "watch"}
# The core namespaces paths, which kmock's parser cannot read (see KubeEmulator.__call__), and the namespace
# under which the emulator hands them to it instead: not a valid namespace name, so it names no real one.
_NAMESPACES_PATH = re.compile(r"/api/v1/namespaces(?:/([^/]+)(?:/(status|finalize))?)?/?")
_CLUSTER_SCOPE = "~cluster~"
_NAMESPACES = kmock.resource("", "v1", "namespaces")


class ApiError(Exception):
    """A request the emulator answers with a Kubernetes `Status` error."""

    def __init__(
        self, code: int, message: str, *, reason: str | None = None, details: JSON | None = None, retry_after: int = 0
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details = details
        self.retry_after = retry_after

    def status(self) -> JSON:
        body: JSON = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        details = dict(self.details or {})
        if self.retry_after:
            details["retryAfterSeconds"] = self.retry_after
        if details:
            body["details"] = details
        return body

    def response(self) -> aiohttp.web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return aiohttp.web.json_response(self.status(), status=self.code, headers=headers)


@dataclass
class _Fault:
    status: int
    remaining: int
    method: str | None
    plural: str | None
    subresource: str | None
    retry_after: int
    message: str


@dataclass
class _WatchFault:
    status: int
    remaining: int
    plural: str | None
    in_stream: bool


@dataclass(frozen=True)
class _Close:
    abrupt: bool


@dataclass(eq=False)
class _Watch:
    resource: kmock.resource
    matches: Callable[[JSON], bool]
    bookmarks: bool
    kind: str
    api_version: str
    queue: asyncio.Queue[JSON | _Close] = field(default_factory=asyncio.Queue)


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with resource versions, optimistic concurrency, the status subresource,
    finalizers, resumable watches, and faults on cue (see the module docstring)."""

    crd_dir: Path | None = CRD_DIR  # CRDs declared at construction; None declares none

    _rv: int = attrs.field(default=0, init=False)
    _compacted_rv: int = attrs.field(default=0, init=False)
    _history: list[tuple[int, kmock.resource, JSON]] = attrs.field(factory=list, init=False)
    _watches: list[_Watch] = attrs.field(factory=list, init=False)
    _faults: list[_Fault] = attrs.field(factory=list, init=False)
    _watch_faults: list[_WatchFault] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.crd_dir is not None:
            self.add_crds(load_crds(self.crd_dir))

    # --- set-up and inspection -------------------------------------------------------------------------------

    def add_crds(self, crds: list[JSON]) -> None:
        """Declare the resources of these CustomResourceDefinition documents (every served version)."""
        for crd in crds:
            spec = crd["spec"]
            names = spec["names"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                self.resources[f"{spec['group']}/{version['name']}/{names['plural']}"] = kmock.ResourceInfo(
                    namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                    kind=names["kind"],
                    singular=names.get("singular") or names["kind"].lower(),
                    shortnames=names.get("shortNames", []),
                    categories=names.get("categories", []),
                    subresources=set(version.get("subresources") or {}),
                    verbs=_VERBS,
                )

    @property
    def resource_version(self) -> int:
        """The newest resourceVersion this server handed out."""
        return self._rv

    def open_watches(self, plural: str | None = None) -> int:
        """How many watch streams are open now (of resources named `plural`, or all)."""
        return sum(1 for watch in self._watches if plural is None or watch.resource.plural == plural)

    # --- faults on cue ---------------------------------------------------------------------------------------

    def fail_next(
        self,
        status: int,
        count: int = 1,
        *,
        method: str | None = None,
        plural: str | None = None,
        subresource: str | None = None,
        retry_after: int | None = None,
        message: str = "injected by the test rig",
    ) -> None:
        """Answer the next `count` non-watch requests that match with `status` and a Kubernetes Status body,
        changing nothing. `method` is an HTTP method (GET also covers lists; watches have
        `fail_next_watches`), `plural` a resource, `subresource` e.g. "status"; None matches anything. 429 and
        503 carry `Retry-After` (`retry_after` seconds, default 1). Typical: `fail_next(409, 3,
        method="PATCH")` for a conflict storm, `fail_next(429)`, `fail_next(503, method="GET")`."""
        if retry_after is None:
            retry_after = 1 if status in (429, 503) else 0
        self._faults.append(
            _Fault(status, count, method.upper() if method else None, plural, subresource, retry_after, message)
        )

    def fail_next_watches(
        self, count: int = 1, *, status: int = 410, in_stream: bool = True, plural: str | None = None
    ) -> None:
        """Answer the next `count` watch requests (of `plural`, or any) with `status`: with `in_stream`, the way
        a real server expires a watch (HTTP 200, then one event `{"type": "ERROR", "object": Status}` with
        `code` 410 and reason Expired, then the end of the stream); otherwise as an HTTP error status."""
        self._watch_faults.append(_WatchFault(status, count, plural, in_stream))

    def disconnect_watches(self, plural: str | None = None, *, abrupt: bool = False) -> int:
        """End every open watch stream (of `plural`, or all) and return how many: a clean end of the response,
        as when a watch times out, or with `abrupt` a closed connection, as when a server dies."""
        ended = 0
        for watch in list(self._watches):
            if plural is None or watch.resource.plural == plural:
                watch.queue.put_nowait(_Close(abrupt))
                ended += 1
        return ended

    def expire_watches(self, plural: str | None = None) -> int:
        """What an expiry looks like to a client: `disconnect_watches(plural)` and `compact()`, so the open
        watches end and resuming from any version they saw gets 410. Returns how many watches ended."""
        ended = self.disconnect_watches(plural)
        self.compact()
        return ended

    def compact(self) -> None:
        """Forget the event history, like etcd compaction: a watch from a resourceVersion older than now then
        gets the in-stream ERROR 410 Expired; watches from now on (or without a version) are unaffected."""
        self._history.clear()
        self._compacted_rv = self._rv

    def send_bookmarks(self) -> int:
        """Send a BOOKMARK event (the current resourceVersion) to every open watch that allowed bookmarks;
        return how many got one."""
        sent = 0
        for watch in self._watches:
            if watch.bookmarks:
                watch.queue.put_nowait(_bookmark(watch, self._rv))
                sent += 1
        return sent

    def clear_faults(self) -> None:
        """Drop every fault that has not fired yet."""
        self._faults.clear()
        self._watch_faults.clear()

    # --- request handling ------------------------------------------------------------------------------------

    async def _serve_version(self, request: kmock.Request) -> Any:
        """Discovery of one group version (`/api/v1`, `/apis/GROUP/VERSION`) as a real server answers it: kmock
        says `groupVersion: /v1` for the core group, so kubectl finds no core resource, and gives a subresource
        (`llamamodels/status`) the short names of its resource, so kubectl warns that each short name is
        ambiguous. A real server: `v1`, and subresources with no short names, categories or singular name."""
        payload = await super()._serve_version(request)
        if request.resource is not None and request.resource.group == "":
            payload["groupVersion"] = request.resource.version
        for entry in payload["resources"]:
            if "/" in entry["name"]:
                entry.update(singularName="", shortNames=[], categories=[], verbs=["get", "patch", "update"])
        return payload

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """kmock's path parser reads `/api/v1/namespaces[/NAME[/status]]` as the start of a namespaced path and
        fails (a 500 for every namespace request), so it gets such a request with a path it reads,
        `/api/v1/namespaces/~cluster~/namespaces[/NAME[/status]]`, and `_handle` takes the made-up namespace
        away again (the requests kmock records keep the made-up path)."""
        match = _NAMESPACES_PATH.fullmatch(raw_request.path)
        if match is not None:
            parts = "".join(f"/{part}" for part in match.groups() if part)
            rel_url = raw_request.rel_url.with_path(f"/api/v1/namespaces/{_CLUSTER_SCOPE}/namespaces{parts}")
            raw_request = raw_request.clone(rel_url=rel_url.with_query(raw_request.query))
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.namespace == _CLUSTER_SCOPE and request.resource == _NAMESPACES:
            request = attrs.evolve(request, namespace=None)  # a core namespaces path (see __call__)
        resource = request.resource
        if resource is None or resource.plural is None or resource.version is None:
            # Discovery and anything else: kmock's own handling, without its object bookkeeping.
            return await kmock.KubernetesScaffold._handle(self, request)
        try:
            fault = self._take_fault(request)
            if fault is not None:
                return fault
            reacted = await self._user_reaction(request)
            if reacted is not None:
                return reacted
            return await self._emulate(request, resource)
        except ApiError as exc:
            return exc.response()

    def _take_fault(self, request: kmock.Request) -> aiohttp.web.StreamResponse | None:
        plural = request.resource.plural if request.resource is not None else None
        if _is_watch(request):
            for watch_fault in self._watch_faults:
                if watch_fault.plural in (None, plural):
                    watch_fault.remaining -= 1
                    if watch_fault.remaining <= 0:
                        self._watch_faults.remove(watch_fault)
                    message = "too old resource version" if watch_fault.status == 410 else "watch refused"
                    error = ApiError(watch_fault.status, f"injected by the test rig: {message}")
                    if not watch_fault.in_stream:
                        return error.response()
                    body = json.dumps({"type": "ERROR", "object": error.status()}) + "\n"
                    return aiohttp.web.Response(text=body, content_type="application/json")
            return None
        for fault in self._faults:
            if (
                fault.method in (None, request.method.value.upper())
                and fault.plural in (None, plural)
                and fault.subresource in (None, request.subresource)
            ):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return ApiError(fault.status, fault.message, retry_after=fault.retry_after).response()
        return None

    async def _user_reaction(self, request: kmock.Request) -> aiohttp.web.StreamResponse | None:
        """Serve the request with a reaction a test added (not a fallback), as kmock itself would; None if no
        such reaction answers it."""
        reactions = [r for r in self._payloads if not any(math.isinf(p) and p < 0 for p in r.priorities)]
        width = max((len(r.priorities) for r in reactions), default=0)
        reactions.sort(key=lambda r: tuple(-p for p in r.priorities) + (0,) * (width - len(r.priorities)))
        for reaction in reactions:
            if request in reaction._source and not reaction._disabled.is_set():
                try:
                    return await reaction(request)
                except ReactionMismatchError:
                    reaction._disabled.set()
                except NotImplementedError:
                    pass
        return None

    async def _emulate(self, request: kmock.Request, resource: kmock.resource) -> aiohttp.web.StreamResponse:
        info = self._info(resource)
        method = request.method.value.upper()
        if request.subresource not in (None, "status") or (
            request.subresource == "status" and "status" not in info.subresources
        ):
            raise ApiError(404, "the server could not find the requested resource")
        namespaced = bool(info.namespaced)
        if not namespaced and request.namespace is not None:
            raise ApiError(404, "the server could not find the requested resource")
        if namespaced and request.namespace is None and (request.name is not None or method != "GET"):
            raise ApiError(404, "the server could not find the requested resource")
        if method == "GET" and _is_watch(request):
            return await self._watch(request, resource, info)
        async with self._lock:
            self._stamp_seeded()
            if method == "GET" and request.name is None:
                return aiohttp.web.json_response(self._list(request, resource, info))
            if request.name is None:
                if method == "POST":
                    return aiohttp.web.json_response(self._create(request, resource, info), status=201)
                raise ApiError(405, f"the server does not allow this method on the requested resource: {method}")
            key = (resource, request.namespace, request.name)
            if method == "GET":
                return aiohttp.web.json_response(self._get(key))
            if method == "PUT":
                return aiohttp.web.json_response(self._replace(request, key, info))
            if method == "PATCH":
                return aiohttp.web.json_response(self._patch(request, key, info))
            if method == "DELETE":
                return aiohttp.web.json_response(self._delete(request, key, info))
        raise ApiError(405, f"the server does not allow this method on the requested resource: {method}")

    # --- reads -----------------------------------------------------------------------------------------------

    def _list(self, request: kmock.Request, resource: kmock.resource, info: kmock.ResourceInfo) -> JSON:
        matches = _matcher(request)
        items = [obj for obj in self._current(resource, request.namespace) if matches(obj)]
        return {
            "apiVersion": _api_version(resource),
            "kind": f"{info.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    def _get(self, key: tuple[kmock.resource, str | None, str]) -> JSON:
        stored = self._stored(key)
        if stored is None:
            raise _not_found(key)
        return stored

    async def _watch(
        self, request: kmock.Request, resource: kmock.resource, info: kmock.ResourceInfo
    ) -> aiohttp.web.StreamResponse:
        params = request.params
        since_text = params.get("resourceVersion", "")
        initial_events = since_text in ("", "0") or params.get("sendInitialEvents") == "true"
        try:
            since = int(since_text or "0")
            timeout_s = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        except ValueError as exc:
            raise ApiError(400, f"invalid watch parameters: {exc}") from exc
        watch = _Watch(
            resource=resource,
            matches=_matcher(request),
            bookmarks=params.get("allowWatchBookmarks") == "true",
            kind=str(info.kind),
            api_version=_api_version(resource),
        )
        expired = False
        async with self._lock:  # subscribe and snapshot in one step: nothing is lost or sent twice
            self._stamp_seeded()
            if initial_events:
                backlog = [
                    {"type": "ADDED", "object": obj}
                    for obj in self._current(resource, request.namespace)
                    if watch.matches(obj)
                ]
            elif since < self._compacted_rv:
                expired, backlog = True, []
            else:
                backlog = [
                    copy.deepcopy(event)
                    for rv, res, event in self._history
                    if rv > since and res == resource and watch.matches(event["object"])
                ]
            if not expired:
                self._watches.append(watch)
            snapshot_rv = self._rv
        raw_request = request._raw_request
        assert raw_request is not None  # kmock sets it for every served request
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            await response.prepare(raw_request)
            if expired:
                message = f"too old resource version: {since} ({self._compacted_rv})"
                await _write_event(response, {"type": "ERROR", "object": ApiError(410, message).status()})
                await response.write_eof()
                return response
            for event in backlog:
                await _write_event(response, event)
            if initial_events and watch.bookmarks and params.get("sendInitialEvents") == "true":
                bookmark = _bookmark(watch, snapshot_rv)
                bookmark["object"]["metadata"]["annotations"] = {"k8s.io/initial-events-end": "true"}
                await _write_event(response, bookmark)
            deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
            while True:
                wait_s = _LIVENESS_S
                if deadline is not None:
                    wait_s = min(wait_s, deadline - asyncio.get_running_loop().time())
                    if wait_s <= 0:
                        break
                try:
                    item = await asyncio.wait_for(watch.queue.get(), wait_s)
                except TimeoutError:
                    if raw_request.transport is None or raw_request.transport.is_closing():
                        return response  # the client went away
                    continue
                if isinstance(item, _Close):
                    if item.abrupt and raw_request.transport is not None:
                        raw_request.transport.abort()
                        return response
                    break
                await _write_event(response, item)
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away
        finally:
            with contextlib.suppress(ValueError):
                self._watches.remove(watch)
        return response

    # --- writes (all under self._lock) -----------------------------------------------------------------------

    def _create(self, request: kmock.Request, resource: kmock.resource, info: kmock.ResourceInfo) -> JSON:
        body = _body_object(request)
        metadata = body.setdefault("metadata", {})
        if not isinstance(metadata, dict):
            raise ApiError(400, "metadata must be an object")
        if not metadata.get("name"):
            if not metadata.get("generateName"):
                raise ApiError(422, "metadata.name: Required value: name or generateName is required")
            metadata["name"] = metadata["generateName"] + "".join(
                secrets.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5)
            )
        if metadata.get("namespace") not in (None, "", request.namespace):
            raise ApiError(400, "the namespace of the provided object does not match the namespace sent on the request")
        key = (resource, request.namespace, str(metadata["name"]))
        if self._stored(key) is not None:
            raise ApiError(
                409, f'{_qualified(resource)} "{key[2]}" already exists', reason="AlreadyExists", details=_details(key)
            )
        for system_field in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds"):
            metadata.pop(system_field, None)
        if request.namespace is not None:
            metadata["namespace"] = request.namespace
        else:
            metadata.pop("namespace", None)
        metadata.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1, resourceVersion=self._next_rv())
        body["apiVersion"] = _api_version(resource)
        body["kind"] = info.kind
        if "status" in info.subresources:
            body.pop("status", None)
        if key in self._objects:
            self._objects[key].create(copy.deepcopy(body))  # after a deletion: the history goes on
        else:
            self._objects[key] = copy.deepcopy(body)
        self._publish(resource, "ADDED", body)
        return body

    def _replace(
        self, request: kmock.Request, key: tuple[kmock.resource, str | None, str], info: kmock.ResourceInfo
    ) -> JSON:
        stored = self._get(key)
        body = _body_object(request)
        metadata = body.get("metadata")
        if not isinstance(metadata, dict):
            metadata = {}
        if metadata.get("name") not in (None, key[2]):
            raise ApiError(400, "the name of the object does not match the name on the URL")
        if not metadata.get("resourceVersion"):
            raise ApiError(
                422,
                f'{_qualified(key[0])} "{key[2]}" is invalid: metadata.resourceVersion: Invalid value: 0: must be'
                " specified for an update",
                details=_details(key),
            )
        self._check_version(key, stored, body)
        return self._update(key, stored, body, info, status_only=request.subresource == "status")

    def _patch(
        self, request: kmock.Request, key: tuple[kmock.resource, str | None, str], info: kmock.ResourceInfo
    ) -> JSON:
        content_type = _header(request, "Content-Type").split(";")[0].strip().lower()
        stored = self._get(key)
        patch = _body_json(request)
        if content_type in _MERGE_PATCH:
            if not isinstance(patch, dict):
                raise ApiError(400, "a merge patch must be a JSON object")
            candidate = _merge_patch(stored, patch)
        elif content_type == _JSON_PATCH:
            if not isinstance(patch, list):
                raise ApiError(400, "a JSON patch must be a JSON array of operations")
            candidate = _json_patch(stored, patch)
        else:
            raise ApiError(
                415,
                f"the body of the request was in an unknown format ({content_type or 'no Content-Type'}) - accepted"
                f" media types include: {_JSON_PATCH}, {', '.join(_MERGE_PATCH)}",
            )
        if not isinstance(candidate, dict):
            raise ApiError(422, "the patched object is not a JSON object")
        self._check_version(key, stored, candidate)
        return self._update(key, stored, candidate, info, status_only=request.subresource == "status")

    def _delete(
        self, request: kmock.Request, key: tuple[kmock.resource, str | None, str], info: kmock.ResourceInfo
    ) -> JSON:
        stored = self._get(key)
        body = _body_json(request) if request.body.strip() else {}
        preconditions = body.get("preconditions") if isinstance(body, dict) else None
        metadata = stored["metadata"]
        for name in ("resourceVersion", "uid"):
            wanted = (preconditions or {}).get(name)
            if wanted is not None and wanted != metadata.get(name):
                raise ApiError(
                    409,
                    f"Precondition failed: {name}: {wanted}, {name} in object meta: {metadata.get(name)}",
                    details=_details(key),
                )
        if metadata.get("deletionTimestamp"):
            return stored  # already being deleted; waits for its finalizers
        if metadata.get("finalizers"):
            metadata.update(
                deletionTimestamp=_now(),
                deletionGracePeriodSeconds=0,
                generation=int(metadata.get("generation", 0)) + 1,
                resourceVersion=self._next_rv(),
            )
            self._objects[key].history.append(copy.deepcopy(stored))
            self._publish(key[0], "MODIFIED", stored)
            return stored
        metadata["resourceVersion"] = self._next_rv()
        self._objects[key].delete()
        self._publish(key[0], "DELETED", stored)
        # What a real server answers for a custom resource deleted at once (with finalizers: the object).
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {**_details(key), "uid": metadata.get("uid")},
        }

    def _check_version(self, key: tuple[kmock.resource, str | None, str], stored: JSON, candidate: JSON) -> None:
        """Optimistic concurrency: a resourceVersion in the written object must be the stored one."""
        metadata = candidate.get("metadata")
        wanted = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        if wanted and wanted != stored["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                f'Operation cannot be fulfilled on {_qualified(key[0])} "{key[2]}": the object has been modified;'
                " please apply your changes to the latest version and try again",
                details=_details(key),
            )

    def _update(
        self,
        key: tuple[kmock.resource, str | None, str],
        stored: JSON,
        candidate: JSON,
        info: kmock.ResourceInfo,
        *,
        status_only: bool,
    ) -> JSON:
        """Store `candidate` as the new state of `stored`, keeping what this kind of write may not change."""
        has_status = "status" in info.subresources
        if status_only:
            new = copy.deepcopy(stored)
            new.pop("status", None)
            if candidate.get("status") is not None:
                new["status"] = copy.deepcopy(candidate["status"])
        else:
            new = copy.deepcopy(candidate)
            new["apiVersion"], new["kind"] = stored["apiVersion"], stored["kind"]
            if has_status:
                new.pop("status", None)
                if "status" in stored:
                    new["status"] = copy.deepcopy(stored["status"])
            metadata = new.get("metadata")
            new["metadata"] = metadata = dict(metadata) if isinstance(metadata, dict) else {}
            for system_field in (
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "resourceVersion",
            ):
                metadata.pop(system_field, None)
                if system_field in stored["metadata"]:
                    metadata[system_field] = stored["metadata"][system_field]
            if metadata.get("deletionTimestamp"):
                added = set(metadata.get("finalizers") or []) - set(stored["metadata"].get("finalizers") or [])
                if added:
                    raise ApiError(
                        422,
                        f'{info.kind}.{key[0].group} "{key[2]}" is invalid: metadata.finalizers: Forbidden: no new'
                        " finalizers can be added if the object is being deleted, found new finalizers"
                        f" {sorted(added)}",
                        details=_details(key),
                    )
            if not metadata.get("finalizers"):
                metadata.pop("finalizers", None)
            ignored = {"metadata", "status"} if has_status else {"metadata"}
            if {k: v for k, v in new.items() if k not in ignored} != {
                k: v for k, v in stored.items() if k not in ignored
            }:
                metadata["generation"] = int(stored["metadata"].get("generation", 0)) + 1
        if new == stored:
            return stored  # nothing changed: no new version, no event (as on a real server)
        new["metadata"]["resourceVersion"] = self._next_rv()
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._objects[key].delete()
            self._publish(key[0], "DELETED", new)
        else:
            self._objects[key].history.append(copy.deepcopy(new))
            self._publish(key[0], "MODIFIED", new)
        return new

    # --- state -----------------------------------------------------------------------------------------------

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _publish(self, resource: kmock.resource, kind: str, obj: JSON) -> None:
        event: JSON = {"type": kind, "object": copy.deepcopy(obj)}
        self._history.append((int(obj["metadata"]["resourceVersion"]), resource, event))
        if len(self._history) > _HISTORY_LIMIT:
            dropped = self._history[: len(self._history) - _HISTORY_LIMIT]
            del self._history[: len(dropped)]
            self._compacted_rv = dropped[-1][0]
        for watch in self._watches:
            if watch.resource == resource and watch.matches(event["object"]):
                watch.queue.put_nowait(event)

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo:
        if resource not in self.resources:
            raise ApiError(404, "the server could not find the requested resource")
        info = self.resources[resource]
        return kmock.ResourceInfo(
            namespaced=True if info.namespaced is None else info.namespaced,
            kind=info.kind or _guess_kind(resource),
            singular=info.singular,
            subresources=info.subresources,
        )

    def _stored(self, key: tuple[kmock.resource, str | None, str]) -> JSON | None:
        if key not in self._objects or self._objects[key].deleted:
            return None
        return copy.deepcopy(self._objects[key].raw)

    def _current(self, resource: kmock.resource, namespace: str | None) -> list[JSON]:
        """The live objects of `resource` in `namespace` (None: all), ordered by namespace and name."""
        found = [
            (ns or "", name, obj.raw)
            for (res, ns, name), obj in self._objects.items()
            if res == resource and (namespace is None or ns == namespace) and not obj.deleted
        ]
        return [copy.deepcopy(raw) for _, _, raw in sorted(found, key=lambda item: item[:2])]

    def _stamp_seeded(self) -> None:
        """Give objects that a test put into `kmock.objects` directly what a real server would have stamped."""
        for (resource, namespace, name), obj in self._objects.items():
            if obj.deleted or resource not in self.resources:
                continue
            metadata = obj.raw.get("metadata")
            if isinstance(metadata, Mapping) and metadata.get("resourceVersion"):
                continue
            raw = copy.deepcopy(obj.raw)
            metadata = raw.setdefault("metadata", {})
            metadata.setdefault("name", name)
            if namespace is not None:
                metadata.setdefault("namespace", namespace)
            metadata.setdefault("uid", str(uuid.uuid4()))
            metadata.setdefault("creationTimestamp", _now())
            metadata.setdefault("generation", 1)
            metadata["resourceVersion"] = self._next_rv()
            raw.setdefault("apiVersion", _api_version(resource))
            raw.setdefault("kind", self._info(resource).kind)
            obj.history[-1] = raw


@contextlib.asynccontextmanager
async def running(*, crd_dir: Path | None = CRD_DIR) -> AsyncIterator[KubeEmulator]:
    """Serve a `KubeEmulator` (with the CRDs of `crd_dir` declared) over plain HTTP on a free 127.0.0.1 port on
    the current event loop; its `url` is the base URL (no TLS, no token). Open watches end on the way out."""
    async with KubeEmulator(crd_dir=crd_dir) as emulator, kmock.Server(emulator):
        try:
            yield emulator
        finally:
            emulator.disconnect_watches()


# --- helpers ---------------------------------------------------------------------------------------------------


def _is_watch(request: kmock.Request) -> bool:
    return request.method.value.upper() == "GET" and request.params.get("watch", "").lower() in ("true", "1")


def _header(request: kmock.Request, name: str) -> str:
    return next((value for key, value in request.headers.items() if key.lower() == name.lower()), "")


def _body_json(request: kmock.Request) -> Any:
    try:
        return json.loads(request.body or b"null")
    except ValueError as exc:
        raise ApiError(400, f"the request body is not JSON: {exc}") from exc


def _body_object(request: kmock.Request) -> JSON:
    body = _body_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _api_version(resource: kmock.resource) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


def _qualified(resource: kmock.resource) -> str:
    return f"{resource.plural}.{resource.group}" if resource.group else str(resource.plural)


def _guess_kind(resource: kmock.resource) -> str:
    plural = str(resource.plural)
    return (plural[:-1] if plural.endswith("s") else plural).capitalize()


def _details(key: tuple[kmock.resource, str | None, str]) -> JSON:
    return {"name": key[2], "group": key[0].group, "kind": key[0].plural}


def _not_found(key: tuple[kmock.resource, str | None, str]) -> ApiError:
    return ApiError(404, f'{_qualified(key[0])} "{key[2]}" not found', details=_details(key))


def _bookmark(watch: _Watch, rv: int) -> JSON:
    return {
        "type": "BOOKMARK",
        "object": {"apiVersion": watch.api_version, "kind": watch.kind, "metadata": {"resourceVersion": str(rv)}},
    }


async def _write_event(response: aiohttp.web.StreamResponse, event: JSON) -> None:
    await response.write(json.dumps(event).encode() + b"\n")


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _json_patch(document: JSON, operations: list[Any]) -> Any:
    """RFC 6902 JSON patch; any failure (a failed `test` included) is 422, as on a real server."""
    result: Any = copy.deepcopy(document)
    try:
        for operation in operations:
            op, path = operation["op"], _pointer(operation["path"])
            if op == "test":
                if _resolve(result, path) != operation["value"]:
                    raise ValueError(f"test failed at {operation['path']}")
            elif op == "add":
                result = _add(result, path, copy.deepcopy(operation["value"]))
            elif op == "remove":
                result = _remove(result, path)
            elif op == "replace":
                _resolve(result, path)
                result = _add(_remove(result, path), path, copy.deepcopy(operation["value"]))
            elif op in ("move", "copy"):
                source = _pointer(operation["from"])
                value = copy.deepcopy(_resolve(result, source))
                if op == "move":
                    result = _remove(result, source)
                result = _add(result, path, value)
            else:
                raise ValueError(f"unknown operation {op!r}")
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ApiError(422, f"the server rejected our request due to an error in our request: {exc}") from exc
    return result


def _pointer(text: str) -> list[str]:
    if text == "":
        return []
    if not text.startswith("/"):
        raise ValueError(f"invalid JSON pointer {text!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in text[1:].split("/")]


def _resolve(document: Any, tokens: list[str]) -> Any:
    for token in tokens:
        document = document[int(token)] if isinstance(document, list) else document[token]
    return document


def _add(document: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent, last = _resolve(document, tokens[:-1]), tokens[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if not 0 <= index <= len(parent):
            raise IndexError(f"index {last} out of range")
        parent.insert(index, value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise TypeError(f"cannot add below a {type(parent).__name__}")
    return document


def _remove(document: Any, tokens: list[str]) -> Any:
    if not tokens:
        return None
    parent, last = _resolve(document, tokens[:-1]), tokens[-1]
    if isinstance(parent, list):
        del parent[int(last)]
    else:
        del parent[last]
    return document


def _matcher(request: kmock.Request) -> Callable[[JSON], bool]:
    """What a list or watch request selects: its namespace, its name (a watch of one object), and its
    labelSelector and fieldSelector."""
    namespace, name = request.namespace, request.name
    labels = _label_selector(request.params.get("labelSelector", ""))
    fields = _field_selector(request.params.get("fieldSelector", ""))

    def matches(obj: JSON) -> bool:
        metadata = obj.get("metadata") or {}
        return (
            (namespace is None or metadata.get("namespace") == namespace)
            and (name is None or metadata.get("name") == name)
            and labels(metadata.get("labels") or {})
            and fields(obj)
        )

    return matches


def _label_selector(selector: str) -> Callable[[Mapping[str, str]], bool]:
    """Equality- and set-based label selectors: `a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x)`."""
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for term in (t.strip() for t in re.split(r",(?![^()]*\))", selector) if t.strip()):
        if match := re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", term):
            checks.append(_label_check(match[1], match[2], {v.strip() for v in match[3].split(",")}))
        elif match := re.fullmatch(r"([^!=\s]+)\s*(!=|==|=)\s*(\S*)", term):
            checks.append(_label_check(match[1], match[2], {match[3]}))
        elif term.startswith("!"):
            checks.append(_label_check(term[1:].strip(), "!", set()))
        else:
            checks.append(_label_check(term, "exists", set()))
    return lambda labels: all(check(labels) for check in checks)


def _label_check(key: str, op: str, values: set[str]) -> Callable[[Mapping[str, str]], bool]:
    def check(labels: Mapping[str, str]) -> bool:
        value = labels.get(key)
        if op == "exists":
            return value is not None
        if op == "!":
            return value is None
        return (value in values) == (op in ("=", "==", "in"))

    return check


def _field_selector(selector: str) -> Callable[[JSON], bool]:
    """Field selectors on dotted paths: `metadata.name=x`, `metadata.namespace!=y`."""
    checks: list[Callable[[JSON], bool]] = []
    for term in (t.strip() for t in selector.split(",") if t.strip()):
        match = re.fullmatch(r"([^!=\s]+)\s*(!=|==|=)\s*(\S*)", term)
        if match is None:
            raise ApiError(400, f"invalid field selector term {term!r}")
        checks.append(_field_check(match[1].split("."), match[3], match[2] == "!="))
    return lambda obj: all(check(obj) for check in checks)


def _field_check(path: list[str], wanted: str, negate: bool) -> Callable[[JSON], bool]:
    def check(obj: JSON) -> bool:
        current: Any = obj
        for part in path:
            current = current.get(part) if isinstance(current, dict) else None
        value = "" if current is None else str(current)
        return (value == wanted) != negate

    return check

"""The live web dashboard at `/ui`, served by the gateway itself (bare metal and Kubernetes alike).

- `GET /ui` (and `/ui/`, the same page: its asset and API URLs are absolute, so they resolve alike from
  both) and its two assets (`ui/` package data: plain HTML, CSS and JavaScript, nothing fetched from
  elsewhere) carry no data, so they are open like the probes; the page asks for a key when `/ui/state`
  answers 401 and keeps it in the tab's sessionStorage, sending it as `Authorization: Bearer`.
- `GET /ui/state[?since=N]`: the state document (`overview.build`), behind the same auth as /v1/models.
  The page polls it every couple of seconds; `since` asks only for log records numbered N or later.
- `POST /admin/drain {"instance": name}`: marks the instance `spec.drain` as the operator does when it
  retires one, so the agent stops it once no gateway has a request on it. Behind the admin endpoints' auth.
  The page's other actions are the existing /admin/prewarm and /admin/rebuild-llama.

While the gateway runs, a sampler task adds the counters to a `history.RateHistory` every few seconds, and a
`history.TailHandler` on the root logger keeps the last log records; both are removed at cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
from collections.abc import AsyncIterator
from importlib import resources as package_files

from aiohttp import web

from llamesh_api import resources, writes
from llamesh_proxy import errors, gateway, history, overview

log = logging.getLogger(__name__)

ASSETS = {
    "/ui": ("index.html", "text/html"),
    "/ui/": ("index.html", "text/html"),
    "/ui/dashboard.css": ("dashboard.css", "text/css"),
    "/ui/dashboard.js": ("dashboard.js", "text/javascript"),
}
# Nothing but this gateway's own files and API (the favicon is an empty data: URL, so none is requested),
# and no framing: the page's buttons act with the admin key.
ASSET_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
}
LOG_LINES = 200  # log records a state document carries at most
BUILD_EVENTS = ("llama_build",)  # the build manager's progress, result and rollback events
DRAIN_REASON = "admin: drained from the dashboard"
_TERMINAL = frozenset({resources.Phase.STOPPED, resources.Phase.FAILED})


@dataclasses.dataclass
class Dashboard:
    """The dashboard's memory while the gateway runs."""

    rates: history.RateHistory = dataclasses.field(default_factory=history.RateHistory)  # 150 samples: 5 minutes
    tail: history.LogTail = dataclasses.field(default_factory=history.LogTail)
    sample_interval_s: float = 2.0


DASHBOARD = web.AppKey("llamesh_dashboard", Dashboard)


class InstanceNotFound(errors.GatewayError):
    status = 404
    error_type = "invalid_request_error"


def add_routes(app: web.Application) -> None:
    """The page, its assets, the state document and the drain action; the sampler and log tail at startup."""
    app[DASHBOARD] = Dashboard()
    for path in ASSETS:
        app.router.add_get(path, _asset)
    app.router.add_get("/ui/state", state)
    app.router.add_post("/admin/drain", drain)
    app.cleanup_ctx.append(_recording)


async def _asset(request: web.Request) -> web.Response:
    filename, content_type = ASSETS[request.path]
    body = package_files.files("llamesh_proxy").joinpath("ui", filename).read_bytes()
    return web.Response(
        body=body,
        content_type=content_type,
        charset="utf-8",
        headers=ASSET_HEADERS,
    )


async def state(request: web.Request) -> web.Response:
    since = request.query.get("since", "0")
    if not since.isdigit():
        raise errors.InvalidRequest("since must be a non-negative integer (the log's `next` from the last state)")
    gw, board = request.app[gateway.GATEWAY], request.app[DASHBOARD]
    document = overview.build(view(gw, board, since=int(since), now=datetime.datetime.now(datetime.UTC)))
    return web.json_response(document, headers={"Cache-Control": "no-store"})


def view(gw: gateway.Gateway, board: Dashboard, *, since: int, now: datetime.datetime) -> overview.View:
    """What the gateway holds now, as `overview.build` takes it."""
    metrics = gw.metrics
    return overview.View(
        now=now,
        gateway_id=gw.gateway_id,
        node_name=gw.node_name,
        version=gateway.VERSION,
        draining=gw.draining,
        auth_enabled=gw.authenticator.enabled,
        nodes=gw.catalog.nodes(),
        targets=gw.catalog.targets(),
        instances=gw.catalog.instances(),
        queue_lengths=gw.board.queue_lengths(),
        in_flight=gw.board.in_flight_by_instance(),
        totals=overview.Totals(
            requests_total=metrics.requests_total,
            errors_total=metrics.errors_total,
            current_requests=metrics.current_requests,
            tokens_total=_tokens(gw),
        ),
        history=board.rates.points(),
        log=board.tail.since(since, limit=LOG_LINES),
        log_next=board.tail.next_seq,
        build_log=board.tail.latest(events=BUILD_EVENTS, limit=20),
    )


def _tokens(gw: gateway.Gateway) -> int:
    return sum(stats.tokens for stats in gw.metrics.hashes.values())


def sample(gw: gateway.Gateway, *, at: float) -> history.Sample:
    metrics = gw.metrics
    return history.Sample(
        at=at,
        requests_total=metrics.requests_total,
        errors_total=metrics.errors_total,
        tokens_total=_tokens(gw),
        queue_length=gw.board.queue_length(),
        in_flight=metrics.current_requests,
    )


async def drain(request: web.Request) -> web.Response:
    """Drain one instance: it takes no new requests, finishes those it has, and its agent stops it."""
    gw = request.app[gateway.GATEWAY]
    try:
        document = json.loads(await request.read())
    except ValueError:
        raise errors.InvalidRequest("Invalid JSON") from None
    except RecursionError:
        raise errors.InvalidRequest("Invalid JSON: nested too deeply") from None
    name = document.get("instance") if isinstance(document, dict) else None
    if not isinstance(name, str) or not name:
        raise errors.InvalidRequest("Missing instance field (the LlamaInstance name)", param="instance")
    known = gw.catalog.instance(name)
    if known is None:
        raise InstanceNotFound(f"Instance '{name}' not found", param="instance", code="instance_not_found")
    if known.phase in _TERMINAL:
        raise errors.Conflict(f"Instance '{name}' is {known.phase.value}; there is nothing to drain")
    if known.spec.drain:
        return web.json_response({"status": "ok", "message": "Instance is already draining", "instance": name})

    def mark(current: resources.LlamaInstance) -> None:
        if not current.spec.drain:
            current.spec.drain = True
            current.spec.drain_reason = DRAIN_REASON

    if await writes.update(gw.store, resources.LlamaInstance, name, mark, uid=known.metadata.uid) is None:
        raise InstanceNotFound(f"Instance '{name}' not found", param="instance", code="instance_not_found")
    log.info(
        "instance %s draining: asked from the dashboard",
        name,
        extra={"event": "instance_drain", "instance_id": name, "reason": DRAIN_REASON},
    )
    return web.json_response({"status": "accepted", "message": "Drain requested", "instance": name}, status=202)


async def _recording(app: web.Application) -> AsyncIterator[None]:
    """While the gateway runs: the log tail on the root logger and the counter sampler."""
    gw, board = app[gateway.GATEWAY], app[DASHBOARD]
    handler = history.TailHandler(board.tail)
    root = logging.getLogger()
    root.addHandler(handler)
    sampler = asyncio.create_task(_sample_forever(gw, board), name="dashboard: sample counters")
    try:
        yield
    finally:
        root.removeHandler(handler)
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler


async def _sample_forever(gw: gateway.Gateway, board: Dashboard) -> None:
    loop = asyncio.get_running_loop()
    while True:
        board.rates.add(sample(gw, at=loop.time()))
        await asyncio.sleep(board.sample_interval_s)

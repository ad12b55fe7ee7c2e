"""The gateway's aiohttp application: routes, middlewares, and what runs while it is up.

`create_app(...)` builds everything from its arguments and starts nothing: on startup (cleanup_ctx) the
upstream connection pool (`upstream_http`) is opened, the catalog is primed from the store, the watches and the
usage publisher start; on cleanup they stop, a last usage report is written and the upstream pool closes.
With a `metrics_path`, the counters are loaded from the node's metrics file and saved to it (`metrics_file`).

Run it with `make_runner(app)`: a client that disconnects must cancel its handler (`handler_cancellation`),
so a queued request leaves its queue and an upstream request is abandoned at once; and its connections
follow `http` (`connections`: malformed requests answered with the envelope, header and idle deadlines, a
connection cap). Any other runner serves the same app without those connection limits.
The CLI's shutdown calls `start_draining(app)` on the first SIGTERM, then `await wait_idle(app, grace)`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import typedefs, web

from llamesh_api import config, store
from llamesh_proxy import (
    catalog,
    connections,
    dashboard,
    endpoints,
    errors,
    following,
    forwarder,
    gateway,
    inference,
    metrics_file,
    upstream_http,
)

GATEWAY = gateway.GATEWAY
TEXT, EMBEDDINGS, RERANK = catalog.Capability.TEXT, catalog.Capability.EMBEDDINGS, catalog.Capability.RERANK


def create_app(
    node_config: config.NodeConfig,
    *,
    store: store.Store,
    gateway_id: str,
    node_name: str,
    shared_slots: bool = False,
    metrics_path: Path | None = None,
) -> web.Application:
    """The OpenAI gateway for `node_config`, reading and writing resources through `store`.

    `shared_slots`: other gateway replicas serve the same instances (Kubernetes); keep the per-instance
    slot limit together with them (`sharing`). `metrics_path`: the node's metrics file, where the counters
    outlive the process (`metrics_file`); None keeps them for the process only."""
    gw = gateway.Gateway(
        node_config,
        store=store,
        gateway_id=gateway_id,
        node_name=node_name,
        shared_slots=shared_slots,
        metrics_path=metrics_path,
    )
    middlewares: list[typedefs.Middleware] = [errors.error_middleware]
    if gw.authenticator.enabled:
        middlewares.append(gw.authenticator.middleware())
    app = web.Application(client_max_size=node_config.http.request_body_limit_bytes, middlewares=middlewares)
    app[GATEWAY] = gw
    _add_routes(app)
    app.cleanup_ctx.append(_upstream_pool)
    app.cleanup_ctx.append(_background)
    app.cleanup_ctx.append(metrics_file.persisted)
    return app


def make_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """An `AppRunner` with the settings the gateway relies on (client disconnect cancels the handler) and
    the connection rules of the node config's `http` section."""
    kwargs.setdefault("handler_cancellation", True)
    kwargs.setdefault("access_log", None)
    return connections.GatewayRunner(app, http=app[GATEWAY].config.http, **kwargs)


def start_draining(app: web.Application) -> None:
    """First SIGTERM: /readyz 503, new and queued requests 503 draining. In-flight requests finish."""
    app[GATEWAY].start_draining()


async def wait_idle(app: web.Application, timeout_s: float | None) -> bool:
    """Wait until no request is in flight or queued; False if `timeout_s` seconds passed first."""
    return await app[GATEWAY].wait_idle(timeout_s)


def _add_routes(app: web.Application) -> None:
    router = app.router
    router.add_post("/v1/chat/completions", inference.handler(TEXT))
    router.add_post("/v1/completions", inference.handler(TEXT))
    router.add_post("/v1/embeddings", inference.handler(EMBEDDINGS))
    for path in ("/v1/rerank", "/v1/reranking", "/rerank"):
        router.add_post(path, inference.handler(RERANK))
    router.add_get("/v1/models", endpoints.list_models)
    router.add_get("/v1/models/{model:.+}", endpoints.get_model)
    router.add_get("/healthz", endpoints.healthz)
    router.add_get("/health", endpoints.healthz)
    router.add_get("/readyz", endpoints.readyz)
    router.add_get("/version", endpoints.version)
    router.add_get("/metrics", endpoints.metrics_text)
    router.add_get("/metrics/json", endpoints.metrics_json)
    router.add_post("/admin/prewarm", endpoints.prewarm)
    router.add_post("/admin/rebuild-llama", endpoints.rebuild_llama)
    dashboard.add_routes(app)


async def _upstream_pool(app: web.Application) -> AsyncIterator[None]:
    """One pool of keep-alive connections for every upstream request (`upstream_http`); bytes are relayed undecoded."""
    gw = app[GATEWAY]
    pool = upstream_http.Pool()
    gw.forwarder = forwarder.Forwarder(
        pool,
        credential_headers=gw.authenticator.credential_headers(),
        upstream_read_timeout_ms=gw.config.upstream_read_timeout_ms,
    )
    try:
        yield
    finally:
        gw.forwarder = None
        await pool.close()


async def _background(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    tasks = await following.follow(gw)  # returns once every kind is listed: the catalog is full
    tasks.append(asyncio.create_task(following.publish_usage(gw), name="gateway: publish usage"))
    if gw.sharing is not None:
        tasks.append(asyncio.create_task(gw.sharing.run(), name="gateway: slot claims"))
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await gw.dispatcher.close()
    if gw.sharing is not None:
        await gw.sharing.close()

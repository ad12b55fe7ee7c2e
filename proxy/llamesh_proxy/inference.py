"""The OpenAI request path: /v1/chat/completions, /v1/completions, /v1/embeddings and the rerank aliases.

In order (DESIGN.md "The request path"; auth already ran as middleware): refuse while draining → read the
body within `http.request_body_limit_bytes` (413) and `http.body_read_timeout_ms` (408) → it must be a
JSON object (400; nesting too deep for the decoder is invalid JSON too) → `model`: absent means
`default_model`, present must be a non-empty string (400) → hop limit: `X-Llama-Mesh-Hops` is ASCII
digits only, at most `max_hops` (400) → in a cluster, forward to a peer when the mesh's score says so or
only a peer serves the model (`cluster`) → resolve `model[:profile]` (404) → the profile must serve this
endpoint (the seed's 404/400) → admission (a slot now, or a wait in the profile's queue: the seed's
503s; a local spawn that keeps failing falls back to a peer in a cluster) → forward → count and log one
JSON line. Every answer carries `X-Request-Id` (the client's, or a new one).

The body is forwarded verbatim; only a `"stream": true` sent to embeddings or rerank is removed, because
those endpoints have no streaming form (as in the seed).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from typing import Any

import orjson
from aiohttp import web

from llamesh_proxy import affinity, catalog, errors, forwarder, gateway, metrics, requestlog

HOPS_HEADER = "X-Llama-Mesh-Hops"
UNREACHABLE_RETRIES = 2  # attempts after the first when an instance cannot be reached at all
# A connection dropped before any answer is retried only this soon after it was sent: that is a pooled
# keep-alive connection the server closed at the same moment (nothing was generated). A drop after longer
# is the upstream failing the request (a crash, the wedge watchdog's kill): the seed's 502, not a retry.
DROPPED_RETRY_WITHIN_S = 2.0
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; only ever seen in our log line
_HOPS = re.compile(r"[0-9]+")  # not int(): it also takes "+1", "1_0", " 10" and non-ASCII digits


def handler(endpoint: catalog.Capability) -> errors.Handler:
    """The aiohttp handler for one kind of endpoint."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return await serve(request, endpoint)

    return handle


async def serve(request: web.Request, endpoint: catalog.Capability) -> web.StreamResponse:
    gw = request.app[gateway.GATEWAY]
    started = time.monotonic()
    exchange = requestlog.Exchange(
        request_id=request.headers.get("X-Request-Id") or new_request_id(),
        session_id=request.headers.get("X-Session-Id"),
        path=request.path,
    )
    gw.request_started()
    gw.metrics.requests_total += 1
    stats: metrics.HashStats | None = None
    try:
        if gw.draining:
            raise errors.Draining()
        http = gw.config.http
        body = await read_body(request, limit=http.request_body_limit_bytes, timeout_ms=http.body_read_timeout_ms)
        document = parse_object(body)
        requested = requested_model(document, default_model=gw.config.default_model)
        check_hops(request, max_hops=gw.config.max_hops)
        target = gw.catalog.resolve(requested)
        if gw.mesh is not None:  # a peer may serve it better, or it is only served by a peer (`cluster`)
            exchange.stream = document.get("stream") is True and endpoint is catalog.Capability.TEXT
            routed = await gw.mesh.route(request, requested=requested, target=target, body=body, exchange=exchange)
            if routed is not None:
                return routed
        if target is None:
            raise errors.ModelNotFound(f"Model '{requested}' not found in local cookbook or any peer")
        exchange.model, exchange.profile = target.model, target.profile.id
        stats = gw.metrics.hash(target.args_hash, target.display)
        stats.requests += 1
        check_endpoint(target, endpoint, requested)
        stream = document.get("stream") is True
        if stream and endpoint is not catalog.Capability.TEXT:
            body = without_stream(body)
            stream = False
        exchange.stream = stream
        key = affinity.request_key(document, session=exchange.session_id) if target.policy.affinity else None
        try:
            return await _forward(request, gw, target, body=body, exchange=exchange, key=key)
        except (errors.SpawnFailuresExhausted, errors.NoCapacity):
            # the seed: a local spawn that keeps failing falls back to a peer that serves the model
            fallback = None
            if gw.mesh is not None:
                fallback = await gw.mesh.fallback(
                    request, requested=requested, target=target, body=body, exchange=exchange
                )
            if fallback is None:
                raise
            return fallback
    except errors.GatewayError as exc:
        exchange.status, exchange.error_type = exc.status, exc.error_type
        response = exc.to_response()
        response.headers["X-Request-Id"] = exchange.request_id
        return response
    except ConnectionResetError:  # the client went away while we read its body or wrote the answer
        exchange.client_gone = True
        exchange.status = exchange.status or CLIENT_CLOSED_REQUEST
        return web.Response(status=CLIENT_CLOSED_REQUEST)  # never delivered; aiohttp drops it quietly
    except asyncio.CancelledError:  # the client went away (handler cancelled) or the server is stopping
        exchange.client_gone = True
        exchange.status = exchange.status or CLIENT_CLOSED_REQUEST
        raise
    finally:
        gw.request_finished()
        duration_ms = (time.monotonic() - started) * 1000
        failed = exchange.status >= 400 or exchange.upstream_failed
        gw.metrics.errors_total += failed
        if stats is not None:
            stats.errors += failed
            if exchange.instance is not None and not failed:
                stats.observe(round(duration_ms), exchange.tokens)
        if exchange.stream and exchange.instance is not None:
            gw.metrics.observe_stream(
                status=exchange.status, tokens=exchange.tokens, upstream_failed=exchange.upstream_failed
            )
        requestlog.emit(exchange, duration_ms=duration_ms)


async def _forward(
    request: web.Request,
    gw: gateway.Gateway,
    target: catalog.Target,
    *,
    body: bytes,
    exchange: requestlog.Exchange,
    key: str | None = None,
) -> web.StreamResponse:
    """Hold a slot (now or after queueing) for as long as the relay runs, whatever ends it.

    An instance that cannot be reached at all (it died a moment ago and its agent has not said so yet)
    is routed around and the request tried again, since nothing was generated for it; so is a connection
    dropped at once (`DROPPED_RETRY_WITHIN_S`).
    """
    for attempt in range(UNREACHABLE_RETRIES + 1):
        lease = await gw.dispatcher.acquire(target, key=key)
        exchange.instance, exchange.queued_ms = lease.instance, exchange.queued_ms + lease.queued_ms
        exchange.affinity = lease.affinity.value
        relay = forwarder.Relay()
        sent_at = time.monotonic()
        try:
            return await gw.forwarder.relay(
                request,
                base_url=lease.url,
                body=body,
                stream=exchange.stream,
                max_duration_ms=target.max_request_duration_ms,
                api_key=target.upstream_api_key,
                request_id=exchange.request_id,
                relay=relay,
            )
        except errors.UpstreamUnreachable as exc:
            if attempt == UNREACHABLE_RETRIES:
                raise
            if not exc.refused and time.monotonic() - sent_at > DROPPED_RETRY_WITHIN_S:
                raise errors.UpstreamError(exc.message) from None
            if exc.refused:  # nothing listens there: route around it until its agent reports it
                gw.dispatcher.unreachable(lease)
        finally:
            gw.dispatcher.release(lease)
            exchange.status = relay.status
            exchange.tokens = relay.tokens
            exchange.client_gone = relay.client_gone
            exchange.upstream_failed = relay.upstream_failed
            exchange.cached_tokens = relay.cached_tokens
            gw.dispatcher.observe_cache(lease, relay.cached_tokens)
    raise AssertionError("unreachable: the last attempt returns or raises")


async def read_body(request: web.Request, *, limit: int, timeout_ms: int) -> bytes:
    """The whole body, refused when larger than `limit` (413) or slower than `timeout_ms` (408)."""
    too_large = f"Body too large or error: length limit exceeded ({limit} bytes)"
    if request.content_length is not None and request.content_length > limit:
        raise errors.PayloadTooLarge(too_large)
    try:
        if request.content.is_eof():  # all of it arrived with the headers: nothing to wait for
            return await request.read()
        async with asyncio.timeout(timeout_ms / 1000):
            return await request.read()
    except TimeoutError:
        raise errors.RequestTimeout("Request body read timed out") from None
    except web.HTTPRequestEntityTooLarge:
        raise errors.PayloadTooLarge(too_large) from None


def new_request_id() -> str:
    """32 random hex digits. Unique, not secret: a system call to the OS's random source per request cost
    more than any other line of this handler (bench/, profiled); `random` reseeds after a fork."""
    return f"{random.getrandbits(128):032x}"


def parse_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, for the gateway's decisions (`model`, `stream`); it is forwarded as sent.

    orjson parses it several times faster; whatever orjson refuses goes to the standard library, whose
    verdict and errors are the contract (it takes NaN and UTF-16 bodies; its messages for the rest).
    orjson reads an integer beyond 64 bits as a float: no decision depends on a number, and
    `without_stream`, which re-encodes a body, parses it with the standard library."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = _parse_strictly(body)
    if not isinstance(document, dict):
        raise errors.InvalidRequest("Request body must be a JSON object")
    return document


def without_stream(body: bytes) -> bytes:
    """A JSON object body (`parse_object` accepted it) re-encoded without its `stream` member."""
    document = json.loads(body)
    return json.dumps({key: value for key, value in document.items() if key != "stream"}).encode()


def _parse_strictly(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise errors.InvalidRequest("Invalid JSON") from None
    except RecursionError:  # e.g. 100,000 nested arrays: the decoder recurses once per level
        raise errors.InvalidRequest("Invalid JSON: nested too deeply") from None


def requested_model(document: dict[str, Any], *, default_model: str | None) -> str:
    """Only an absent `model` takes the default; a present one must be a non-empty string."""
    if "model" not in document:
        if default_model:
            return default_model
        raise errors.InvalidRequest(
            "'model' is required: the request names no model and no default_model is configured", param="model"
        )
    model = document["model"]
    if not isinstance(model, str) or not model:
        raise errors.InvalidRequest("'model' must be a non-empty string", param="model")
    return model


def check_hops(request: web.Request, *, max_hops: int) -> None:
    raw = request.headers.get(HOPS_HEADER)
    if raw is None:
        return
    if not _HOPS.fullmatch(raw):
        raise errors.InvalidRequest("Invalid x-llama-mesh-hops header value")
    significant = raw.lstrip("0")
    # More significant digits than max_hops has is more hops, without int() on thousands of digits.
    if len(significant) > len(str(max_hops)) or int(significant or "0") > max_hops:
        raise errors.InvalidRequest("Too many hops (loop detected)")


def check_endpoint(target: catalog.Target, endpoint: catalog.Capability, requested: str) -> None:
    """The seed's rules: text endpoints never reach embedding/rerank profiles, and vice versa."""
    if endpoint is target.capability:
        return
    if endpoint is catalog.Capability.EMBEDDINGS:
        raise errors.ModelNotFound(f"Model '{requested}' is not configured for embeddings", param="model")
    if endpoint is catalog.Capability.RERANK:
        raise errors.ModelNotFound(f"Model '{requested}' is not configured for reranking", param="model")
    raise errors.InvalidRequest(f"Model '{requested}' is restricted to embeddings or rerank endpoints", param="model")

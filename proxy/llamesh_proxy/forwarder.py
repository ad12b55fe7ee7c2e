"""Relaying one request to its llama-server instance and the answer back, bytes as they are.

The body goes upstream verbatim on the same path, with hop-by-hop headers, `Host`, `Content-Length` and the
client's gateway key left out. Rerank is the exception to "the same path": llama-server builds differ in which
of its spellings they register, so a 404 there is retried on the others, and the one that answered is used
for that instance from then on. A non-streaming answer (any status) is read whole and relayed with its
status; a streaming one (`"stream": true`, 2xx) is relayed chunk by chunk as it arrives, awaiting each
write so a slow client slows the upstream read (backpressure). SSE is not parsed: the last few chunks are
kept by reference and searched once at the end for `usage.completion_tokens`.

To an HTTP/1.1 client, once the first chunk and the head are out, the rest of a stream is written in the
upstream connection's read callback (`_Passthrough`, `upstream_http.Response.read_in_callback`): each read's
bytes, as aiohttp's parser took them out of their chunks, go to the client as one chunk while the client's
connection has nothing unsent, and the relaying task sleeps until the body ends or fails. Against a real
llama-server, whose tokens come one per read, waking the task, its reader and aiohttp's writer for every
token was most of the gateway's user CPU per token (bench/README.md, "Eighth pass"). A read that finds the
client behind is left to the task, which writes it with backpressure as above and comes back after.

Failures: no answer from upstream (refused, reset, timed out) is a 502 `upstream_error`. Once a stream has
started its status cannot change, so for an upstream that dies mid-stream we send one last SSE event in
OpenAI's error shape, `data: {"error": {"message", "type": "upstream_error", ...}}` (the OpenAI SDKs raise
`APIError` on it), then close the client connection without the final chunk, so that a client that ignores
the event still sees a truncated stream. The request counts as an error. A client that goes away
(`ConnectionResetError` on write, or the handler cancelled) closes the upstream response, which makes
llama-server cancel the task and free its slot.

It does not choose instances or hold slots; the caller does, and releases them whatever happens here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
from collections.abc import Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from llamesh_proxy import errors, upstream_http

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
REQUEST_HEADERS_DROPPED = HOP_BY_HOP | {"host", "content-length"}
RESPONSE_HEADERS_DROPPED = HOP_BY_HOP | {"content-length", "date", "server"}
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
TAIL_CHUNKS = 4
# The gateway answers all four; llama-server builds register some of them (older ones only /rerank and
# /v1/rerank). Tried in this order after a 404 on the client's spelling.
RERANK_PATHS = ("/v1/rerank", "/rerank", "/v1/reranking", "/reranking")
MAX_REMEMBERED_INSTANCES = 1024
TAIL_BYTES = 8192
_NUMBER = re.compile(rb"\s*:\s*(\d+)")  # what follows a key whose value is a count
_UPSTREAM_FAILURES = (aiohttp.ClientError, TimeoutError, ConnectionError)
Upstream = upstream_http.Response | aiohttp.ClientResponse  # what either client answers with


@dataclasses.dataclass
class Relay:
    """What happened while relaying; filled in as it goes, read by the caller even after a failure."""

    status: int = 0
    tokens: int = 0
    cached_tokens: int | None = None  # llama-server's `timings.cache_n`, when the answer carried it
    client_gone: bool = False
    upstream_failed: bool = False


def completion_tokens(tail: bytes, *, data_events: int = 0) -> int:
    """Generated tokens from the end of a response (its last TAIL_BYTES): `usage.completion_tokens`, else
    `timings.predicted_n`.

    For a stream without either, the number of SSE `data:` events less the role, finish and `[DONE]`
    events — an estimate that is exact for llama-server's one-token-per-chunk streams.
    """
    found = _last_count(tail, b'"completion_tokens"')
    if found is None:
        found = _last_count(tail, b'"predicted_n"')
    return found if found is not None else max(data_events - 3, 0)


def cached_tokens(tail: bytes) -> int | None:
    """Prompt tokens llama-server took from its KV cache (`timings.cache_n`), if the response says."""
    return _last_count(tail, b'"cache_n"')  # llama-server's timings: prompt tokens its KV cache held


def _last_count(tail: bytes, key: bytes) -> int | None:
    """The value of the last `key: <digits>` in the last TAIL_BYTES of `tail`. Searched backwards from the end,
    where the final event carries it: a regex over the whole tail cost more than the rest of a stream's end
    (profiled)."""
    start, end = max(len(tail) - TAIL_BYTES, 0), len(tail)
    while (at := tail.rfind(key, start, end)) >= 0:
        if match := _NUMBER.match(tail, at + len(key)):
            return int(match[1])
        end = at
    return None


def upstream_headers(
    client_headers: Mapping[str, str], *, dropped: frozenset[str], api_key: str | None, request_id: str
) -> CIMultiDict[str]:
    """The client's headers minus `dropped` (lower-case names), with our request id and the profile's key.

    Copied whole and then pruned by name: both run in multidict's C code, where a Python loop over every
    header cost more than the rest of this function (bench/, profiled)."""
    headers = CIMultiDict(client_headers)
    for name in dropped:
        headers.popall(name, None)
    headers["X-Request-Id"] = request_id
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class Forwarder:
    """Sends requests upstream on one shared pool of keep-alive connections (`upstream_http.Pool`), or on an
    aiohttp `ClientSession` (wrapped in `upstream_http.SessionClient`) where the hop needs its connector."""

    def __init__(
        self,
        pool: upstream_http.Pool | aiohttp.ClientSession,
        *,
        credential_headers: tuple[str, ...],
        upstream_read_timeout_ms: int,
    ) -> None:
        self._pool = upstream_http.SessionClient(pool) if isinstance(pool, aiohttp.ClientSession) else pool
        self._dropped = REQUEST_HEADERS_DROPPED | {name.lower() for name in credential_headers}
        self._sock_read = upstream_read_timeout_ms / 1000 if upstream_read_timeout_ms else None
        self._rerank_paths: dict[str, str] = {}  # base URL → the rerank spelling its llama-server registers

    async def relay(
        self,
        request: web.Request,
        *,
        base_url: str,
        body: bytes,
        stream: bool,
        max_duration_ms: int,
        api_key: str | None,
        request_id: str,
        relay: Relay,
        extra_headers: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        """`extra_headers` replace the client's of the same name (the mesh's hop count)."""
        headers = upstream_headers(request.headers, dropped=self._dropped, api_key=api_key, request_id=request_id)
        if extra_headers:
            headers.update(extra_headers)
        total_s = max_duration_ms / 1000 if max_duration_ms else None
        rerank = request.path in RERANK_PATHS
        path = self._rerank_paths.get(base_url, request.path) if rerank else request.path
        query = f"?{request.query_string}" if request.query_string else ""
        try:
            upstream = await self._pool.request(
                request.method,
                base_url,
                path + query if rerank else request.raw_path,
                headers=headers,
                body=body,
                total_s=total_s,
                read_timeout_s=self._sock_read,
            )
            if rerank and upstream.status == 404:
                upstream = await self._rerank_elsewhere(upstream, base_url, path, query, body, headers, total_s)
        except _UPSTREAM_FAILURES as exc:
            relay.upstream_failed = True
            if isinstance(exc, aiohttp.ClientConnectionError | ConnectionError) and not isinstance(exc, TimeoutError):
                refused = isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError)
                raise errors.UpstreamUnreachable(f"Upstream error: {_describe(exc)}", refused=refused) from None
            raise errors.UpstreamError(f"Upstream error: {_describe(exc)}") from None
        try:
            relay.status = upstream.status
            if stream and 200 <= upstream.status < 300:
                return await self._relay_stream(request, upstream, request_id=request_id, relay=relay)
            return await self._relay_whole(request, upstream, request_id=request_id, relay=relay)
        finally:
            upstream.close()  # a finished body was released already; an unfinished one drops the connection

    async def _rerank_elsewhere(
        self,
        not_found: Upstream,
        base_url: str,
        tried: str,
        query: str,
        body: bytes,
        headers: CIMultiDict[str],
        total_s: float | None,
    ) -> Upstream:
        """A 404 on a rerank path: this llama-server build registers other spellings. Try them in turn and
        remember, per instance, the first one it answers; the last 404 is relayed if none works."""
        upstream = not_found
        for path in (p for p in RERANK_PATHS if p != tried):
            await upstream.release()
            upstream = await self._pool.request(
                "POST",
                base_url,
                path + query,
                headers=headers,
                body=body,
                total_s=total_s,
                read_timeout_s=self._sock_read,
            )
            if upstream.status != 404:
                if len(self._rerank_paths) >= MAX_REMEMBERED_INSTANCES:
                    self._rerank_paths.clear()  # ports are reused by new instances; the map never grows unbounded
                self._rerank_paths[base_url] = path
                break
        return upstream

    async def _relay_whole(
        self, request: web.Request, upstream: Upstream, *, request_id: str, relay: Relay
    ) -> web.Response:
        try:
            payload = await upstream.read()
        except _UPSTREAM_FAILURES as exc:
            relay.upstream_failed = True
            raise errors.UpstreamError(f"Failed to read upstream response body: {_describe(exc)}") from None
        if 200 <= upstream.status < 300:
            relay.tokens = completion_tokens(payload)  # its last TAIL_BYTES, searched in place
            relay.cached_tokens = cached_tokens(payload)
        response = web.Response(status=upstream.status, body=payload, headers=self._client_headers(upstream))
        response.headers["X-Request-Id"] = request_id
        if 200 <= upstream.status < 300:
            # sent now, head and body in one write, rather than by aiohttp once the handler has returned:
            # what the gateway does after the relay (the slot, metrics, the request's log line) is not
            # waited for. An error is returned unsent: a caller may answer otherwise (the mesh tries
            # another peer after a peer's 503).
            try:
                await response.prepare(request)
                await response.write_eof()
            except ConnectionResetError:
                relay.client_gone = True
        return response

    async def _relay_stream(
        self, request: web.Request, upstream: Upstream, *, request_id: str, relay: Relay
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, headers=self._client_headers(upstream))
        response.headers.update(STREAM_HEADERS)
        response.headers["X-Request-Id"] = request_id
        relayed = _Relayed()
        failure = ""
        content = upstream.content  # read directly: one coroutine less per chunk
        passthrough: _Passthrough | None = None
        read_in_callback = None
        if isinstance(upstream, upstream_http.Response) and request.version == aiohttp.HttpVersion11:
            response.enable_chunked_encoding()  # what aiohttp does for HTTP/1.1 anyway; said, so ours match
            if request.transport is not None:
                passthrough = _Passthrough(content, request.transport, relayed)
                read_in_callback = upstream.read_in_callback
        if content.total_bytes or content.is_eof():
            # the body's first piece came with the upstream's head: the client's head waits for it, and the
            # two go out in one write (aiohttp's StreamResponse sends its head on its own otherwise, which a
            # stream whose first piece is still to come keeps)
            response._send_headers_immediately = False
        try:
            await response.prepare(request)
            while True:
                try:
                    chunk = await content.readany()
                except _UPSTREAM_FAILURES as exc:
                    relay.upstream_failed = True
                    failure = _describe(exc)
                    break
                if not chunk:
                    break
                relayed.add(chunk)
                if content.at_eof() and content.exception() is None:  # the body's last piece: it goes out
                    await response.write_eof(chunk)  # with the final chunk, in one write
                    break
                await response.write(chunk)  # waits while the client is slow: backpressure
                if passthrough is not None and read_in_callback is not None:  # the head is out: the rest
                    try:  # in the read callback, while it can
                        await read_in_callback(passthrough.relay)
                    except _UPSTREAM_FAILURES as exc:  # the total timeout
                        relay.upstream_failed = True
                        failure = _describe(exc)
                        break
        except ConnectionResetError:
            relay.client_gone = True
            return response
        ending = b"".join(relayed.tail)[-TAIL_BYTES:]
        relay.tokens = completion_tokens(ending, data_events=relayed.events)
        relay.cached_tokens = cached_tokens(ending)
        if relay.upstream_failed:
            # The status is sent: what is left is an error event, then a truncated body (no final chunk).
            with contextlib.suppress(ConnectionResetError):
                await response.write(stream_error_event(failure, after=ending))
            if request.transport is not None:
                request.transport.close()
        return response

    @staticmethod
    def _client_headers(upstream: Upstream) -> CIMultiDict[str]:
        headers = CIMultiDict(upstream.headers)  # pruned as in `upstream_headers`, for the same reason
        for name in RESPONSE_HEADERS_DROPPED:
            headers.popall(name, None)
        return headers


class _Relayed:
    """A stream's last few chunks, by reference, and its count of SSE `data:` events."""

    __slots__ = ("events", "tail")

    def __init__(self) -> None:
        self.tail: list[bytes] = []
        self.events = 0

    def add(self, chunk: bytes) -> None:
        self.tail.append(chunk)
        if len(self.tail) > TAIL_CHUNKS:
            del self.tail[0]
        self.events += chunk.count(b"data:")


class _Passthrough:
    """Writes a stream's body to the client in the upstream connection's read callback
    (`upstream_http.Response.read_in_callback`), chunk-encoded, while the client's connection keeps up.

    The relaying task then sleeps until the body ends or fails; nothing is woken per token. The first read
    that finds the client's connection with bytes still unsent (or closing) is left in `content` and ends
    this: the task reads it and writes it with backpressure, and comes back here once a write went out."""

    __slots__ = ("_client", "_content", "_relayed")

    def __init__(self, content: aiohttp.StreamReader, client: asyncio.Transport, relayed: _Relayed) -> None:
        self._content = content
        self._client = client
        self._relayed = relayed

    def relay(self) -> bool:
        """Write what the body has to the client; whether to go on doing so after the next read."""
        content, client = self._content, self._client
        if content.exception() is not None or client.is_closing() or client.get_write_buffer_size():
            return False
        data = content.read_nowait()
        if data:
            client.write(b"%x\r\n%b\r\n" % (len(data), data))
            self._relayed.add(data)
        return not content.is_eof()


def stream_error_event(failure: str, *, after: bytes) -> bytes:
    """The SSE event that ends a stream whose upstream failed, as its own event whatever came `after`."""
    error = errors.UpstreamError(f"Upstream error: the stream broke off ({failure})")
    event = b"data: " + json.dumps(error.envelope()).encode() + b"\n\n"
    at_boundary = not after or after.endswith((b"\n\n", b"\r\n\r\n"))
    return event if at_boundary else b"\n\n" + event


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__

"""A lean HTTP/1.1 client for the one hop the gateway makes on every request: to its llama-server instance.

Why: `aiohttp.ClientSession.request` spends most of its time on things this hop never uses (tracing
signals, the cookie jar, yarl URL building and re-quoting, auto-header negotiation, payload objects, a
`ClientRequest` and a `ClientResponse` per request, the connector's bookkeeping); under the benchmark's
throughput load that was the largest piece of the gateway's Python time per request (bench/README.md,
profiled). This module keeps aiohttp's own wire pieces — its C response parser and `ResponseHandler`
protocol (flow control, the socket read timeout, `StreamReader` bodies) and its timer for the total
timeout — so responses are parsed, and fail, exactly as through a `ClientSession`: the same exception
types (`ClientConnectorError`, `ServerDisconnectedError`, `ClientPayloadError`, `SocketTimeoutError`,
`TimeoutError`) for the same events. What it drops is everything around them.

`Pool` keeps idle keep-alive connections per base URL (`http://host:port`), newest first, and drops one
idle longer than `keepalive_s` or already closed by the server. llama-server closes a connection a few
milliseconds after the end of a streamed (`text/event-stream`) answer, though it answers keep-alive; a
request that takes such a connection in that window is lost on it. So the pool learns, per base URL, that a
server closes after streams (an idle connection that came back from a stream is found closed, or fails the
next request before any answer) and from then on closes those connections itself instead of keeping them.

A request is written with one `write`: the request line, the caller's headers, the `Host`, `Accept`,
`Accept-Encoding`, `User-Agent`, `Content-Type` and `Content-Length` aiohttp would have added, and the body;
the write is made when the event loop has run the callbacks it is running now, together with the other
requests they made (a body of 64 KiB or more is written at once).
A response whose body was read to the end on a connection that may stay open goes back to the pool; anything
else closes the connection.

Not here: TLS (instance URLs are plain `http://`; `https://` is refused), proxies, redirects, cookies,
decompression (the gateway relays bytes undecoded), request bodies other than bytes, retries (the caller
decides: `inference` retries a refused or at-once dropped connection), HTTP/2.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import sys
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, NamedTuple

import aiohttp
from aiohttp import client_proto, client_reqrep, helpers, http_exceptions, streams
from multidict import CIMultiDict, CIMultiDictProxy

# llama-server (cpp-httplib) closes a connection idle for 5 s. Reusing one near that moment races its close:
# the request is written, then the connection drops unanswered. Dropping ours a second earlier avoids the race.
KEEPALIVE_S = 4.0
CONNECT_TIMEOUT_S = 10.0  # ClientTimeout(sock_connect=10)
READ_BUFSIZE = 2**16  # ClientSession's default read_bufsize
LARGE_BODY = 2**16  # a request this big is written at once, in two writes (no copy to join head and body)
MAX_IDLE_PER_HOST = 256
TIMEOUT_CEIL_THRESHOLD = 5.0
USER_AGENT = f"Python/{sys.version_info[0]}.{sys.version_info[1]} aiohttp/{aiohttp.__version__}"
logger = logging.getLogger(__name__)
# How a kept connection the server has closed fails the request written on it: a clean close, or a reset.
_DROPPED = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError)
_AUTO_HEADERS = (("accept", "*/*"), ("accept-encoding", "gzip, deflate"), ("user-agent", USER_AGENT))


class _Idle(NamedTuple):
    """A kept connection: since when, and whether it came back from a streamed answer."""

    since: float
    protocol: client_proto.ResponseHandler
    after_stream: bool


class _Protocol(client_proto.ResponseHandler):
    """aiohttp's client protocol, less one cost per body chunk: its `StreamReader` asks the protocol to
    resume reading after every chunk a reader takes while the buffer is below its low-water mark, paused or
    not, and aiohttp's `resume_reading` then feeds the parser an empty chunk and resumes the transport.
    Nothing was paused (neither flow control nor a full buffer paused the transport or the parser) means
    there is nothing to resume: that was 5% of the gateway's time under the streaming load (bench/,
    profiled). A paused protocol resumes exactly as aiohttp's does.

    Two more: a body the parser refuses fails the body's reader (`set_exception`), and while
    `Response.read_in_callback` runs, its callable is called after each read (`data_received`)."""

    _after_read: Callable[[], bool] | None = None  # `Response.read_in_callback`'s callable, while it runs
    _reads_done: asyncio.Future[None] | None = None  # what `read_in_callback` waits on
    _in_after_read = False
    _read_again = False
    _head_pending = False  # an answer is expected whose body's reader is not yet a `_Body`
    _seen_payload: object = None

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._reading_paused or self._buffer_paused:
            super().resume_reading(resume_parser)

    def set_response_params(self, *args: Any, **kwargs: Any) -> None:
        super().set_response_params(*args, **kwargs)
        self._head_pending = True  # an answer is expected: its body's reader is to be made a `_Body`
        self._seen_payload = self._payload  # the last answer's reader (aiohttp keeps it): not this one's

    def data_received(self, data: bytes) -> None:
        while self._head_pending and data:
            # The head and the body often come in one read (a short answer, or a stream that ran ahead):
            # the parser makes the body's reader at the end of the head and feeds it the body within the
            # same call, so each head goes in alone and the reader becomes a `_Body` before its first byte.
            # Any split is the same to the parser; a head that ends in a later read is adopted later. Only
            # chunked bodies gain (a Content-Length body is fed as one piece).
            end = data.find(b"\r\n\r\n") + 4
            informational = data[9:10] == b"1"  # "HTTP/1.1 1xx": the answer's own head comes after it
            if not 4 <= end < len(data) or not (informational or b"chunked" in data[:end]):
                break  # no head ends here with a body after it, or one of a single piece (Content-Length)
            super().data_received(data[:end])
            self._adopt_body()
            if self.exception() is not None:
                return  # the head was refused: the connection is closed, the rest is not parsed
            data = data[end:]
        super().data_received(data)
        if self._head_pending:
            self._adopt_body()
        if self._after_read is not None:
            self._run_after_read()

    def _adopt_body(self) -> None:
        """Make the expected answer's body reader a `_Body` once the parser has made it (after a 1xx head,
        or one with no body, it is still to come)."""
        payload = self._payload
        if payload is None or payload is self._seen_payload:
            return
        self._seen_payload = payload
        if _Body.adopt(payload):
            self._head_pending = False

    def _run_after_read(self) -> None:
        """Call `_after_read` until it has seen every byte fed to the body; end the reads when it says so.

        aiohttp's parser keeps what arrives while reading is paused, and hands it to the body when a read of
        the body resumes it, which is inside `_after_read`: that call comes here again, and is answered by
        one more round of the loop below, not by `_after_read` within itself."""
        if self._in_after_read:
            self._read_again = True
            return
        self._in_after_read = True
        try:
            while (after_read := self._after_read) is not None:
                self._read_again = False
                if not after_read():
                    self.end_reads_in_callback()
                    return
                if not self._read_again:
                    return
        finally:
            self._in_after_read = False

    def set_exception(self, exc: BaseException, *args: Any, **kwargs: Any) -> None:
        super().set_exception(exc, *args, **kwargs)
        payload = self._payload
        if (
            isinstance(exc, http_exceptions.HttpProcessingError)
            and payload is not None
            and payload.exception() is None
            and not payload.is_eof()
        ):
            # The parser refused bytes of the body (a broken chunk): aiohttp fails the protocol and closes
            # the connection, but nothing fails the body's reader, which then waits for ever (or until the
            # total timeout) on a connection that is gone.
            what = str(exc.message).strip().splitlines()[0] if exc.message else type(exc).__name__
            message = f"Response payload is not completed: {what}"
            payload.set_exception(aiohttp.ClientPayloadError(message), exc)
        self.end_reads_in_callback()  # a read timeout, a refused answer: the body's reader sees it next

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.end_reads_in_callback()

    def end_reads_in_callback(self) -> None:
        self._after_read = None
        done, self._reads_done = self._reads_done, None
        if done is not None and not done.done():
            done.set_result(None)


class _Body(streams.StreamReader):
    """aiohttp's body reader, less two costs per HTTP chunk that only `iter_chunks` needs; the gateway reads
    bodies with `readany`, `read` and `read_nowait`. aiohttp's parser marks each chunk's start and end on the
    reader (`begin_`/`end_http_chunk_receiving`, which keep the chunks' offsets), and a read of the whole
    buffer takes it piece by piece (`_read_nowait_chunk`: bookkeeping and a call to resume the protocol per
    piece). A relayed stream is a chunk per token, so for a 64-token stream that was some 270 calls;
    here the marks are ignored and the whole buffer is taken in one join (bench/README.md, "Ninth pass").

    Made by re-classing the reader aiohttp's parser made (`adopt`): the parser holds on to that object.
    Everything else (flow control, `_high_water` pausing and the resume after a read, EOF, exceptions,
    timeouts, reads of n bytes) is aiohttp's."""

    __slots__ = ()

    @classmethod
    def adopt(cls, payload: object) -> bool:
        """Make aiohttp's reader `payload` one of these; whether it was one (the empty body of a 1xx or
        a 204, or a decompressing wrapper, is left as it is). Chunk offsets already marked are dropped:
        nothing reads by chunk."""
        if type(payload) is not streams.StreamReader:
            return False
        payload.__class__ = cls
        payload._http_chunk_splits = None
        return True

    def begin_http_chunk_receiving(self) -> None:
        pass

    def end_http_chunk_receiving(self) -> None:
        pass

    def _read_nowait(self, n: int) -> bytes:
        if n != -1 or self._buffer_offset:
            return super()._read_nowait(n)
        self._timer.assert_timeout()
        buffer = self._buffer
        data = buffer.popleft() if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self._cursor += len(data)
        self._size = 0
        self._protocol.resume_reading()  # as aiohttp's does below its low-water mark (now empty)
        return data


class UpstreamResponseError(aiohttp.ClientResponseError):
    """The upstream's answer could not be parsed as HTTP (aiohttp's `ClientSession` raises a
    `ClientResponseError` with the parser's code and message for the same)."""


@dataclasses.dataclass(frozen=True, eq=False)
class _Origin:
    """A base URL parsed once: where to connect and what `Host` says. One object per base URL (`Pool` keeps
    them), so it is a dict key by identity: hashing its fields twice per request showed in the profile."""

    host: str
    port: int
    host_header: str
    key: client_reqrep.ConnectionKey


def parse_origin(base_url: str) -> _Origin:
    """`http://host[:port]` (no path) → where to connect; anything but plain http is refused."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not a plain http:// base URL: {base_url!r}")
    port = parts.port or 80
    host_header = parts.netloc.rpartition("@")[2]
    if parts.port == 80:
        host_header = host_header.rpartition(":")[0]
    key = client_reqrep.ConnectionKey(parts.hostname, port, False, True, None, None, None)
    return _Origin(host=parts.hostname, port=port, host_header=host_header, key=key)


def request_head(method: str, target: str, *, origin_host: str, headers: CIMultiDict[str], length: int) -> bytes:
    """The request line and header block, in the order and with the defaults aiohttp writes."""
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {origin_host}\r\n"]
    for name, value in _AUTO_HEADERS:
        if name not in headers:
            lines.append(f"{name.title()}: {value}\r\n")
    for name, value in headers.items():
        line = f"{name}: {value}"
        if "\r" in line or "\n" in line:  # would split the header block (aiohttp refuses these too)
            raise ValueError("Newline or carriage return character detected in HTTP header")
        lines.append(line + "\r\n")
    if "content-type" not in headers:
        lines.append("Content-Type: application/octet-stream\r\n")
    lines.append(f"Content-Length: {length}\r\n\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


class Response:
    """One upstream answer: status and headers, and the body to read (`read` or `readany`). `close` hands
    the connection back to the pool when the body was read to its end, and closes it otherwise."""

    __slots__ = (
        "_deadline",
        "_handle",
        "_origin",
        "_payload",
        "_pool",
        "_protocol",
        "_timer",
        "content",
        "event_stream",
        "headers",
        "status",
    )

    def __init__(
        self,
        pool: Pool,
        origin: _Origin,
        protocol: client_proto.ResponseHandler,
        *,
        status: int,
        headers: CIMultiDictProxy[str],
        payload: streams.StreamReader,
        handle: helpers.TimeoutHandle,
        timer: helpers.BaseTimerContext,
        deadline: asyncio.TimerHandle | None,
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._protocol: client_proto.ResponseHandler | None = protocol
        self._payload = payload
        self.content = payload  # the body's StreamReader, for a caller that reads it chunk by chunk
        self._handle = handle
        self._timer = timer  # the total timeout, for what waits on the body (as `content`'s reads do)
        self._deadline = deadline
        self.status = status
        self.headers = headers
        self.event_stream = headers.get("Content-Type", "").startswith("text/event-stream")

    async def readany(self) -> bytes:
        """The next piece of the body as it arrives; b"" at its end."""
        return await self._payload.readany()

    async def read_in_callback(self, after_read: Callable[[], bool]) -> None:
        """Call `after_read` now, and then after every read from the connection, in the protocol's callback
        that read it, with what the read carried of the body in `content` (take it with `read_nowait`);
        return when it answers False, or when the connection fails, times out (`TimeoutError`, as a read
        of `content` would raise) or is lost. Meanwhile nothing waits on `content`, so nothing is woken per
        read: for a stream of small pieces that is most of what relaying a piece costs (bench/README.md).
        Answering False leaves what is still in `content` to be read as usual."""
        protocol = self._protocol
        if not isinstance(protocol, _Protocol) or not protocol.is_connected():
            return
        done = protocol._reads_done = asyncio.get_running_loop().create_future()
        protocol._after_read = after_read
        try:
            protocol._run_after_read()  # what came before the call
            if not done.done():
                with self._timer:
                    await done
        finally:
            if protocol._reads_done is done:
                protocol.end_reads_in_callback()

    async def read(self) -> bytes:
        """The rest of the body."""
        return await self._payload.read()

    async def release(self) -> None:
        """Read what is left of the body, then `close`."""
        try:
            await self._payload.read()
        finally:
            self.close()

    def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            return
        self._handle.close()
        if self._deadline is not None:
            self._deadline.cancel()
        if self._payload.is_eof() and self._payload.exception() is None and not protocol.should_close:
            self._pool.put_back(self._origin, protocol, after_stream=self.event_stream)
        else:
            protocol.close()


class Pool:
    """Keep-alive connections to upstreams, per base URL."""

    def __init__(self, *, keepalive_s: float = KEEPALIVE_S, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[_Origin, collections.deque[_Idle]] = {}
        self._closes_after_streams: set[_Origin] = set()
        self.connections_opened = 0  # for tests and the curious
        self._unsent: list[tuple[asyncio.Transport, bytes]] = []  # requests to write (`_write_soon`)
        self._closed = False

    async def request(
        self,
        method: str,
        base_url: str,
        target: str,
        *,
        headers: CIMultiDict[str],
        body: bytes,
        total_s: float | None,
        read_timeout_s: float | None,
    ) -> Response:
        """Send `method target` with `body` to `base_url`; returns once the status and headers are in.

        `total_s` bounds everything until the body's end (a `TimeoutError`), `read_timeout_s` each wait on
        the socket (`SocketTimeoutError`); None for no limit."""
        if self._closed:
            raise aiohttp.ClientConnectionError("Session is closed")
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = parse_origin(base_url)
        loop = asyncio.get_running_loop()
        handle = helpers.TimeoutHandle(loop, total_s, ceil_threshold=TIMEOUT_CEIL_THRESHOLD)
        deadline = handle.start()
        timer = handle.timer()
        try:
            idle = self._take(origin)
            if idle is None:
                with timer:
                    protocol = await self._connect(loop, origin)
            else:
                protocol = idle.protocol
            try:
                head = request_head(method, target, origin_host=origin.host_header, headers=headers, length=len(body))
                protocol.set_response_params(
                    timer=timer,
                    read_until_eof=True,
                    auto_decompress=False,
                    read_timeout=read_timeout_s,
                    read_bufsize=READ_BUFSIZE,
                    timeout_ceil_threshold=TIMEOUT_CEIL_THRESHOLD,
                )
                transport = protocol.transport
                if transport is None:
                    raise aiohttp.ServerDisconnectedError()
                if len(body) < LARGE_BODY:
                    self._write_soon(loop, transport, head + body)
                else:  # written now, and waited for while the socket's buffer is full
                    transport.write(head)
                    transport.write(body)
                with timer:
                    if protocol.writing_paused:
                        await protocol._drain_helper()
                    protocol.start_timeout()
                    while True:  # as ClientResponse.start: a 1xx is skipped, the parser reads the next answer
                        message, payload = await protocol.read()
                        if message.code < 100 or message.code > 199 or message.code == 101:
                            break
            except http_exceptions.HttpProcessingError as exc:
                protocol.close()
                raise UpstreamResponseError(
                    _request_info(method, base_url + target), (), status=exc.code, message=exc.message
                ) from exc
            except BaseException as exc:
                protocol.close()
                if idle is not None and idle.after_stream and isinstance(exc, _DROPPED):
                    self._learn_closes_after_streams(origin)
                raise
        except BaseException:
            handle.close()
            if deadline is not None:
                deadline.cancel()
            raise
        return Response(
            self,
            origin,
            protocol,
            status=message.code,
            headers=message.headers,
            payload=payload,
            handle=handle,
            timer=timer,
            deadline=deadline,
        )

    def _write_soon(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, data: bytes) -> None:
        """Send `data` once the callbacks the loop is running now have run: the requests they make go out
        one after another, so the upstream wakes once for all of them rather than once per request. On a
        core it shares with the upstream, a write per request as it was made cost the gateway 15% and its
        upstream 31% more CPU per request (bench/README.md, "Fourth pass": woken per request, caches cold)."""
        if not self._unsent:
            loop.call_soon(self._send)
        self._unsent.append((transport, data))

    def _send(self) -> None:
        unsent, self._unsent = self._unsent, []
        for transport, data in unsent:
            if transport.is_closing():  # its request was abandoned (the caller closed it), or the server left
                continue  # the reader sees the connection's end, as for a request written on a closed one
            try:
                transport.write(data)
            except (OSError, RuntimeError):  # the socket failed: closing it fails the request that waits on it
                transport.close()

    def _take(self, origin: _Origin) -> _Idle | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest_kept = time.monotonic() - self._keepalive_s
        while idle:
            entry = idle.pop()
            if entry.since >= oldest_kept and _reusable(entry.protocol):
                return entry
            if entry.after_stream and not entry.protocol.is_connected():
                self._learn_closes_after_streams(origin)
            entry.protocol.close()
        return None

    def _learn_closes_after_streams(self, origin: _Origin) -> None:
        if origin not in self._closes_after_streams:
            self._closes_after_streams.add(origin)
            logger.info(
                "http://%s closes connections after streamed answers: not keeping them",
                origin.host_header,
                extra={"event": "upstream_closes_after_streams", "upstream": f"http://{origin.host_header}"},
            )

    def closes_after_streams(self, base_url: str) -> bool:
        """Whether the pool learned that `base_url` closes a connection after a streamed answer."""
        origin = self._origins.get(base_url)
        return origin is not None and origin in self._closes_after_streams

    async def _connect(self, loop: asyncio.AbstractEventLoop, origin: _Origin) -> client_proto.ResponseHandler:
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _transport, protocol = await loop.create_connection(lambda: _Protocol(loop), origin.host, origin.port)
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host http://{origin.host_header}") from None
        except OSError as exc:
            raise aiohttp.ClientConnectorError(origin.key, exc) from exc
        self.connections_opened += 1
        return protocol

    def put_back(self, origin: _Origin, protocol: client_proto.ResponseHandler, *, after_stream: bool = False) -> None:
        if self._closed or not protocol.is_connected() or (after_stream and origin in self._closes_after_streams):
            protocol.close()
            return
        idle = self._idle.get(origin)
        if idle is None:
            idle = self._idle[origin] = collections.deque()
        now = time.monotonic()
        while idle and (now - idle[0].since > self._keepalive_s or len(idle) >= MAX_IDLE_PER_HOST):
            idle.popleft().protocol.close()
        idle.append(_Idle(now, protocol, after_stream))

    def idle_connections(self, base_url: str) -> int:
        """Idle connections kept for `base_url` (for tests and the curious)."""
        origin = self._origins.get(base_url)
        idle = self._idle.get(origin) if origin is not None else None
        return sum(1 for entry in idle if _reusable(entry.protocol)) if idle else 0

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for entry in idle:
                entry.protocol.close()
        self._idle.clear()


class SessionClient:
    """`Pool.request`'s signature over an `aiohttp.ClientSession`, for a hop whose connector does more than
    TCP (the mesh's Noise connector): the answer is aiohttp's `ClientResponse`, which has the same `status`,
    `headers`, `content`, `read`, `release` and `close`."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._timeouts: dict[tuple[float | None, float | None], aiohttp.ClientTimeout] = {}

    async def request(
        self,
        method: str,
        base_url: str,
        target: str,
        *,
        headers: CIMultiDict[str],
        body: bytes,
        total_s: float | None,
        read_timeout_s: float | None,
    ) -> aiohttp.ClientResponse:
        timeout = self._timeouts.get((total_s, read_timeout_s))
        if timeout is None:
            timeout = aiohttp.ClientTimeout(total=total_s, sock_connect=CONNECT_TIMEOUT_S, sock_read=read_timeout_s)
            self._timeouts[(total_s, read_timeout_s)] = timeout
        return await self._session.request(method, base_url + target, data=body, headers=headers, timeout=timeout)


def _reusable(protocol: client_proto.ResponseHandler) -> bool:
    """Open, and nothing arrived on it while it was idle (an answer to nothing means a confused server)."""
    return protocol.is_connected() and not protocol.should_close


def _request_info(method: str, url: str) -> aiohttp.RequestInfo:
    import yarl  # only on this rare path

    return aiohttp.RequestInfo(yarl.URL(url), method, CIMultiDictProxy(CIMultiDict()), yarl.URL(url))

"""Streams relayed in the upstream connection's read callback (`forwarder._Passthrough`): real sockets on both
sides, the upstream a raw TCP server writing chunked bytes by hand, the client a raw socket that sees the
gateway's bytes as they are.

Covers: a stream whose pieces arrive one by one (as llama-server's tokens do) reaches an HTTP/1.1 client
whole, each piece written in the read callback that brought it, ended once with the gateway's own last chunk
(no upstream trailers), its tokens counted; a client that stops reading holds the upstream back (its socket
fills) and then gets every byte in order as the relay moves between the callback and the task's writes
with backpressure; bytes that are no chunked body, an upstream that dies, a read timeout and the total
timeout end the stream with the error event and no last chunk; a client that goes away closes the upstream
connection; an HTTP/1.0 client is answered without chunks, its body whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import http_writer, web

from llamesh_proxy import forwarder, upstream_http
from rig import waiting

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def upstream(answer: Answer) -> AsyncIterator[str]:
    """A server that reads one request (head and Content-Length body) per connection and lets `answer` write."""
    tasks: list[asyncio.Task[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            await reader.readexactly(length)
            await answer(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def gateway(
    upstream_url: str,
    *,
    read_timeout_ms: int = 0,
    max_duration_ms: int = 0,
    stream: bool = True,
    returned: list[bool] | None = None,
) -> AsyncIterator[tuple[int, list[forwarder.Relay]]]:
    """An aiohttp server whose one route streams (or, `stream=False`, relays whole) through a `Forwarder` on a
    `Pool`, as the gateway's does; with `returned`, whether each response was sent when `relay` returned it."""
    pool = upstream_http.Pool()
    relaying = forwarder.Forwarder(pool, credential_headers=(), upstream_read_timeout_ms=read_timeout_ms)
    relays: list[forwarder.Relay] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        relay = forwarder.Relay()
        relays.append(relay)
        response = await relaying.relay(
            request,
            base_url=upstream_url,
            body=await request.read(),
            stream=stream,
            max_duration_ms=max_duration_ms,
            api_key=None,
            request_id="r-1",
            relay=relay,
        )
        if returned is not None:
            returned.append(response.prepared)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], relays
    finally:
        await runner.cleanup()
        await pool.close()


async def ask(
    port: int, *, version: str = "1.1", receive_buffer: int | None = None, until: asyncio.Event | None = None
) -> bytes:
    """Everything the gateway answers one streamed request with; with `until`, nothing is read before it is set."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)  # before connect, to take effect
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
    body = b'{"model":"m","stream":true}'
    writer.write(
        b"POST /v1/chat/completions HTTP/%s\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (version.encode(), len(body), body)
    )
    try:
        if until is not None:
            await waiting.eventually(until.is_set, within_s=60, what="the upstream to be held back")
        return await reader.read()
    finally:
        writer.close()


def dechunk(body: bytes) -> tuple[bytes, bool]:
    """The data of a chunked body read line by line, and whether it ended with its last chunk."""
    stream, pieces = io.BytesIO(body), []
    while line := stream.readline():
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return b"".join(pieces), stream.read() == b"\r\n"
        pieces.append(stream.read(size))
        if stream.read(2) != b"\r\n":
            break
    return b"".join(pieces), False


def event(n: int, padding: int = 0) -> bytes:
    return b'data: {"n":%d,"pad":"%s"}\n\n' % (n, b"x" * padding)


@pytest.fixture
def callback_writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The pieces `_Passthrough.relay` wrote to the client from the read callback (the real method, watched)."""
    written: list[bytes] = []
    relay = forwarder._Passthrough.relay

    def watched(self: forwarder._Passthrough) -> bool:
        before = len(self._relayed.tail), self._relayed.events
        going_on = relay(self)
        if (len(self._relayed.tail), self._relayed.events) != before and asyncio.current_task() is None:
            written.append(self._relayed.tail[-1])
        return going_on

    monkeypatch.setattr(forwarder._Passthrough, "relay", watched)
    return written


async def test_pieces_arriving_one_by_one_are_written_in_the_read_callback_and_counted(
    callback_writes: list[bytes],
) -> None:
    usage = b'data: {"choices":[],"usage":{"completion_tokens":3}}\n\n'
    events = [event(1), event(2), event(3, padding=40), usage]

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"%X;ext=1\r\n%s\r\n" % (len(events[0]), events[0]))
        for data in events[1:]:
            await asyncio.sleep(0.02)  # one chunk per read, as llama-server's tokens come
            writer.write(b"%X;ext=1\r\n%s\r\n" % (len(data), data))
        writer.write(b"0\r\nX-Trailer: dropped\r\n\r\n")
        await writer.drain()

    async with upstream(answer) as url, gateway(url) as (port, relays):
        answer_bytes = await ask(port)
    head, _, body = answer_bytes.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
    data, ended = dechunk(body)
    assert ended and data == b"".join(events)
    assert body.endswith(b"\r\n0\r\n\r\n") and b"X-Trailer" not in body  # one end: the gateway's own
    assert callback_writes == events[1:]  # the first went with the head; every later one from the callback
    (relay,) = relays
    assert relay.tokens == 3 and not relay.upstream_failed and not relay.client_gone


async def test_the_head_goes_out_at_once_when_the_first_token_is_still_to_come(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # llama-server sends its head, then the first token once the prompt is processed: the client has the
    # head meanwhile; when the first piece came with the upstream's head, both go out in one write instead
    heads_alone: list[int] = []
    send_headers = http_writer.StreamWriter.send_headers

    def watched(self: http_writer.StreamWriter) -> None:
        heads_alone.append(1)
        send_headers(self)

    monkeypatch.setattr(http_writer.StreamWriter, "send_headers", watched)
    first_token = asyncio.Event()

    async def slow_first_token(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD)
        await writer.drain()
        await first_token.wait()
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event(1)), event(1)))
        await writer.drain()

    async with upstream(slow_first_token) as url, gateway(url) as (port, _relays):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"model":"m","stream":true}'
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)  # before any token was sent
        assert head.startswith(b"HTTP/1.1 200") and not first_token.is_set() and heads_alone == [1]
        first_token.set()
        rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 30)
        assert dechunk(rest) == (event(1), True)
        writer.close()

    heads_alone.clear()

    async def head_with_the_stream(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"%x\r\n%s\r\n0\r\n\r\n" % (len(event(1)), event(1)))
        await writer.drain()

    async with upstream(head_with_the_stream) as url, gateway(url) as (port, _relays):
        answer = await ask(port)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and dechunk(rest) == (event(1), True)
    assert heads_alone == []  # the head went out with the body, not on its own


@pytest.mark.parametrize(("status", "sent_before_return"), [(200, True), (503, False)])
async def test_a_whole_answer_is_sent_before_the_relay_returns_unless_it_is_an_error(
    status: int, sent_before_return: bool
) -> None:
    # a 2xx goes out before the gateway's bookkeeping after the relay (the client's latency); an error is
    # returned unsent, for a caller that answers otherwise (the mesh tries another peer after a 503)
    payload = b'{"choices":[],"usage":{"completion_tokens":2}}'

    async def whole(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, len(payload), payload)
        )
        await writer.drain()

    returned: list[bool] = []
    async with upstream(whole) as url, gateway(url, stream=False, returned=returned) as (port, relays):
        answer = await ask(port)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status) and body == payload and b"X-Request-Id: r-1" in head
    assert returned == [sent_before_return]
    (relay,) = relays
    assert relay.status == status and not relay.client_gone
    assert (relay.tokens == 2) is (status == 200)


async def test_a_client_that_stops_reading_holds_the_upstream_back_and_gets_every_byte_in_order(
    callback_writes: list[bytes],
) -> None:
    # 32 MB: far more than the sockets between upstream, gateway and client hold (about 10 MB here)
    events = [event(n, padding=16_000) for n in range(2000)]
    held_back, finished = asyncio.Event(), asyncio.Event()
    sent = 0  # bytes the upstream's socket took

    async def answer(writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        writer.write(HEAD)
        for data in events:
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            try:
                async with asyncio.timeout(0.5):
                    await writer.drain()
            except TimeoutError:  # the gateway has stopped reading: the client reads nothing yet
                held_back.set()
                assert sent < len(events) * 16_000 // 2  # nowhere near the end: the gateway kept little
                await writer.drain()
            sent += len(data)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        finished.set()

    async with upstream(answer) as url, gateway(url) as (port, relays):
        answer_bytes = await ask(port, receive_buffer=2**16, until=held_back)
    assert held_back.is_set() and finished.is_set()
    assert callback_writes  # it began in the callback; the held-back client moved it to the task
    data, ended = dechunk(answer_bytes.partition(b"\r\n\r\n")[2])
    assert ended
    assert data == b"".join(events)
    assert not relays[0].upstream_failed and not relays[0].client_gone


@pytest.mark.parametrize(
    ("ending", "options", "why"),
    [
        (b"zz\r\nnot a chunk\r\n", {}, b"not completed: Invalid character in chunk size"),
        (b"", {}, b"not completed"),
        (None, {"read_timeout_ms": 300}, b"timed out"),
        (None, {"max_duration_ms": 1500}, b"timed out"),
    ],
    ids=["not-chunked", "upstream-dies", "read-timeout", "total-timeout"],
)
async def test_a_broken_stream_ends_with_the_error_event_and_no_last_chunk(
    ending: bytes | None, options: dict[str, int], why: bytes, callback_writes: list[bytes]
) -> None:
    stop = asyncio.Event()

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"%x\r\n%s\r\n" % (len(event(1)), event(1)))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"%x\r\n%s\r\n" % (len(event(2)), event(2)))  # from the read callback
        await writer.drain()
        await asyncio.sleep(0.05)
        if ending is None:
            await stop.wait()  # silence until the gateway gives up
        else:
            writer.write(ending)  # then garbage, or the connection's end (the server closes)
            await writer.drain()

    async with upstream(answer) as url, gateway(url, **options) as (port, relays):
        answer_bytes = await ask(port)
        stop.set()
    data, ended = dechunk(answer_bytes.partition(b"\r\n\r\n")[2])
    assert not ended  # no last chunk: a truncated stream, for a client that ignores the event
    events = data.split(b"\n\n")
    assert [e + b"\n\n" for e in events[:2]] == [event(1), event(2)]
    assert callback_writes == [event(2)]
    envelope = json.loads(events[2].removeprefix(b"data: "))
    assert envelope["error"]["type"] == "upstream_error"
    assert why in envelope["error"]["message"].encode()
    assert relays[0].upstream_failed


async def test_a_client_that_goes_away_closes_the_upstream_connection() -> None:
    upstream_closed = asyncio.Event()

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD)
        try:
            for n in range(1000):  # 20 s of tokens unless the gateway lets go
                writer.write(b"%x\r\n%s\r\n" % (len(event(n)), event(n)))
                await writer.drain()
                await asyncio.sleep(0.02)
        except ConnectionError:
            pass
        upstream_closed.set()

    async with upstream(answer) as url, gateway(url) as (port, relays):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"model":"m","stream":true}'
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await reader.readuntil(b'data: {"n":3')  # the stream is under way, in the callback
        writer.close()
        await waiting.eventually(upstream_closed.is_set, within_s=30, what="the upstream connection closed")
    assert relays[0].client_gone and not relays[0].upstream_failed


async def test_an_http_1_0_client_is_answered_without_chunks_with_the_whole_body() -> None:
    events = [event(n) for n in range(5)]

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n")
        await writer.drain()

    async with upstream(answer) as url, gateway(url) as (port, _relays):
        answer_bytes = await ask(port, version="1.0")
    head, _, body = answer_bytes.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head
    assert body == b"".join(events)

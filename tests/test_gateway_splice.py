"""Streams spliced through the forwarder (`forwarder._Splice`): real sockets on both sides, the upstream a raw
TCP server writing chunked bytes by hand, the client a raw socket that sees the gateway's bytes as they are.

Covers: a chunked stream reaches an HTTP/1.1 client chunk for chunk as the upstream sent it (sizes,
extensions), ended once by the gateway's own last chunk (no upstream trailers), its tokens counted; a burst
of many chunks in one read hands the rest of the body to aiohttp's parser, the client's bytes whole; a
client that stops reading holds the upstream back (its socket fills) and then gets every byte in order as
the relay switches between splicing and writing with backpressure; bytes that are no chunked body, and an
upstream that dies mid-stream, end the stream with the error event and no last chunk; an HTTP/1.0 client is
answered unspliced, its body whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

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
async def gateway(upstream_url: str) -> AsyncIterator[tuple[int, list[forwarder.Relay]]]:
    """An aiohttp server whose one route streams through a `Forwarder` on a `Pool`, as the gateway's does."""
    pool = upstream_http.Pool()
    relaying = forwarder.Forwarder(pool, credential_headers=(), upstream_read_timeout_ms=0)
    relays: list[forwarder.Relay] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        relay = forwarder.Relay()
        relays.append(relay)
        return await relaying.relay(
            request,
            base_url=upstream_url,
            body=await request.read(),
            stream=True,
            max_duration_ms=0,
            api_key=None,
            request_id="r-1",
            relay=relay,
        )

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


async def test_a_chunked_stream_goes_on_as_the_upstream_sent_it_and_is_counted() -> None:
    usage = b'data: {"choices":[],"usage":{"completion_tokens":3}}\n\n'
    frames = [b"%X;ext=1\r\n%s\r\n" % (len(e), e) for e in (event(1), event(2), event(3, padding=40), usage)]

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + frames[0])
        for frame in frames[1:]:
            await asyncio.sleep(0.02)  # one chunk per read, as llama-server's tokens come
            writer.write(frame)
        writer.write(b"0\r\nX-Trailer: dropped\r\n\r\n")
        await writer.drain()

    async with upstream(answer) as url, gateway(url) as (port, relays):
        answer_bytes = await ask(port)
    head, _, body = answer_bytes.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
    assert body == b"".join(frames) + b"0\r\n\r\n"  # the upstream's own frames; one end, no trailer
    (relay,) = relays
    assert relay.tokens == 3 and not relay.upstream_failed and not relay.client_gone


async def test_a_burst_of_chunks_in_one_read_hands_the_rest_of_the_body_to_the_parser() -> None:
    first = [b"%X;ext=1\r\n%s\r\n" % (len(event(n)), event(n)) for n in range(3)]
    burst = [event(n, padding=20) for n in range(3, 60)]  # about 5 KB in one write: more than a splice takes

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + first[0])
        for frame in first[1:]:
            await asyncio.sleep(0.02)
            writer.write(frame)
        await asyncio.sleep(0.02)
        writer.write(b"".join(b"%X;ext=1\r\n%s\r\n" % (len(e), e) for e in burst) + b"0\r\n\r\n")
        await writer.drain()

    assert len(b"".join(burst)) > forwarder.SPLICE_READ_MAX
    async with upstream(answer) as url, gateway(url) as (port, relays):
        answer_bytes = await ask(port)
    body = answer_bytes.partition(b"\r\n\r\n")[2]
    assert body.startswith(b"".join(first))  # spliced: the upstream's own frames
    assert b"ext=1" not in body[len(b"".join(first)) :]  # then parsed, and written by the task in its frames
    data, ended = dechunk(body)
    assert ended and data == b"".join([event(n) for n in range(3)] + burst)
    assert not relays[0].upstream_failed


async def test_a_client_that_stops_reading_holds_the_upstream_back_and_gets_every_byte_in_order() -> None:
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
    body = answer_bytes.partition(b"\r\n\r\n")[2]
    data, ended = dechunk(body)
    assert ended
    assert data == b"".join(events)
    assert not relays[0].upstream_failed and not relays[0].client_gone


async def test_bytes_that_are_no_chunked_body_or_an_upstream_that_dies_end_the_stream_with_the_error_event() -> None:
    for ending, why in ((b"zz\r\nnot a chunk\r\n", b"not chunked"), (b"", b"not completed")):

        async def answer(writer: asyncio.StreamWriter, ending: bytes = ending) -> None:
            writer.write(HEAD + b"%x\r\n%s\r\n" % (len(event(1)), event(1)))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(ending)  # then garbage, or the connection's end (the server closes)
            await writer.drain()

        async with upstream(answer) as url, gateway(url) as (port, relays):
            answer_bytes = await ask(port)
        data, ended = dechunk(answer_bytes.partition(b"\r\n\r\n")[2])
        assert not ended  # no last chunk: a truncated stream, for a client that ignores the event
        first, error = data.split(b"\n\n", 1)[0] + b"\n\n", data.split(b"\n\n")[1]
        assert first == event(1)
        envelope = json.loads(error.removeprefix(b"data: "))
        assert envelope["error"]["type"] == "upstream_error"
        assert why in envelope["error"]["message"].encode()
        assert relays[0].upstream_failed


async def test_an_http_1_0_client_is_answered_unspliced_with_the_whole_body() -> None:
    events = [event(n) for n in range(5)]

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n")
        await writer.drain()

    async with upstream(answer) as url, gateway(url) as (port, _relays):
        answer_bytes = await ask(port, version="1.0")
    head, _, body = answer_bytes.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head
    assert body == b"".join(events)

"""The gateway's lean upstream client (`upstream_http`) against real sockets.

The upstream is a raw asyncio TCP server that answers each request with bytes the test scripts (a fake is
the point here: the faults are the thing under test): content-length and chunked bodies, a body read to
its end when the server closes, `Connection: close`, a server that dies mid-body, one that closes an idle
kept-alive connection, one that stalls before or after its headers, a malformed status line, a refused
port. Each test checks what the client raises (the same aiohttp exception types a `ClientSession` raises)
and whether the connection went back to the pool. Servers that close a connection after a streamed answer
are learned and their streamed connections no longer kept, with the real llama-server too (it does so).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import streams
from multidict import CIMultiDict

from llamesh_proxy import upstream_http
from rig import processes, waiting

Answer = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # (request, writer) → keep the connection


class Upstream:
    """A TCP server that reads one request at a time (head + Content-Length body) and lets `answer` reply."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.stop = asyncio.Event()  # set at teardown: a stalling answer returns
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.append(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if not await self.answer(request, writer):
                    return
        finally:
            self.closed += 1
            writer.close()


@contextlib.asynccontextmanager
async def upstream(answer: Answer) -> AsyncIterator[Upstream]:
    server = Upstream(answer)
    server.server = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.server.close()
        server.stop.set()
        for writer in server.writers:
            writer.close()  # a handler waiting for the next request sees the end of its stream
        await asyncio.gather(*server.tasks, return_exceptions=True)


def replying(data: bytes, *, keep: bool = True) -> Answer:
    async def answer(_request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        await writer.drain()
        return keep

    return answer


OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


@pytest.fixture
async def pool() -> AsyncIterator[upstream_http.Pool]:
    """A pool for the test, closed after it whatever happened."""
    connections = upstream_http.Pool()
    try:
        yield connections
    finally:
        await connections.close()


async def ask(pool: upstream_http.Pool, url: str, **options: float | None) -> upstream_http.Response:
    headers = CIMultiDict({"Content-Type": "application/json", "X-Request-Id": "r-1"})
    return await pool.request(
        "POST",
        url,
        "/v1/chat/completions?x=1",
        headers=headers,
        body=b'{"model":"m"}',
        total_s=options.get("total_s"),
        read_timeout_s=options.get("read_timeout_s"),
    )


async def test_content_length_body_and_keep_alive_reuse(pool: upstream_http.Pool) -> None:
    async with upstream(replying(OK)) as server:
        for _ in range(3):
            response = await ask(pool, server.url)
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/json"
            assert await response.read() == b'{"ok":true}'
            response.close()
            assert pool.idle_connections(server.url) == 1
        assert server.connections == 1  # one connection carried all three
        head = server.requests[0].split(b"\r\n\r\n")[0].decode().split("\r\n")
        assert head[0] == "POST /v1/chat/completions?x=1 HTTP/1.1"
        fields = {line.partition(": ")[0].lower(): line.partition(": ")[2] for line in head[1:]}
        assert fields["host"] == server.url.removeprefix("http://")
        assert fields["content-length"] == "13" and fields["content-type"] == "application/json"
        assert fields["x-request-id"] == "r-1" and fields["accept"] == "*/*"
        assert fields["user-agent"].startswith("Python/") and fields["accept-encoding"] == "gzip, deflate"
        assert server.requests[0].endswith(b'\r\n\r\n{"model":"m"}')


async def test_chunked_body_arrives_piece_by_piece(pool: upstream_http.Pool) -> None:
    events = [b'data: {"n":%d}\n\n' % n for n in range(5)]

    async def answer(_request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for event in events:
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        return True

    async with upstream(answer) as server:
        response = await ask(pool, server.url)
        assert "Transfer-Encoding" in response.headers
        received = b""
        while chunk := await response.readany():
            received += chunk
        assert received == b"".join(events)
        response.close()
        assert pool.idle_connections(server.url) == 1


async def test_many_chunks_that_wait_are_taken_whole_and_reads_of_n_bytes_still_work(
    pool: upstream_http.Pool,
) -> None:
    # 3,000 tokens' worth of chunks (about 200 kB, over the reader's high-water mark) sent at once: the body
    # reader ignores chunk boundaries, pauses the socket above its mark, resumes it as it is read, and a
    # read of everything waiting comes as one piece in order
    events = [b'data: {"n":%d,"pad":"%s"}\n\n' % (n, b"x" * 40) for n in range(3000)]
    sent = asyncio.Event()

    async def answer(_request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events) + b"0\r\n\r\n")
        await writer.drain()
        sent.set()
        return True

    async with upstream(answer) as server:
        response = await ask(pool, server.url)
        content = response.content
        assert type(content) is upstream_http._Body
        await waiting.eventually(lambda: content._protocol._reading_paused, what="reading paused above the mark")
        assert await content.read(5) == events[0][:5]  # n bytes: aiohttp's own read
        first = await response.readany()
        assert first == b"".join(events)[5 : len(first) + 5] and first.count(b"data:") > 100  # many chunks, one piece
        received = b"".join(events)[: len(first) + 5]
        async with asyncio.timeout(30):  # a reader that never resumed the socket would wait for ever
            while chunk := await response.readany():
                received += chunk
        assert received == b"".join(events) and sent.is_set()
        assert content.at_eof() and content.exception() is None
        response.close()
        assert pool.idle_connections(server.url) == 1  # read to its end: kept


@pytest.mark.parametrize("informational", [False, True], ids=["head", "100-then-head"])
async def test_a_body_in_the_same_read_as_its_head_is_never_marked_chunk_by_chunk(
    pool: upstream_http.Pool, monkeypatch: pytest.MonkeyPatch, informational: bool
) -> None:
    # the whole answer in one write: the head goes to the parser alone, so the body's reader is a `_Body`
    # before the parser feeds it, and aiohttp's per-chunk marks are never made (watched on its class)
    marks: list[int] = []
    monkeypatch.setattr(streams.StreamReader, "end_http_chunk_receiving", lambda self: marks.append(1))
    events = [b'data: {"n":%d}\n\n' % n for n in range(50)]
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    first = b"HTTP/1.1 100 Continue\r\n\r\n" if informational else b""
    body = b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events) + b"0\r\n\r\n"
    async with upstream(replying(first + head + body)) as server:
        for _ in range(2):  # a new connection, then the kept one
            response = await ask(pool, server.url)
            assert response.status == 200 and type(response.content) is upstream_http._Body
            assert await response.read() == b"".join(events)
            response.close()
        assert server.connections == 1 and marks == []


def streaming(*, then_close: asyncio.Event | None) -> Answer:
    """A streamed answer (chunked `text/event-stream`) that says nothing of closing; with `then_close`, the
    connection is closed after it once the event is set (set at once: as soon as it is written), as
    llama-server does a few milliseconds after a stream. Other requests get `OK`."""

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> bool:
        if b'"stream":true' not in request:
            writer.write(OK)
            return True
        event = b'data: {"n":1}\n\n'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
        await writer.drain()
        if then_close is None:
            return True
        await then_close.wait()
        return False

    return answer


async def ask_stream(pool: upstream_http.Pool, url: str) -> None:
    response = await pool.request(
        "POST",
        url,
        "/v1/chat/completions",
        headers=CIMultiDict({"Content-Type": "application/json"}),
        body=b'{"stream":true}',
        total_s=None,
        read_timeout_s=None,
    )
    assert response.event_stream
    assert await response.read() == b'data: {"n":1}\n\n'
    response.close()


async def test_a_server_that_closes_after_streams_is_learned_from_the_closed_idle_connection(
    pool: upstream_http.Pool,
) -> None:
    closing = asyncio.Event()
    closing.set()
    async with upstream(streaming(then_close=closing)) as server:
        await ask_stream(pool, server.url)
        assert not pool.closes_after_streams(server.url)
        await waiting.eventually(lambda: pool.idle_connections(server.url) == 0, within_s=10, what="close seen")
        await ask_stream(pool, server.url)  # finds the closed one: learns, and connects anew
        assert pool.closes_after_streams(server.url)
        assert pool.idle_connections(server.url) == 0  # not kept: this server is about to close it
        await ask_stream(pool, server.url)
        assert (pool.connections_opened, server.connections) == (3, 3)
        response = await ask(pool, server.url)  # other answers are kept as before
        await response.read()
        response.close()
        assert pool.idle_connections(server.url) == 1


async def test_a_server_that_closes_after_streams_is_learned_from_the_request_it_drops(
    pool: upstream_http.Pool,
) -> None:
    """The close races the next request: the connection still looks open when it is taken, and the request
    written on it gets no answer. That request fails (the gateway retries it); the pool learns."""
    closing = asyncio.Event()
    async with upstream(streaming(then_close=closing)) as server:
        await ask_stream(pool, server.url)
        assert pool.idle_connections(server.url) == 1
        asking = asyncio.ensure_future(ask(pool, server.url))
        try:  # taken and written in one step: once it is no longer idle, the request is on its way
            await waiting.eventually(lambda: pool.idle_connections(server.url) == 0, within_s=10, what="taken")
        finally:
            closing.set()  # the server closes instead of answering it
        with pytest.raises(aiohttp.ClientConnectionError):
            await asking
        assert pool.closes_after_streams(server.url)


async def test_a_server_that_keeps_connections_after_streams_keeps_them_pooled(pool: upstream_http.Pool) -> None:
    async with upstream(streaming(then_close=None)) as server:
        for _ in range(3):
            await ask_stream(pool, server.url)
            assert pool.idle_connections(server.url) == 1
        assert (pool.connections_opened, server.connections) == (1, 1)
        assert not pool.closes_after_streams(server.url)


async def test_a_body_bigger_than_the_buffer_pauses_the_socket_and_resumes_as_it_is_read(
    pool: upstream_http.Pool,
) -> None:
    """Flow control still works with the pool's protocol, which skips aiohttp's resume when nothing is
    paused: a body over the reader's high-water mark pauses reading, and reading it resumes to the end."""
    body = bytes(range(256)) * 4096  # 1 MiB, 16 times the read buffer
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % len(body)
    async with upstream(replying(head + body)) as server:
        response = await ask(pool, server.url)
        await waiting.eventually(lambda: response.content._protocol._reading_paused, what="reading paused")
        received = bytearray()
        async with asyncio.timeout(30):  # a reader that never resumes would wait forever
            while chunk := await response.readany():
                received += chunk
        assert bytes(received) == body
        response.close()
        assert pool.idle_connections(server.url) == 1  # read to the end: kept


async def test_requests_made_together_are_written_together(pool: upstream_http.Pool) -> None:
    """Requests made while the loop runs one round of callbacks reach the upstream in one round of writes
    (it wakes once for them), each on its own connection, each answered."""
    async with upstream(replying(OK)) as server:
        warm = [await ask(pool, server.url) for _ in range(4)]  # four connections at once, then idle
        for response in warm:
            await response.read()
            response.close()
        assert pool.idle_connections(server.url) == 4
        sends = 0
        send = pool._send

        def counted() -> None:
            nonlocal sends
            sends += 1
            send()

        pool._send = counted  # type: ignore[method-assign]
        answers = await asyncio.gather(*(ask(pool, server.url) for _ in range(4)))
        assert [answer.status for answer in answers] == [200] * 4
        assert [await answer.read() for answer in answers] == [b'{"ok":true}'] * 4
        for answer in answers:
            answer.close()
        assert sends == 1 and server.connections == 4 and len(server.requests) == 8


async def test_connection_close_is_not_pooled(pool: upstream_http.Pool) -> None:
    closing = OK.replace(b"Content-Length", b"Connection: close\r\nContent-Length")
    async with upstream(replying(closing, keep=False)) as server:
        for expected in (1, 2):
            response = await ask(pool, server.url)
            assert await response.read() == b'{"ok":true}'
            response.close()
            assert pool.idle_connections(server.url) == 0
            assert server.connections == expected


async def test_body_until_the_server_closes(pool: upstream_http.Pool) -> None:
    no_length = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it"
    async with upstream(replying(no_length, keep=False)) as server:
        response = await ask(pool, server.url)
        assert await response.read() == b"all of it"
        response.close()
        assert pool.idle_connections(server.url) == 0


async def test_upstream_dying_mid_body_is_a_payload_error(pool: upstream_http.Pool) -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b"
    async with upstream(replying(cut, keep=False)) as server:
        response = await ask(pool, server.url)
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
        response.close()
        assert pool.idle_connections(server.url) == 0


async def test_a_broken_chunk_fails_the_body_even_while_the_server_keeps_the_connection(
    pool: upstream_http.Pool,
) -> None:
    async def answer(_request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # the head is parsed and answered before the broken chunk comes
        writer.write(b"zz\r\nnot a chunk\r\n")
        await writer.drain()
        return True  # and then silence, the connection open

    async with upstream(answer) as server:
        response = await ask(pool, server.url)
        with pytest.raises(aiohttp.ClientPayloadError, match="Invalid character in chunk size"):
            async with asyncio.timeout(30):  # aiohttp alone left the reader waiting for ever
                await response.read()
        response.close()
        assert pool.idle_connections(server.url) == 0


async def test_dying_before_the_answer_is_a_disconnect(pool: upstream_http.Pool) -> None:
    async with upstream(replying(b"", keep=False)) as server:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await ask(pool, server.url)


async def test_idle_connection_closed_by_the_server_is_not_reused(pool: upstream_http.Pool) -> None:
    async with upstream(replying(OK)) as server:
        (await ask(pool, server.url)).close()
        assert pool.idle_connections(server.url) == 1
        server.writers[0].close()  # the server drops the kept-alive connection, as llama-server does
        await waiting.eventually(lambda: pool.idle_connections(server.url) == 0, within_s=10, what="close seen")
        response = await ask(pool, server.url)
        assert await response.read() == b'{"ok":true}'
        response.close()
        assert server.connections == 2


async def test_connection_with_stray_bytes_while_idle_is_not_reused(pool: upstream_http.Pool) -> None:
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"
    async with upstream(replying(OK + stray)) as server:
        response = await ask(pool, server.url)
        assert await response.read() == b'{"ok":true}'
        response.close()
        await waiting.eventually(lambda: pool.idle_connections(server.url) == 0, within_s=10, what="stray seen")
        response = await ask(pool, server.url)
        assert await response.read() == b'{"ok":true}'  # a new connection: not the stray answer
        response.close()
        assert server.connections == 2


async def test_abandoned_body_closes_the_connection(pool: upstream_http.Pool) -> None:
    async def answer(_request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        return True

    async with upstream(answer) as server:
        response = await ask(pool, server.url)
        assert await response.readany() == b"first"
        response.close()  # the client went away mid-stream
        assert pool.idle_connections(server.url) == 0
        await waiting.eventually(lambda: server.closed == 1, within_s=10, what="upstream sees the close")


async def test_stall_before_the_headers_hits_the_total_timeout(pool: upstream_http.Pool) -> None:
    stop = asyncio.Event()

    async def stall(_request: bytes, _writer: asyncio.StreamWriter) -> bool:
        await stop.wait()
        return False

    async with upstream(stall) as server:
        server.stop = stop
        with pytest.raises(TimeoutError):
            await ask(pool, server.url, total_s=0.2)
        assert pool.idle_connections(server.url) == 0


async def test_stall_in_the_body_hits_the_read_timeout_and_the_total_timeout(pool: upstream_http.Pool) -> None:
    async def answer(_request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        return True

    async with upstream(answer) as server:
        response = await ask(pool, server.url, read_timeout_s=0.2)
        assert await response.readany() == b"first"
        with pytest.raises(aiohttp.SocketTimeoutError):
            await response.readany()
        response.close()
        response = await ask(pool, server.url, total_s=0.3)
        assert await response.readany() == b"first"
        with pytest.raises(TimeoutError):
            await response.readany()
        response.close()


def chunked_events(events: list[bytes], *, gap_s: float = 0.02, end: bool = True) -> Answer:
    """A chunked `text/event-stream` answer, one event per write, `gap_s` apart; kept open after it."""

    async def answer(_request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for event in events:
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(gap_s)
        if end:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        return True

    return answer


async def test_reads_in_the_callback_see_every_piece_in_it_and_end_with_the_body(pool: upstream_http.Pool) -> None:
    events = [b'data: {"n":%d}\n\n' % n for n in range(6)]
    async with upstream(chunked_events(events)) as server:
        response = await ask(pool, server.url)
        seen: list[tuple[bytes, bool]] = []

        def after_read() -> bool:
            seen.append((response.content.read_nowait(), asyncio.current_task() is None))
            return not response.content.is_eof()

        await response.read_in_callback(after_read)
        assert response.content.is_eof()
        assert b"".join(data for data, _ in seen) == b"".join(events)
        assert all(in_callback for _, in_callback in seen[1:])  # the first call is the caller's own
        assert len([data for data, _ in seen if data]) >= 3  # pieces as they came, not the body at once
        assert await response.readany() == b""
        response.close()
        assert pool.idle_connections(server.url) == 1  # read to its end: kept, with nothing left attached
        again = await ask(pool, server.url)  # the kept connection answers the next request as usual
        received = b""
        while chunk := await again.readany():
            received += chunk
        assert received == b"".join(events)
        again.close()
        assert server.connections == 1


async def test_answering_false_leaves_the_rest_of_the_body_to_the_reader(pool: upstream_http.Pool) -> None:
    events = [b'data: {"n":%d}\n\n' % n for n in range(6)]
    async with upstream(chunked_events(events)) as server:
        response = await ask(pool, server.url)
        taken: list[bytes] = []

        def after_read() -> bool:
            taken.append(response.content.read_nowait())
            return b"".join(taken).count(b"data:") < 2

        await response.read_in_callback(after_read)
        rest = b""
        while chunk := await response.readany():
            rest += chunk
        assert b"".join(taken) + rest == b"".join(events)
        assert b"".join(taken).count(b"data:") == 2
        response.close()


async def test_reads_in_the_callback_end_on_a_dying_upstream_a_read_timeout_and_the_total_timeout(
    pool: upstream_http.Pool,
) -> None:
    first = [b'data: {"n":0}\n\n']

    def taking(response: upstream_http.Response) -> Callable[[], bool]:
        def after_read() -> bool:
            response.content.read_nowait()
            return True  # never stops by itself: only the connection's fate ends the wait

        return after_read

    async with upstream(replying(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nten bytes.", keep=False)) as s:
        response = await ask(pool, s.url)
        await response.read_in_callback(taking(response))
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.readany()
        response.close()
    async with upstream(chunked_events(first, end=False)) as server:
        response = await ask(pool, server.url, read_timeout_s=0.2)
        await response.read_in_callback(taking(response))
        with pytest.raises(aiohttp.SocketTimeoutError):
            await response.readany()
        response.close()
        response = await ask(pool, server.url, total_s=0.3)
        with pytest.raises(TimeoutError):
            await response.read_in_callback(taking(response))
        response.close()
        assert pool.idle_connections(server.url) == 0


async def test_refused_connection_is_a_connector_error(pool: upstream_http.Pool) -> None:
    async with upstream(replying(OK)) as server:
        url = server.url
    with pytest.raises(aiohttp.ClientConnectorError) as raised:
        await ask(pool, url)
    assert isinstance(raised.value.os_error, ConnectionRefusedError)
    assert str(raised.value).startswith(f"Cannot connect to host 127.0.0.1:{url.rpartition(':')[2]}")


async def test_malformed_answer_is_a_client_error(pool: upstream_http.Pool) -> None:
    async with upstream(replying(b"NOT HTTP AT ALL\r\n\r\n", keep=False)) as server:
        with pytest.raises(aiohttp.ClientResponseError):
            await ask(pool, server.url)


async def test_informational_answer_is_skipped(pool: upstream_http.Pool) -> None:
    async with upstream(replying(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)) as server:
        response = await ask(pool, server.url)
        assert response.status == 200 and await response.read() == b'{"ok":true}'
        response.close()


async def test_informational_answer_then_the_answer_in_pieces(pool: upstream_http.Pool) -> None:
    async def answer(_request: bytes, writer: asyncio.StreamWriter) -> bool:
        for piece in (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConte", OK[len(b"HTTP/1.1 200 OK\r\nConte") :]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0)  # two segments: the answer's head is split across reads
        return True

    async with upstream(answer) as server:
        response = await ask(pool, server.url)
        assert response.status == 200 and await response.read() == b'{"ok":true}'
        response.close()


async def test_refused_header_closes_the_connection_it_took(pool: upstream_http.Pool) -> None:
    async with upstream(replying(OK)) as server:
        (await ask(pool, server.url)).close()
        assert pool.idle_connections(server.url) == 1
        with pytest.raises(ValueError, match="Newline"):
            await pool.request(
                "POST",
                server.url,
                "/p",
                headers=CIMultiDict({"X": "a\nb"}),
                body=b"",
                total_s=None,
                read_timeout_s=None,
            )
        assert pool.idle_connections(server.url) == 0
        await waiting.eventually(lambda: server.closed == 1, within_s=10, what="the taken connection closed")


def test_request_head_keeps_the_callers_headers_and_refuses_injection() -> None:
    headers = CIMultiDict([("accept", "text/event-stream"), ("X-A", "1"), ("x-a", "2")])
    head = upstream_http.request_head("POST", "/p", origin_host="h:1", headers=headers, length=3).decode()
    assert head.startswith("POST /p HTTP/1.1\r\nHost: h:1\r\n") and head.endswith("Content-Length: 3\r\n\r\n")
    assert "Accept: */*" not in head and "accept: text/event-stream\r\n" in head
    assert "X-A: 1\r\nx-a: 2\r\n" in head  # repeated headers kept, in order
    for bad in ("a\r\nInjected: 1", "a\nb", "a\rb"):
        with pytest.raises(ValueError, match="Newline or carriage return"):
            upstream_http.request_head("POST", "/p", origin_host="h", headers=CIMultiDict({"X": bad}), length=0)


def test_parse_origin() -> None:
    assert upstream_http.parse_origin("http://10.0.0.1:8081").host_header == "10.0.0.1:8081"
    assert upstream_http.parse_origin("http://node-a").port == 80
    assert upstream_http.parse_origin("http://[::1]:9").host == "::1"
    with pytest.raises(ValueError, match="plain http"):
        upstream_http.parse_origin("https://node-a:443")


async def test_session_client_speaks_the_same_request() -> None:
    async with upstream(replying(OK)) as server:
        async with aiohttp.ClientSession() as session:
            client = upstream_http.SessionClient(session)
            response = await client.request(
                "POST", server.url, "/v1/x", headers=CIMultiDict(), body=b"{}", total_s=5, read_timeout_s=None
            )
            assert response.status == 200 and await response.read() == b'{"ok":true}'
            response.close()
        assert server.requests[0].startswith(b"POST /v1/x HTTP/1.1\r\n")


@pytest.mark.real
async def test_the_real_llama_server_closes_after_streams_and_the_pool_learns_it(
    tmp_path: Path, llama_server_binary: Path, chat_model: Path, pool: upstream_http.Pool
) -> None:
    port = processes.free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(llama_server_binary), "-m", str(chat_model), "--host", "127.0.0.1", "--port", str(port), "-c", "512"]
    headers = CIMultiDict({"Content-Type": "application/json"})

    async def complete(*, stream: bool) -> bytes:
        body = json.dumps({"prompt": "Hello", "max_tokens": 3, "stream": stream}).encode()
        response = await pool.request(
            "POST", url, "/v1/completions", headers=headers, body=body, total_s=60, read_timeout_s=None
        )
        assert response.status == 200 and response.event_stream is stream
        payload = await response.read()
        response.close()
        return payload

    async with processes.running(argv, log_path=tmp_path / "llama-server.log", base_url=url):
        assert (await complete(stream=True)).endswith(b"data: [DONE]\n\n")
        assert pool.idle_connections(url) == 1  # it answered keep-alive...
        # ...and closes the connection a few milliseconds later anyway
        await waiting.eventually(lambda: pool.idle_connections(url) == 0, within_s=10, what="llama-server's close")
        await complete(stream=True)  # takes the closed one: learned, a new connection
        assert pool.closes_after_streams(url)
        assert pool.idle_connections(url) == 0  # closed by the pool itself this time
        for _ in range(3):  # non-streamed answers keep their connection
            await complete(stream=False)
        assert pool.connections_opened == 3

"""The gateway against bad input and slow clients, served as `llamesh serve` serves it (`make_runner`, `listen`).

Covers: a JSON body nested 100,000 deep (arrays, objects) is a 400 `invalid_request_error`, counted and logged
like any other 400; HTTP the parser refuses (unknown method, a raw 0xFF in the path, a request line or a
header over 8 KB, 1,000 headers) is answered with the seed's envelope and closed, with exactly one WARNING
line that quotes none of it; a connection that sends nothing, only a request line, or a byte at a time is
closed once its deadline passes, and a kept-alive one once `idle_timeout_seconds` pass; connections over
`max_connections` are closed at once; 2,000 idle connections stay open while requests are served; the
OpenAI SDK raises `APIError` on a stream whose upstream dies mid-way (an SSE error event); the hop header
takes ASCII digits only; the new `http` fields load from config.yaml and `LLAMESH_HTTP__*`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import resource
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

import gateway_support as gs
from llamesh_api import loading, store
from llamesh_operator import serve
from llamesh_proxy import app as gateway_app
from llamesh_proxy import connections, gateway

EXAMPLES = Path(__file__).parent.parent / "examples"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
FAST_DEADLINES = {"protocol_detect_timeout_ms": 1000, "header_read_timeout_ms": 1000, "idle_timeout_seconds": 1}


@dataclasses.dataclass
class Served:
    app: web.Application
    runner: web.AppRunner
    port: int

    @property
    def gw(self) -> gateway.Gateway:
        return self.app[gateway.GATEWAY]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open_connections(self) -> int:
        server = self.runner.server
        assert isinstance(server, connections._Server)
        return server.open_connections


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, *, agent: bool = False, env: Mapping[str, Mapping[str, str]] | None = None, **http: Any
) -> AsyncIterator[Served]:
    """The gateway for model "m" on a loopback port, opened by `serve.listen` with `make_runner`'s runner."""
    settings = gs.node_config(listen_addr="127.0.0.1:0", http=http)
    memory = store.MemoryStore()
    await memory.create(gs.model("m"))
    async with contextlib.AsyncExitStack() as stack:
        if agent:
            await stack.enter_async_context(gs.running_node(memory, tmp_path, settings=settings, env=env))
        else:
            await gs.register_node(memory)
        app = gateway_app.create_app(settings, store=memory, gateway_id=gs.GATEWAY_ID, node_name=gs.NODE)
        runner = gateway_app.make_runner(app)
        await serve.listen(runner, settings)
        stack.push_async_callback(runner.cleanup)
        yield Served(app, runner, runner.addresses[0][1])


async def exchange(port: int, raw: bytes, *, within_s: float = 30) -> bytes:
    """Send `raw` on a new connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), within_s)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def parse_response(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


def request(method: str, path: str, *, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway", f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def warnings_and_worse(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_the_connection_settings_are_config_fields_with_env_overrides() -> None:
    environ = {"LLAMESH_HTTP__HEADER_READ_TIMEOUT_MS": "2500", "LLAMESH_HTTP__MAX_CONNECTIONS": "7"}
    http = loading.load_node_config(EXAMPLES / "config.yaml", environ=environ).http
    assert (http.header_read_timeout_ms, http.max_connections, http.idle_timeout_seconds) == (2500, 7, 120)
    defaults = gs.node_config().http
    assert (defaults.header_read_timeout_ms, defaults.max_connections) == (10_000, 10_000)


# --- bad bodies -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000],
    ids=["arrays", "objects"],
)
async def test_a_deeply_nested_body_is_a_400_envelope_counted_as_an_error(
    tmp_path: Path, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serving(tmp_path) as served, aiohttp.ClientSession() as session:
        headers = {"Content-Type": "application/json"}
        async with session.post(served.base_url + "/v1/chat/completions", data=body, headers=headers) as response:
            assert response.status == 400
            assert await response.json() == {
                "error": {
                    "message": "Invalid JSON: nested too deeply",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        assert served.gw.metrics.errors_total == 1
    logged = [record for record in caplog.records if getattr(record, "event", None) == "request_complete"]
    assert [(record.status, record.error_type) for record in logged] == [(400, "invalid_request_error")]  # type: ignore[attr-defined]
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]


# --- HTTP the parser refuses -------------------------------------------------------------------------------------

GARBAGE = {
    "unknown method": (b"FOO /v1/models HTTP/1.1\r\nHost: gateway\r\n\r\n", b"FOO"),
    "0xff in the path": (b"GET /v1/\xff HTTP/1.1\r\nHost: gateway\r\n\r\n", b"\\xff"),
    "long request line": (b"GET /" + b"L" * 9000 + b" HTTP/1.1\r\nHost: gateway\r\n\r\n", b"LLLL"),
    "long header": (b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Long: " + b"H" * 9000 + b"\r\n\r\n", b"HHHH"),
    "1,000 headers": (
        b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n"
        + b"".join(b"X-Many-%d: 1\r\n" % i for i in range(1000))
        + b"\r\n",
        b"X-Many",
    ),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
async def test_http_the_parser_refuses_is_an_envelope_and_one_warning(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    raw, echoed = GARBAGE[kind]
    async with serving(tmp_path) as served:
        caplog.set_level(logging.DEBUG)
        caplog.clear()
        answer = await exchange(served.port, raw)  # ends: the server closed the connection
        status, headers, body = parse_response(answer)
        assert status == 400 and headers["content-type"].startswith("application/json")
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["message"].startswith("Malformed HTTP request: ")
        assert echoed not in answer
        await gs.eventually(lambda: served.open_connections() == 0, what="the connection to be let go")
        # a well-formed request is served as before
        healthy = await exchange(served.port, request("GET", "/healthz"))
        assert parse_response(healthy)[0] == 200
    [warning] = warnings_and_worse(caplog)
    assert warning.name == "llamesh_proxy.connections" and warning.levelno == logging.WARNING
    assert warning.getMessage().startswith("refused a malformed HTTP request from 127.0.0.1: ")
    assert echoed.decode() not in warning.getMessage()
    assert not [record for record in caplog.records if record.exc_info]


# --- slow and idle clients ---------------------------------------------------------------------------------------


async def _trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """One byte every half second: a whole request would take a minute."""
    with contextlib.suppress(ConnectionError):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.5)


@pytest.mark.parametrize("client", ["silent", "request line only", "a byte at a time"])
async def test_a_client_that_does_not_finish_its_headers_is_closed(tmp_path: Path, client: str) -> None:
    async with serving(tmp_path, **FAST_DEADLINES) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        trickling = None
        if client == "request line only":
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\n")
        elif client == "a byte at a time":
            trickling = asyncio.create_task(_trickle(writer, request("GET", "/healthz") * 4))
        started = time.monotonic()
        try:
            assert await asyncio.wait_for(reader.read(), 20) == b""  # closed, without an answer
            assert time.monotonic() - started < 20  # the trickle alone would need a minute
        finally:
            if trickling is not None:
                trickling.cancel()
                await asyncio.gather(trickling, return_exceptions=True)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await gs.eventually(lambda: served.open_connections() == 0, what="the connection to be let go")


async def test_the_next_request_on_a_kept_alive_connection_must_finish_its_headers_too(tmp_path: Path) -> None:
    """The header deadline starts with a request's first byte on a kept-alive connection as on a new one
    (it is armed only when the bytes that arrived do not hold all the headers)."""
    deadlines = {**FAST_DEADLINES, "idle_timeout_seconds": 300}  # only the header deadline can close it
    async with serving(tmp_path, **deadlines) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
            assert head.startswith(b"HTTP/1.1 200 ")
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            writer.write(b"GET /healthz HTTP/1.1\r\n")  # the next request's line, and no headers
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 20) == b""  # closed, without an answer
            assert time.monotonic() - started < 20  # long before the idle timeout
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_a_kept_alive_connection_is_closed_after_the_idle_timeout(tmp_path: Path) -> None:
    async with serving(tmp_path, **FAST_DEADLINES) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        try:
            for _ in range(2):  # served, and kept alive for the next request
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
                assert head.startswith(b"HTTP/1.1 200 ")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
            assert await asyncio.wait_for(reader.read(), 20) == b""  # then closed once idle
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_connections_over_max_connections_are_closed_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(tmp_path, max_connections=5, protocol_detect_timeout_ms=120_000) as served:
        held = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(5)]
        try:
            await gs.eventually(lambda: served.open_connections() == 5)
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            assert await asyncio.wait_for(reader.read(), 20) == b""
            writer.close()
            assert any("client connections are open" in record.getMessage() for record in warnings_and_worse(caplog))

            held.pop()[1].close()  # one leaves: a new client is served
            await gs.eventually(lambda: served.open_connections() == 4)
            assert parse_response(await exchange(served.port, request("GET", "/healthz")))[0] == 200
        finally:
            for _, held_writer in held:
                held_writer.close()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.slow
async def test_two_thousand_idle_connections_stay_open_while_requests_are_served(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * 2_000 + 2 * connections.FDS_KEPT_BACK + 256  # both ends live in this process
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the open-file hard limit ({hard}) is below the {needed} this test needs")
    # The usual default soft limit, with which 1,100 silent connections used to lock everyone out.
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    assert connections.connection_limit(10_000) == (1024 - connections.FDS_KEPT_BACK) // 2
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    slow = {"protocol_detect_timeout_ms": 300_000, "header_read_timeout_ms": 300_000}
    try:
        async with serving(tmp_path, **slow) as served:
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard  # raised by serve.listen
            try:
                for _ in range(20):  # in batches: the listen backlog holds 1,024
                    batch = (asyncio.open_connection("127.0.0.1", served.port) for _ in range(100))
                    idle += await asyncio.gather(*batch)
                await gs.eventually(lambda: served.open_connections() == 2_000, within_s=60, what="2,000 connections")
                async with aiohttp.ClientSession() as session:
                    for _ in range(20):
                        async with session.get(served.base_url + "/healthz") as response:
                            assert response.status == 200
                    async with session.post(served.base_url + "/v1/chat/completions", json={"model": "nope"}) as r:
                        assert r.status == 404  # the request path too, up to the model lookup
                assert served.open_connections() >= 2_000
                assert not any(reader.at_eof() for reader, _ in idle)
            finally:
                for _, writer in idle:
                    writer.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- streams whose upstream dies ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_the_sdk_raises_on_a_stream_whose_upstream_died(tmp_path: Path) -> None:
    env = {"default": {"FAKE_LLAMA_FAULT": "crash_mid_stream", "FAKE_LLAMA_CRASH_AFTER": "3"}}
    async with (
        serving(tmp_path, agent=True, env=env) as served,
        openai.AsyncOpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        stream = await client.chat.completions.create(model="m", messages=HI, stream=True)
        received = []
        with pytest.raises(openai.APIError) as raised:
            async for chunk in stream:
                received.append(chunk)
        assert not isinstance(raised.value, openai.APIConnectionError)  # the event, not the broken connection
        assert raised.value.body is not None and raised.value.body["type"] == "upstream_error"  # type: ignore[index]
        assert raised.value.message.startswith("Upstream error: the stream broke off")
        assert len(received) == 3
        await gs.eventually(lambda: served.gw.metrics.current_requests == 0)
        assert served.gw.metrics.errors_total == 1


# --- the hop header ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hops", "message"),
    [
        (b"1_0", "Invalid x-llama-mesh-hops header value"),
        (b"+1", "Invalid x-llama-mesh-hops header value"),
        (b"-1", "Invalid x-llama-mesh-hops header value"),
        (b"1 0", "Invalid x-llama-mesh-hops header value"),
        ("\u0661".encode(), "Invalid x-llama-mesh-hops header value"),  # ARABIC-INDIC DIGIT ONE: int() takes it
        ("\u00b2".encode(), "Invalid x-llama-mesh-hops header value"),  # SUPERSCRIPT TWO
        (b"0x1", "Invalid x-llama-mesh-hops header value"),
        (b"11", "Too many hops (loop detected)"),
        (b"9" * 5000, "Too many hops (loop detected)"),  # more digits than int() converts
        (b"10", None),
        (b"0010", None),
        (b"0", None),
    ],
)
async def test_the_hop_header_takes_ascii_digits_only(tmp_path: Path, hops: bytes, message: str | None) -> None:
    body = json.dumps({"model": "nope", "messages": HI}).encode()
    raw = request("POST", "/v1/chat/completions", body=body).replace(
        b"Host: gateway\r\n", b"Host: gateway\r\nX-Llama-Mesh-Hops: " + hops + b"\r\n"
    )
    async with serving(tmp_path) as served:
        status, _, answer = parse_response(await exchange(served.port, raw))
    if message is None:  # accepted: the request went on to the model lookup
        assert (status, answer["error"]["type"]) == (404, "model_not_found")
    else:
        assert (status, answer["error"]) == (
            400,
            {"message": message, "type": "invalid_request_error", "param": None, "code": None},
        )

"""`server_tls`: the public API over TLS on the gateway's one port, with certificates reloaded on change.

Covers: aiohttp and the OpenAI SDK, trusting a self-signed certificate made with `cryptography`, are served
over TLS on the public port (handlers see a secure request), plain HTTP still works on the same port;
after the certificate files are replaced the next connection gets the new certificate, and a replacement
that does not load keeps the old one with a warning; a client that does not trust the certificate fails
its handshake while the server goes on serving; a certificate that cannot be read stops the start with
the file's name. With the real llama-server under `llamesh serve`: the OpenAI SDK streams a chat over TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
import yaml

import noise_support as ms
from llamesh_api import config
from llamesh_proxy import connections
from llamesh_proxy.mesh import tls
from rig import processes


def trusting(*certificates: ms.Certificate) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for certificate in certificates:
        context.load_verify_locations(cadata=certificate.cert_pem.decode())
    return context


@contextlib.asynccontextmanager
async def tls_gateway(tmp_path: Path, certificate: ms.Certificate) -> AsyncIterator[tuple[ms.Served, tls.ServerTls]]:
    certificate.write(tmp_path / "server.crt", tmp_path / "server.key")
    settings = config.ServerTlsConfig(enabled=True, cert_path="server.crt", key_path="server.key")
    server_tls = tls.ServerTls(settings, base_dir=tmp_path)
    async with ms.serving(tmp_path, layers=connections.Layers(tls=server_tls)) as served:
        yield served, server_tls


async def served_certificate(port: int, context: ssl.SSLContext) -> bytes:
    """The certificate a new TLS connection gets (DER), after a request on it was answered 200."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 20)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
        der: bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return der
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def test_aiohttp_and_the_openai_sdk_are_served_over_tls_on_the_public_port(tmp_path: Path) -> None:
    certificate = ms.self_signed()
    async with tls_gateway(tmp_path, certificate) as (served, _):
        https = f"https://localhost:{served.port}"
        connector = aiohttp.TCPConnector(ssl=trusting(certificate))
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get(https + "/whoami") as response:
                assert await response.json() == {"secure": True}
            body = os.urandom(900_000)  # many TLS records each way, through flow control
            async with session.post(https + "/echo", data=body) as response:
                assert await response.read() == body
        async with openai.AsyncOpenAI(
            base_url=https + "/v1",
            api_key="unused",
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(verify=trusting(certificate)),
        ) as client:
            assert [model.id async for model in client.models.list()] == ["m"]
        async with aiohttp.ClientSession() as session, session.get(served.base_url + "/whoami") as response:
            assert await response.json() == {"secure": False}  # plain HTTP, same port


async def test_the_next_connection_gets_the_replaced_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = ms.self_signed("first"), ms.self_signed("second")  # distinct issuer names to trust both
    both = trusting(first, second)
    caplog.set_level(logging.INFO)
    async with tls_gateway(tmp_path, first) as (served, _):
        assert await served_certificate(served.port, both) == first.der
        second.write(tmp_path / "server.crt", tmp_path / "server.key")
        assert await served_certificate(served.port, both) == second.der
        assert any(getattr(record, "event", None) == "tls_reloaded" for record in caplog.records)

        (tmp_path / "server.crt").write_text("not a certificate")  # a renewal gone wrong
        assert await served_certificate(served.port, both) == second.der
    [warning] = [record for record in caplog.records if getattr(record, "event", None) == "tls_reload_failed"]
    assert warning.levelno == logging.WARNING and "still serving the previous one" in warning.getMessage()


async def test_a_client_that_does_not_trust_the_certificate_fails_and_others_are_served(tmp_path: Path) -> None:
    certificate = ms.self_signed()
    async with tls_gateway(tmp_path, certificate) as (served, _):
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection(
                "127.0.0.1", served.port, ssl=ssl.create_default_context(), server_hostname="localhost"
            )
        assert await served_certificate(served.port, trusting(certificate)) == certificate.der


def test_a_certificate_that_cannot_load_stops_the_start(tmp_path: Path) -> None:
    settings = config.ServerTlsConfig(enabled=True, cert_path="missing.crt", key_path="missing.key")
    with pytest.raises(tls.TlsError, match=rf"cannot read {tmp_path / 'missing.crt'}"):
        tls.ServerTls(settings, base_dir=tmp_path)
    ms.self_signed().write(tmp_path / "a.crt", tmp_path / "a.key")
    ms.self_signed().write(tmp_path / "b.crt", tmp_path / "b.key")
    mismatched = config.ServerTlsConfig(enabled=True, cert_path="a.crt", key_path="b.key")
    with pytest.raises(tls.TlsError, match="check that both are PEM and belong together"):
        tls.ServerTls(mismatched, base_dir=tmp_path)
    with pytest.raises(tls.TlsError, match="cert_path or key_path is empty"):
        tls.ServerTls(config.ServerTlsConfig(enabled=True), base_dir=tmp_path)


@pytest.mark.real
async def test_llamesh_serve_streams_a_chat_to_the_openai_sdk_over_tls(
    tmp_path: Path, llama_server_binary: Path, chat_model: Path
) -> None:
    certificate = ms.self_signed()
    certificate.write(tmp_path / "server.crt", tmp_path / "server.key")
    port = processes.free_port()
    node_config = {
        "node_id": "tls",
        "listen_addr": f"127.0.0.1:{port}",
        "metrics_path": str(tmp_path / "node-metrics.json"),
        "shutdown_grace_period_seconds": 5,
        "llama_cpp": {"enabled": False, "binary_path": str(llama_server_binary), "cache_dir": str(tmp_path / "c")},
        "server_tls": {"enabled": True, "cert_path": "server.crt", "key_path": "server.key"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(node_config))
    profile = {"id": "default", "model_path": str(chat_model), "llama_server_args": "-c 512 -np 1"}
    (tmp_path / "cookbook.yaml").write_text(yaml.safe_dump({"models": [{"name": "tiny", "profiles": [profile]}]}))
    llamesh = str(Path(sys.executable).parent / "llamesh")
    argv = [llamesh, "serve", "--config", str(tmp_path / "config.yaml"), "--cookbook", str(tmp_path / "cookbook.yaml")]
    async with (
        processes.running(argv, log_path=tmp_path / "serve.log", base_url=f"http://127.0.0.1:{port}") as child,
        openai.AsyncOpenAI(
            base_url=f"https://localhost:{port}/v1",
            api_key="unused",
            max_retries=0,
            timeout=120,
            http_client=openai.DefaultAsyncHttpxClient(verify=trusting(certificate)),
        ) as client,
    ):
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in {"length", "stop"}
    assert f"llamesh serving the OpenAI API on https://127.0.0.1:{port}/v1" in child.log_text()

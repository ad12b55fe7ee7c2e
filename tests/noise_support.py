"""Helpers for the mesh security tests: node identities in temporary folders, the gateway served on a loopback
port the way `llamesh serve` serves it (with Noise and TLS layers), a byte-flipping TCP relay, and
self-signed certificates made with `cryptography`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import gateway_support as gs
from llamesh_api import config, store
from llamesh_operator import serve
from llamesh_proxy import app as gateway_app
from llamesh_proxy import connections
from llamesh_proxy.mesh import keys, transport

TOKEN = "the-cluster-token"


def security(
    tmp_path: Path, node_id: str, *, token: str = TOKEN, environ: dict[str, str] | None = None, **noise: Any
) -> keys.MeshSecurity:
    """A node's identity with its secrets in tmp_path/<node_id> (generated on first use)."""
    noise.setdefault("config_dir", str(tmp_path / node_id))
    return keys.load(
        config.NoiseConfig(**noise),
        node_id=node_id,
        base_dir=tmp_path,
        environ={"CLUSTER_TOKEN": token, **(environ or {})},
    )


@dataclasses.dataclass
class Served:
    app: web.Application
    runner: web.AppRunner
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def _whoami(request: web.Request) -> web.Response:
    """What a handler sees of the connection: the interface the mesh's gossip handler relies on."""
    assert request.transport is not None
    peer = request.transport.get_extra_info(transport.PEER_INFO)
    body = {"secure": request.secure}
    if peer is not None:
        body |= {"public_key": peer.public_key, "node_id": peer.node_id}
    return web.json_response(body)


async def _echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read(), content_type="application/octet-stream")


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, *, layers: connections.Layers, **http: Any) -> AsyncIterator[Served]:
    """The gateway for model "m" on a loopback port, opened by `serve.listen`, with test routes /whoami (what a
    handler sees of the connection) and /echo (the body back)."""
    settings = gs.node_config(listen_addr="127.0.0.1:0", http=http)
    memory = store.MemoryStore()
    await memory.create(gs.model("m"))
    await gs.register_node(memory)
    app = gateway_app.create_app(settings, store=memory, gateway_id=gs.GATEWAY_ID, node_name=gs.NODE)
    app.router.add_get("/whoami", _whoami)
    app.router.add_post("/echo", _echo)
    runner = gateway_app.make_runner(app, layers=layers)
    await serve.listen(runner, settings)
    try:
        yield Served(app, runner, runner.addresses[0][1])
    finally:
        await runner.cleanup()


class Relay:
    """A TCP relay between a client and `target_port` that can flip one bit of the next client chunk."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flip_next: bool = False
        self.flipped = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        def tamper(chunk: bytes) -> bytes:
            if not self.flip_next:
                return chunk
            self.flip_next = False
            self.flipped.set()
            middle = len(chunk) // 2
            return chunk[:middle] + bytes([chunk[middle] ^ 0x01]) + chunk[middle + 1 :]

        upstream = asyncio.create_task(self._pipe(client_reader, server_writer, tamper))
        downstream = asyncio.create_task(self._pipe(server_reader, client_writer, lambda chunk: chunk))
        self._tasks |= {upstream, downstream}
        await asyncio.gather(upstream, downstream, return_exceptions=True)

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, change: Callable[[bytes], bytes]
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(change(chunk))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@dataclasses.dataclass(frozen=True)
class Certificate:
    cert_pem: bytes
    key_pem: bytes

    @property
    def der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.cert_pem).public_bytes(serialization.Encoding.DER)

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Replace both files the way a renewal tool does: new files renamed over the old ones."""
        for path, content in ((key_path, self.key_pem), (cert_path, self.cert_pem)):
            temporary = path.with_name(path.name + ".new")
            temporary.write_bytes(content)
            temporary.replace(path)


def self_signed(common_name: str = "localhost") -> Certificate:
    """A fresh key and a self-signed certificate for localhost and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Certificate(certificate.public_bytes(serialization.Encoding.PEM), key_pem)

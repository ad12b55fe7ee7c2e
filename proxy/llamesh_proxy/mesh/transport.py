"""Node-to-node HTTP over Noise on the public port: the server's protocol detection and the client connector.

One port serves everything (the seed's protocol multiplexing). `detect` reads a new connection's first
bytes: `LMNZ` (noise.MAGIC) is a Noise session, `0x16 0x03` a TLS ClientHello, `PRI ` the HTTP/2 prior
knowledge preface (h2c, which aiohttp cannot serve: answered with an HTTP/2 GOAWAY, HTTP_1_1_REQUIRED),
anything else HTTP/1.1 as before. The gateway's connection protocol (`connections.Connection`) keeps the
socket and, for Noise and TLS, puts a `LayeredTransport` between itself and aiohttp's HTTP parser: bytes
in are decrypted before the parser sees them, the responses aiohttp writes are encrypted on the way out.
Handlers find the authenticated peer as `request.transport.get_extra_info("llamesh.noise_peer")` (a
`noise.NoisePeer`; None on plain and TLS connections).

`NoiseConnector` is the client side: an aiohttp connector whose connections run the Noise handshake
before aiohttp writes its first request, so gossip and request forwarding use `http://host:port/...`
URLs, pooling and streaming bodies exactly as over plain TCP.

Not here: the handshake and framing (`noise`), keys and trust (`keys`), TLS certificates (`tls`).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import struct
import typing
from typing import Any

import aiohttp
from aiohttp import client_proto, connector

from llamesh_proxy.mesh import keys, noise

PEER_INFO = "llamesh.noise_peer"
HANDSHAKE_TIMEOUT_S = 10.0

_H2_PREFACE_START = b"PRI "
_TLS_HANDSHAKE = b"\x16\x03"
_HTTP_1_1_REQUIRED = 0xD
# An empty SETTINGS frame (the server's preface), then GOAWAY(last stream 0, HTTP_1_1_REQUIRED).
H2C_REFUSAL = (
    struct.pack(">I", 0)[1:]
    + b"\x04\x00"
    + struct.pack(">I", 0)
    + (struct.pack(">I", 8)[1:] + b"\x07\x00" + struct.pack(">I", 0) + struct.pack(">II", 0, _HTTP_1_1_REQUIRED))
)


class Wire(enum.Enum):
    HTTP1 = "http/1.1"
    NOISE = "noise"
    TLS = "tls"
    H2C = "h2c"


def detect(prefix: bytes) -> Wire | None:
    """The protocol a connection speaks, from its first bytes; None while they could still be any."""
    for marker, wire in ((noise.MAGIC, Wire.NOISE), (_TLS_HANDSHAKE, Wire.TLS), (_H2_PREFACE_START, Wire.H2C)):
        if prefix[: len(marker)] == marker[: len(prefix)]:
            return wire if len(prefix) >= len(marker) else None
    return Wire.HTTP1


class LayerClosed(Exception):
    """The layer ended the connection (a failed handshake, a refused peer, a tampered frame)."""

    def __init__(self, reason: str, *, refused: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.refused = refused  # a peer this node refused (worth a warning), rather than noise on the wire


class LayeredTransport(asyncio.Transport):
    """The plaintext side of an encrypted connection: writes are sealed onto the socket's transport, and
    `receive` turns the socket's bytes into plaintext (writing any handshake answers itself)."""

    def __init__(self, raw: asyncio.Transport, *, protocol: asyncio.BaseProtocol | None = None) -> None:
        super().__init__()
        self._raw = raw
        self._protocol = protocol

    # subclasses: the codec
    def receive(self, data: bytes) -> bytes:
        raise NotImplementedError

    def _seal(self, data: bytes) -> bytes:
        raise NotImplementedError

    def _own_extra(self, name: str) -> tuple[bool, Any]:
        return False, None

    # asyncio.Transport, mostly the socket's
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data and not self._raw.is_closing():
            self._raw.write(self._seal(bytes(data)))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        own, value = self._own_extra(name)
        return value if own else self._raw.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._raw.is_closing()

    def close(self) -> None:
        self._raw.close()

    def abort(self) -> None:
        self._raw.abort()

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("an encrypted layer cannot half-close")

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol


class NoiseTransport(LayeredTransport):
    """HTTP bytes over one Noise session (either side)."""

    def __init__(self, raw: asyncio.Transport, session: noise.Session) -> None:
        super().__init__(raw)
        self.session = session

    def receive(self, data: bytes) -> bytes:
        try:
            received = self.session.receive(data)
        except noise.Refused as exc:
            raise LayerClosed(exc.reason, refused=True) from exc
        except noise.NoiseError as exc:
            raise LayerClosed(str(exc)) from exc
        if received.outgoing:
            self._raw.write(received.outgoing)
        if received.refusal is not None:
            raise LayerClosed(received.refusal, refused=True)
        return received.plaintext

    def _seal(self, data: bytes) -> bytes:
        return self.session.seal(data)

    def _own_extra(self, name: str) -> tuple[bool, Any]:
        if name == PEER_INFO:
            return True, self.session.peer
        return False, None


def server_transport(raw: asyncio.Transport, security: keys.MeshSecurity) -> NoiseTransport:
    """The responder's layer for a connection that began with the Noise marker."""

    def authorize(peer: noise.NoisePeer) -> None:
        security.trust.check(names=[f"node={peer.node_id}"], key=peer.public_key, previous_key=peer.previous_key)

    return NoiseTransport(raw, noise.Session(security, initiator=False, authorize=authorize))


# --- the client side ---------------------------------------------------------------------------------------------


class HandshakeFailed(ConnectionError):
    """The Noise handshake with a peer did not complete: refused, timed out or broken off."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.ECONNABORTED, reason)  # aiohttp's ClientConnectorError shows the strerror


class _Initiator(asyncio.Protocol):
    """The socket's protocol on the dialling side: runs the handshake, then relays to aiohttp's protocol."""

    def __init__(self, session: noise.Session, loop: asyncio.AbstractEventLoop) -> None:
        self.session = session
        self.ready: asyncio.Future[None] = loop.create_future()
        self.layer: NoiseTransport | None = None
        self._app: asyncio.Protocol | None = None
        self._early = b""  # plaintext that came before aiohttp's protocol was attached

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a cast, not an isinstance check: uvloop's TCPTransport is a stream transport but no asyncio.Transport
        raw = typing.cast(asyncio.Transport, transport)
        self.layer = NoiseTransport(raw, self.session)
        raw.write(self.session.start())

    def attach(self, app: asyncio.Protocol) -> NoiseTransport:
        assert self.layer is not None
        self._app = app
        self.layer.set_protocol(app)
        app.connection_made(self.layer)
        if self._early:
            early, self._early = self._early, b""
            app.data_received(early)
        return self.layer

    def data_received(self, data: bytes) -> None:
        assert self.layer is not None
        try:
            plaintext = self.layer.receive(data)
        except LayerClosed as exc:
            self._fail(HandshakeFailed(exc.reason) if not self.ready.done() else ConnectionResetError(exc.reason))
            return
        if self.session.established and not self.ready.done():
            self.ready.set_result(None)
        if plaintext:
            if self._app is None:
                self._early += plaintext
            else:
                self._app.data_received(plaintext)

    def _fail(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        assert self.layer is not None
        self.layer.abort()

    def eof_received(self) -> bool | None:
        return self._app.eof_received() if self._app is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(HandshakeFailed("the peer closed the connection during the Noise handshake"))
        if self._app is not None:
            self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()


class NoiseConnector(aiohttp.TCPConnector):
    """An aiohttp connector to peers' public ports: every connection is a Noise session authenticated both
    ways (cluster token, pinned keys) before the first request. Use `http://` URLs; `https://` is refused."""

    def __init__(
        self, security: keys.MeshSecurity, *, handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.security = security
        self._handshake_timeout_s = handshake_timeout_s

    async def _wrap_create_connection(
        self,
        *args: Any,
        addr_infos: list[connector.AddrInfoType],
        req: aiohttp.ClientRequest,
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
        client_error: type[Exception] = aiohttp.ClientConnectorError,
        **kwargs: Any,
    ) -> tuple[asyncio.Transport, client_proto.ResponseHandler]:
        if req.is_ssl():
            raise client_error(req.connection_key, HandshakeFailed("Noise connections take http:// URLs, not https://"))
        factory, *rest = args
        address = f"{req.url.raw_host}:{req.port}"
        security = self.security

        def authorize(peer: noise.NoisePeer) -> None:
            names = [f"node={peer.node_id}", f"addr={address}"]
            security.trust.check(names=names, key=peer.public_key, previous_key=peer.previous_key)

        loop = asyncio.get_running_loop()
        session = noise.Session(security, initiator=True, authorize=authorize)
        raw, initiator = await super()._wrap_create_connection(
            lambda: _Initiator(session, loop),
            *rest,
            addr_infos=addr_infos,
            req=req,
            timeout=timeout,
            client_error=client_error,
            **kwargs,
        )
        assert isinstance(initiator, _Initiator)
        try:
            async with asyncio.timeout(self._handshake_timeout_s):
                await initiator.ready
        except TimeoutError:
            raw.abort()
            failure = HandshakeFailed(f"no Noise handshake with {address} within {self._handshake_timeout_s:g} s")
            raise client_error(req.connection_key, failure) from None
        except HandshakeFailed as exc:
            raw.abort()
            raise client_error(req.connection_key, exc) from None
        app = factory()
        return initiator.attach(app), app

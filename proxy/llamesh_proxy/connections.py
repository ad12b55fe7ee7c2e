"""The gateway's client connections: what happens before a request reaches the app, and between requests.

aiohttp reads the request line and headers in its protocol (`web.RequestHandler`) before any middleware
runs, and has no setting for what happens there (aio-libs/aiohttp#3287). `GatewayRunner` is an `AppRunner`
whose server makes `Connection`s instead, which changes four things:

- a request aiohttp cannot parse (an unknown method, a byte the request target may not hold, a request
  line or header over 8190 bytes, more than 128 headers) is answered with the seed's 400
  `invalid_request_error` envelope and the connection is closed. One WARNING line names the client and
  the kind of fault, never the bytes: aiohttp's own answer echoes them as text, and it logs a traceback
  quoting them for every such request;
- a new connection must send its first byte within `http.protocol_detect_timeout_ms`, and a request's line
  and headers must be complete `http.header_read_timeout_ms` after its first byte; otherwise the
  connection is closed without an answer (a silent or trickling client would hold it, a file descriptor
  and a parser forever);
- a kept-alive connection with no request for `http.idle_timeout_seconds` is closed (aiohttp's keep-alive
  timeout, which also bounds a next request that arrives pipelined behind a running one);
- a new connection's first bytes say its protocol (`mesh.transport.detect`): HTTP/1.1 as always; Noise
  (node-to-node, when the runner has the node's `MeshSecurity`) and TLS (`server_tls`) are decrypted by a
  `mesh.transport.LayeredTransport` before aiohttp's parser sees them; h2c, which aiohttp cannot serve,
  is answered with an HTTP/2 GOAWAY (HTTP_1_1_REQUIRED). The deadlines above cover the Noise and TLS
  handshakes: they must finish, with the request's headers, within `http.header_read_timeout_ms`;
- at most `http.max_connections` are open at once, lowered to what the open-file limit allows (two
  descriptors per client, one for its upstream request, plus a reserve); one more is closed as soon as it
  is accepted, with a WARNING line at most once a minute while that happens.

Requests that parse are not touched here: the app's middlewares and handlers answer them as before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import resource
import time
from typing import Any

from aiohttp import http_exceptions, web

from llamesh_api import config
from llamesh_proxy import errors
from llamesh_proxy.mesh import keys, tls, transport

log = logging.getLogger(__name__)

FDS_KEPT_BACK = 256  # descriptors left for everything but client connections: children, logs, the store
LIMIT_WARNING_INTERVAL_S = 60.0
_SILENT = "nothing sent"
_SLOW = "request headers incomplete"


@dataclasses.dataclass(frozen=True)
class Limits:
    first_byte_timeout_s: float
    header_read_timeout_s: float
    max_connections: int


@dataclasses.dataclass(frozen=True)
class Layers:
    """The encrypted protocols the public port also speaks (None: that protocol is closed on sight)."""

    noise: keys.MeshSecurity | None = None
    tls: tls.ServerTls | None = None


def connection_limit(configured: int) -> int:
    """`configured`, lowered so that every client may hold an upstream connection within RLIMIT_NOFILE."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, (soft - FDS_KEPT_BACK) // 2))


class GatewayRunner(web.AppRunner):
    """An `AppRunner` whose connections follow `http` (see the module docstring)."""

    def __init__(
        self, app: web.Application, *, http: config.HttpConfig, layers: Layers | None = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("keepalive_timeout", http.idle_timeout_seconds)
        super().__init__(app, **kwargs)
        self._http = http
        self._layers = layers or Layers()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        max_connections = connection_limit(self._http.max_connections)
        if max_connections < self._http.max_connections:
            log.warning(
                "http.max_connections is %d, but the open-file limit (ulimit -n) allows %d client connections; "
                "raise the limit to allow more",
                self._http.max_connections,
                max_connections,
                extra={"event": "http_connection_limit"},
            )
        limits = Limits(
            first_byte_timeout_s=self._http.protocol_detect_timeout_ms / 1000,
            header_read_timeout_s=self._http.header_read_timeout_ms / 1000,
            max_connections=max_connections,
        )
        return _Server.adopt(server, limits, self._layers)


class _Server(web.Server):
    """aiohttp's `Server` as the Application built it, making `Connection`s and counting them."""

    limits: Limits
    layers: Layers
    open_connections: int
    refused: int  # connections closed over the limit since the last warning
    warned_at: float

    @classmethod
    def adopt(cls, server: web.Server, limits: Limits, layers: Layers) -> _Server:
        # The Application builds its Server itself (`_make_handler`) with no way to name the protocol class;
        # the one it built becomes this subclass, which only adds the fields below and `__call__`.
        server.__class__ = cls
        assert isinstance(server, cls)
        server.limits, server.open_connections, server.refused, server.warned_at = limits, 0, 0, -math.inf
        server.layers = layers
        return server

    def refuse(self, transport: asyncio.BaseTransport) -> None:
        """Close a connection over the limit before aiohttp takes it; a warning at most once a minute."""
        transport.close()
        self.refused += 1
        now = time.monotonic()
        if now - self.warned_at >= LIMIT_WARNING_INTERVAL_S:
            log.warning(
                "%d client connections are open, the most allowed (http.max_connections or the open-file limit); "
                "new connections closed at once since the last such warning: %d",
                self.open_connections,
                self.refused,
                extra={"event": "http_connection_limit"},
            )
            self.warned_at, self.refused = now, 0

    def __call__(self) -> Connection:
        return Connection(self, loop=self._loop, **self._kwargs)


class Connection(web.RequestHandler):
    """One client connection: aiohttp's protocol with the gateway's parse-error answer, deadlines and cap."""

    __slots__ = (
        "_counted",
        "_deadline",
        "_deadline_reason",
        "_deadline_request",
        "_deadline_s",
        "_gateway_server",
        "_layer",
        "_prefix",
        "_session_expiry",
    )

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gateway_server = manager
        self._counted = False
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_request = 0
        self._deadline_reason = ""
        self._deadline_s = 0.0
        self._prefix: bytes | None = b""  # the first bytes while the protocol is unknown; None once known
        self._layer: transport.LayeredTransport | None = None
        self._session_expiry: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._gateway_server
        if server.open_connections >= server.limits.max_connections:
            server.refuse(transport)  # never handed to aiohttp: no parser task, no timers
            return
        server.open_connections += 1
        self._counted = True
        super().connection_made(transport)
        self._arm(server.limits.first_byte_timeout_s, _SILENT)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if self._session_expiry is not None:
            self._session_expiry.cancel()
        if self._counted:
            self._counted = False
            self._gateway_server.open_connections -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Bytes that start a request start its header deadline, unless they hold all of its headers: that
        # is known once they are parsed, so the deadline is armed after, and only then (a timer armed and
        # cancelled on every request cost more than the rest of this method; bench/, profiled).
        begins = bool(data) and self._deadline_reason != _SLOW and self._awaiting_request()
        requests = self._request_count
        self._receive(data)
        if begins and self._request_count == requests and self.transport is not None:
            self._arm(self._gateway_server.limits.header_read_timeout_s, _SLOW)  # its headers are incomplete
        elif self._deadline is not None and self._request_count != self._deadline_request:
            self._disarm()  # its headers are complete (or it failed to parse and is being answered)

    def _receive(self, data: bytes) -> None:
        """Through the protocol detection and the Noise or TLS layer, then to aiohttp's parser."""
        if self._prefix is not None:
            data = self._detect(self._prefix + data)
        if self._layer is not None and data:
            try:
                data = self._layer.receive(data)
            except transport.LayerClosed as exc:
                self._layer_closed(exc)
                return
        if data:
            super().data_received(data)

    def _detect(self, prefix: bytes) -> bytes:
        """The bytes for the HTTP path once the protocol is known (a layer set up for Noise and TLS); b""
        while it is not, or when the connection is being closed."""
        wire = transport.detect(prefix)
        if wire is None:
            self._prefix = prefix
            return b""
        self._prefix = None
        raw = self.transport
        assert raw is not None
        layers = self._gateway_server.layers
        if wire is transport.Wire.HTTP1:
            return prefix
        if wire is transport.Wire.NOISE and layers.noise is not None:
            self._layer = transport.server_transport(raw, layers.noise)
            if layers.noise.session_ttl_s > 0:  # `cluster.noise.session_ttl_seconds`: a fresh handshake after it
                self._session_expiry = self._loop.call_later(layers.noise.session_ttl_s, self._session_expired)
        elif wire is transport.Wire.TLS and layers.tls is not None:
            self._layer = tls.TlsTransport(raw, layers.tls.context())
        else:
            self._refuse_wire(wire, raw)
            return b""
        self._layer.set_protocol(self)
        self.transport = self._layer  # aiohttp reads and writes through `self.transport` from here on
        return prefix

    def _session_expired(self) -> None:
        """Closed now if idle, else once the request in flight is answered (aiohttp's `close`)."""
        self._session_expiry = None
        if self._awaiting_request():
            self.force_close()
        else:
            self.close()

    def _refuse_wire(self, wire: transport.Wire, raw: asyncio.Transport) -> None:
        remote = _remote(raw)
        if wire is transport.Wire.H2C:
            raw.write(transport.H2C_REFUSAL)
            log.info("closed an h2c (HTTP/2 prior knowledge) connection from %s: HTTP/1.1 only", remote)
        elif wire is transport.Wire.NOISE:
            log.info("closed a Noise connection from %s: cluster Noise is off on this node", remote)
        else:
            log.info("closed a TLS connection from %s: server_tls is off on this node", remote)
        self.force_close()

    def _layer_closed(self, exc: transport.LayerClosed) -> None:
        assert self._layer is not None
        remote = _remote(self._layer)
        if exc.refused:
            log.warning(
                "refused a mesh connection from %s: %s", remote, exc.reason, extra={"event": "mesh_peer_refused"}
            )
        elif isinstance(self._layer, transport.NoiseTransport):  # a broken or tampered stream from a "peer"
            log.warning(
                "dropped a Noise connection from %s: %s", remote, exc.reason, extra={"event": "mesh_noise_error"}
            )
        else:  # TLS: a scanner, or a client that does not trust the certificate
            log.info("closed a TLS connection from %s: %s", remote, exc.reason)
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse or whose handler raised: the seed's envelope."""
        if isinstance(exc, http_exceptions.HttpProcessingError):
            fault = self._describe(exc)
            log.warning(
                "refused a malformed HTTP request from %s: %s",
                request.remote,
                fault,
                extra={"event": "http_malformed_request"},
            )
            error: errors.GatewayError = errors.InvalidRequest(f"Malformed HTTP request: {fault}")
        else:  # error_middleware answers every handler failure, so this is a bug worth a traceback
            log.error(
                "unexpected error outside the middlewares (status %d)",
                status,
                exc_info=exc,
                extra={"event": "internal_error"},
            )
            error = errors.InternalError("Internal server error")
        if request.writer.output_size > 0:  # as aiohttp: an answer has begun, only closing is left
            raise ConnectionError("a response was already under way")
        response = error.to_response()
        response.force_close()
        return response

    def _describe(self, exc: http_exceptions.HttpProcessingError) -> str:
        """The kind of fault, in words that quote nothing the client sent."""
        if isinstance(exc, http_exceptions.LineTooLong):
            return f"the request line or a header is longer than {self.max_line_size} bytes"
        if isinstance(exc, http_exceptions.BadHttpMethod):
            return "unknown method, or not HTTP"
        if isinstance(exc, http_exceptions.InvalidURLError):
            return "the request target holds a character HTTP does not allow"
        if isinstance(exc, http_exceptions.BadStatusLine):
            return "malformed request line"
        if isinstance(exc, http_exceptions.InvalidHeader):
            return "malformed header"
        if exc.message.startswith("Too many headers"):  # aiohttp's fixed wording, without client bytes
            return f"more than {self.max_headers} headers"
        return "malformed request"

    def _awaiting_request(self) -> bool:
        """Bytes now start a request: none has arrived yet, or the last one is answered and none is queued."""
        if self._request_count == 0:
            return True
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    def _arm(self, timeout_s: float, reason: str) -> None:
        self._disarm()
        self._deadline_request, self._deadline_reason, self._deadline_s = self._request_count, reason, timeout_s
        self._deadline = self._loop.call_later(timeout_s, self._deadline_passed)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._deadline_reason = ""

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport is None or self._request_count != self._deadline_request:
            return
        remote = _remote(self.transport)
        # A browser's speculative connection that is never used is normal: not worth a warning.
        level = logging.DEBUG if self._deadline_reason == _SILENT else logging.INFO
        log.log(level, "closed a connection from %s: %s after %g s", remote, self._deadline_reason, self._deadline_s)
        self.force_close()


def _remote(transport_: asyncio.BaseTransport) -> Any:
    peer = transport_.get_extra_info("peername")
    return peer[0] if isinstance(peer, tuple) else peer

"""`server_tls`: the public API over TLS on the same port, with certificates picked up when their files change.

`ServerTls.context()` is asked for each new TLS connection; it compares the certificate and key files'
stat (inode, size, mtime) with what it loaded and reloads on a change, so a renewed certificate (certbot,
cert-manager) is served from the next connection on, without a restart. A change that does not load (a
half-written file, a key that does not match) keeps the last good context and logs a warning; at start
it is an error naming the file.

The TLS itself runs in `TlsTransport`, a `transport.LayeredTransport` over `ssl.SSLObject` and memory
BIOs: detection has already read the ClientHello's first bytes, so the socket cannot be handed to
asyncio's own TLS after the fact. No ALPN is offered (the seed): TLS clients speak HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from pathlib import Path
from typing import Any

from llamesh_api import config
from llamesh_proxy.mesh import transport

log = logging.getLogger(__name__)

_READ_SIZE = 65536


class TlsError(Exception):
    """The certificate or key cannot be used; the message names the file and the fix."""


class ServerTls:
    """The server's TLS context, reloaded when the certificate or key file changes."""

    def __init__(self, settings: config.ServerTlsConfig, *, base_dir: Path) -> None:
        if not settings.cert_path or not settings.key_path:
            raise TlsError("server_tls.enabled is true but cert_path or key_path is empty; set both")
        self.cert_path = config.resolve_path(settings.cert_path, base_dir=base_dir)
        self.key_path = config.resolve_path(settings.key_path, base_dir=base_dir)
        self._stamp: tuple[tuple[int, int, int], ...] | None = None
        self._context: ssl.SSLContext | None = None
        self.context()  # a certificate that cannot load stops the start

    def context(self) -> ssl.SSLContext:
        try:
            stamp = tuple(self._stat(path) for path in (self.cert_path, self.key_path))
        except OSError as exc:
            if self._context is None:
                raise TlsError(f"server_tls: cannot read {exc.filename}: {exc.strerror}; fix the path") from exc
            return self._context
        if stamp != self._stamp or self._context is None:
            try:
                self._context = self._load()
            except (OSError, ssl.SSLError) as exc:
                if self._context is None:
                    raise TlsError(
                        f"server_tls: cannot load certificate {self.cert_path} with key {self.key_path}: {exc}; "
                        "check that both are PEM and belong together"
                    ) from exc
                log.warning(
                    "server_tls: the changed certificate or key does not load (%s); still serving the previous one",
                    exc,
                    extra={"event": "tls_reload_failed"},
                )
                return self._context
            if self._stamp is not None:
                log.info("server_tls: loaded the changed %s", self.cert_path, extra={"event": "tls_reloaded"})
            self._stamp = stamp
        return self._context

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        return context

    @staticmethod
    def _stat(path: Path) -> tuple[int, int, int]:
        status = os.stat(path)
        return status.st_ino, status.st_size, status.st_mtime_ns


class TlsTransport(transport.LayeredTransport):
    """The server side of one TLS connection, over memory BIOs."""

    def __init__(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        super().__init__(raw)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._context = context
        self._handshaken = False

    def receive(self, data: bytes) -> bytes:
        self._incoming.write(data)
        plaintext = bytearray()
        try:
            if not self._handshaken:
                try:
                    self._tls.do_handshake()
                    self._handshaken = True
                except ssl.SSLWantReadError:
                    pass
            while self._handshaken:
                try:
                    chunk = self._tls.read(_READ_SIZE)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:  # the client's close_notify
                    self._flush()
                    self.close()
                    break
                if not chunk:
                    break
                plaintext += chunk
        except ssl.SSLError as exc:
            self._flush()  # the alert, so the client sees why
            raise transport.LayerClosed(f"TLS: {exc.reason or exc}") from exc
        self._flush()
        return bytes(plaintext)

    def _seal(self, data: bytes) -> bytes:
        self._tls.write(data)
        return self._outgoing.read()

    def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending and not self._raw.is_closing():
            self._raw.write(pending)

    def close(self) -> None:
        if self._handshaken and not self._raw.is_closing():
            with contextlib.suppress(ssl.SSLError):
                self._tls.unwrap()  # close_notify; the client's answer is not awaited
            self._flush()
        super().close()

    def _own_extra(self, name: str) -> tuple[bool, Any]:
        if name == "sslcontext":
            return True, self._context
        if name == "ssl_object":
            return True, self._tls
        if name == "peercert":
            return True, self._tls.getpeercert() if self._handshaken else None
        if name == "cipher":
            return True, self._tls.cipher()
        return False, None

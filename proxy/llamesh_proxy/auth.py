"""API-key authentication for client requests.

With `auth.enabled`, a request carries its key in `auth.required_header` (default `x-api-key`) or as
`Authorization: Bearer <key>` (what OpenAI SDKs send). Probes (/healthz, /health, /readyz, /version) and the
dashboard's page and assets (/ui: no data in them; the page asks for a key) stay open; everything else — the
OpenAI routes, /metrics, the dashboard's state and the admin endpoints — needs an accepted key.
Keys are compared in constant time against every configured key, as the seed does. A request over a Noise
session (a cluster peer: gossip, a forwarded request) needs no key; the peer proved the cluster token.

This module decides who may call; it does not rate-limit or scope keys to models.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from aiohttp import typedefs, web

from llamesh_api import config
from llamesh_proxy import errors
from llamesh_proxy.mesh import transport

OPEN_PATHS = frozenset(
    {"/healthz", "/health", "/readyz", "/version", "/ui", "/ui/", "/ui/dashboard.css", "/ui/dashboard.js"}
)
_BEARER = "bearer "


class Authenticator:
    """Checks the key a request presents against `auth.allowed_keys`."""

    def __init__(self, settings: config.AuthConfig) -> None:
        self.enabled = settings.enabled
        self.header = settings.required_header
        self._keys = [key.get_secret_value().encode() for key in settings.allowed_keys]

    def presented_key(self, headers: Mapping[str, str]) -> str | None:
        key = headers.get(self.header)
        if key:
            return key.strip()
        authorization = headers.get("Authorization", "")
        if authorization[: len(_BEARER)].lower() == _BEARER:
            return authorization[len(_BEARER) :].strip() or None
        return None

    def is_authorized(self, headers: Mapping[str, str]) -> bool:
        if not self.enabled:
            return True
        key = self.presented_key(headers)
        if key is None:
            return False
        candidate = key.encode()
        matched = False
        for allowed in self._keys:  # no early exit: timing says nothing about which key matched
            matched |= hmac.compare_digest(candidate, allowed)
        return matched

    def credential_headers(self) -> tuple[str, ...]:
        """Request headers that carry a gateway key; they are never forwarded upstream."""
        return (self.header.lower(), "authorization")

    def middleware(self) -> typedefs.Middleware:
        @web.middleware
        async def require_key(request: web.Request, handler: errors.Handler) -> web.StreamResponse:
            refused = self.enabled and request.path not in OPEN_PATHS and not self.is_authorized(request.headers)
            if refused and not is_mesh_peer(request):
                raise errors.AuthenticationFailed()
            return await handler(request)

        return require_key


def is_mesh_peer(request: web.Request) -> bool:
    """The request came over a Noise session: a cluster node that proved the cluster token and a trusted key
    (gossip, forwarded requests). It needs no client key; the client's was checked by the node it reached."""
    return request.transport is not None and request.transport.get_extra_info(transport.PEER_INFO) is not None

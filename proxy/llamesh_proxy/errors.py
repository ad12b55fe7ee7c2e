"""The gateway's own errors: the seed's JSON envelope, its status codes, types and `Retry-After` hints.

Every error the gateway itself produces is a `GatewayError`; `error_middleware` turns it into
`{"error": {"message", "type", "param", "code"}}` with the right status, and turns anything unexpected
into a 500 `internal_error` (logged with its traceback, never shown to the client). Error responses that
llama-server itself sends are relayed untouched by the forwarder and never pass through here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TypedDict

from aiohttp import web

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ErrorBody(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | None


class Envelope(TypedDict):
    error: ErrorBody


class GatewayError(Exception):
    """An error answered with the seed's envelope. Subclasses fix the status, type and retry hint."""

    status: int = 500
    error_type: str = "internal_error"
    retry_after_s: int | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def envelope(self) -> Envelope:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def to_response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None
        response = web.Response(
            status=self.status,
            body=json.dumps(self.envelope()).encode(),
            content_type="application/json",
            headers=headers,
        )
        if self.status in (408, 413):
            response.force_close()  # the client may still be sending the body we refused to read
        return response


class InvalidRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status = 401
    error_type = "authentication_error"

    def __init__(self, message: str = "Unauthorized") -> None:
        super().__init__(message)


class ModelNotFound(GatewayError):
    status = 404
    error_type = "model_not_found"


class EndpointNotFound(GatewayError):
    """A path the gateway does not serve (OpenAI answers these with `invalid_request_error`)."""

    status = 404
    error_type = "invalid_request_error"


class MethodNotAllowed(GatewayError):
    status = 405
    error_type = "invalid_request_error"


class RequestTimeout(GatewayError):
    status = 408
    error_type = "request_timeout"


class Conflict(GatewayError):
    status = 409
    error_type = "conflict"


class PayloadTooLarge(GatewayError):
    """The seed answers an oversized body with `invalid_request_error`; we keep the type, with status 413."""

    status = 413
    error_type = "invalid_request_error"


class InternalError(GatewayError):
    status = 500
    error_type = "internal_error"


class UpstreamError(GatewayError):
    status = 502
    error_type = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    """No answer at all: the connection was refused or dropped before a response began (safe to retry).

    `refused`: nothing listens there (the process is gone); otherwise a connection dropped before the answer
    began, e.g. a kept-alive one the server had just closed, which says nothing about the instance."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class Unavailable(GatewayError):
    """503s: the request was fine, the gateway cannot serve it now."""

    status = 503
    error_type = "no_capacity"
    retry_after_s = 30


class NoCapacity(Unavailable):
    error_type = "no_capacity"
    retry_after_s = 30

    def __init__(self, message: str = "Insufficient resources") -> None:
        super().__init__(message)


class SpawnFailuresExhausted(Unavailable):
    error_type = "spawn_failures_exhausted"
    retry_after_s = 30

    def __init__(self, message: str = "All nodes failed to spawn instance for this model") -> None:
        super().__init__(message)


class QueueFull(Unavailable):
    error_type = "queue_full"
    retry_after_s = 5

    def __init__(self, message: str = "Queue full") -> None:
        super().__init__(message)


class QueueTimeout(Unavailable):
    error_type = "queue_timeout"
    retry_after_s = 5

    def __init__(self, message: str = "Queue timeout") -> None:
        super().__init__(message)


class Draining(Unavailable):
    error_type = "draining"
    retry_after_s = 5

    def __init__(self, message: str = "Node is draining for shutdown") -> None:
        super().__init__(message)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: every failure leaves as the seed's envelope, never as a traceback."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return exc.to_response()
    except web.HTTPNotFound:
        return EndpointNotFound(f"Invalid URL ({request.method} {request.path})").to_response()
    except web.HTTPMethodNotAllowed:
        return MethodNotAllowed(f"Method {request.method} is not allowed for {request.path}").to_response()
    except web.HTTPRequestEntityTooLarge as exc:
        return PayloadTooLarge(f"Body too large or error: {exc.text}").to_response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        generic = GatewayError(exc.reason)  # an aiohttp status we do not map ourselves
        generic.status = exc.status
        generic.error_type = "invalid_request_error" if exc.status < 500 else "internal_error"
        return generic.to_response()
    except Exception:
        logger.exception(
            "unexpected error while handling %s %s", request.method, request.path, extra={"event": "internal_error"}
        )
        return InternalError("Internal server error").to_response()

"""The gateway's error envelope and API-key authentication.

Covers: every error class's status, `type` and `Retry-After` (the seed's table); the envelope's shape;
the error middleware (gateway errors as envelopes, unknown paths and methods as envelopes, an unexpected
exception as a 500 `internal_error` without traceback, logged); key lookup from the configured header or
`Authorization: Bearer`, constant-time matching, probes open and everything else closed when auth is on.
"""

from __future__ import annotations

import json
import logging

import pytest
from aiohttp import test_utils, web

from llamesh_api import config
from llamesh_proxy import auth, errors


@pytest.mark.parametrize(
    ("error", "status", "error_type", "retry_after"),
    [
        (errors.InvalidRequest("x"), 400, "invalid_request_error", None),
        (errors.AuthenticationFailed(), 401, "authentication_error", None),
        (errors.ModelNotFound("x"), 404, "model_not_found", None),
        (errors.RequestTimeout("x"), 408, "request_timeout", None),
        (errors.Conflict("x"), 409, "conflict", None),
        (errors.PayloadTooLarge("x"), 413, "invalid_request_error", None),
        (errors.InternalError("x"), 500, "internal_error", None),
        (errors.UpstreamError("x"), 502, "upstream_error", None),
        (errors.NoCapacity(), 503, "no_capacity", "30"),
        (errors.SpawnFailuresExhausted(), 503, "spawn_failures_exhausted", "30"),
        (errors.QueueFull(), 503, "queue_full", "5"),
        (errors.QueueTimeout(), 503, "queue_timeout", "5"),
        (errors.Draining(), 503, "draining", "5"),
    ],
)
def test_status_type_and_retry_after(
    error: errors.GatewayError, status: int, error_type: str, retry_after: str | None
) -> None:
    response = error.to_response()
    assert response.status == status
    assert response.headers.get("Retry-After") == retry_after
    assert response.content_type == "application/json"
    assert response.body is not None
    assert isinstance(response.body, bytes)
    envelope = json.loads(response.body)
    assert envelope == {"error": {"message": error.message, "type": error_type, "param": None, "code": None}}


def test_param_and_seed_messages() -> None:
    assert errors.InvalidRequest("'model' must be a non-empty string", param="model").envelope()["error"] == {
        "message": "'model' must be a non-empty string",
        "type": "invalid_request_error",
        "param": "model",
        "code": None,
    }
    assert errors.Draining().message == "Node is draining for shutdown"
    assert errors.QueueFull().message == "Queue full"
    assert errors.QueueTimeout().message == "Queue timeout"
    assert errors.SpawnFailuresExhausted().message == "All nodes failed to spawn instance for this model"
    assert errors.AuthenticationFailed().message == "Unauthorized"


def test_refused_bodies_close_the_connection() -> None:
    assert not errors.RequestTimeout("x").to_response().keep_alive
    assert not errors.PayloadTooLarge("x").to_response().keep_alive


async def _serve(app: web.Application) -> test_utils.TestClient[web.Request, web.Application]:
    client = test_utils.TestClient(test_utils.TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


async def test_middleware_answers_every_failure_with_an_envelope(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals")

    async def refused(request: web.Request) -> web.Response:
        raise errors.QueueFull()

    app = web.Application(middlewares=[errors.error_middleware])
    app.router.add_get("/broken", broken)
    app.router.add_get("/refused", refused)
    client = await _serve(app)
    try:
        with caplog.at_level(logging.ERROR, logger="llamesh_proxy.errors"):
            response = await client.get("/broken")
            body = await response.text()
        assert response.status == 500
        assert json.loads(body)["error"]["type"] == "internal_error"
        assert "secret" not in body and "Traceback" not in body
        assert "secret internals" in caplog.text  # logged for the operator, with its traceback

        response = await client.get("/refused")
        assert (response.status, response.headers["Retry-After"]) == (503, "5")
        assert (await response.json())["error"]["type"] == "queue_full"

        response = await client.get("/nowhere")
        assert response.status == 404
        assert (await response.json())["error"] == {
            "message": "Invalid URL (GET /nowhere)",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
        response = await client.post("/refused")
        assert response.status == 405
        assert (await response.json())["error"]["type"] == "invalid_request_error"
    finally:
        await client.close()


def authenticator(**fields: object) -> auth.Authenticator:
    fields.setdefault("enabled", True)
    fields.setdefault("allowed_keys", ["key-one", "key-two"])
    return auth.Authenticator(config.AuthConfig.model_validate(fields))


def test_keys_come_from_the_configured_header_or_bearer() -> None:
    checker = authenticator(required_header="X-Api-Key")
    assert checker.is_authorized({"X-Api-Key": "key-one"})
    assert checker.is_authorized({"Authorization": "Bearer key-two"})
    assert checker.is_authorized({"Authorization": "bearer key-two"})
    assert not checker.is_authorized({})
    assert not checker.is_authorized({"X-Api-Key": "key-three"})
    assert not checker.is_authorized({"Authorization": "Basic a2V5LW9uZQ=="})
    assert not checker.is_authorized({"Authorization": "Bearer "})
    assert not checker.is_authorized({"X-Api-Key": "key-on"})  # a prefix is not a key
    assert checker.credential_headers() == ("x-api-key", "authorization")


def test_disabled_auth_lets_everyone_in() -> None:
    assert auth.Authenticator(config.AuthConfig()).is_authorized({})


async def test_probes_are_open_and_everything_else_needs_a_key() -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    checker = authenticator()
    app = web.Application(middlewares=[errors.error_middleware, checker.middleware()])
    for path in ("/healthz", "/health", "/readyz", "/version", "/v1/models", "/metrics"):
        app.router.add_get(path, ok)
    app.router.add_post("/admin/prewarm", ok)
    client = await _serve(app)
    try:
        for path in ("/healthz", "/health", "/readyz", "/version"):
            assert (await client.get(path)).status == 200, path
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/admin/prewarm")):
            response = await client.request(method, path)
            assert response.status == 401, path
            assert (await response.json())["error"] == {
                "message": "Unauthorized",
                "type": "authentication_error",
                "param": None,
                "code": None,
            }
            response = await client.request(method, path, headers={"x-api-key": "wrong"})
            assert response.status == 401
            response = await client.request(method, path, headers={"x-api-key": "key-one"})
            assert response.status == 200
    finally:
        await client.close()

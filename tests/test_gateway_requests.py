"""The gateway's HTTP surface apart from forwarding: validation, probes, listings, admin, metrics, auth.

Runs the real aiohttp application over a MemoryStore, without llama-server children. Covers: every bad
input with its exact status, type, message and param (malformed JSON, non-object body, bad `model`
values, no model and no default, unknown model or profile, disabled ones, endpoint-type mismatches,
oversized bodies with and without Content-Length, a body slower than body_read_timeout_ms, hop limits);
`default_model`; `X-Request-Id` echo; /healthz, /health, /readyz (binary, models, draining, can_spawn);
/version with and without a key; /v1/models and /v1/models/{id} in the seed's shape, with parsed params
learned by the node; /admin/prewarm and /admin/rebuild-llama; /metrics and /metrics/json; auth on every
closed route.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import gateway_support as gs
from llamesh_api import resources, writes

CHAT = gs.model(
    "chat", gs.profile(), gs.profile("fast", "-c", "1024", description="Lower context"), description="A chat model"
)
EMBED = gs.model("embed", gs.profile("default", "--embedding"))
RERANK = gs.model("rank", gs.profile("default", "--reranking"))
OFF = gs.model("off", gs.profile(), enabled=False)
PARTLY = gs.model("partly", gs.profile(), gs.profile("hidden", enabled=False))
MODELS = (CHAT, EMBED, RERANK, OFF, PARTLY)


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, *, models: tuple[resources.LlamaModel, ...] = MODELS, binary: bool = True, **settings: Any
) -> AsyncIterator[gs.Harness]:
    async with gs.running_gateway(
        tmp_path, models=models, settings=gs.node_config(**settings), binary=binary, agent=False
    ) as harness:
        yield harness


async def post_json(harness: gs.Harness, path: str, payload: Any, **kwargs: Any) -> tuple[int, Any]:
    response = await harness.client.post(path, json=payload, **kwargs)
    return response.status, await response.json()


def error(message: str, error_type: str = "invalid_request_error", param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": None}}


# --- bad input --------------------------------------------------------------------------------


async def test_malformed_and_non_object_bodies(tmp_path: Path) -> None:
    async with serving(tmp_path) as h:
        for raw in (b"{", b"", b"\xff\xfe", b"nul"):
            response = await h.client.post("/v1/chat/completions", data=raw)
            assert (response.status, await response.json()) == (400, error("Invalid JSON")), raw
        for raw in (b"[]", b'"text"', b"1", b"null", b'[{"model": "chat"}]'):
            response = await h.client.post("/v1/chat/completions", data=raw)
            assert (response.status, await response.json()) == (400, error("Request body must be a JSON object")), raw


@pytest.mark.parametrize("value", [None, 123, "", {}, [], True, 1.5])
async def test_model_present_but_not_a_non_empty_string(tmp_path: Path, value: Any) -> None:
    async with serving(tmp_path, default_model="chat") as h:
        status, payload = await post_json(h, "/v1/chat/completions", {"model": value, "messages": []})
        assert (status, payload) == (400, error("'model' must be a non-empty string", param="model"))


async def test_absent_model_takes_the_default_or_is_refused(tmp_path: Path) -> None:
    async with serving(tmp_path) as h:
        status, payload = await post_json(h, "/v1/chat/completions", {"messages": []})
        assert status == 400 and payload["error"]["param"] == "model"
        assert "no default_model is configured" in payload["error"]["message"]
    no_room = gs.model("chat", gs.profile(max_instances=0))
    async with serving(tmp_path, models=(no_room,), default_model="chat") as h:
        status, payload = await post_json(h, "/v1/chat/completions", {"messages": []})
        assert (status, payload["error"]["type"]) == (503, "no_capacity")  # resolved to chat, which may not run


async def test_unknown_disabled_and_mistyped_models(tmp_path: Path) -> None:
    async with serving(tmp_path) as h:
        for requested in ("nope", "chat:nope", "off", "partly:hidden", "chat:"):
            status, payload = await post_json(h, "/v1/chat/completions", {"model": requested})
            assert (status, payload) == (
                404,
                error(f"Model '{requested}' not found in local cookbook or any peer", "model_not_found"),
            ), requested
        cases = [
            (
                "/v1/chat/completions",
                "embed",
                400,
                "invalid_request_error",
                "is restricted to embeddings or rerank endpoints",
            ),
            (
                "/v1/completions",
                "rank",
                400,
                "invalid_request_error",
                "is restricted to embeddings or rerank endpoints",
            ),
            ("/v1/embeddings", "chat", 404, "model_not_found", "is not configured for embeddings"),
            ("/v1/embeddings", "rank", 404, "model_not_found", "is not configured for embeddings"),
            ("/v1/rerank", "chat:fast", 404, "model_not_found", "is not configured for reranking"),
            ("/v1/reranking", "embed", 404, "model_not_found", "is not configured for reranking"),
            ("/rerank", "chat", 404, "model_not_found", "is not configured for reranking"),
        ]
        for path, requested, status_code, error_type, text in cases:
            status, payload = await post_json(h, path, {"model": requested})
            assert (status, payload) == (status_code, error(f"Model '{requested}' {text}", error_type, "model")), path


async def test_model_names_match_case_insensitively(tmp_path: Path) -> None:
    no_room = gs.model("Chat", gs.profile("Fast", max_instances=0))
    async with serving(tmp_path, models=(no_room,)) as h:
        status, payload = await post_json(h, "/v1/chat/completions", {"model": "CHAT:fast"})
        assert (status, payload["error"]["type"]) == (503, "no_capacity")


async def test_oversized_bodies_are_413(tmp_path: Path) -> None:
    async with serving(tmp_path, http={"request_body_limit_bytes": 1024}) as h:
        big = b'{"model": "chat", "pad": "' + b"x" * 2000 + b'"}'
        response = await h.client.post("/v1/chat/completions", data=big)
        assert response.status == 413
        assert (await response.json())["error"]["type"] == "invalid_request_error"

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b"x" * 600

        response = await h.client.post("/v1/chat/completions", data=chunks())  # chunked: no Content-Length
        assert response.status == 413
        payload = await response.json()
        assert payload["error"]["message"].startswith("Body too large or error: length limit exceeded")


async def test_a_body_slower_than_the_read_timeout_is_408(tmp_path: Path) -> None:
    async with serving(tmp_path, http={"body_read_timeout_ms": 300}) as h:
        reader, writer = await asyncio.open_connection(h.server.host, h.server.port)
        try:
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"model": '
            )
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 408 ")
            assert b"Connection: close" in head
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            body = await asyncio.wait_for(reader.readexactly(length), 10)
            assert json.loads(body) == error("Request body read timed out", "request_timeout")
        finally:
            writer.close()
            await writer.wait_closed()


async def test_hop_limit(tmp_path: Path) -> None:
    async with serving(tmp_path, max_hops=2) as h:
        for hops, message in (("3", "Too many hops (loop detected)"), ("x", "Invalid x-llama-mesh-hops header value")):
            headers = {"X-Llama-Mesh-Hops": hops}
            status, payload = await post_json(h, "/v1/chat/completions", {"model": "chat"}, headers=headers)
            assert (status, payload) == (400, error(message))


async def test_request_id_is_echoed_on_errors(tmp_path: Path) -> None:
    async with serving(tmp_path) as h:
        response = await h.client.post("/v1/chat/completions", json={"model": "nope"}, headers={"X-Request-Id": "r-1"})
        assert response.headers["X-Request-Id"] == "r-1"
        response = await h.client.post("/v1/chat/completions", json={"model": "nope"})
        assert len(response.headers["X-Request-Id"]) == 32


# --- probes and version -----------------------------------------------------------------------


async def test_health_and_readiness(tmp_path: Path) -> None:
    async with serving(tmp_path) as h:
        for path in ("/healthz", "/health"):
            response = await h.client.get(path)
            assert (response.status, await response.json()) == (200, {"status": "ok"})
        response = await h.client.get("/readyz")
        assert (response.status, await response.json()) == (200, {"status": "ready", "can_spawn": True})
        h.gw.start_draining()
        response = await h.client.get("/readyz")
        assert (response.status, await response.json()) == (503, {"status": "draining", "message": "Node is draining"})
        status, payload = await post_json(h, "/v1/chat/completions", {"model": "chat"})
        assert (status, payload) == (503, error("Node is draining for shutdown", "draining"))
    async with serving(tmp_path, binary=False) as h:
        response = await h.client.get("/healthz")
        assert (response.status, await response.json()) == (503, {"status": "error", "message": "Binary missing"})
        response = await h.client.get("/readyz")
        assert (response.status, (await response.json())["status"]) == (503, "not_ready")
    async with serving(tmp_path, models=()) as h:
        response = await h.client.get("/healthz")
        assert (response.status, await response.json()) == (503, {"status": "error", "message": "No models configured"})
        assert (await h.client.get("/readyz")).status == 503


async def test_version_shows_llama_cpp_only_to_authorized_callers(tmp_path: Path) -> None:
    async with serving(tmp_path) as h:
        assert await (await h.client.get("/version")).json() == {"version": "0.1.0", "llama_cpp_version": "b1-fake"}
    async with serving(tmp_path, auth={"enabled": True, "allowed_keys": ["k"]}) as h:
        assert await (await h.client.get("/version")).json() == {"version": "0.1.0"}
        response = await h.client.get("/version", headers={"x-api-key": "k"})
        assert await response.json() == {"version": "0.1.0", "llama_cpp_version": "b1-fake"}


# --- auth -------------------------------------------------------------------------------------


async def test_auth_closes_everything_but_the_probes(tmp_path: Path) -> None:
    async with serving(tmp_path, auth={"enabled": True, "allowed_keys": ["k"]}) as h:
        unauthorized = error("Unauthorized", "authentication_error")
        for method, path in (
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/embeddings"),
            ("POST", "/rerank"),
            ("GET", "/v1/models"),
            ("GET", "/v1/models/chat"),
            ("GET", "/metrics"),
            ("GET", "/metrics/json"),
            ("POST", "/admin/prewarm"),
            ("POST", "/admin/rebuild-llama"),
        ):
            for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}):
                response = await h.client.request(method, path, json={"model": "chat"}, headers=headers)
                assert (response.status, await response.json()) == (401, unauthorized), (path, headers)
        for headers in ({"x-api-key": "k"}, {"Authorization": "Bearer k"}):
            status, _ = await post_json(h, "/v1/chat/completions", {"model": "nope"}, headers=headers)
            assert status == 404  # past auth
        assert (await h.client.get("/healthz")).status == 200


# --- models -----------------------------------------------------------------------------------


async def test_models_listing_in_the_seed_shape(tmp_path: Path) -> None:
    async with serving(tmp_path) as h:
        chat_fast = h.gw.catalog.resolve("chat:fast")
        assert chat_fast is not None

        def learn(node: resources.LlamaNode) -> None:
            node.status.learned[chat_fast.args_hash] = resources.Learned(
                parsed_model_params={"n_ctx": 1024, "n_slots": 1}, llama_cpp_version="b1-fake"
            )

        await writes.update_status(h.store, resources.LlamaNode, gs.NODE, learn)
        await gs.eventually(lambda: h.gw.catalog.parsed_model_params(chat_fast, node_name=gs.NODE))
        listing = await (await h.client.get("/v1/models")).json()
        assert listing["object"] == "list"
        assert [m["id"] for m in listing["data"]] == ["chat", "chat:fast", "embed", "rank", "partly"]
        fast = listing["data"][1]
        assert fast == {
            "id": "chat:fast",
            "object": "model",
            "created": h.gw.started_at,
            "owned_by": gs.NODE,
            "permission": [],
            "root": "chat",
            "parent": None,
            "metadata": {
                "model": "chat",
                "model_description": "A chat model",
                "profile_id": "fast",
                "profile_description": "Lower context",
                "idle_timeout_seconds": 300,
                "estimated_tokens_per_second": 0.0,
                "parsed_model_params": {"n_ctx": 1024, "n_slots": 1},
            },
        }
        assert listing["data"][0]["metadata"]["parsed_model_params"] is None
        again = await (await h.client.get("/v1/models")).json()
        assert again["data"][0]["created"] == listing["data"][0]["created"]  # stable

        assert await (await h.client.get("/v1/models/chat:fast")).json() == fast
        assert (await (await h.client.get("/v1/models/chat")).json())["id"] == "chat"
        response = await h.client.get("/v1/models/nope")
        assert (response.status, await response.json()) == (
            404,
            error("Model 'nope' not found in local cookbook or any peer", "model_not_found", "model"),
        )
        # Exactly the listed ids: the aliases the request path accepts are not ids (the seed's contract)
        for alias in ("CHAT", "chat:default", "CHAT:default", "Chat:FAST", "chat:fast ", "/chat"):
            response = await h.client.get(f"/v1/models/{alias}")
            assert response.status == 404, alias
            assert (await response.json())["error"]["type"] == "model_not_found"


async def test_learned_params_from_another_llama_cpp_build_are_withheld(tmp_path: Path) -> None:
    async with serving(tmp_path) as h:
        chat = h.gw.catalog.resolve("chat")
        assert chat is not None

        def learn(node: resources.LlamaNode) -> None:
            node.status.learned[chat.args_hash] = resources.Learned(
                parsed_model_params={"n_ctx": 1}, llama_cpp_version="old"
            )

        await writes.update_status(h.store, resources.LlamaNode, gs.NODE, learn)
        await gs.eventually(lambda: chat.args_hash in h.gw.catalog.node(gs.NODE).status.learned)  # type: ignore[union-attr]
        assert h.gw.catalog.parsed_model_params(chat, node_name=gs.NODE) is None


# --- admin ------------------------------------------------------------------------------------


async def test_prewarm(tmp_path: Path) -> None:
    async with serving(tmp_path) as h:
        status, payload = await post_json(h, "/admin/prewarm", {"model": "chat:fast"})
        assert (status, payload["status"], payload["model"]) == (202, "accepted", "chat:fast")
        created = await h.store.get(resources.LlamaInstance, payload["instance"])
        assert created is not None and created.spec.reason is resources.Reason.PREWARM
        assert created.spec.profile == "fast"
        status, payload = await post_json(h, "/admin/prewarm", {"model": "chat:fast"})
        assert (status, payload["status"]) == (200, "ok")
        status, payload = await post_json(h, "/admin/prewarm", {})
        assert (status, payload) == (400, error("Missing model field", param="model"))
        status, payload = await post_json(h, "/admin/prewarm", {"model": "nope"})
        assert (status, payload["error"]["type"]) == (404, "model_not_found")


async def test_rebuild_requests_are_recorded_once_at_a_time(tmp_path: Path) -> None:
    async with serving(tmp_path) as h:
        response = await h.client.post("/admin/rebuild-llama")
        assert (response.status, (await response.json())["status"]) == (202, "accepted")
        node = await h.store.get(resources.LlamaNode, gs.NODE)
        assert node is not None and node.spec.rebuild_requests == 1
        await gs.eventually(lambda: h.gw.catalog.node(gs.NODE).spec.rebuild_requests == 1)  # type: ignore[union-attr]
        response = await h.client.post("/admin/rebuild-llama")  # the agent has not taken it yet
        assert (response.status, await response.json()) == (409, error("Rebuild already in progress", "conflict"))

        def building(current: resources.LlamaNode) -> None:
            current.status.rebuilds_handled = 1
            current.status.is_building = True

        await writes.update_status(h.store, resources.LlamaNode, gs.NODE, building)
        await gs.eventually(lambda: h.gw.catalog.node(gs.NODE).status.is_building)  # type: ignore[union-attr]
        assert (await h.client.post("/admin/rebuild-llama")).status == 409


# --- metrics ----------------------------------------------------------------------------------


async def test_metrics_text_and_json(tmp_path: Path) -> None:
    async with serving(tmp_path) as h:
        await post_json(h, "/v1/chat/completions", {"model": "nope"})
        queued = asyncio.create_task(post_json(h, "/v1/chat/completions", {"model": "chat", "messages": []}))
        await gs.eventually(lambda: h.gw.board.queue_length() == 1)  # no agent: it waits for its instance
        text = await (await h.client.get("/metrics")).text()
        for line in (
            "proxy_requests_total 2.0",
            "proxy_errors_total 1.0",
            "proxy_current_requests 1.0",
            "proxy_queue_length 1.0",
            'proxy_queue_drops_total{reason="full"} 0.0',
            'proxy_build_info{llama_cpp_version="b1-fake",version="0.1.0"} 1.0',
            "proxy_queue_wait_count 0.0",
            "proxy_node_active_instances 0.0",
        ):
            assert line in text, line
        assert 'proxy_hash_requests_total{hash="' in text
        snapshot = await (await h.client.get("/metrics/json")).json()
        assert (snapshot["node_id"], snapshot["requests_total"], snapshot["queue_length"]) == (gs.NODE, 2, 1)
        queued.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await queued
        await gs.eventually(lambda: h.gw.board.queue_length() == 0 and h.gw.metrics.current_requests == 0)

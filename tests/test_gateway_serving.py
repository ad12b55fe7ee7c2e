"""The gateway serving real traffic: the aiohttp app, a MemoryStore, and fake llama-server children.

The real operator loop binds every instance the gateway asks for and the real node agent starts a
fault-injecting fake llama-server for it (`gateway_support.running_node`). Covers: the unmodified OpenAI
SDK through the gateway (chat streamed and not, completions, embeddings, models), rerank aliases; scale
from zero; two requests on a one-slot profile served one after the other; a full queue (503 queue_full,
Retry-After 5); a queue wait past its limit (503 queue_timeout); a client that disconnects while queued,
before the response headers, or mid-stream (in-flight back to 0 in the gateway and in the fake's /slots);
an upstream that crashes mid-stream (an SSE error event, then a truncated stream) or before answering (502
upstream_error); a spawn that fails (503 spawn_failures_exhausted, Retry-After 30, the instance Failed by
its agent); max_request_duration_ms; an unreachable READY instance routed around; the graceful drain
(waiters 503 draining, in-flight requests finish, wait_idle); usage published to the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

import gateway_support as gs
from llamesh_api import resources, store
from llamesh_proxy import app as gateway_app
from rig import processes

pytestmark = pytest.mark.slow

SLOW = {"FAKE_LLAMA_TOKEN_DELAY_MS": "60"}  # 8 tokens: about half a second per request
ONE_AT_A_TIME = {"model_defaults": {"max_concurrent_requests_per_instance": 1}}
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy"]  # the fake's 8 default tokens


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path,
    *profiles: Any,
    env: dict[str, dict[str, str]] | None = None,
    **settings: Any,
) -> AsyncIterator[gs.Harness]:
    models = [gs.model("m", *profiles)] if profiles else [gs.model("m")]
    async with gs.running_gateway(tmp_path, models=models, settings=gs.node_config(**settings), env=env) as harness:
        yield harness


@contextlib.asynccontextmanager
async def sdk(harness: gs.Harness) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=harness.base_url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


async def chat(harness: gs.Harness, **body: Any) -> tuple[int, dict[str, str], bytes]:
    """A raw chat request: (status, headers, body)."""
    body.setdefault("model", "m")
    body.setdefault("messages", HI)
    async with (
        aiohttp.ClientSession() as session,
        session.post(harness.base_url + "/v1/chat/completions", json=body) as r,
    ):
        return r.status, dict(r.headers), await r.read()


async def settled(harness: gs.Harness, instance: str | None = None) -> None:
    """Wait until the gateway holds nothing and (when given) the fake's slots are all idle."""
    await gs.eventually(
        lambda: harness.gw.metrics.current_requests == 0 and not harness.gw.board.in_flight_by_instance()
    )
    assert harness.gw.board.queue_length() == 0
    if instance is not None:
        await gs.eventually(lambda: _idle(harness, instance))


async def _idle(harness: gs.Harness, instance: str) -> bool:
    return await harness.slots_busy(instance) == 0


# --- the OpenAI SDK ---------------------------------------------------------------------------


async def test_openai_sdk_through_the_gateway(tmp_path: Path) -> None:
    models = [
        gs.model("m"),
        gs.model("emb", gs.profile("default", "--embedding")),
        gs.model("rank", gs.profile("default", "--reranking")),
    ]
    async with gs.running_gateway(tmp_path, models=models) as h, sdk(h) as client:
        started = time.monotonic()
        answer = await client.chat.completions.create(model="m", messages=HI)
        cold_start_s = time.monotonic() - started
        assert (answer.choices[0].message.content or "").split() == WORDS
        assert answer.usage is not None and answer.usage.completion_tokens == 8

        stream = await client.chat.completions.create(
            model="m",
            messages=HI,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.split() == WORDS
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8

        completion = await client.completions.create(model="m", prompt="once", max_tokens=3)
        assert completion.choices[0].text.split() == ["the", "quick", "brown"]

        embedded = await client.embeddings.create(model="emb", input=["a", "b"])
        assert [len(item.embedding) for item in embedded.data] == [64, 64]

        listed = [m.id async for m in client.models.list()]
        assert listed == ["m", "emb", "rank"]
        assert (await client.models.retrieve("emb")).id == "emb"
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("nope")
        assert missing.value.body == {  # the SDK hands over the envelope's `error` object
            "message": "Model 'nope' not found in local cookbook or any peer",
            "type": "model_not_found",
            "param": "model",
            "code": None,
        }

        async with aiohttp.ClientSession() as session:
            # The fake registers /v1/rerank and /rerank only (as older llama-server builds): /v1/reranking
            # reaches it through the forwarder's fallback.
            for path in ("/v1/rerank", "/rerank", "/v1/reranking"):
                body = {"model": "rank", "query": "q", "documents": ["x", "y", "z"], "stream": True}
                async with session.post(h.base_url + path, json=body, headers={"X-Request-Id": "rr"}) as response:
                    assert response.status == 200, path
                    assert response.headers["X-Request-Id"] == "rr"
                    assert len((await response.json())["results"]) == 3

        assert sorted(i.spec.model for i in h.instances()) == ["emb", "m", "rank"]  # one instance each
        assert cold_start_s < 30
        snapshot = h.gw.metrics.snapshot(h.gw.live())
        assert snapshot["errors_total"] == 0 and snapshot["requests_total"] == 7
        m_stats = h.gw.metrics.hashes[h.gw.catalog.resolve("m").args_hash]  # type: ignore[union-attr]
        assert m_stats.tokens == 8 + 8 + 3 and m_stats.requests == 3
        await settled(h)


async def test_rerank_reaches_a_build_that_registers_one_spelling_only(tmp_path: Path) -> None:
    """Whichever of the four spellings a client uses, the gateway finds the one the upstream build has."""
    models = [gs.model("rank", gs.profile("default", "--reranking"))]
    only = {"default": {"FAKE_LLAMA_RERANK_PATHS": "/reranking"}}
    async with gs.running_gateway(tmp_path, models=models, env=only) as h, aiohttp.ClientSession() as session:
        for path in ("/v1/rerank", "/rerank", "/v1/reranking", "/v1/rerank"):  # the seed's three aliases
            body = {"model": "rank", "query": "q", "documents": ["x", "y"]}
            async with session.post(h.base_url + path, json=body) as response:
                assert response.status == 200, path
                assert len((await response.json())["results"]) == 2
        assert h.gw.metrics.snapshot(h.gw.live())["errors_total"] == 0


async def test_stream_relay_headers_and_request_id(tmp_path: Path) -> None:
    async with serving(tmp_path) as h, aiohttp.ClientSession() as session:
        body = {"model": "m", "messages": HI, "stream": True}
        headers = {"X-Request-Id": "req-7", "X-Session-Id": "s-1"}
        async with session.post(h.base_url + "/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            assert response.headers["Cache-Control"] == "no-cache"
            assert response.headers["X-Accel-Buffering"] == "no"
            assert response.headers["X-Request-Id"] == "req-7"
            raw = await response.read()
        events = [line for line in raw.split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]"
        assert len(events) == 1 + 8 + 1 + 1  # role, 8 tokens, finish, [DONE]: relayed unchanged
        stats = h.gw.metrics.hashes[h.gw.catalog.resolve("m").args_hash]  # type: ignore[union-attr]
        assert stats.tokens == 8  # no usage chunk: counted from the events


# --- queueing ---------------------------------------------------------------------------------


async def test_two_requests_on_one_slot_are_served_one_after_the_other(tmp_path: Path) -> None:
    async with serving(tmp_path, gs.profile(max_instances=1), env={"default": SLOW}, **ONE_AT_A_TIME) as h:
        first = asyncio.create_task(chat(h))
        await gs.eventually(lambda: h.gw.board.queue_length() == 1)  # waiting for the instance to start
        second = asyncio.create_task(chat(h))
        await gs.eventually(lambda: h.gw.board.queue_length() == 2)
        (status_1, _, _) = await first
        finished_first = time.monotonic()
        assert not second.done()  # FIFO: the second was behind the first
        (status_2, _, body_2) = await second
        finished_second = time.monotonic()
        assert (status_1, status_2) == (200, 200)
        assert json.loads(body_2)["usage"]["completion_tokens"] == 8
        assert finished_second - finished_first > 0.3  # it ran after the first (8 tokens x 60 ms)
        assert len(h.instances()) == 1
        assert h.gw.metrics.queue_wait_count == 2
        await settled(h, h.instances()[0].name)


async def test_a_full_queue_is_503_queue_full(tmp_path: Path) -> None:
    profile = gs.profile(max_instances=1, max_queue_size=1)
    async with serving(tmp_path, profile, env={"default": SLOW}, **ONE_AT_A_TIME) as h:
        served = asyncio.create_task(chat(h))
        await gs.eventually(lambda: h.gw.board.queue_length() == 1)
        status, headers, body = await chat(h)
        assert (status, headers["Retry-After"]) == (503, "5")
        assert json.loads(body) == {
            "error": {"message": "Queue full", "type": "queue_full", "param": None, "code": None}
        }
        assert h.gw.metrics.queue_drops["full"] == 1
        assert (await served)[0] == 200


async def test_a_global_queue_limit_is_503_queue_full(tmp_path: Path) -> None:
    async with serving(tmp_path, gs.profile(max_instances=1), env={"default": SLOW}, max_total_queue_entries=1) as h:
        served = asyncio.create_task(chat(h))
        await gs.eventually(lambda: h.gw.board.queue_length() == 1)
        status, headers, body = await chat(h)
        assert (status, headers["Retry-After"], json.loads(body)["error"]["type"]) == (503, "5", "queue_full")
        assert h.gw.metrics.queue_drops["global_limit"] == 1
        assert (await served)[0] == 200


async def test_waiting_past_the_limit_is_503_queue_timeout(tmp_path: Path) -> None:
    profile = gs.profile(max_instances=1, max_wait_in_queue_ms=1500)
    env = {"default": {"FAKE_LLAMA_TOKEN_DELAY_MS": "400"}}  # about 3 s per request
    async with serving(tmp_path, profile, env=env, **ONE_AT_A_TIME) as h:
        served = asyncio.create_task(chat(h))
        await gs.eventually(lambda: h.gw.board.in_flight_by_instance())  # the first holds the only slot
        started = time.monotonic()
        status, headers, body = await chat(h)
        waited = time.monotonic() - started
        assert (status, headers["Retry-After"]) == (503, "5")
        assert json.loads(body)["error"] == {
            "message": "Queue timeout",
            "type": "queue_timeout",
            "param": None,
            "code": None,
        }
        assert 1.4 < waited < 2.9
        assert h.gw.metrics.queue_drops["timeout"] == 1
        assert (await served)[0] == 200


# --- disconnects ------------------------------------------------------------------------------


async def test_a_client_that_leaves_while_queued_leaves_the_queue(tmp_path: Path) -> None:
    async with serving(tmp_path, gs.profile(max_instances=1), env={"default": SLOW}, **ONE_AT_A_TIME) as h:
        served = asyncio.create_task(chat(h))
        await gs.eventually(lambda: h.gw.board.in_flight_by_instance())
        leaving = asyncio.create_task(chat(h))
        await gs.eventually(lambda: h.gw.board.queue_length() == 1)
        leaving.cancel()  # closes the client's connection
        await gs.eventually(lambda: h.gw.board.queue_length() == 0, within_s=5)
        assert h.gw.metrics.current_requests == 1
        assert (await served)[0] == 200
        await settled(h, h.instances()[0].name)


async def test_a_client_that_leaves_before_the_headers_frees_both_slots(tmp_path: Path) -> None:
    env = {"default": {"FAKE_LLAMA_TOKEN_DELAY_MS": "1000"}}  # a non-streaming answer takes 8 s
    async with serving(tmp_path, env=env, **ONE_AT_A_TIME) as h:
        leaving = asyncio.create_task(chat(h))
        await gs.eventually(lambda: h.gw.board.in_flight_by_instance())
        name = h.instances()[0].name
        await gs.eventually(lambda: _busy(h, name))  # llama-server is generating
        leaving.cancel()
        await settled(h, name)  # the gateway let go and so did the fake llama-server
        assert h.gw.metrics.current_requests == 0


async def test_a_client_that_leaves_mid_stream_frees_both_slots(tmp_path: Path) -> None:
    env = {"default": {"FAKE_LLAMA_TOKEN_DELAY_MS": "300", "FAKE_LLAMA_TOKENS": "50"}}
    async with serving(tmp_path, env=env) as h, aiohttp.ClientSession() as session:
        body = {"model": "m", "messages": HI, "stream": True}
        async with session.post(h.base_url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            first = await response.content.readline()
            assert first.startswith(b"data: ")
            name = h.instances()[0].name
            assert await h.slots_busy(name) == 1
        # leaving the block closed the connection mid-stream
        await settled(h, name)
        log = h.gw.metrics.hashes[h.gw.catalog.resolve("m").args_hash]  # type: ignore[union-attr]
        assert log.errors == 0


async def _busy(harness: gs.Harness, instance: str) -> bool:
    return await harness.slots_busy(instance) > 0


# --- upstream failures ------------------------------------------------------------------------


async def test_an_upstream_crash_mid_stream_ends_with_an_error_event_and_truncates(tmp_path: Path) -> None:
    env = {"default": {"FAKE_LLAMA_FAULT": "crash_mid_stream", "FAKE_LLAMA_CRASH_AFTER": "3"}}
    async with serving(tmp_path, env=env) as h, aiohttp.ClientSession() as session:
        body = {"model": "m", "messages": HI, "stream": True}
        received = b""
        async with session.post(h.base_url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):  # no final chunk: the client can tell
                async for chunk in response.content.iter_any():
                    received += chunk
        *events, error_event = received.split(b"\n\n")[:-1]
        assert len(events) == 3 and b"[DONE]" not in received
        assert json.loads(error_event.removeprefix(b"data: "))["error"]["type"] == "upstream_error"
        await settled(h)
        assert h.gw.metrics.errors_total == 1


async def test_an_upstream_crash_before_answering_is_502(tmp_path: Path) -> None:
    env = {"default": {"FAKE_LLAMA_FAULT": "crash_mid_stream"}}
    # room for replacements: every replacement crashes too; after its retries the client gets the 502
    async with serving(tmp_path, gs.profile(max_instances=4), env=env) as h:
        status, _, body = await chat(h)
        assert status == 502
        error = json.loads(body)["error"]
        assert error["type"] == "upstream_error" and error["message"].startswith("Upstream error: ")
        await settled(h)


async def test_a_request_past_max_request_duration_is_502(tmp_path: Path) -> None:
    env = {"default": {"FAKE_LLAMA_FAULT": "stall_body"}}
    async with serving(tmp_path, gs.profile(max_request_duration_ms=1000), env=env) as h:
        started = time.monotonic()
        status, _, body = await chat(h)
        assert status == 502 and json.loads(body)["error"]["type"] == "upstream_error"
        assert time.monotonic() - started < 20
        await settled(h)


async def test_a_failed_spawn_is_503_spawn_failures_exhausted(tmp_path: Path) -> None:
    async with serving(tmp_path, env={"default": {"FAKE_LLAMA_FAULT": "exit_on_start"}}) as h:
        status, headers, body = await chat(h)
        assert (status, headers["Retry-After"]) == (503, "30")
        assert json.loads(body)["error"] == {
            "message": "All nodes failed to spawn instance for this model",
            "type": "spawn_failures_exhausted",
            "param": None,
            "code": None,
        }
        assert h.instances()[0].status.phase is resources.Phase.FAILED
        await settled(h)


# --- drain and usage --------------------------------------------------------------------------


async def test_graceful_drain(tmp_path: Path) -> None:
    async with serving(tmp_path, gs.profile(max_instances=1), env={"default": SLOW}, **ONE_AT_A_TIME) as h:
        served = asyncio.create_task(chat(h))
        await gs.eventually(lambda: h.gw.board.in_flight_by_instance())
        waiting = asyncio.create_task(chat(h))
        await gs.eventually(lambda: h.gw.board.queue_length() == 1)
        assert not await h.gw.wait_idle(0.05)

        h.gw.start_draining()
        status, headers, body = await waiting
        assert (status, headers["Retry-After"], json.loads(body)["error"]["type"]) == (503, "5", "draining")
        assert (await h.client.get("/readyz")).status == 503
        assert (await chat(h))[0] == 503
        assert await h.gw.wait_idle(30)
        assert (await served)[0] == 200  # in flight when the drain began: it finished


async def test_usage_reaches_the_store(tmp_path: Path) -> None:
    env = {"default": {"FAKE_LLAMA_TOKEN_DELAY_MS": "200", "FAKE_LLAMA_TOKENS": "12"}}
    async with serving(tmp_path, env=env) as h:
        served = asyncio.create_task(chat(h))
        await gs.eventually(lambda: h.gw.board.in_flight_by_instance())
        name = h.instances()[0].name

        def usage() -> resources.GatewayUsage | None:
            instance = h.gw.catalog.instance(name)
            return instance.status.usage.get(gs.GATEWAY_ID) if instance is not None else None

        busy = await gs.eventually(lambda: (u := usage()) is not None and u.in_flight == 1 and u)
        assert busy.last_request_at is not None
        assert (await served)[0] == 200
        await gs.eventually(lambda: (u := usage()) is not None and u.in_flight == 0, within_s=10)


async def test_make_runner_cancels_the_handler_of_a_client_that_leaves(tmp_path: Path) -> None:
    """The runner the CLI uses: a queued client that goes away leaves the queue at once."""
    memory = store.MemoryStore()
    await memory.create(gs.model("m", gs.profile(max_instances=1)))
    settings = gs.node_config(**ONE_AT_A_TIME)
    async with gs.running_node(memory, tmp_path, settings=settings, env={"default": SLOW}):
        app = gateway_app.create_app(settings, store=memory, gateway_id=gs.GATEWAY_ID, node_name=gs.NODE)
        runner = gateway_app.make_runner(app)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            gw = app[gateway_app.GATEWAY]
            url = f"http://{host}:{port}/v1/chat/completions"

            async def ask() -> int:
                async with (
                    aiohttp.ClientSession() as session,
                    session.post(url, json={"model": "m", "messages": HI}) as r,
                ):
                    await r.read()
                    return r.status

            served = asyncio.create_task(ask())
            await gs.eventually(lambda: gw.board.in_flight_by_instance())
            leaving = asyncio.create_task(ask())
            await gs.eventually(lambda: gw.board.queue_length() == 1)
            leaving.cancel()
            await gs.eventually(lambda: gw.board.queue_length() == 0, within_s=5)
            assert await served == 200
            gateway_app.start_draining(app)
            assert await gateway_app.wait_idle(app, 10)
        finally:
            await runner.cleanup()


async def test_an_unreachable_ready_instance_is_routed_around(tmp_path: Path) -> None:
    """An instance that died a moment ago still looks READY; the request goes to another one instead."""
    models = [gs.model("m", gs.profile(max_instances=2))]
    async with gs.running_gateway(tmp_path, models=models, agent=False) as h:
        port = processes.free_port()
        live = processes.start(processes.fake_llama_server_argv("--port", str(port)), log_path=tmp_path / "live.log")
        try:
            await processes.wait_healthy(live, f"http://127.0.0.1:{port}")
            for name, instance_port in (("dead", processes.free_port()), ("live", port)):
                await h.store.create(
                    resources.LlamaInstance(
                        metadata=resources.ObjectMeta(name=name),
                        spec=resources.InstanceSpec(model="m", profile="default", args_hash="x", node_name=gs.NODE),
                    )
                )
                await gs.set_phase(h.store, name, resources.Phase.READY, port=instance_port)
            await gs.eventually(lambda: len(h.gw.catalog.pool_view("m:default").routable) == 2)
            for _ in range(3):
                status, _, _ = await chat(h)
                assert status == 200
            assert h.gw.catalog.pool_view("m:default").routable == ["live"]
            await settled(h)
        finally:
            await processes.stop(live)

"""The test rig itself: the fake llama-server, the tiny GGUF models, and the real llama-server on them.

Covers:
- fake llama-server as a child process: 503 "Loading model" then 200 on /health, llama-server-style startup
  lines, /props, /slots, /v1/models; chat completions streamed (with the usage chunk) and not; a completions
  stream whose last chunk carries usage; embeddings and rerank;
- its faults: crash_mid_stream (the process exits mid-stream), stall_body (first chunk, then silence, and the
  slot comes free when the client goes), slow_stream, busy, never_healthy, exit_on_start, hang_health;
- the tiny models: deterministic bytes;
- the real llama-server on the tiny models: chat (streamed and not) through the OpenAI SDK, embeddings of
  width 64 under --embedding, rerank scores under --reranking, /props, and the startup log lines the agent
  parses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from rig import processes, tiny_models, waiting

HOST = "127.0.0.1"
Json = dict[str, Any]


@contextlib.asynccontextmanager
async def fake_llama(
    tmp_path: Path, *args: str, wait: bool = True, **env: str
) -> AsyncIterator[tuple[str, processes.Child]]:
    """Run the fake llama-server with FAKE_LLAMA_<KEY> set from `env`; yield its base URL and the child."""
    port = processes.free_port()
    argv = processes.fake_llama_server_argv("--host", HOST, "--port", str(port), "-m", "tiny.gguf", *args)
    fake_env = {f"FAKE_LLAMA_{key.upper()}": value for key, value in env.items()}
    base_url = f"http://{HOST}:{port}"
    log_path = tmp_path / f"fake-{port}.log"
    async with processes.running(
        argv, log_path=log_path, base_url=base_url, env=fake_env, deadline_s=30, wait=wait
    ) as child:
        yield base_url, child


async def wait_listening(base_url: str, child: processes.Child) -> None:
    """Until the port answers at all (any status): for faults where /health never says 200."""
    async with aiohttp.ClientSession() as session:

        async def answers() -> bool:
            assert child.process.poll() is None, child.log_text()
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with session.get(f"{base_url}/props"):
                    return True
            return False

        await waiting.eventually(answers, interval_s=0.05, what=f"{base_url} to answer (log {child.log_path})")


async def read_events(response: aiohttp.ClientResponse) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    events = []
    async for line in response.content:
        if line.startswith(b"data: "):
            events.append(line[len(b"data: ") :].decode().strip())
    return events


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}]}


# --- the fake llama-server ------------------------------------------------------------------------------------


async def test_fake_answers_loading_until_loaded_and_logs_like_llama_server(tmp_path: Path) -> None:
    args = ("-c", "512", "-np", "2", "--fit", "off", "--some-unknown-flag")
    async with fake_llama(tmp_path, *args, wait=False, startup_delay_ms="2500") as (base_url, child):
        await wait_listening(base_url, child)
        async with aiohttp.ClientSession() as session, session.get(f"{base_url}/health") as response:
            assert response.status == 503
            assert await response.json() == {
                "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}
            }
        await processes.wait_healthy(child, base_url, deadline_s=30)
        log = child.log_text()
    assert "srv  llama_server: initializing ..." in log
    assert "srv    load_model: initializing, n_slots = 2, n_ctx_slot = 256, kv_unified = 'false'" in log
    assert f"srv  llama_server: listening on {base_url}" in log


async def test_fake_props_slots_and_models(tmp_path: Path) -> None:
    async with fake_llama(tmp_path, "-c", "1024", "-np", "2") as (base_url, _), aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}/props") as response:
            props = await response.json()
        async with session.get(f"{base_url}/slots") as response:
            slots = await response.json()
        async with session.get(f"{base_url}/v1/models") as response:
            models = await response.json()
    assert props["default_generation_settings"]["n_ctx"] == 512
    assert props["total_slots"] == 2
    assert props["build_info"]
    assert slots == [{"id": 0, "n_ctx": 512, "is_processing": False}, {"id": 1, "n_ctx": 512, "is_processing": False}]
    assert models["data"][0]["id"] == "tiny.gguf"
    assert models["data"][0]["meta"]["n_ctx_train"] == 2048


async def test_fake_chat_streamed_and_not(tmp_path: Path) -> None:
    async with fake_llama(tmp_path) as (base_url, _), aiohttp.ClientSession() as session:
        async with session.post(f"{base_url}/v1/chat/completions", json={**CHAT, "max_tokens": 4}) as response:
            whole = await response.json()
        streamed_request = {**CHAT, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
        async with session.post(f"{base_url}/v1/chat/completions", json=streamed_request) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            events = await read_events(response)
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 4
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == whole["usage"]


async def test_fake_completions_stream_ends_with_usage(tmp_path: Path) -> None:
    async with fake_llama(tmp_path, tokens="3") as (base_url, _), aiohttp.ClientSession() as session:
        request = {"model": "tiny", "prompt": "hello", "stream": True}
        async with session.post(f"{base_url}/v1/completions", json=request) as response:
            events = await read_events(response)
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["object"] == "text_completion"
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["usage"]["completion_tokens"] == 3
    assert len(events) == 3 + 2


async def test_fake_embeddings_and_rerank(tmp_path: Path) -> None:
    async with fake_llama(tmp_path) as (base_url, _), aiohttp.ClientSession() as session:
        async with session.post(f"{base_url}/v1/embeddings", json={"input": ["a", "b"]}) as response:
            embedded = await response.json()
        request = {"query": "cat", "documents": ["dog", "cat", "car"], "top_n": 2}
        async with session.post(f"{base_url}/v1/rerank", json=request) as response:
            ranked = await response.json()
    vectors = [item["embedding"] for item in embedded["data"]]
    assert [len(vector) for vector in vectors] == [64, 64]
    assert math.isclose(sum(x * x for x in vectors[0]), 1.0)
    assert ranked["results"][0]["index"] == 1
    assert len(ranked["results"]) == 2


async def test_fake_crash_mid_stream_exits_the_process(tmp_path: Path) -> None:
    async with fake_llama(tmp_path, fault="crash_mid_stream", crash_after="3") as (base_url, child):
        received: list[bytes] = []
        async with aiohttp.ClientSession() as session:
            request = {**CHAT, "max_tokens": 20, "stream": True}
            async with session.post(f"{base_url}/v1/chat/completions", json=request) as response:
                assert response.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    async for line in response.content:
                        if line.strip():
                            received.append(line)
        assert await processes.wait_exited(child, deadline_s=10) == 1
    assert len(received) == 3
    assert b"[DONE]" not in b"".join(received)
    assert "fake crash" in child.log_text()


async def test_fake_stall_body_sends_one_chunk_then_nothing_and_frees_the_slot(tmp_path: Path) -> None:
    async with fake_llama(tmp_path, fault="stall_body") as (base_url, _), aiohttp.ClientSession() as session:
        async with session.post(f"{base_url}/v1/chat/completions", json={**CHAT, "stream": True}) as response:
            assert response.status == 200
            first = await asyncio.wait_for(response.content.readline(), timeout=5)
            assert first.startswith(b"data: ")
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(response.content.readuntil(b"\n\n"), timeout=1.0)
            async with session.get(f"{base_url}/slots") as slots:
                assert (await slots.json())[0]["is_processing"] is True
            response.close()  # the client goes away mid-stream
        await waiting.eventually(lambda: slot_free(session, base_url), what="the slot to be freed after the disconnect")


async def slot_free(session: aiohttp.ClientSession, base_url: str) -> bool:
    async with session.get(f"{base_url}/slots") as response:
        return not (await response.json())[0]["is_processing"]


async def test_fake_stall_body_non_streaming_sends_half_a_body(tmp_path: Path) -> None:
    async with (
        fake_llama(tmp_path, fault="stall_body") as (base_url, _),
        aiohttp.ClientSession() as session,
        session.post(f"{base_url}/v1/chat/completions", json=CHAT) as response,
    ):
        assert response.status == 200
        assert response.content_length is not None
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(response.read(), timeout=1.0)


async def test_fake_slow_stream_spaces_the_chunks(tmp_path: Path) -> None:
    request = {**CHAT, "max_tokens": 5, "stream": True}
    async with (
        fake_llama(tmp_path, fault="slow_stream", token_delay_ms="100") as (base_url, _),
        aiohttp.ClientSession() as session,
    ):
        started = time.monotonic()
        async with session.post(f"{base_url}/v1/chat/completions", json=request) as response:
            events = await read_events(response)
        elapsed = time.monotonic() - started
    assert events[-1] == "[DONE]"
    assert elapsed >= 0.5  # role chunk + 5 tokens + finish chunk, 100 ms after each


async def test_fake_busy_shows_all_slots_processing_and_requests_wait(tmp_path: Path) -> None:
    async with fake_llama(tmp_path, "-np", "2", fault="busy") as (base_url, _), aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}/slots") as response:
            assert [slot["is_processing"] for slot in await response.json()] == [True, True]
        with pytest.raises(asyncio.TimeoutError):
            timeout = aiohttp.ClientTimeout(total=1.0)
            async with session.post(f"{base_url}/v1/chat/completions", json=CHAT, timeout=timeout):
                pass


async def test_fake_never_healthy(tmp_path: Path) -> None:
    async with fake_llama(tmp_path, wait=False, fault="never_healthy") as (base_url, child):
        with pytest.raises(processes.ChildNotHealthy, match="503"):
            await processes.wait_healthy(child, base_url, deadline_s=1.5)


async def test_fake_exit_on_start(tmp_path: Path) -> None:
    async with fake_llama(tmp_path, wait=False, fault="exit_on_start") as (base_url, child):
        with pytest.raises(processes.ChildExited, match="exited with 1"):
            await processes.wait_healthy(child, base_url, deadline_s=30)
    assert "srv  llama_server: exiting due to model loading error" in child.log_text()


async def test_fake_hang_health_accepts_but_never_answers(tmp_path: Path) -> None:
    async with fake_llama(tmp_path, wait=False, fault="hang_health") as (base_url, child):
        await wait_listening(base_url, child)
        async with aiohttp.ClientSession() as session:
            with pytest.raises(asyncio.TimeoutError):
                async with session.get(f"{base_url}/health", timeout=aiohttp.ClientTimeout(total=1.0)):
                    pass
            async with session.get(f"{base_url}/props") as response:
                assert response.status == 200


# --- the tiny models ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "write",
    [tiny_models.write_chat_model, tiny_models.write_embedding_model, tiny_models.write_reranker_model],
)
def test_tiny_models_are_deterministic_and_small(tmp_path: Path, write: Any) -> None:
    first = write(tmp_path / "first.gguf").read_bytes()
    second = write(tmp_path / "second.gguf").read_bytes()
    assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()
    assert 300_000 < len(first) < 600_000
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first.gguf", "second.gguf"]


# --- the real llama-server ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@contextlib.asynccontextmanager
async def real_llama(
    binary: Path, model: Path, tmp_path: Path, *args: str
) -> AsyncIterator[tuple[str, processes.Child]]:
    port = processes.free_port()
    argv = [str(binary), "--host", HOST, "--port", str(port), "-m", str(model), "-c", "512", "--fit", "off"]
    argv += ["-np", "1", *args]
    base_url = f"http://{HOST}:{port}"
    async with processes.running(argv, log_path=tmp_path / "llama-server.log", base_url=base_url) as child:
        yield base_url, child


@pytest.mark.real
async def test_real_chat_through_the_openai_sdk(llama_server_binary: Path, model_dir: Path, tmp_path: Path) -> None:
    model = tiny_models.write_chat_model(model_dir / "chat.gguf")
    async with (
        real_llama(llama_server_binary, model, tmp_path) as (base_url, child),
        openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="x") as client,
    ):
        completion = await client.chat.completions.create(
            model="chat.gguf", messages=[{"role": "user", "content": "hello"}], max_tokens=8
        )
        stream = await client.chat.completions.create(
            model="chat.gguf",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        async with aiohttp.ClientSession() as session, session.get(f"{base_url}/props") as response:
            props = await response.json()
        log = child.log_text()
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert len(text) >= 5  # five printable ASCII bytes
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert props["default_generation_settings"]["n_ctx"] == 512
    assert props["total_slots"] == 1
    assert "srv    load_model: initializing, n_slots = 1, n_ctx_slot = 512" in log
    assert f"srv  llama_server: listening on {base_url}" in log


@pytest.mark.real
async def test_real_embeddings(llama_server_binary: Path, model_dir: Path, tmp_path: Path) -> None:
    model = tiny_models.write_embedding_model(model_dir / "embedding.gguf")
    async with (
        real_llama(llama_server_binary, model, tmp_path, "--embedding") as (base_url, _),
        openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="x") as client,
    ):
        response = await client.embeddings.create(model="embedding.gguf", input=["hello world", "the cat"])
    vectors = [item.embedding for item in response.data]
    assert [len(vector) for vector in vectors] == [64, 64]
    assert vectors[0] != vectors[1]
    assert math.isclose(sum(x * x for x in vectors[0]), 1.0, rel_tol=1e-3)  # llama-server normalizes


@pytest.mark.real
async def test_real_rerank(llama_server_binary: Path, model_dir: Path, tmp_path: Path) -> None:
    model = tiny_models.write_reranker_model(model_dir / "reranker.gguf")
    request = {"query": "what is the capital of france", "documents": ["paris", "the dog", "hello world"]}
    async with (
        real_llama(llama_server_binary, model, tmp_path, "--reranking") as (base_url, _),
        aiohttp.ClientSession() as session,
        session.post(f"{base_url}/v1/rerank", json=request) as response,
    ):
        assert response.status == 200, await response.text()
        ranked = await response.json()
    assert sorted(result["index"] for result in ranked["results"]) == [0, 1, 2]
    assert all(isinstance(result["relevance_score"], float) for result in ranked["results"])

"""End to end: `llamesh serve` as a real child process, the real llama-server, tiny real GGUF models and the
unmodified OpenAI Python SDK.

Covers: the first request spawns the instance, and its output reaches the instance's log file; chat
(streaming and not), completions, embeddings and rerank; /v1/models and retrieve agree and show the parsed
params; idle eviction stops llama-server; two concurrent requests on a 1-slot profile both succeed; a client
that disconnects mid-stream leaves in-flight at 0 and llama-server's slot free; killing llama-server
mid-stream ends the response and the next request respawns it; cookbook edits (in place, rename-over,
broken) with no failed request on an untouched profile; SIGTERM drains and stops every child; a full queue
is 503 queue_full; clients leaving while queued or before the response headers free everything; a full node
stops an idle model to serve another.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
import yaml

from rig import processes, waiting

pytestmark = pytest.mark.real


@dataclass
class Node:
    base_url: str
    child: processes.Child
    cookbook: Path
    client: openai.AsyncOpenAI

    def llama_servers(self) -> list[processes.Seen]:
        """The llama-servers running under `llamesh serve` now (one exiting as it is looked at is left out)."""
        return processes.descendants(self.child.pid, matching="llama-server")

    def llama_port(self) -> int:
        (server,) = self.llama_servers()
        port = server.flag("--port")
        assert port is not None, server.argv
        return int(port)

    async def get_json(self, path: str) -> tuple[int, dict]:  # type: ignore[type-arg]
        async with aiohttp.ClientSession() as session, session.get(self.base_url + path) as response:
            return response.status, await response.json()


def cookbook_text(chat: Path, embed: Path, rerank: Path, *, idle: int = 300, extra: str = "") -> str:
    return f"""
models:
  - name: tiny
    description: tiny llama for tests
    profiles:
      - id: default
        model_path: {chat}
        llama_server_args: "-c 1024 -np 1"
        idle_timeout_seconds: {idle}
      - id: embed
        model_path: {embed}
        llama_server_args: "--embedding -c 512"
      - id: rerank
        model_path: {rerank}
        llama_server_args: "--reranking -c 512"
{extra}"""


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, binary: Path, cookbook: str, **config_overrides: object) -> AsyncIterator[Node]:
    port = processes.free_port()
    node_config: dict[str, object] = {
        "node_id": "e2e",
        "listen_addr": f"127.0.0.1:{port}",
        "metrics_path": str(tmp_path / "node-metrics.json"),
        "shutdown_grace_period_seconds": 5,
        "model_defaults": {"max_concurrent_requests_per_instance": 1, "max_instances_per_model": 1},
        "llama_cpp": {"enabled": False, "binary_path": str(binary), "cache_dir": str(tmp_path / "cache")},
    }
    node_config.update(config_overrides)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(node_config))
    cookbook_path = tmp_path / "cookbook.yaml"
    cookbook_path.write_text(cookbook)
    argv = [
        str(Path(sys.executable).parent / "llamesh"),
        "serve",
        "--config",
        str(config_path),
        "--cookbook",
        str(cookbook_path),
    ]
    child = processes.start(argv, log_path=tmp_path / "serve.log")
    base_url = f"http://127.0.0.1:{port}"
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        await processes.wait_healthy(child, base_url, deadline_s=60)
        yield Node(base_url=base_url, child=child, cookbook=cookbook_path, client=client)
    finally:
        await client.close()
        await processes.stop(child, grace_s=15)


@pytest.fixture
def tiny_cookbook(chat_model: Path, embedding_model: Path, reranker_model: Path) -> str:
    return cookbook_text(chat_model, embedding_model, reranker_model)


async def test_openai_sdk_gets_every_endpoint_and_models_agree(
    tmp_path: Path, llama_server_binary: Path, tiny_cookbook: str
) -> None:
    async with serving(tmp_path, llama_server_binary, tiny_cookbook) as node:
        assert node.llama_servers() == []  # nothing runs before the first request
        chat = await node.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
        assert chat.choices[0].message.content
        assert chat.usage is not None and chat.usage.completion_tokens == 8
        assert len(node.llama_servers()) == 1  # the first request spawned it

        def instance_log() -> str:  # llama-server's output, read through childpipe on `llamesh serve`'s uvloop
            return "".join(path.read_text() for path in (tmp_path / "cache" / "state" / "logs").glob("tiny-default-*"))

        await waiting.eventually(lambda: "stop processing" in instance_log(), what="the request's lines in the log")
        assert "listening on" in instance_log()

        stream = await node.client.chat.completions.create(
            model="tiny:default", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
        )
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        assert "".join(pieces)

        completion = await node.client.completions.create(model="tiny", prompt="abc", max_tokens=4)
        assert completion.choices[0].text

        embedding = await node.client.embeddings.create(model="tiny:embed", input=["hello world"])
        assert len(embedding.data[0].embedding) == 64

        async with (
            aiohttp.ClientSession() as session,
            session.post(
                node.base_url + "/v1/rerank",
                json={"model": "tiny:rerank", "query": "hello", "documents": ["hello there", "zebra"]},
            ) as response,
        ):
            assert response.status == 200, await response.text()
            ranked = await response.json()
        assert len(ranked["results"]) == 2

        listed = {model.id: model for model in (await node.client.models.list()).data}
        assert set(listed) == {"tiny", "tiny:embed", "tiny:rerank"}
        retrieved = await node.client.models.retrieve("tiny")
        assert retrieved.id == "tiny" and retrieved.created == listed["tiny"].created
        status, body = await node.get_json("/v1/models/tiny")
        params = body["metadata"]["parsed_model_params"]
        assert params["n_ctx"] == 1024 and params["n_ctx_train"] == 2048 and params["n_slots"] == 1
        status, missing = await node.get_json("/v1/models/nope")
        assert status == 404 and missing["error"]["type"] == "model_not_found"


async def test_idle_instance_is_stopped(
    tmp_path: Path, llama_server_binary: Path, chat_model: Path, embedding_model: Path, reranker_model: Path
) -> None:
    cookbook = cookbook_text(chat_model, embedding_model, reranker_model, idle=2)
    async with serving(tmp_path, llama_server_binary, cookbook) as node:
        await node.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert len(node.llama_servers()) == 1

        async def gone() -> bool:
            return node.llama_servers() == []

        await waiting.eventually(gone, within_s=30)
        _, body = await node.get_json("/v1/models/tiny")  # learned params outlive the instance
        assert body["metadata"]["parsed_model_params"]["n_ctx"] == 1024


async def test_two_requests_on_one_slot_both_succeed(
    tmp_path: Path, llama_server_binary: Path, tiny_cookbook: str
) -> None:
    async with serving(tmp_path, llama_server_binary, tiny_cookbook) as node:
        results = await asyncio.gather(
            *(
                node.client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": str(i)}], max_tokens=16
                )
                for i in range(2)
            )
        )
        assert all(result.choices[0].message.content for result in results)
        assert len(node.llama_servers()) == 1


async def test_disconnect_mid_stream_frees_the_slot_and_a_killed_server_respawns(
    tmp_path: Path, llama_server_binary: Path, tiny_cookbook: str
) -> None:
    async with serving(tmp_path, llama_server_binary, tiny_cookbook) as node:
        await node.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        port = node.llama_port()
        body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 400, "stream": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(node.base_url + "/v1/chat/completions", json=body) as response:
                assert response.status == 200
                await response.content.readany()  # the stream started; now walk away

            async def slot_free() -> bool:
                async with session.get(f"http://127.0.0.1:{port}/slots") as slots:
                    return not any(slot["is_processing"] for slot in await slots.json())

            await waiting.eventually(slot_free, within_s=10)

            async def gateway_idle() -> bool:
                async with session.get(node.base_url + "/metrics/json") as metrics:
                    return (await metrics.json())["current_requests"] == 0

            await waiting.eventually(gateway_idle, within_s=10)

            # kill llama-server in the middle of a stream: the response ends, the next request respawns
            async with session.post(node.base_url + "/v1/chat/completions", json=body) as response:
                await response.content.readany()
                (server,) = node.llama_servers()
                server.kill()
                with contextlib.suppress(aiohttp.ClientPayloadError):
                    async with asyncio.timeout(10):
                        await response.read()
        again = await node.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert again.choices[0].message.content is not None
        assert len(node.llama_servers()) == 1 and node.llama_port() != 0


async def test_cookbook_edits_never_fail_requests_on_untouched_profiles(
    tmp_path: Path, llama_server_binary: Path, chat_model: Path, embedding_model: Path, reranker_model: Path
) -> None:
    base = cookbook_text(chat_model, embedding_model, reranker_model)
    extra = f"""  - name: other
    profiles:
      - id: default
        model_path: {chat_model}
        llama_server_args: "-c 512"
"""
    async with serving(tmp_path, llama_server_binary, base) as node:
        failures: list[BaseException] = []
        served = 0
        stop = asyncio.Event()

        async def keep_asking() -> None:
            nonlocal served
            while not stop.is_set():
                try:
                    await node.client.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
                    )
                    served += 1
                except openai.OpenAIError as exc:
                    failures.append(exc)

        asker = asyncio.create_task(keep_asking())

        async def listed(ids: set[str]) -> bool:
            _, body = await node.get_json("/v1/models")
            return {model["id"] for model in body["data"]} == ids

        # in place: a model added
        node.cookbook.write_text(base + extra)
        await waiting.eventually(lambda: listed({"tiny", "tiny:embed", "tiny:rerank", "other"}), within_s=15)
        # broken: refused, everything keeps serving
        node.cookbook.write_text(base + "  - name: [\n")
        await waiting.eventually(lambda: "cookbook not reloaded" in node.child.log_text(), within_s=15)
        assert await listed({"tiny", "tiny:embed", "tiny:rerank", "other"})
        # rename-over: the embed profile removed
        replacement = tmp_path / "cookbook.yaml.new"
        replacement.write_text(base.replace("      - id: embed", "      - id: embed\n        enabled: false") + extra)
        os.replace(replacement, node.cookbook)
        await waiting.eventually(lambda: listed({"tiny", "tiny:rerank", "other"}), within_s=15)

        stop.set()
        await asyncio.wait_for(asker, 60)
        assert failures == []
        assert served > 0


async def test_sigterm_drains_and_stops_every_child(
    tmp_path: Path, llama_server_binary: Path, tiny_cookbook: str
) -> None:
    async with serving(tmp_path, llama_server_binary, tiny_cookbook) as node:
        await node.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        (server,) = node.llama_servers()
        os.kill(node.child.pid, signal.SIGTERM)
        exit_code = await processes.wait_exited(node.child, deadline_s=30)
        assert exit_code == 0, node.child.log_text()[-3000:]
        assert not server.is_alive()


async def test_queue_limits_and_disconnects_while_queued_or_before_headers(
    tmp_path: Path, llama_server_binary: Path, chat_model: Path, embedding_model: Path, reranker_model: Path
) -> None:
    """One slot, a queue of one: a third request is 503 queue_full; clients that leave while queued or
    before the response headers leave nothing in flight and llama-server's slot free."""
    # One thread: llama.cpp's threads spin-wait for each other, and on a busy 2-core machine two of them
    # crawl (under 5 tokens/s seen), while the test waits for generations to end.
    cookbook = cookbook_text(chat_model, embedding_model, reranker_model).replace(
        '"-c 1024 -np 1"', '"-c 8192 -np 1 -t 1"'
    )
    defaults = {"max_concurrent_requests_per_instance": 1, "max_instances_per_model": 1, "max_queue_size_per_model": 1}
    async with serving(tmp_path, llama_server_binary, cookbook, model_defaults=defaults) as node:
        await node.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        port = node.llama_port()
        messages = [{"role": "user", "content": "x"}]
        async with aiohttp.ClientSession() as session:
            # The holder streams ~1 MB that it never reads: backpressure keeps its slot busy.
            holder_body = {"model": "tiny", "messages": messages, "max_tokens": 6000, "stream": True}
            holder = await session.post(node.base_url + "/v1/chat/completions", json=holder_body)
            assert holder.status == 200
            await holder.content.readany()

            async def post() -> tuple[int, dict[str, str], dict]:  # type: ignore[type-arg]
                body = {"model": "tiny", "messages": messages, "max_tokens": 4}
                async with session.post(node.base_url + "/v1/chat/completions", json=body) as response:
                    return response.status, dict(response.headers), await response.json()

            queued = asyncio.create_task(post())  # waits in the queue

            async def queue_used() -> bool:
                async with session.get(node.base_url + "/metrics/json") as metrics:
                    return bool((await metrics.json())["queue_length"])

            await waiting.eventually(queue_used, within_s=30)
            status, headers, error = await post()  # the queue is full
            assert status == 503, (status, error)
            assert (headers["Retry-After"], error["error"]["type"]) == ("5", "queue_full")

            queued.cancel()  # leaves while queued
            await asyncio.gather(queued, return_exceptions=True)
            holder.close()  # leaves mid-stream

            # leaves before the response headers: a non-streaming request, abandoned while generating
            async def gateway_requests() -> int:
                async with session.get(node.base_url + "/metrics/json") as metrics:
                    return int((await metrics.json())["current_requests"])

            async def gateway_idle() -> bool:
                return await gateway_requests() == 0

            await waiting.eventually(gateway_idle, within_s=10)
            before_headers = asyncio.create_task(post_long(session, node.base_url))

            async def forwarded() -> bool:
                return await gateway_requests() == 1 or before_headers.done()

            await waiting.eventually(forwarded, within_s=10)
            before_headers.cancel()
            await asyncio.gather(before_headers, return_exceptions=True)
            await waiting.eventually(gateway_idle, within_s=5)
            # llama-server itself only notices a closed connection of a non-streaming request when no token
            # arrives for its polling interval, so it may finish the (short) generation first.
            await waiting.eventually(lambda: _not_processing(session, port), within_s=60)
        served = await node.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert served.choices[0].message.content is not None


async def post_long(session: aiohttp.ClientSession, base_url: str) -> int:
    # Long enough to be cancelled while generating, short enough that llama-server, which may finish it
    # before it notices the closed connection, is idle again soon on a loaded machine (~100 tokens/s there).
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 500}
    async with session.post(base_url + "/v1/chat/completions", json=body) as response:
        return response.status


async def _processing(session: aiohttp.ClientSession, port: int) -> bool:
    async with session.get(f"http://127.0.0.1:{port}/slots") as slots:
        return any(slot["is_processing"] for slot in await slots.json())


async def _not_processing(session: aiohttp.ClientSession, port: int) -> bool:
    return not await _processing(session, port)


async def test_a_full_node_stops_an_idle_model_to_serve_another(
    tmp_path: Path, llama_server_binary: Path, tiny_cookbook: str
) -> None:
    """Room for one instance: asking for a second model drains the idle first one instead of timing out."""
    async with serving(tmp_path, llama_server_binary, tiny_cookbook, max_instances_per_node=1) as node:
        await node.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        (first,) = node.llama_servers()
        embedding = await node.client.embeddings.create(model="tiny:embed", input=["hello"])
        assert len(embedding.data[0].embedding) == 64
        (second,) = node.llama_servers()
        assert second.pid != first.pid and "--embedding" in second.argv

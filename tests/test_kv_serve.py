"""KV-cache affinity and KV caches that survive eviction, end to end: `llamesh serve` as a child process,
the real llama-server, a tiny real GGUF model and the unmodified OpenAI Python SDK.

Covers: with two instances of one profile, each of eight multi-turn conversations stays on one instance
(both instances used), llama-server's timings show the history read from its cache on every follow-up
turn, and `proxy_affinity_total` counts the follow-ups as hits; with `kv_cache` on, an instance stopped
for idleness saves its slot, the next instance restores it before it is Ready, and the conversation's next
turn reads only its new tokens (`proxy_kv_cache_*` count the save and the restore); a restored cache that
llama-server then does not use (prompt caching off) serves the turn from a cold prompt and is counted as
`unused`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from rig import processes, waiting

pytestmark = pytest.mark.real


@dataclass
class Node:
    base_url: str
    child: processes.Child
    log: Path
    client: openai.AsyncOpenAI

    def llama_ports(self) -> list[int]:
        return [
            int(port)
            for seen in processes.descendants(self.child.pid, matching="llama-server")
            if (port := seen.flag("--port"))
        ]

    def request_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log.read_text(errors="replace").splitlines():
            if raw.startswith("{") and '"request_complete"' in raw:
                lines.append(json.loads(raw))
        return lines

    async def metric(self, name: str, **labels: str) -> float:
        async with aiohttp.ClientSession() as session, session.get(self.base_url + "/metrics") as response:
            text = await response.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        raise AssertionError(f"{name}{labels} not in /metrics")


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, binary: Path, cookbook: str, **config_overrides: object) -> AsyncIterator[Node]:
    port = processes.free_port()
    node_config: dict[str, object] = {
        "node_id": "kv",
        "listen_addr": f"127.0.0.1:{port}",
        "metrics_path": str(tmp_path / "node-metrics.json"),
        "shutdown_grace_period_seconds": 5,
        "model_defaults": {"max_concurrent_requests_per_instance": 2, "max_instances_per_model": 2},
        "llama_cpp": {"enabled": False, "binary_path": str(binary), "cache_dir": str(tmp_path / "cache")},
        **config_overrides,
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(node_config))
    (tmp_path / "cookbook.yaml").write_text(cookbook)
    argv = [str(Path(sys.executable).parent / "llamesh"), "serve", "--config", str(tmp_path / "config.yaml")]
    child = processes.start([*argv, "--cookbook", str(tmp_path / "cookbook.yaml")], log_path=tmp_path / "serve.log")
    base_url = f"http://127.0.0.1:{port}"
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        await processes.wait_healthy(child, base_url, deadline_s=60)
        yield Node(base_url=base_url, child=child, log=tmp_path / "serve.log", client=client)
    finally:
        await client.close()
        await processes.stop(child, grace_s=15)


def timings(answer: ChatCompletion) -> dict[str, Any]:
    extra = answer.model_extra or {}
    found: dict[str, Any] = extra["timings"]
    return found


async def healthy(port: int) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/health") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def test_conversations_stick_to_the_instance_that_holds_their_cache(
    tmp_path: Path, llama_server_binary: Path, chat_model: Path
) -> None:
    cookbook = f"""
models:
  - name: tiny
    profiles:
      - id: default
        model_path: {chat_model}
        llama_server_args: "-c 4096 -np 2"
        min_instances: 2
"""
    async with serving(tmp_path, llama_server_binary, cookbook) as node:

        async def both_ready() -> bool:
            ports = node.llama_ports()
            return len(ports) == 2 and all(await asyncio.gather(*(healthy(port) for port in ports)))

        await waiting.eventually(both_ready, within_s=90)
        await asyncio.sleep(1)  # the gateway sees READY through the store a moment after /health answers
        histories: list[list[ChatCompletionMessageParam]] = [
            [{"role": "user", "content": f"Conversation {n}: tell me a long story about the number {n}. " * 8}]
            for n in range(8)
        ]
        cached: list[int] = []
        for turn in range(3):
            for history in histories:
                answer = await node.client.chat.completions.create(model="tiny", messages=history, max_tokens=4)
                if turn:
                    cached.append(timings(answer)["cache_n"])
                history += [
                    {"role": "assistant", "content": answer.choices[0].message.content or ""},
                    {"role": "user", "content": f"Go on with part {turn + 2}."},
                ]

        def chat_lines() -> list[dict[str, Any]]:
            return [line for line in node.request_lines() if line.get("path") == "/v1/chat/completions"]

        await waiting.eventually(lambda: len(chat_lines()) == 24, within_s=10)  # the log writer batches lines
        served = chat_lines()
        by_conversation = [{line["instance"] for line in served[n::8]} for n in range(8)]
        assert all(len(instances) == 1 for instances in by_conversation), by_conversation
        assert len(set().union(*by_conversation)) == 2, "the conversations all landed on one instance"
        assert [line["affinity"] for line in served[8:]] == ["hit"] * 16
        assert all(tokens > 300 for tokens in cached), cached  # each follow-up reused its history
        assert await node.metric("proxy_affinity_total", result="hit") == 16


@contextlib.asynccontextmanager
async def evicting(
    tmp_path: Path, binary: Path, chat_model: Path, *, extra_args: str = ""
) -> AsyncIterator[tuple[Node, Path]]:
    """`llamesh serve` with one single-slot profile whose instance stops after 2 idle seconds, and `kv_cache`
    on in the folder it yields with the node."""
    cookbook = f"""
models:
  - name: tiny
    profiles:
      - id: default
        model_path: {chat_model}
        llama_server_args: "-c 2048 -np 1{extra_args}"
        idle_timeout_seconds: 2
"""
    kv = tmp_path / "kv"
    settings = {"kv_cache": {"enabled": True, "directory": str(kv), "min_cached_tokens": 256}}
    async with serving(tmp_path, binary, cookbook, **settings) as node:
        yield node, kv


async def a_turn_then_eviction(
    node: Node, kv: Path, *, opening: str, follow_up: str
) -> tuple[ChatCompletion, list[ChatCompletionMessageParam]]:
    """The first turn of a conversation (`opening` twelve times), then its instance stopped for idleness with
    its slot saved; the first answer, and the history with `follow_up` for the next turn."""
    history: list[ChatCompletionMessageParam] = [{"role": "user", "content": opening * 12}]
    first = await node.client.chat.completions.create(model="tiny", messages=history, max_tokens=4)
    history += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": follow_up},
    ]

    def evicted_and_saved() -> bool:
        return node.llama_ports() == [] and any(kv.glob("*/*.slot*.bin"))

    await waiting.eventually(evicted_and_saved, within_s=60)
    return first, history


async def test_an_evicted_instance_s_cache_is_restored_for_the_next_turn(
    tmp_path: Path, llama_server_binary: Path, chat_model: Path
) -> None:
    async with evicting(tmp_path, llama_server_binary, chat_model) as (node, kv):
        first, history = await a_turn_then_eviction(
            node, kv, opening="Describe the harbour, its ships and their cargo in detail. ",
            follow_up="What happens at night?",
        )  # fmt: skip
        cold_prompt = timings(first)["prompt_n"]
        assert cold_prompt > 600
        assert await node.metric("proxy_kv_cache_saves_total") == 1

        second = await node.client.chat.completions.create(model="tiny", messages=history, max_tokens=4)
        warm = timings(second)
        assert warm["cache_n"] >= cold_prompt and warm["prompt_n"] < cold_prompt // 10, warm  # only the new turn
        assert not any(kv.glob("*/*.slot*.bin"))  # the file moved into the new instance
        assert await node.metric("proxy_kv_cache_restores_total", result="restored") == 1
        assert await node.metric("proxy_kv_cache_restores_total", result="failed") == 0
        assert await node.metric("proxy_kv_cache_restores_total", result="unused") == 0
        assert await node.metric("proxy_affinity_cache_total", result="reused") == 1  # the restored turn


async def test_a_restored_cache_that_llama_server_does_not_use_is_counted(
    tmp_path: Path, llama_server_binary: Path, chat_model: Path
) -> None:
    # --no-cache-prompt: llama-server loads the saved slot, then reads every prompt from scratch anyway,
    # as a sliding-window model without --swa-full does with a restored slot
    async with evicting(tmp_path, llama_server_binary, chat_model, extra_args=" --no-cache-prompt") as (node, kv):
        _, history = await a_turn_then_eviction(
            node, kv, opening="List the lighthouses of the northern coast, one by one. ",
            follow_up="Which is the oldest?",
        )  # fmt: skip
        second = await node.client.chat.completions.create(model="tiny", messages=history, max_tokens=4)
        assert timings(second)["cache_n"] == 0  # served from a cold prompt, as if nothing had been saved
        assert await node.metric("proxy_kv_cache_restores_total", result="restored") == 1
        assert await node.metric("proxy_kv_cache_restores_total", result="unused") == 1

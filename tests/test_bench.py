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
  every mode's output is JSON;
- the CPU window: run.py's load runner with `--sync` samples the relay and the upstream behind it around the
  measured requests (CPU was spent by both, the result follows the events);
- the report's CPU arithmetic: CPU ms per 1,000 requests and per 100,000 tokens per run, medians over runs,
  the gateway / relay CPU check's verdict either way, and the table's rows;
- instructions.py: callgrind's dump files read per phase and thread, the idle window netted out, and the
  whole tool against the relay under valgrind.

Not covered: llamesh's gateway (bench/run.py measures it) and whether any number meets DESIGN.md's budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
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


def bench_modules(monkeypatch: pytest.MonkeyPatch, *names: str) -> list[ModuleType]:
    """bench/ scripts that import each other by name (run.py imports servers and report), for one test."""
    modules = []
    for name in names:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)  # before it runs: its dataclasses look themselves up there
        spec.loader.exec_module(module)
        modules.append(module)
    return modules


@dataclass(frozen=True)
class Targets:
    direct: str
    relay: str
    direct_pid: int
    relay_pid: int

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
    async with fake_upstream(tmp_path, FAKE_UPSTREAM_TOKENS=str(TOKENS)) as (direct_url, direct):
        relay_port = processes.free_port()
        relay_argv = [sys.executable, str(BENCH / "bare_relay.py"), "--port", str(relay_port), "--upstream", direct_url]
        relay = processes.start(relay_argv, log_path=tmp_path / "relay.log")
        relay_url = f"http://{HOST}:{relay_port}"
        try:
            await wait_relaying(relay_url, relay)
            yield Targets(direct=direct_url, relay=relay_url, direct_pid=direct.pid, relay_pid=relay.pid)
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


# --- CPU time over the measured window --------------------------------------------------------------------------


@shared_loop
async def test_load_runner_samples_cpu_around_the_measured_window(
    targets: Targets, monkeypatch: pytest.MonkeyPatch
) -> None:
    servers, _, run = bench_modules(monkeypatch, "servers", "report", "run")
    relay = SimpleNamespace(pid=targets.relay_pid)  # all a CpuWindow needs of a server
    window = servers.CpuWindow(relay, lambda: [targets.direct_pid])
    options = ("--concurrency", "4", "--duration", "1", "--warmup-s", "0.2")
    result = await run.LoadRunner(None).run(targets.relay, "throughput", *options, timeout_s=60, window=window)
    assert result["mode"] == "throughput"
    assert result["requests"] > 0
    assert result["errors"] == 0, result["first_error"]
    assert window.server_s > 0
    assert window.upstream_s > 0
    assert window.result() == {
        "server_s": window.server_s,
        "upstream_s": window.upstream_s,
        "upstream_pids": [targets.direct_pid],
    }


@shared_loop
async def test_sync_without_a_warm_up_still_announces_the_window(targets: Targets) -> None:
    """The caller's line is awaited even with no warm-up; events come in order, the result last."""
    options = ("--concurrency", "2", "--duration", "0.5", "--warmup-s", "0", "--sync")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BENCH / "load.py"),
        *("--url", targets.direct, "--mode", "stream", *options),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(b"go\n"), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    warm, measured, result = (json.loads(line) for line in out.decode().splitlines())
    assert (warm, measured) == ({"event": "warm"}, {"event": "measured"})
    assert result["tokens"] == result["streams"] * TOKENS > 0


def report_results(relay_cpu_s: list[float], gateway_cpu_s: list[float]) -> Json:
    """A results dictionary as run.py fills it in: three rounds, 10,000 requests and 200,000 tokens per run."""

    def throughput(cpu_s: float | None, upstream_s: float | None) -> Json:
        cpu = None if cpu_s is None else {"server_s": cpu_s, "upstream_s": upstream_s, "upstream_pids": []}
        return {"requests": 10_000, "requests_per_s": 1000.0, "errors": 0, "first_error": None, "cpu": cpu}

    def stream(cpu_s: float) -> Json:
        cpu = {"server_s": cpu_s, "upstream_s": None, "upstream_pids": []}
        return {"tokens": 200_000, "tokens_per_s": 20_000.0, "errors": 0, "first_error": None, "cpu": cpu}

    latency = {"p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0, "errors": 0, "first_error": None}
    runs = {
        "direct": {
            "throughput": [throughput(1.0, None)] * 3,
            "latency": [latency] * 3,
            "stream": [stream(0.5)] * 3,
        },
        "relay": {
            "throughput": [throughput(cpu_s, 1.0) for cpu_s in relay_cpu_s],
            "latency": [latency] * 3,
            "stream": [stream(cpu_s) for cpu_s in relay_cpu_s],
        },
        "gateway": {
            "throughput": [throughput(cpu_s, 1.5) for cpu_s in gateway_cpu_s],
            "latency": [latency] * 3,
            "stream": [stream(cpu_s) for cpu_s in gateway_cpu_s],
        },
    }
    return {
        "plan": {"concurrency": 32, "open_streams": 256, "rounds": 3},
        "environment": {"load_cpus": None, "server_cpus": None},
        "runs": runs,
        "rss": {},
        "scale_from_zero": [],
    }


def test_report_derives_cpu_per_work_and_checks_gateway_against_relay() -> None:
    report = load_module("report")
    assert report.cpu_ms_per(2.0, 10_000, 1_000) == 200.0
    assert report.cpu_ms_per(0.5, 200_000, 100_000) == 250.0
    assert report.cpu_ms_per(None, 10_000, 1_000) is None
    assert report.cpu_ms_per(1.0, 0, 1_000) is None  # no work done: no figure rather than a division by zero

    results = report_results(relay_cpu_s=[3.0, 2.0, 4.0], gateway_cpu_s=[4.5, 3.6, 3.0])
    report.summarize(results)
    medians = results["medians"]
    assert medians["relay"]["cpu_ms_per_1k_requests"] == 300.0  # 2, 3, 4 s over 10,000 requests
    assert medians["gateway"]["cpu_ms_per_1k_requests"] == 360.0
    assert medians["relay"]["cpu_ms_per_100k_tokens"] == 1500.0  # 3 s over 200,000 tokens
    assert medians["relay"]["upstream_cpu_ms_per_1k_requests"] == 100.0
    assert medians["gateway"]["upstream_cpu_ms_per_1k_requests"] == 150.0
    assert medians["direct"]["upstream_cpu_ms_per_1k_requests"] is None
    assert medians["direct"]["upstream_cpu_ms_per_100k_tokens"] is None
    (cpu_check,) = [item for item in results["checks"] if item["name"].startswith("CPU per 1,000 requests")]
    assert cpu_check["measured"] == pytest.approx(1.2)
    assert (cpu_check["comparison"], cpu_check["limit"], cpu_check["passed"]) == ("<=", 1.3, True)

    table = report.render(results)
    assert "CPU ms per 1,000 requests, server process" in table
    assert "CPU ms per 100,000 tokens, server process" in table
    assert "1.20 x" in table and "<= 1.3 x  PASS" in table
    assert "CPU per 100,000 streamed tokens, gateway / bare relay: 1.20 x" in table

    costly = report_results(relay_cpu_s=[2.0, 2.0, 2.0], gateway_cpu_s=[3.0, 3.0, 3.0])
    report.summarize(costly)
    (cpu_check,) = [item for item in costly["checks"] if item["name"].startswith("CPU per 1,000 requests")]
    assert cpu_check["measured"] == pytest.approx(1.5)
    assert cpu_check["passed"] is False


def test_stream_windows_merge_into_tokens_over_seconds_with_cpu_summed() -> None:
    report = load_module("report")

    def window(tokens: int, seconds: float, server_s: float, upstream_s: float | None, error: str | None) -> Json:
        cpu = {"server_s": server_s, "upstream_s": upstream_s, "upstream_pids": [7] if upstream_s else []}
        return {
            **{"mode": "stream", "concurrency": 32, "streams": tokens // 64, "tokens": tokens, "seconds": seconds},
            **{"errors": int(error is not None), "first_error": error, "tokens_per_s": tokens / seconds},
            **{"tokens_per_stream_min": 64, "tokens_per_stream_max": 64, "cpu": cpu},
        }

    fast, slow = window(128_000, 2.0, 0.9, 1.1, None), window(64_000, 2.0, 1.0, 1.0, "reset")
    merged = report.merge_windows([fast, slow])
    # the rate of the whole, not the mean of the rates (which would weigh a window by its rate)
    assert merged["tokens_per_s"] == 48_000.0 and merged["tokens"] == 192_000 and merged["seconds"] == 4.0
    assert merged["streams"] == 3000 and (merged["errors"], merged["first_error"]) == (1, "reset")
    assert merged["cpu"] == {"server_s": pytest.approx(1.9), "upstream_s": pytest.approx(2.1), "upstream_pids": [7]}
    assert merged["windows"] == [fast, slow]
    # direct has no upstream: its upstream CPU stays unknown; a window without a CPU window leaves it all out
    assert report.merge_windows([window(64_000, 2.0, 1.0, None, None)] * 2)["cpu"]["upstream_s"] is None
    assert report.merge_windows([fast, {**slow, "cpu": None}])["cpu"] is None
    with pytest.raises(ValueError):
        report.merge_windows([])
    # throughput windows: requests over seconds
    through = [
        {"mode": "throughput", "concurrency": 32, "requests": n, "seconds": 2.0, "errors": 0, "first_error": None}
        for n in (6000, 10_000)
    ]
    merged_through = report.merge_windows(through)
    assert merged_through["requests_per_s"] == 4000.0 and merged_through["requests"] == 16_000
    assert merged_through["cpu"] is None and "tokens" not in merged_through
    # a merged round is what the report's medians and CPU figures read
    results = report_results(relay_cpu_s=[2.0] * 3, gateway_cpu_s=[2.0] * 3)
    results["runs"]["gateway"]["stream"] = [merged] * 3
    report.summarize(results)
    assert results["medians"]["gateway"]["tokens_per_s"] == 48_000.0
    assert results["medians"]["gateway"]["cpu_ms_per_100k_tokens"] == pytest.approx(1.9e3 * 100_000 / 192_000)


async def test_rounds_interleave_the_throughput_and_stream_windows_across_targets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _servers, _report, run = bench_modules(monkeypatch, "servers", "report", "run")
    calls: list[tuple[str, str]] = []

    class Recording:
        async def run(self, url: str, mode: str, *options: str, window: object = None) -> Json:
            calls.append((url, mode))
            if mode == "latency":
                return {"p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0, "errors": 0, "first_error": None}
            duration = float(options[options.index("--duration") + 1])
            if mode == "throughput":
                return {
                    **{"mode": "throughput", "concurrency": 32, "requests": 100, "seconds": duration},
                    **{"requests_per_s": 100 / duration, "errors": 0, "first_error": None},
                }
            return {
                **{"mode": "stream", "concurrency": 32, "streams": 1, "tokens": 64, "seconds": duration},
                **{"errors": 0, "first_error": None, "tokens_per_s": 64 / duration},
                **{"tokens_per_stream_min": 64, "tokens_per_stream_max": 64},
            }

    targets = {name: SimpleNamespace(url=name, pid=0) for name in ("direct", "relay", "gateway")}
    monkeypatch.setattr(run, "cpu_window", lambda target, targets: None)
    plan = dataclasses.replace(run.QUICK, rounds=2, windows=4, stream_s=0.4, throughput_s=0.8, settle_s=0.0)
    runs = await run.run_rounds(Recording(), targets, plan)
    d, r, g = "direct", "relay", "gateway"
    # latency target after target; throughput, then streaming, in windows: round 1 starts at direct, round 2
    # at relay, and within a round each window starts one target further on
    assert calls[:3] == [(d, "latency"), (r, "latency"), (g, "latency")]
    for mode in ("throughput", "stream"):
        order = [url for url, called in calls if called == mode]
        assert order[:12] == [d, r, g, r, g, d, g, d, r, d, r, g] and order[12:15] == [r, g, d]
    assert [mode for _, mode in calls[:27]] == ["latency"] * 3 + ["throughput"] * 12 + ["stream"] * 12
    for name in targets:
        assert len(runs[name]["latency"]) == 2
        merged = runs[name]["stream"]
        assert len(merged) == 2 and all(len(round_["windows"]) == 4 for round_ in merged)
        assert merged[0]["seconds"] == pytest.approx(0.4) and merged[0]["tokens"] == 4 * 64
        through = runs[name]["throughput"][0]
        assert len(through["windows"]) == 4 and through["requests"] == 400
        assert through["requests_per_s"] == pytest.approx(400 / 0.8)
    assert run.rotated(["a", "b", "c"], 4) == ["b", "c", "a"] and run.rotated([], 3) == []


def test_report_without_cpu_figures_says_not_available() -> None:
    """Runs without a CPU window (an older results file) give no CPU figures and no verdict, not an error."""
    report = load_module("report")
    results = report_results(relay_cpu_s=[2.0] * 3, gateway_cpu_s=[2.0] * 3)
    for modes in results["runs"].values():
        for run in modes["throughput"]:
            run["cpu"] = None
    report.summarize(results)
    (cpu_check,) = [item for item in results["checks"] if item["name"].startswith("CPU per 1,000 requests")]
    assert cpu_check["measured"] is None and cpu_check["passed"] is None
    assert results["medians"]["gateway"]["cpu_ms_per_1k_requests"] is None


def test_report_with_peers_adds_their_columns_and_ratios_to_the_relay() -> None:
    report = load_module("report")
    results = report_results(relay_cpu_s=[2.0] * 3, gateway_cpu_s=[2.4] * 3)
    relay_runs = results["runs"]["relay"]
    results["runs"]["nginx"] = {
        "throughput": [{**run, "requests_per_s": 1500.0} for run in relay_runs["throughput"]],
        "latency": relay_runs["latency"],
        "stream": [{**run, "tokens_per_s": 10_000.0} for run in relay_runs["stream"]],
    }
    report.summarize(results)
    assert report.targets_in(results) == ("direct", "relay", "gateway", "nginx")
    assert results["medians"]["nginx"]["requests_per_s"] == 1500.0
    table = report.render(results)
    assert table.splitlines()[0].split() == ["direct", "relay", "gateway", "nginx"]
    assert "nginx / bare relay: non-streaming req/s 1.50 x, streaming tokens/s 0.50 x" in table
    assert "litellm" not in table  # not measured, not shown


def test_generate_counts_only_events_with_content() -> None:
    load = load_module("load")
    chunk = 'data: {"choices":[{"delta":{%s},"index":0}],"object":"chat.completion.chunk"}'
    lines = [
        (chunk % '"role":"assistant","content":null').encode(),
        (chunk % '"content":"Once"').encode(),
        (chunk % '"content":" upon"').encode(),
        (chunk % '"content":""').encode(),
        b'data: {"choices":[{"delta":{},"finish_reason":"length","index":0}],"usage":{"completion_tokens":2}}',
        b"data: [DONE]",
    ]
    assert load.content_tokens(lines) == 2
    body = json.loads(load.generate_body("m", max_tokens=64))
    assert (body["stream"], body["max_tokens"], body["ignore_eos"], body["temperature"]) == (True, 64, True, 0)


@shared_loop
async def test_generate_alternates_two_targets_stream_by_stream(targets: Targets) -> None:
    """The paired TTFT measurement (bench/real.py): each worker alternates, half of them starting with each
    target, so both get the same number of streams and each stream's TTFT is filed under its target."""
    options = ("--model", "bench", "--concurrency", "2", "--streams", "3", "--max-tokens", "4")
    *_, result = await run_load(targets.direct, "generate", *options, "--alt-url", targets.relay)
    assert result["errors"] == 0, result["first_error"]
    assert (len(result["ttft_ms"]), len(result["alt_ttft_ms"])) == (3, 3)
    assert result["tokens"] == 6 * 4
    assert len(result["stream_rates"]) == len(result["alt_stream_rates"]) == 3  # each stream's tokens/s, in order
    assert all(rate > 0 for rate in result["stream_rates"] + result["alt_stream_rates"])
    assert all(ttft > 0 for ttft in result["ttft_ms"] + result["alt_ttft_ms"])
    # --together: concurrency / 2 workers, each sending its pair at once, pair after pair (aligned lists)
    options = ("--model", "bench", "--concurrency", "4", "--streams", "3", "--max-tokens", "4")
    *_, result = await run_load(targets.direct, "generate", *options, "--alt-url", targets.relay, "--together")
    assert result["errors"] == 0, result["first_error"]
    assert (len(result["ttft_ms"]), len(result["alt_ttft_ms"])) == (6, 6)
    assert result["tokens"] == 12 * 4


def test_real_paired_difference_and_its_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's median TTFT minus direct's, with a bootstrap interval that holds the point estimate,
    narrows with more samples, and ignores streams without a first token (NaN); the check judges it."""
    _servers, real = bench_modules(monkeypatch, "servers", "real")
    direct = [20.0 + (index % 5) * 0.5 for index in range(40)]  # median 21.0
    gateway = [value + 1.5 for value in direct] + [float("nan")]
    few, many = real.paired_difference(direct[:10], gateway[:10]), real.paired_difference(direct, gateway)
    assert many["added_ms"] == pytest.approx(1.5) and many["samples"] == [40, 40]
    low, high = many["interval_ms"]
    assert low <= 1.5 <= high
    assert high - low <= few["interval_ms"][1] - few["interval_ms"][0]
    assert real.paired_difference([], gateway)["added_ms"] is None
    # together: the median of the pairs' own differences (pairs with a failed stream left out)
    noisy = [20.0 + 30.0 * (index % 3) for index in range(40)]  # which batch step a pair joined: +0/+30/+60
    shifted = [*(value + 0.5 for value in noisy), float("nan")]
    together = real.paired_difference([*noisy, 21.0], shifted, together=True)
    assert together["added_ms"] == pytest.approx(0.5) and together["samples"] == [40, 40]
    assert together["interval_ms"] == [pytest.approx(0.5), pytest.approx(0.5)]  # the spread cancels pair by pair
    late = real.paired_difference([20.0] * 9 + [20.0], [20.5] * 9 + [50.5], together=True)  # one pair a step apart
    assert late["added_ms"] == pytest.approx(0.5) and late["mean_added_ms"] == pytest.approx(3.5)
    runs = [
        {"target": target, "round": 0, "concurrency": 1, "tokens_per_s": 100.0, "ttft_ms": [ttft], "tokens": 64,
         "errors": 0, "relay_cpu_s": 0.01, "llama_cpu_s": 1.0}
        for target, ttft in (("direct", 20.0), ("relay", 30.0), ("gateway", 60.0))
    ]  # fmt: skip
    paired = [{"concurrency": 1, "direct_ttft_ms": direct, "gateway_ttft_ms": gateway, "errors": 0}]
    results: Json = {"runs": runs, "paired": paired, "rounds": 1, "tokens": 64}
    real.summarize(results, concurrencies=[1])
    verdicts = {item["name"]: (item["measured"], item["passed"]) for item in results["checks"]}
    # the separate runs said +40 ms; the verdict is the paired figure's
    assert verdicts["1 streams: added time to first token, ms"] == (pytest.approx(1.5), True)
    assert "95% interval" in real.render(results)


def test_real_summary_compares_gateway_with_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/real.py's arithmetic: tokens/s against direct as the ratio of medians and round by round (the
    verdict's), the added median TTFT, and the issue's verdicts."""
    _servers, real = bench_modules(monkeypatch, "servers", "real")

    def run(target: str, concurrency: int, tokens_per_s: float, ttft: list[float], round_index: int = 0) -> Json:
        return {
            "target": target,
            "round": round_index,
            "concurrency": concurrency,
            "tokens_per_s": tokens_per_s,
            "ttft_ms": ttft,
            "tokens": 640,
            "errors": 0,
            "relay_cpu_s": 0.064,
            "llama_cpu_s": 6.4,
        }

    runs = [
        *(run("direct", 1, rate, [20.0, 22.0, 21.0], i) for i, rate in enumerate((100.0, 110.0, 90.0))),
        *(run("relay", 1, rate, [20.5], i) for i, rate in enumerate((100.0, 100.0, 100.0))),
        *(run("gateway", 1, rate, [21.0, 22.5, 22.0], i) for i, rate in enumerate((99.0, 108.0, 80.0))),
        *(run("direct", 4, rate, [40.0], i) for i, rate in enumerate((200.0, 200.0, 200.0))),
        *(run("relay", 4, rate, [41.0], i) for i, rate in enumerate((196.0, 196.0, 196.0))),
        *(run("gateway", 4, rate, [45.0], i) for i, rate in enumerate((190.0, 190.0, 190.0))),
    ]
    results: Json = {"runs": runs, "rounds": 3, "tokens": 64}
    real.summarize(results, concurrencies=[1, 4])
    one, four = results["table"]["1"], results["table"]["4"]
    assert one["gateway"]["ratio"] == pytest.approx(99.0 / 100.0)  # the medians' ratio, rounds unpaired
    # round by round: 0.99, 108/110 = 0.982, 80/90 = 0.889; the median passes where the worst round does not
    assert one["gateway"]["round_ratios"] == pytest.approx([0.99, 108 / 110, 80 / 90])
    assert one["gateway"]["round_ratio"] == pytest.approx(108 / 110)
    low, high = one["gateway"]["round_ratio_interval"]
    assert 80 / 90 <= low <= 108 / 110 <= high <= 0.99
    assert one["relay"]["round_ratios"] == pytest.approx([1.0, 100 / 110, 100 / 90])
    assert one["gateway"]["added_ttft_ms"] == pytest.approx(1.0)  # medians of the runs' medians: 22.0 - 21.0
    assert one["relay"]["added_ttft_ms"] == pytest.approx(-0.5)
    assert one["gateway"]["cpu_ms_per_100_tokens"] == pytest.approx(10.0)
    assert four["gateway"]["ratio"] == pytest.approx(0.95) and four["gateway"]["added_ttft_ms"] == pytest.approx(5.0)
    assert four["relay"]["ratio"] == pytest.approx(0.98)
    verdicts = {item["name"]: item["passed"] for item in results["checks"]}
    assert verdicts == {
        "1 streams: tokens/s, gateway / direct": True,
        "1 streams: added time to first token, ms": True,
        "4 streams: tokens/s, gateway / direct": False,
        "4 streams: added time to first token, ms": False,
    }
    assert "FAIL" in real.render(results)


def test_real_one_stream_tokens_per_second_paired_stream_by_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/real.py's paired tokens/s: each gateway stream over the mean of the direct streams on either side
    of it, so a drift over the run cancels; failed streams (NaN) are left out; at one stream the check judges
    this figure instead of the separate runs' per-round one."""
    _servers, real = bench_modules(monkeypatch, "servers", "real")
    # the machine slows down steadily by 1 token/s per stream; the gateway costs 2% throughout
    direct = [100.0 - 2 * index for index in range(20)]
    gateway = [0.98 * (99.0 - 2 * index) for index in range(20)]
    paired = real.paired_rate_ratio(direct, gateway)
    assert paired["ratio"] == pytest.approx(0.98) and paired["pairs"] == 20
    unpaired = statistics.median(gateway) / statistics.median(direct)
    assert unpaired < 0.98 - 0.005  # the drift alone, compared whole, makes it look worse
    assert real.paired_rate_ratio([100.0, float("nan")], [99.0, float("nan")])["pairs"] == 1
    runs = [
        {"target": target, "round": 0, "concurrency": 1, "tokens_per_s": rate, "ttft_ms": [20.0], "tokens": 64,
         "errors": 0, "relay_cpu_s": 0.01, "llama_cpu_s": 1.0}
        for target, rate in (("direct", 100.0), ("relay", 100.0), ("gateway", 90.0))
    ]  # fmt: skip
    paired_rates = {"1": {"direct": direct, "gateway": gateway}}
    results: Json = {"runs": runs, "rounds": 1, "tokens": 64, "paired_rates": paired_rates}
    real.summarize(results, concurrencies=[1])
    verdicts = {item["name"]: (item["measured"], item["passed"]) for item in results["checks"]}
    # the separate run said 0.90; the verdict is the paired figure's
    assert verdicts["1 streams: tokens/s, gateway / direct"] == (pytest.approx(0.98), True)
    assert "gateway / direct, paired, 1 streams: 0.9800" in real.render(results)


@shared_loop
async def test_nginx_config_relays_streams_whole(
    targets: Targets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run.py --nginx's configuration in front of the fake upstream: every stream arrives whole (no buffering
    cuts, keep-alive upstream). Skipped where nginx is not installed: tests install nothing."""
    (servers,) = bench_modules(monkeypatch, "servers")
    binary = servers.find_nginx()
    if binary is None:
        pytest.skip("nginx is not installed (run.py --nginx installs it)")
    port = processes.free_port()
    upstream_port = int(targets.direct.rpartition(":")[2])
    config_path = servers.nginx_config(tmp_path / "nginx", port=port, upstream_port=upstream_port)
    nginx = processes.start(servers.nginx_argv(binary, config_path), log_path=tmp_path / "nginx.log")
    try:
        url = f"http://{HOST}:{port}"
        await wait_relaying(url, nginx)
        (result,) = await run_load(url, "stream", "--concurrency", "4", "--duration", "0.5", "--warmup-s", "0")
        assert result["errors"] == 0 and result["streams"] > 0
        assert result["tokens_per_stream_min"] == result["tokens_per_stream_max"] == TOKENS
    finally:
        await processes.stop(nginx)


def test_hotspots_reads_py_spy_raw_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/hotspots.py's summary of py-spy's raw format: self samples go to the leaf, inclusive ones to
    every frame of the stack once, line numbers are folded."""
    _report, _servers, _run, hotspots = bench_modules(monkeypatch, "report", "servers", "run", "hotspots")
    raw = "\n".join(
        [
            "main (a.py:1);serve (b.py:10);send (c.py:5) 6",
            "main (a.py:1);serve (b.py:12);send (c.py:7) 3",
            "main (a.py:1);serve (b.py:12) 1",
            "",
        ]
    )
    total, own, within = hotspots.top_frames(raw, 2)
    assert total == 10
    assert own == [("send (c.py)", 9), ("serve (b.py)", 1)]
    assert within == [("main (a.py)", 10), ("serve (b.py)", 10)]


def test_instructions_reads_callgrind_dumps_and_nets_out_the_idle_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/instructions.py: each dump file's trigger, thread and total; per request, a thread's count over
    the requests less its count over the idle window; per stream, uncorrected."""
    _servers, instructions = bench_modules(monkeypatch, "servers", "instructions")
    dumps = []
    for trigger, thread, total in [("requests", 1, 9_000), ("requests", 2, 600), ("idle", 1, 1_000), ("idle", 2, 100)]:
        dump = tmp_path / f"callgrind.out.{len(dumps)}-0{thread}"
        dump.write_text(f"version: 1\nthread: {thread}\ndesc: Trigger: dump {trigger}\nevents: Ir\ntotals: {total}\n")
        dumps.append(dump)
    dumps.append(tmp_path / "callgrind.out.9-01")
    dumps[-1].write_text("version: 1\nthread: 1\ndesc: Trigger: dump streams\ntotals: 50000\n")
    counts = instructions.read_dumps(dumps)
    assert counts == {"requests": {1: 9_000, 2: 600}, "idle": {1: 1_000, 2: 100}, "streams": {1: 50_000}}
    result = instructions.per_request(counts, requests=10, streams=5)
    assert result["per_request"] == {1: 800.0, 2: 50.0} and result["per_request_total"] == 850.0
    assert result["per_stream"] == {1: 10_000.0, 2: 0.0}


async def test_instructions_counts_the_relay_under_callgrind(tmp_path: Path) -> None:
    """The whole tool against the bare relay (quick under valgrind): every request answered, the event
    loop's thread counted, and a 64-token stream costing it more than one non-streamed answer."""
    out = tmp_path / "instructions.json"
    argv = [sys.executable, str(BENCH / "instructions.py"), "--target", "relay", "--requests", "20", "--streams", "3"]
    process = await asyncio.create_subprocess_exec(
        *argv, "--out", str(out), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), 600)
    assert process.returncode == 0, output.decode()[-2000:]
    result = json.loads(out.read_text())
    assert result["errors"] == 0
    loop_thread = result["per_request"]["1"]
    assert loop_thread > 10_000  # a request through a Python relay is tens of thousands of instructions at least
    assert result["per_stream"]["1"] > loop_thread

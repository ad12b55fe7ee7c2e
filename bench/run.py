"""The benchmark: llamesh's gateway against a bare relay and against no relay at all, in one run.

    .venv/bin/python bench/run.py [--quick] [--out results.json]

It starts the fake upstream (direct), the bare relay in front of it, and `llamesh serve` whose llama-server
is the fake upstream; warms the gateway up (its first request starts the instance); then, in rounds whose
target order rotates, runs the load generator (bench/load.py, a separate process) against each target:
latency at one connection, non-streaming throughput and streaming tokens/s (these two in short windows
interleaved across the targets, so that every target's figure spans the same stretch of the round), and
around the measured window of the throughput and streaming loads the CPU time of the server process (and
of the upstream behind it, for information), for CPU per 1,000 requests and per 100,000 streamed tokens.
Then the gateway's RSS while 256 streams are open, and scale-from-zero (first token after the spawned
upstream reported healthy).
Each metric is the median over the rounds. It prints a table, checks DESIGN.md's performance budget, and
writes everything, raw runs included, to a JSON file.

On a machine with at least two CPUs the load generator runs on the first and every server (with the
upstreams llamesh spawns) on the rest, so each target competes with the same load generator in the same way.
Deliberately no assertions: this is a measurement, not a test (`--fail-on-budget` makes FAIL an exit status).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import report
import servers


@dataclass(frozen=True)
class Plan:
    rounds: int
    concurrency: int
    throughput_s: float
    stream_s: float
    windows: int
    warmup_s: float
    latency_requests: int
    latency_warmup: int
    open_streams: int
    open_delay_ms: int
    hold_s: float
    cold_profiles: int
    tokens: int
    startup_ms: int
    settle_s: float


FULL = Plan(
    rounds=3,
    concurrency=32,
    throughput_s=8.0,
    stream_s=8.0,
    windows=4,
    warmup_s=1.0,
    latency_requests=2000,
    latency_warmup=200,
    open_streams=256,
    open_delay_ms=250,
    hold_s=4.0,
    cold_profiles=3,
    tokens=64,
    startup_ms=500,
    settle_s=0.5,
)
QUICK = Plan(
    rounds=1,
    concurrency=32,
    throughput_s=2.0,
    stream_s=2.0,
    windows=1,
    warmup_s=0.3,
    latency_requests=300,
    latency_warmup=50,
    open_streams=256,
    open_delay_ms=250,
    hold_s=2.0,
    cold_profiles=1,
    tokens=64,
    startup_ms=500,
    settle_s=0.2,
)


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class LoadRunner:
    """Runs bench/load.py as its own process, pinned to the load generator's CPUs."""

    def __init__(self, cpus: set[int] | None) -> None:
        self.cpus = cpus

    def argv(self, url: str, mode: str, *options: str) -> list[str]:
        return [sys.executable, str(servers.LOAD), "--url", url, "--mode", mode, *options]

    async def run(
        self, url: str, mode: str, *options: str, timeout_s: float = 600, window: servers.CpuWindow | None = None
    ) -> dict[str, Any]:
        """The load's JSON result; with `window`, that window is started and stopped around the measured requests.

        The load generator then runs with `--sync`: it says when the warm-up is over (nothing in flight), waits
        for this side to sample and answer, and says when the measured requests have all ended.
        """
        sync = ["--sync"] if window is not None else []
        process = await asyncio.create_subprocess_exec(
            *self.argv(url, mode, *options, *sync),
            stdin=asyncio.subprocess.PIPE if window is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        servers.pin(process.pid, self.cpus)
        try:
            lines, err = await asyncio.wait_for(self._follow(process, window), timeout_s)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        if process.returncode != 0 or not lines:
            raise servers.ServerError(f"load {mode} against {url} failed ({process.returncode}):\n{err.decode()}")
        return lines[-1]

    @staticmethod
    async def _follow(
        process: asyncio.subprocess.Process, window: servers.CpuWindow | None
    ) -> tuple[list[dict[str, Any]], bytes]:
        """Every stdout line, parsed, answering the `--sync` events as they come; and all of stderr."""
        assert process.stdout is not None and process.stderr is not None
        stderr = asyncio.create_task(process.stderr.read())
        lines: list[dict[str, Any]] = []
        async for raw in process.stdout:
            line: dict[str, Any] = json.loads(raw)
            lines.append(line)
            if window is not None and line.get("event") == "warm":
                window.start()
                assert process.stdin is not None
                process.stdin.write(b"go\n")
                await process.stdin.drain()
            elif window is not None and line.get("event") == "measured":
                window.stop()
        await process.wait()
        return lines, await stderr


async def open_streams_rss(load: LoadRunner, target: servers.Server, plan: Plan) -> dict[str, Any]:
    """Hold `plan.open_streams` streams open through `target` and sample its RSS meanwhile (peak, MiB)."""
    options = [
        *("--model", servers.MODEL, "--streams", str(plan.open_streams)),
        *("--delay-ms", str(plan.open_delay_ms), "--hold", str(plan.hold_s)),
    ]
    idle_mb = target.rss_mb()
    process = await asyncio.create_subprocess_exec(
        *load.argv(target.url, "open-streams", *options), stdout=asyncio.subprocess.PIPE
    )
    servers.pin(process.pid, load.cpus)
    assert process.stdout is not None
    event: dict[str, Any] = json.loads(await asyncio.wait_for(process.stdout.readline(), 120))
    samples = []
    sampling_until = time.monotonic() + plan.hold_s * 0.75
    while time.monotonic() < sampling_until:
        samples.append(target.rss_mb())
        await asyncio.sleep(0.1)
    out, _ = await process.communicate()
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return {"idle_rss_mb": idle_mb, "peak_rss_mb": max(samples), "open_event": event, "load": result}


async def scale_from_zero(
    load: LoadRunner, gateway: servers.Server, *, profile: str, healthy_file: Path
) -> dict[str, Any]:
    """One streamed request to a profile with no instance: its first token, minus when the upstream got healthy."""
    result = await load.run(gateway.url, "first-token", "--model", f"{servers.MODEL}:{profile}", timeout_s=180)
    healthy_at = healthy_stamp(healthy_file, profile=profile)
    first_token_ms = (result["first_token_at"] - healthy_at) * 1000 if healthy_at is not None else None
    return {
        "profile": profile,
        "first_token_after_healthy_ms": first_token_ms,
        "request_to_first_token_ms": (result["first_token_at"] - result["sent_at"]) * 1000,
        "healthy_at": healthy_at,
        "load": result,
    }


def healthy_stamp(healthy_file: Path, *, profile: str) -> float | None:
    """When the upstream of `profile` first answered /health with 200, as the fake upstream recorded it."""
    stamp = None
    for line in healthy_file.read_text().splitlines() if healthy_file.exists() else []:
        record = json.loads(line)
        if Path(record["model_path"]).name == f"{profile}.gguf":
            stamp = float(record["healthy_at"])
    return stamp


def cpu_split(enabled: bool) -> tuple[set[int] | None, set[int] | None]:
    """(load generator CPUs, server CPUs): the first CPU for load, the rest for servers; None = no pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled or len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def environment(load_cpus: set[int] | None, server_cpus: set[int] | None) -> dict[str, Any]:
    return {
        **servers.environment(("aiohttp", "uvloop", "llamesh")),
        "load_cpus": sorted(load_cpus) if load_cpus else None,
        "server_cpus": sorted(server_cpus) if server_cpus else None,
    }


async def measure(args: argparse.Namespace, plan: Plan, workdir: Path) -> dict[str, Any]:
    load_cpus, server_cpus = cpu_split(not args.no_pin)
    load = LoadRunner(load_cpus)
    ports = {target: servers.free_port() for target in report.TARGETS}
    cold_profiles = [f"cold-{index}" for index in range(1, plan.cold_profiles + 1)]
    healthy_file = workdir / "healthy.jsonl"
    config_path, cookbook_path = servers.write_llamesh_files(
        workdir / "llamesh", port=ports["gateway"], cold_profiles=cold_profiles
    )
    started: list[servers.Server] = []
    results: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_before": os.getloadavg(),
        "environment": environment(load_cpus, server_cpus),
        "plan": asdict(plan),
    }
    upstream_env = {"FAKE_UPSTREAM_TOKENS": str(plan.tokens), "FAKE_UPSTREAM_STARTUP_MS": "0"}
    try:
        direct = await servers.start(
            "direct",
            servers.fake_upstream_argv(ports["direct"]),
            url=f"http://{servers.HOST}:{ports['direct']}",
            log_dir=workdir,
            env=upstream_env,
            cpus=server_cpus,
        )
        started.append(direct)
        relay = await servers.start(
            "relay",
            servers.bare_relay_argv(ports["relay"], direct.url),
            url=f"http://{servers.HOST}:{ports['relay']}",
            log_dir=workdir,
            cpus=server_cpus,
        )
        started.append(relay)
        targets = {"direct": direct, "relay": relay}
        await servers.wait_answering(direct, "/health", deadline_s=30)
        await servers.wait_answering(relay, "/v1/chat/completions", deadline_s=30, method="POST")
        for peer in await start_peers(args, direct, workdir=workdir, cpus=server_cpus):
            started.append(peer)
            targets[peer.name] = peer
        if not args.skip_gateway:
            say("starting llamesh serve")
            gateway_env = {
                **upstream_env,
                "FAKE_UPSTREAM_STARTUP_MS": str(plan.startup_ms),
                "FAKE_UPSTREAM_HEALTHY_FILE": str(healthy_file),
            }
            gateway = await servers.start(
                "gateway",
                servers.llamesh_argv(config_path, cookbook_path),
                url=f"http://{servers.HOST}:{ports['gateway']}",
                log_dir=workdir,
                env=gateway_env,
                cpus=server_cpus,
            )
            started.append(gateway)
            targets["gateway"] = gateway
            await servers.wait_answering(gateway, "/healthz", deadline_s=60)
            say("warming up the gateway (its first request starts the instance)")
            await servers.wait_answering(gateway, "/v1/chat/completions", deadline_s=120, method="POST")
            servers.remember_descendants(gateway)
        results["runs"] = await run_rounds(load, targets, plan)
        results["rss"] = {}
        for name in ("relay", "gateway"):
            if name in targets:
                say(f"RSS of {name} with {plan.open_streams} open streams")
                results["rss"][name] = await open_streams_rss(load, targets[name], plan)
        results["scale_from_zero"] = []
        if "gateway" in targets:
            for profile in cold_profiles:
                say(f"scale-from-zero: {servers.MODEL}:{profile}")
                entry = await scale_from_zero(load, targets["gateway"], profile=profile, healthy_file=healthy_file)
                results["scale_from_zero"].append(entry)
        results["gateway_log_tail"] = targets["gateway"].log_tail(20) if "gateway" in targets else None
    finally:
        for server in reversed(started):
            await servers.stop(server)
    results["load_average_after"] = os.getloadavg()
    report.summarize(results)
    return results


async def start_peers(
    args: argparse.Namespace, direct: servers.Server, *, workdir: Path, cpus: set[int] | None
) -> list[servers.Server]:
    """nginx and the LiteLLM proxy in front of `direct`, as asked; each installed first if missing."""
    peers = []
    if args.nginx:
        binary = servers.ensure_nginx(say)
        port = servers.free_port()
        config_path = servers.nginx_config(
            workdir / "nginx", port=port, upstream_port=int(direct.url.rsplit(":", 1)[1])
        )
        nginx = await servers.start(
            "nginx",
            servers.nginx_argv(binary, config_path),
            url=f"http://{servers.HOST}:{port}",
            log_dir=workdir,
            cpus=cpus,
        )
        peers.append(nginx)
        await servers.wait_answering(nginx, "/v1/chat/completions", deadline_s=30, method="POST")
        servers.pin_group(nginx, cpus)  # its worker was forked before the master was pinned
    if args.litellm:
        command = await asyncio.to_thread(servers.ensure_litellm, say)
        port = servers.free_port()
        config_path = servers.litellm_config(workdir / "litellm", upstream_url=direct.url)
        litellm = await servers.start(
            "litellm",
            servers.litellm_argv(command, config_path, port),
            url=f"http://{servers.HOST}:{port}",
            log_dir=workdir,
            env=servers.LITELLM_ENV,
            cpus=cpus,
        )
        peers.append(litellm)
        say("waiting for the LiteLLM proxy (its start-up takes a while)")
        await servers.wait_answering(litellm, "/v1/chat/completions", deadline_s=240, method="POST")
        servers.pin_group(litellm, cpus)
    return peers


def cpu_window(target: str, targets: dict[str, servers.Server]) -> servers.CpuWindow:
    """The CPU window of `target`'s process; its upstream is direct's process (relay, nginx, LiteLLM) or its
    children (gateway). nginx and LiteLLM count with the processes under them (nginx's worker)."""
    server = targets[target]
    if target in ("relay", *report.PEERS):
        direct_pid = targets["direct"].pid
        return servers.CpuWindow(server, lambda: [direct_pid], group=target in report.PEERS)
    if target == "gateway":
        return servers.CpuWindow(server, lambda: servers.descendant_pids(server))
    return servers.CpuWindow(server, lambda: [])


async def run_rounds(load: LoadRunner, targets: dict[str, servers.Server], plan: Plan) -> dict[str, Any]:
    """Every measurement against every target, `plan.rounds` times; the target order rotates each round.

    Latency runs target after target. Throughput and streaming, whose rates on these shared cores move
    with the machine by more than the differences measured (direct's own streaming rate moved 119k-155k
    tokens/s between runs, the relay's CPU per request 116-226 us between rounds), run in `plan.windows`
    windows per target, interleaved across the targets (the order rotating per window too), so each
    target's figure for the round, its windows' requests or tokens over their seconds
    (`report.merge_windows`), spans the same stretch of the round as every other target's.
    Throughput and stream runs carry `cpu`: the CPU seconds of the target (and its upstream) over the
    measured window, warm-up excluded.
    """
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        target: {"throughput": [], "latency": [], "stream": []} for target in targets
    }
    names = list(targets)
    common = ["--model", servers.MODEL, "--concurrency", str(plan.concurrency), "--warmup-s", str(plan.warmup_s)]
    latency = [
        *("--model", servers.MODEL),
        *("--requests", str(plan.latency_requests), "--warmup", str(plan.latency_warmup)),
    ]
    windowed = {
        "throughput": [*common, "--duration", str(plan.throughput_s / plan.windows)],
        "stream": [*common, "--duration", str(plan.stream_s / plan.windows)],
    }

    async def measured(target: str, mode: str, options: list[str]) -> dict[str, Any]:
        await asyncio.sleep(plan.settle_s)  # let the previous run's connections close first
        window = cpu_window(target, targets) if mode != "latency" else None
        result = await load.run(targets[target].url, mode, *options, window=window)
        if window is not None:
            result["cpu"] = window.result()
        return result

    for round_index in range(plan.rounds):
        order = rotated(names, round_index)
        for target in order:
            say(f"round {round_index + 1}/{plan.rounds}: latency, {target}")
            runs[target]["latency"].append(await measured(target, "latency", latency))
        for mode, options in windowed.items():
            windows: dict[str, list[dict[str, Any]]] = {target: [] for target in names}
            for index in range(plan.windows):
                say(f"round {round_index + 1}/{plan.rounds}: {mode}, window {index + 1}/{plan.windows}")
                for target in rotated(order, index):
                    windows[target].append(await measured(target, mode, options))
            for target in names:
                runs[target][mode].append(report.merge_windows(windows[target]))
    return runs


def rotated(names: list[str], by: int) -> list[str]:
    """`names` starting at position `by` (modulo its length), wrapping around."""
    start = by % len(names) if names else 0
    return names[start:] + names[:start]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short smoke run (about 30 s)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: a new temporary file)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin load and servers to separate CPUs")
    parser.add_argument("--skip-gateway", action="store_true", help="measure only direct and relay")
    parser.add_argument("--nginx", action="store_true", help="also measure nginx (Debian's package) as a relay")
    parser.add_argument(
        "--litellm", action="store_true", help=f"also measure the LiteLLM proxy (venv {servers.LITELLM_VENV})"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (configs, server logs)")
    parser.add_argument("--fail-on-budget", action="store_true", help="exit 1 when a budget line is FAIL")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="llamesh-bench-"))
    try:
        results = asyncio.run(measure(args, plan, workdir))
    except servers.ServerError as exc:
        print(f"error: {exc}\n(work folder kept: {workdir})", file=sys.stderr)
        return 2
    if args.keep:
        say(f"work folder kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    out = servers.write_results(results, args.out, prefix="llamesh-bench-")
    print(report.render(results))
    print(f"load average before {results['load_average_before']}, after {results['load_average_after']}")
    print(f"results: {out}")
    failed = any(item["passed"] is False for item in results["checks"])
    return 1 if failed and args.fail_on_budget else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The mesh's cost: one forwarding hop between two `llamesh serve` nodes, against asking the owner directly.

    .venv/bin/python bench/mesh.py [--noise] [--requests 1000] [--duration 10] [--concurrency 16] [--json out.json]

Two nodes on loopback, both `llamesh serve` with the cluster on (gossip every second, mDNS off): `owner`
serves the model `bench` (its llama-server is the fake upstream, as in bench/run.py), `front` serves another
model only, and knows `owner` from `cluster.peers`. A request for `bench` sent to `front` is forwarded one
hop to `owner`; the same request sent to `owner` is served there. With `--noise`, node-to-node traffic is
Noise_XX (the cluster token shared through the nodes' secret folders); without it, plain HTTP.

Measured with bench/load.py in its own process, owner first, then front, same settings:
- latency: sequential non-streaming requests on one connection -> p50/p90/p99; "added p50" is the difference;
- throughput: `--concurrency` connections back to back for `--duration` s -> requests/s, and the ratio.

Not measured: streaming token rates (the relay is the same code as the local path, measured in bench/run.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

import servers

TOKEN = "bench-mesh-cluster-token"


def say(message: str) -> None:
    print(f"[mesh {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_node(
    workdir: Path, *, node_id: str, port: int, peers: list[str], noise: bool, serves_bench: bool
) -> list[str]:
    """config.yaml and cookbook.yaml for one node (bench/servers.py's files, with the cluster on)."""
    config_path, cookbook_path = servers.write_llamesh_files(workdir, port=port, cold_profiles=[])
    secrets = workdir / "secrets"
    secrets.mkdir(mode=0o700, exist_ok=True)
    (secrets / "cluster_token").write_text(TOKEN)
    (secrets / "cluster_token").chmod(0o600)
    node = yaml.safe_load(config_path.read_text())
    node["node_id"] = node_id
    node["cluster"] = {
        "enabled": True,
        "peers": peers,
        "gossip_interval_seconds": 1,
        "discovery": {"mdns": False},
        "noise": {"enabled": noise, "config_dir": str(secrets)},
    }
    if not serves_bench:
        node["default_model"] = None
        cookbook = yaml.safe_load(cookbook_path.read_text())
        cookbook["models"][0]["name"] = "front-only"
        cookbook_path.write_text(yaml.safe_dump(cookbook, sort_keys=False))
    config_path.write_text(yaml.safe_dump(node, sort_keys=False))
    return servers.llamesh_argv(config_path, cookbook_path)


async def wait_listed(url: str, model: str, *, deadline_s: float) -> None:
    """Until `url`'s /v1/models lists `model` (the front node has heard the owner's gossip)."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < deadline_s:
            async with session.get(url + "/v1/models") as response:
                if model in [m["id"] for m in (await response.json())["data"]]:
                    return
            await asyncio.sleep(0.2)
    raise servers.ServerError(f"{url} did not list {model} within {deadline_s:.0f} s")


async def load(url: str, mode: str, *options: str) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, str(servers.LOAD), "--url", url, "--mode", mode, "--model", servers.MODEL, *options),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0 or not out.strip():
        raise servers.ServerError(f"load {mode} against {url} failed ({process.returncode}):\n{err.decode()}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


async def measure(arguments: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="llamesh-bench-mesh-") as scratch:
        root = Path(scratch)
        owner_port, front_port = servers.free_port(), servers.free_port()
        owner_url, front_url = f"http://{servers.HOST}:{owner_port}", f"http://{servers.HOST}:{front_port}"
        noise = arguments.noise
        owner_argv = write_node(
            root / "owner", node_id="owner", port=owner_port, peers=[front_url], noise=noise, serves_bench=True
        )
        front_argv = write_node(
            root / "front", node_id="front", port=front_port, peers=[owner_url], noise=noise, serves_bench=False
        )
        owner = await servers.start("owner", owner_argv, url=owner_url, log_dir=root)
        front = await servers.start("front", front_argv, url=front_url, log_dir=root)
        try:
            await servers.wait_answering(owner, "/v1/chat/completions", deadline_s=120, method="POST")
            await wait_listed(front_url, servers.MODEL, deadline_s=60)
            await servers.wait_answering(front, "/v1/chat/completions", deadline_s=60, method="POST")
            results: dict[str, Any] = {"noise": noise}
            for name, url in (("local", owner_url), ("one_hop", front_url)):
                say(f"{name}: latency, {arguments.requests} requests")
                results[f"{name}_latency"] = await load(
                    url, "latency", "--requests", str(arguments.requests), "--warmup", "100"
                )
                say(f"{name}: throughput, {arguments.concurrency} connections for {arguments.duration:g} s")
                results[f"{name}_throughput"] = await load(
                    url,
                    "throughput",
                    "--concurrency",
                    str(arguments.concurrency),
                    "--duration",
                    str(arguments.duration),
                )
        finally:
            await servers.stop(front)
            await servers.stop(owner)
    local, hop = results["local_latency"], results["one_hop_latency"]
    results["added_p50_ms"] = hop["p50_ms"] - local["p50_ms"]
    results["throughput_ratio"] = (
        results["one_hop_throughput"]["requests_per_s"] / results["local_throughput"]["requests_per_s"]
    )
    return results


def report(results: dict[str, Any]) -> str:
    rows = [f"mesh forwarding, Noise {'on' if results['noise'] else 'off'}"]
    for name in ("local", "one_hop"):
        latency, throughput = results[f"{name}_latency"], results[f"{name}_throughput"]
        rows.append(
            f"  {name:8} p50 {latency['p50_ms']:.2f} ms  p99 {latency['p99_ms']:.2f} ms  "
            f"{throughput['requests_per_s']:.0f} req/s  errors {latency['errors'] + throughput['errors']}"
        )
    rows.append(f"  added p50 {results['added_p50_ms']:.2f} ms; one hop at {results['throughput_ratio']:.0%} of local")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", action="store_true", help="node-to-node traffic over Noise_XX")
    parser.add_argument("--requests", type=int, default=1000, help="measured sequential requests (latency)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds (throughput)")
    parser.add_argument("--concurrency", type=int, default=16, help="connections (throughput)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    arguments = parser.parse_args()
    try:
        results = asyncio.run(measure(arguments))
    except servers.ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report(results))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""mDNS discovery between `llamesh serve` nodes that know nothing of each other (no `cluster.peers`).

Covers: two nodes, each in a network namespace this test makes (`ip netns`, a veth pair between them, a
multicast route), advertise `_llama-mesh._tcp.local`, find each other, and gossip over Noise with the
shared cluster token: each one's /cluster/nodes lists the other. Also, in this namespace on loopback, the
discovery module alone: two advertisers find each other's URLs from the TXT record.

Skipped, saying so, where `ip netns add` is not permitted (not root, no CAP_SYS_ADMIN).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml

from llamesh_proxy.mesh import discovery
from rig import processes, waiting

SERVICE = "_llama-mesh._tcp.local"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def namespaces() -> Iterator[tuple[str, str]]:
    """Two network namespaces joined by a veth pair: 10.77.0.1 and 10.77.0.2, multicast routed on it."""
    suffix = str(os.getpid() % 100000)
    names = (f"llm-a-{suffix}", f"llm-b-{suffix}")
    try:
        _ip("netns", "add", names[0])
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        reason = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        pytest.skip(f"cannot make a network namespace here (ip netns add: {reason}); mDNS is tested on loopback")
    try:
        try:
            _ip("netns", "add", names[1])
            _ip("link", "add", f"va{suffix}", "type", "veth", "peer", "name", f"vb{suffix}")
            pairs = ((names[0], f"va{suffix}", "10.77.0.1"), (names[1], f"vb{suffix}", "10.77.0.2"))
            for name, link, address in pairs:
                _ip("link", "set", link, "netns", name)
                _ip("-n", name, "addr", "add", f"{address}/24", "dev", link)
                _ip("-n", name, "link", "set", link, "up")
                _ip("-n", name, "link", "set", "lo", "up")
                _ip("-n", name, "route", "add", "224.0.0.0/4", "dev", link)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot join network namespaces with a veth pair here ({exc.stderr.strip()})")
        yield names
    finally:
        for name in names:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", name)


def node_files(folder: Path, *, node_id: str, address: str, binary: Path, model_file: Path) -> list[str]:
    folder.mkdir(parents=True)
    secrets = folder / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "cluster_token").write_text("mdns-shared-token")
    (secrets / "cluster_token").chmod(0o600)
    settings = {
        "node_id": node_id,
        "listen_addr": f"{address}:8080",
        "metrics_path": str(folder / "node-metrics.json"),
        "shutdown_grace_period_seconds": 2,
        "llama_cpp": {"enabled": False, "binary_path": str(binary), "cache_dir": str(folder / "cache")},
        "cluster": {
            "enabled": True,
            "gossip_interval_seconds": 1,
            "discovery": {"mdns": True},
            "noise": {"config_dir": str(secrets)},
        },
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(settings))
    cookbook = {"models": [{"name": node_id, "profiles": [{"id": "default", "model_path": str(model_file)}]}]}
    (folder / "cookbook.yaml").write_text(yaml.safe_dump(cookbook))
    llamesh = str(Path(sys.executable).parent / "llamesh")
    return [llamesh, "serve", "--config", str(folder / "config.yaml"), "--cookbook", str(folder / "cookbook.yaml")]


async def cluster_nodes(namespace: str, url: str) -> list[str]:
    """The peers node `url` lists in /cluster/nodes, asked from inside its namespace."""
    address = url + "/cluster/nodes"
    script = f"import urllib.request; print(urllib.request.urlopen({address!r}, timeout=5).read().decode())"
    child = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", namespace, sys.executable, "-c", script, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, _ = await child.communicate()
    if child.returncode != 0:
        return []
    return [node["node_id"] for node in json.loads(out)["nodes"]]


@contextlib.asynccontextmanager
async def started(argv: list[str], *, log_path: Path) -> AsyncIterator[processes.Child]:
    child = processes.start(argv, log_path=log_path)
    try:
        yield child
    finally:
        await processes.stop(child, grace_s=10)


async def test_two_nodes_in_network_namespaces_find_each_other(tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"  # never started: no request comes; only the start's smoke test runs it
    binary.write_text('#!/bin/sh\necho "version: 1 (0000000)"; echo "--port PORT"\n')
    binary.chmod(0o755)
    model_file = tmp_path / "model.gguf"
    model_file.write_bytes(b"GGUF")
    with namespaces() as (ns_a, ns_b):
        argv_a = node_files(tmp_path / "a", node_id="ns-a", address="10.77.0.1", binary=binary, model_file=model_file)
        argv_b = node_files(tmp_path / "b", node_id="ns-b", address="10.77.0.2", binary=binary, model_file=model_file)
        async with (
            started(["ip", "netns", "exec", ns_a, *argv_a], log_path=tmp_path / "a.log") as a,
            started(["ip", "netns", "exec", ns_b, *argv_b], log_path=tmp_path / "b.log") as b,
        ):

            async def both_see_each_other() -> bool:
                seen_by_a = await cluster_nodes(ns_a, "http://10.77.0.1:8080")
                seen_by_b = await cluster_nodes(ns_b, "http://10.77.0.2:8080")
                return seen_by_a == ["ns-b"] and seen_by_b == ["ns-a"]

            try:
                await waiting.eventually(both_see_each_other, within_s=60, interval_s=0.5, what="mDNS peers")
            except AssertionError:
                raise AssertionError(f"a:\n{a.log_tail()}\nb:\n{b.log_tail()}") from None
            # b may have found a first and gossiped: a then lists b a moment before its own mDNS line is written
            await waiting.eventually(
                lambda: '"event": "mesh_mdns_peer"' in a.log_text(), within_s=30, what="a's mDNS line"
            )


async def test_discovery_on_loopback_finds_the_other_url() -> None:
    found_by_one: list[str] = []
    found_by_two: list[str] = []
    one, two = "http://127.0.0.1:9001", "http://127.0.0.1:9002"
    async with (
        discovery.advertised(service_name=SERVICE, node_id="lo-1", url=one, found=found_by_one.append),
        discovery.advertised(service_name=SERVICE, node_id="lo-2", url=two, found=found_by_two.append),
    ):
        await waiting.eventually(lambda: found_by_one and found_by_two, what="both advertisers found")
    assert set(found_by_one) == {two}
    assert set(found_by_two) == {one}

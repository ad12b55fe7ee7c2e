"""Three `llamesh serve` nodes on loopback, Noise on with a shared cluster token, the real llama-server with a
tiny real GGUF, and the unmodified OpenAI SDK as the client.

Node a serves `tiny-a`, b serves `shared`, c serves `shared` and `tiny-c`. a is told of b, b of c, c of a:
everyone finds everyone through gossip (transitive discovery).

Covers (one cluster, in order, since three nodes take a while to start on a small machine): each node's
/cluster/nodes lists the other two; /v1/models is the same union on every node, peer entries with
source/advertised_by/cluster_url; `tiny-c`, served only by c, streams through a with the OpenAI SDK and
runs on c (a llama-server under c, none under a); a client that leaves such a stream through a leaves
nothing in flight on a or c; with `shared` loaded on b, a stream through a goes to
b, and killing b (SIGKILL, its llama-server too) mid-stream ends that response with an error the SDK
raises, opens b's breaker on a, and the next request goes to c; b started again is probed back (its
breaker on a closes); nothing is left in flight on any node.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import aiohttp
import openai
import pytest

import mesh_nodes as mn
from rig import waiting

pytestmark = pytest.mark.real

TOKEN = "three-node-cluster-token"
SLOW_TO_REOPEN = mn.FAST_BREAKER | {"open_duration_base_ms": 4000, "open_duration_max_ms": 8000}


def sdk(node: mn.MeshNode) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=120)


async def peers_seen(node: mn.MeshNode) -> list[str]:
    nodes = (await node.get("/cluster/nodes"))["nodes"]
    return sorted(n["node_id"] for n in nodes if not n["stale"])


async def breaker_state(node: mn.MeshNode, peer: str) -> str:
    nodes = (await node.get("/cluster/nodes"))["nodes"]
    return next((n["circuit_breaker"] for n in nodes if n["node_id"] == peer), "unknown")


async def test_three_nodes_route_stream_and_survive_a_killed_peer(
    tmp_path: Path, llama_server_binary: Path, chat_model: Path
) -> None:
    a, b, c = (mn.MeshNode(name, tmp_path / name) for name in "abc")
    served = {
        "a": {"tiny-a": chat_model},
        "b": {"shared": chat_model},
        "c": {"shared": chat_model, "tiny-c": chat_model},
    }
    told_of = {"a": b, "b": c, "c": a}
    for node in (a, b, c):  # a's breakers stay open long enough to be seen open
        node.write(
            binary=llama_server_binary,
            models=served[node.node_id],
            peers=[told_of[node.node_id].url],
            token=TOKEN,
            breaker=SLOW_TO_REOPEN,
            # c's `shared` gets its own args hash: tiny-c's tokens/s must not count for it in the score
            args={"shared": "-c 8192 -np 1 --seed 7"} if node is c else None,
        )
    async with mn.cluster_of([a, b, c]):
        for node, others in ((a, ["b", "c"]), (b, ["a", "c"]), (c, ["a", "b"])):

            async def complete(node: mn.MeshNode = node, others: list[str] = others) -> bool:
                return await peers_seen(node) == others

            await waiting.eventually(complete, within_s=60, interval_s=0.2, what=f"{node.node_id} sees {others}")

        listings = {}
        for node in (a, b, c):
            listings[node.node_id] = sorted(m["id"] for m in (await node.get("/v1/models"))["data"])
        assert listings == {name: ["shared", "tiny-a", "tiny-c"] for name in "abc"}
        on_a = {m["id"]: m for m in (await a.get("/v1/models"))["data"]}
        assert on_a["tiny-c"]["metadata"]["source"] == "cluster"
        assert on_a["tiny-c"]["metadata"]["advertised_by"] == "c"
        assert on_a["tiny-c"]["metadata"]["cluster_url"] == c.url
        on_c = {m["id"]: m for m in (await c.get("/v1/models"))["data"]}
        assert on_a["tiny-c"]["created"] == on_c["tiny-c"]["created"]  # the owner's start time on every node
        assert "source" not in on_c["tiny-c"]["metadata"]

        # a model only c serves, streamed through a with the OpenAI SDK
        client_a = sdk(a)
        stream = await client_a.chat.completions.create(
            model="tiny-c", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
        )
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        assert "".join(pieces)
        assert a.llama_servers() == [] and len(c.llama_servers()) == 1

        # a client that leaves mid-stream frees the request on a and on c
        body = {
            "model": "tiny-c",
            "stream": True,
            "max_tokens": 4000,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "go on"}],
        }
        async with aiohttp.ClientSession() as session:
            response = await session.post(a.url + "/v1/chat/completions", json=body)
            assert response.status == 200
            await response.content.readany()
            response.close()
        for node in (a, c):
            await waiting.eventually(lambda node=node: _idle(node), within_s=20, what=f"{node.node_id} idle")
        # c saw its client (a) leave: a closed the connection at once, not at the end of the generation
        await waiting.eventually(lambda: _left_early(c, "tiny-c"), within_s=10, what="c's request ended by a leaving")

        # `shared` loaded on b (asked there: a tie between b and c stays local), so a routes it to b
        client_b = sdk(b)
        await client_b.chat.completions.create(
            model="shared", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert len(b.llama_servers()) == 1
        await waiting.eventually(
            lambda: _loaded_on(a, "b", "shared"), within_s=20, what="a hears that b has shared loaded and idle"
        )
        long_stream = await client_a.chat.completions.create(
            model="shared",
            messages=[{"role": "user", "content": "tell a long story"}],
            max_tokens=4000,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        with pytest.raises(openai.APIError):
            async for _chunk in long_stream:
                if b.child is not None and b.child.process.poll() is None:
                    servers = b.llama_servers()
                    b.child.process.send_signal(signal.SIGKILL)  # the whole node dies: gateway and llama-server
                    for server in servers:
                        server.kill()
        await b.stop()
        await waiting.eventually(lambda: _breaker_is(a, "b", "open"), within_s=10, what="b's breaker open on a")
        answer = await client_a.chat.completions.create(
            model="shared", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert answer.choices[0].message.content is not None
        assert len(c.llama_servers()) == 2  # tiny-c and now shared
        metrics = await _metrics_text(a)
        assert 'proxy_mesh_forwards_total{outcome="ok",peer="c"}' in metrics

        # b comes back: gossip probes close its breaker on a
        await b.start()
        await waiting.eventually(
            lambda: _breaker_is(a, "b", "closed"), within_s=60, interval_s=0.2, what="b's breaker closed again"
        )
        await client_a.close()
        await client_b.close()

        for node in (a, b, c):
            await waiting.eventually(lambda node=node: _idle(node), within_s=20, what=f"{node.node_id} idle")


def _left_early(node: mn.MeshNode, model: str) -> bool:
    assert node.child is not None
    for line in node.child.log_text().splitlines():
        if '"request_complete"' in line:
            record = json.loads(line)
            if record.get("model") == model and record.get("client_disconnected") and record["tokens"] < 4000:
                return True
    return False


async def _idle(node: mn.MeshNode) -> bool:
    return bool((await node.get("/metrics/json"))["current_requests"] == 0)


async def _loaded_on(node: mn.MeshNode, peer: str, model: str) -> bool:
    """`node` hears that `peer` has `model` loaded, with a free slot and nothing in flight."""
    nodes = (await node.get("/cluster/nodes"))["nodes"]
    document = next((n for n in nodes if n["node_id"] == peer), None)
    if document is None or document["current_requests"]:
        return False
    return any(m["id"] == model and m["loaded"] and m["remaining_slots"] for m in document["models"])


async def _breaker_is(node: mn.MeshNode, peer: str, state: str) -> bool:
    return await breaker_state(node, peer) == state


async def _metrics_text(node: mn.MeshNode) -> str:
    async with aiohttp.ClientSession() as session, session.get(node.url + "/metrics") as response:
        return await response.text()

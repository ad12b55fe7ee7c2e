"""The mesh in one real gateway (node "a", no local model) with fake peers for the faults.

Covers: gossip at startup and transitive discovery (a peer named only in another peer's document is
gossiped with), /cluster/nodes, the union /v1/models and /v1/models/{id} with the peer's metadata; a
streamed request forwarded to the only peer that serves the model, with X-Llama-Mesh-Hops 1; the hop
limit (the seed's 400, nothing forwarded); a peer killed mid-stream ends that response with an error
event, opens its breaker (proxy_circuit_breaker_state 1) and the next request goes to the other peer,
then its return closes the breaker after the gossip probes; a peer's 503 is retried on another; a
client that leaves before the headers and mid-body, and a peer that stalls (cut by
upstream_read_timeout_ms) all end with nothing in flight on either side; /cluster/gossip over plain
HTTP is refused (403) when Noise is on, and /cluster/* needs a key when auth is on; Noise gossip between
in-process nodes takes a node with the token and a pinned key, and refuses one without the token or
with an unpinned key; a local spawn that fails (the fake llama-server exits on start) falls back to a peer.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

import mesh_nodes as mn
import noise_support as ms
from llamesh_proxy import connections
from llamesh_proxy.mesh import breaker, keys
from rig import waiting


async def read_broken(response: aiohttp.ClientResponse) -> str:
    """The rest of a stream that ends truncated (the gateway's error event, then no final chunk)."""
    received = b""
    try:
        async for chunk in response.content.iter_any():
            received += chunk
    except aiohttp.ClientPayloadError:
        return received.decode()
    raise AssertionError(f"the stream ended cleanly: {received!r}")


async def in_flight_zero(node: mn.Node, *fakes: mn.FakePeer) -> None:
    def idle() -> bool:
        return node.gw.metrics.current_requests == 0 and all(f.in_flight == 0 for f in fakes) and not node.mesh.pending

    await waiting.eventually(idle, what="no request in flight on any node")


async def test_gossip_union_listing_and_a_forwarded_stream() -> None:
    async with (
        mn.FakePeer("c", "m") as c,
        mn.FakePeer("b", "other", "m") as b,
    ):
        b.known_peers = [c.url]  # a is told of b only: it finds c through b
        async with mn.gateway_node(peers=[b.url]) as a, aiohttp.ClientSession() as client:
            await mn.wait_for_peers(a, "b", "c")
            assert "a" in c.gossip_from

            async with client.get(f"{a.url}/cluster/nodes") as response:
                nodes = await response.json()
            assert [n["node_id"] for n in nodes["nodes"]] == ["b", "c"]
            assert nodes["self"]["node_id"] == "a"

            async with client.get(f"{a.url}/v1/models") as response:
                listed = {m["id"]: m for m in (await response.json())["data"]}
            assert sorted(listed) == ["m", "other"]
            assert listed["m"]["owned_by"] == "b" and listed["m"]["created"] == 1234
            assert listed["m"]["metadata"]["source"] == "cluster"
            assert listed["m"]["metadata"]["cluster_url"] == b.url
            async with client.get(f"{a.url}/v1/models/other") as response:
                assert (await response.json())["metadata"]["advertised_by"] == "b"

            text = await mn.stream_text(client, a.url)
            assert "b0 " in text and "b4 " in text and text.rstrip().endswith("[DONE]")
            assert b.hops == ["1"]
            assert "b0 " in await mn.stream_text(client, a.url, model="m:default")  # the same model
            await in_flight_zero(a, b, c)


async def test_hop_limit() -> None:
    async with mn.FakePeer("b", "m") as b, mn.gateway_node(peers=[b.url], max_hops=2) as a:
        await mn.wait_for_peers(a, "b")
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as client:
            for hops in ("2", "3"):
                async with client.post(
                    f"{a.url}/v1/chat/completions", json=body, headers={"X-Llama-Mesh-Hops": hops}
                ) as response:
                    assert response.status == 400
                    error = (await response.json())["error"]
                    assert error["type"] == "invalid_request_error" and "hops" in error["message"].lower()
            async with client.post(
                f"{a.url}/v1/chat/completions", json=body, headers={"X-Llama-Mesh-Hops": "1"}
            ) as response:
                assert response.status == 200
        assert b.hops == ["2"]
        await in_flight_zero(a, b)


async def test_killed_peer_opens_its_breaker_then_requests_go_elsewhere_until_it_returns() -> None:
    async with (
        mn.FakePeer("b", "m", chunks=200, chunk_delay_s=0.05) as b,
        mn.FakePeer("c", "m") as c,
        mn.gateway_node(peers=[b.url, c.url]) as a,
        aiohttp.ClientSession() as client,
    ):
        await mn.wait_for_peers(a, "b", "c")
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with client.post(f"{a.url}/v1/chat/completions", json=body) as response:
            assert response.status == 200
            first = await response.content.readuntil(b"\n\n")
            assert b"b0 " in first  # b (the lowest id on a tie) serves it
            b.kill()
            rest = await read_broken(response)
        assert '"upstream_error"' in rest and "[DONE]" not in rest
        circuit = a.mesh.breakers.of("b")
        assert circuit.current(a.mesh.clock()) is breaker.State.OPEN
        async with client.get(f"{a.url}/metrics") as response:
            assert 'proxy_circuit_breaker_state{peer="b"} 1.0' in await response.text()

        text = await mn.stream_text(client, a.url)
        assert "c0 " in text

        b.revive()
        b.chunks = 5
        await waiting.eventually(
            lambda: circuit.current(a.mesh.clock()) is breaker.State.CLOSED, what="b's breaker closed by probes"
        )
        await in_flight_zero(a, b, c)


async def test_a_peers_503_is_retried_on_another_peer() -> None:
    async with (
        mn.FakePeer("b", "m") as b,
        mn.FakePeer("c", "m") as c,
        mn.gateway_node(peers=[b.url, c.url]) as a,
        aiohttp.ClientSession() as client,
    ):
        await mn.wait_for_peers(a, "b", "c")
        b.mode = "unavailable"
        text = await mn.stream_text(client, a.url)
        assert "c0 " in text and b.served == 1
        c.mode = "unavailable"
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with client.post(f"{a.url}/v1/chat/completions", json=body) as response:
            assert response.status == 503  # no peer took it: the last 503 is relayed
        await in_flight_zero(a, b, c)


async def test_a_peers_503_falls_back_to_this_node_when_it_serves_the_model() -> None:
    async with (
        mn.FakePeer("b", "m") as b,
        mn.gateway_node(peers=[b.url], models=("m",)) as a,
        aiohttp.ClientSession() as client,
    ):
        await mn.wait_for_peers(a, "b")
        b.mode = "unavailable"  # b (loaded) wins the score, answers 503: a serves it itself
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        request = asyncio.create_task(client.post(f"{a.url}/v1/chat/completions", json=body))
        await waiting.eventually(lambda: b.served == 1, what="b asked first")
        await waiting.eventually(lambda: a.gw.catalog.instances() or request.done(), what="a local instance asked for")
        assert not request.done() and len(a.gw.catalog.instances()) == 1  # nobody runs it here: it waits
        request.cancel()
        await in_flight_zero(a, b)


async def test_client_leaving_before_headers_and_mid_body_frees_both_nodes() -> None:
    async with (
        mn.FakePeer("b", "m", chunks=10_000, chunk_delay_s=0.02) as b,
        mn.gateway_node(peers=[b.url]) as a,
    ):
        await mn.wait_for_peers(a, "b")
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}

        b.mode = "no_headers"
        async with aiohttp.ClientSession() as client:
            request = asyncio.create_task(client.post(f"{a.url}/v1/chat/completions", json=body))
            await waiting.eventually(lambda: b.in_flight == 1, what="the request at the peer")
            request.cancel()
        await in_flight_zero(a, b)

        b.mode = "stream"
        async with aiohttp.ClientSession() as client:
            response = await client.post(f"{a.url}/v1/chat/completions", json=body)
            assert b"b0 " in await response.content.readuntil(b"\n\n")
            assert b.in_flight == 1
            response.close()
        await in_flight_zero(a, b)


async def test_a_stalled_peer_is_cut_by_upstream_read_timeout() -> None:
    async with (
        mn.FakePeer("b", "m") as b,
        mn.gateway_node(peers=[b.url], upstream_read_timeout_ms=500) as a,
        aiohttp.ClientSession() as client,
    ):
        await mn.wait_for_peers(a, "b")
        b.mode = "stall"
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with client.post(f"{a.url}/v1/chat/completions", json=body) as response:
            assert response.status == 200
            text = await read_broken(response)
        assert "b0 " in text and '"upstream_error"' in text and "timed out" in text
        await in_flight_zero(a, b)


async def test_a_failed_local_spawn_falls_back_to_a_peer(tmp_path: Path) -> None:
    async with mn.FakePeer("b", "m") as b:
        b.loaded = False  # b says it cannot fit m: a's own (cold) instance scores better
        faults = {"default": {"FAKE_LLAMA_FAULT": "exit_on_start"}}
        async with (
            mn.gateway_node(peers=[b.url], models=("m",), agent_folder=tmp_path, faults=faults) as a,
            aiohttp.ClientSession() as client,
        ):
            await mn.wait_for_peers(a, "b")
            text = await mn.stream_text(client, a.url)
            assert "b0 " in text and b.served == 1
            assert a.gw.catalog.instances()[0].status.phase.value == "Failed"  # it was tried here first
            await in_flight_zero(a, b)


async def test_plain_gossip_refused_with_noise_and_cluster_routes_need_a_key(tmp_path: Path) -> None:
    security = ms.security(tmp_path, "a")
    layers = connections.Layers(noise=security)
    auth = {"enabled": True, "allowed_keys": ["k1"]}
    async with mn.gateway_node(peers=[], layers=layers, auth=auth) as a, aiohttp.ClientSession() as client:
        document = mn.FakePeer("b", "m").document().model_dump_json()
        headers = {"x-api-key": "k1", "Content-Type": "application/json"}
        async with client.post(f"{a.url}/cluster/gossip", data=document, headers=headers) as response:
            assert response.status == 403
            assert "Noise" in (await response.json())["error"]["message"]
        assert a.mesh.view.peers == {}
        async with client.get(f"{a.url}/cluster/nodes") as response:
            assert response.status == 401
        async with client.get(f"{a.url}/cluster/nodes", headers={"x-api-key": "k1"}) as response:
            assert response.status == 200


async def test_noise_gossip_takes_cluster_members_only(tmp_path: Path) -> None:
    b_identity = ms.security(tmp_path, "b")
    stranger = ms.security(tmp_path, "x", token="not-the-cluster-token")
    unpinned = ms.security(tmp_path, "y")  # the right token, a key a does not list
    a_identity = ms.security(tmp_path, "a", allowed_keys=[b_identity.public_key], tofu=False)

    def noise(identity: keys.MeshSecurity) -> connections.Layers:
        return connections.Layers(noise=identity)

    async with (
        mn.gateway_node(node_id="a", peers=[], layers=noise(a_identity)) as a,
        mn.gateway_node(node_id="b", peers=[a.url], layers=noise(b_identity), models=("m",)) as b,
        mn.gateway_node(node_id="x", peers=[a.url], layers=noise(stranger), models=("evil",)) as x,
        mn.gateway_node(node_id="y", peers=[a.url], layers=noise(unpinned), models=("other",)) as y,
    ):
        await mn.wait_for_peers(a, "b")
        await mn.wait_for_peers(b, "a")
        for outsider in (x, y):
            gossiper = outsider.mesh.gossiper
            assert gossiper is not None
            await waiting.eventually(lambda g=gossiper: g.rounds >= 3, what="a few gossip rounds")
            assert outsider.mesh.view.peers == {}
        assert sorted(a.mesh.view.peers) == ["b"]
        async with aiohttp.ClientSession() as client, client.get(f"{a.url}/v1/models") as response:
            assert [m["id"] for m in (await response.json())["data"]] == ["m"]

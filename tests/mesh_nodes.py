"""Helpers for the mesh tests: a gateway node in a cluster (in process, as `llamesh serve` wires it), fake
peers for fault injection, and real `llamesh serve` nodes as child processes.

- `gateway_node`: the real gateway application with the mesh installed, listening on a loopback port;
  it has no local model unless given one, so its requests go to peers;
- `FakePeer`: a peer that gossips a document naming its models and answers chat completions the way a
  test asks (`mode`): a stream, a 503, a stall after the first chunk, no headers at all; `kill()` makes
  it vanish (open streams and gossip cut off), `revive()` brings it back. It counts its in-flight requests;
- `MeshNode`: `llamesh serve` in a child process with its own config, cookbook and Noise secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

import gateway_support as gs
from llamesh_api import store
from llamesh_operator import serve
from llamesh_proxy import app as gateway_app
from llamesh_proxy import cluster, connections, gateway
from llamesh_proxy.mesh import view
from rig import processes, waiting

FAST_BREAKER = {
    "failure_threshold": 1,
    "success_threshold": 2,
    "open_duration_base_ms": 300,
    "open_duration_max_ms": 1000,
    "half_open_probe_interval_ms": 0,
}


@dataclasses.dataclass
class Node:
    app: web.Application
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def gw(self) -> gateway.Gateway:
        return self.app[gateway.GATEWAY]

    @property
    def mesh(self) -> cluster.Mesh:
        mesh = self.gw.mesh
        assert isinstance(mesh, cluster.Mesh)
        return mesh


@contextlib.asynccontextmanager
async def gateway_node(
    *,
    peers: list[str],
    layers: connections.Layers | None = None,
    models: tuple[str, ...] = (),
    agent_folder: Path | None = None,
    faults: dict[str, dict[str, str]] | None = None,
    node_id: str = "a",
    **fields: Any,
) -> AsyncIterator[Node]:
    """Node `node_id`: the gateway with the mesh (mDNS off, gossip every second), serving `models` locally. With
    `agent_folder`, the real agent and operator run its instances (the fake llama-server, with `faults` by
    profile id: `gateway_support.running_node`); otherwise nobody starts them."""
    layers = layers or connections.Layers()
    port = processes.free_port()
    cluster_fields = {
        "enabled": True,
        "peers": peers,
        "gossip_interval_seconds": 1,
        "discovery": {"mdns": False},
        "circuit_breaker": FAST_BREAKER,
        "noise": {"enabled": layers.noise is not None},
    } | fields.pop("cluster", {})
    settings = gs.node_config(node_id=node_id, listen_addr=f"127.0.0.1:{port}", cluster=cluster_fields, **fields)
    memory = store.MemoryStore()
    for name in models:
        await memory.create(gs.model(name))
    async with contextlib.AsyncExitStack() as stack:
        if agent_folder is not None:
            await stack.enter_async_context(gs.running_node(memory, agent_folder, settings=settings, env=faults))
        else:
            await gs.register_node(memory)
        app = gateway_app.create_app(settings, store=memory, gateway_id=gs.GATEWAY_ID, node_name=gs.NODE)
        cluster.install(app, serve.mesh(app, settings, layers=layers))
        runner = gateway_app.make_runner(app, layers=layers)
        await serve.listen(runner, settings)
        try:
            yield Node(app, port)
        finally:
            await runner.cleanup()


class FakePeer:
    """A peer node for fault injection (see the module docstring)."""

    def __init__(self, node_id: str, *models: str, chunks: int = 5, chunk_delay_s: float = 0.05) -> None:
        self.node_id = node_id
        self.models = models
        self.mode = "stream"  # stream | unavailable | stall | no_headers
        self.chunks = chunks
        self.chunk_delay_s = chunk_delay_s
        self.alive = True
        self.in_flight = 0
        self.served = 0
        self.hops: list[str | None] = []
        self.gossip_from: list[str] = []
        self.known_peers: list[str] = []
        self.loaded = True  # what its gossip says of its models; not loaded and not fitting: the worst score
        self.first_chunk_sent = asyncio.Event()
        self._transports: set[asyncio.BaseTransport] = set()
        self._runner: web.AppRunner | None = None
        self.port = processes.free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def document(self) -> view.Document:
        entries = [
            view.ModelEntry(id=m, model=m, profile_id="default", loaded=self.loaded, fits=self.loaded)
            for m in self.models
        ]
        return view.Document(
            node_id=self.node_id,
            url=self.url,
            version=gateway.VERSION,
            started_at=1234,
            models=entries,
            known_peers=self.known_peers,
        )

    async def __aenter__(self) -> FakePeer:
        app = web.Application()
        app.router.add_post("/cluster/gossip", self._gossip)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        self.kill()
        await self._runner.cleanup()

    def kill(self) -> None:
        """Gone: every open connection is cut, gossip and requests are dropped until `revive`."""
        self.alive = False
        for transport in list(self._transports):
            transport.abort()

    def revive(self) -> None:
        self.alive = True

    def _refuse_if_dead(self, request: web.Request) -> None:
        if not self.alive and request.transport is not None:
            request.transport.abort()
            raise ConnectionResetError("the fake peer is down")

    async def _gossip(self, request: web.Request) -> web.Response:
        self._refuse_if_dead(request)
        self.gossip_from.append(json.loads(await request.read())["node_id"])
        return web.json_response(text=self.document().model_dump_json())

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self._refuse_if_dead(request)
        assert request.transport is not None
        self._transports.add(request.transport)
        self.in_flight += 1
        self.served += 1
        self.hops.append(request.headers.get("X-Llama-Mesh-Hops"))
        try:
            await request.read()
            if self.mode == "unavailable":
                return web.json_response(
                    {"error": {"message": "Node is draining", "type": "unavailable_error"}}, status=503
                )
            if self.mode == "no_headers":
                await asyncio.Event().wait()
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for index in range(self.chunks if self.mode == "stream" else 1):
                chunk = {"choices": [{"index": 0, "delta": {"content": f"{self.node_id}{index} "}}]}
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.first_chunk_sent.set()
                await asyncio.sleep(self.chunk_delay_s)
            if self.mode == "stall":
                await asyncio.Event().wait()
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            self.in_flight -= 1
            self._transports.discard(request.transport)


async def stream_text(session: aiohttp.ClientSession, url: str, *, model: str = "m", **headers: str) -> str:
    """A streamed chat completion through `url`, its body as text."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        return (await response.read()).decode()


async def wait_for_peers(node: Node, *peer_ids: str) -> None:
    def seen() -> bool:
        return all(p in node.mesh.view.peers for p in peer_ids)

    await waiting.eventually(seen, what=f"gossip from {peer_ids}")


# --- `llamesh serve` nodes ---------------------------------------------------------------------------


@dataclasses.dataclass
class MeshNode:
    """One `llamesh serve` child with its own folder (config.yaml, cookbook.yaml, Noise secrets, caches)."""

    node_id: str
    folder: Path
    port: int = dataclasses.field(default_factory=processes.free_port)
    child: processes.Child | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write(
        self,
        *,
        binary: Path,
        models: dict[str, Path],
        peers: list[str],
        token: str,
        breaker: dict[str, int] | None = None,
        args: dict[str, str] | None = None,
    ) -> None:
        """`args`: a model's llama_server_args when not the default `-c 8192 -np 1`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        secrets = self.folder / "secrets"
        secrets.mkdir(mode=0o700, exist_ok=True)
        token_file = secrets / "cluster_token"  # the shared token, copied to every node as an operator would
        token_file.write_text(token)
        token_file.chmod(0o600)
        node: dict[str, Any] = {
            "node_id": self.node_id,
            "listen_addr": f"127.0.0.1:{self.port}",
            "metrics_path": str(self.folder / "node-metrics.json"),
            "shutdown_grace_period_seconds": 5,
            "model_defaults": {"max_concurrent_requests_per_instance": 1, "max_instances_per_model": 1},
            "llama_cpp": {"enabled": False, "binary_path": str(binary), "cache_dir": str(self.folder / "cache")},
            "cluster": {
                "enabled": True,
                "peers": peers,
                "gossip_interval_seconds": 1,
                "discovery": {"mdns": False},
                "noise": {"enabled": True, "config_dir": str(secrets)},
                "circuit_breaker": breaker or FAST_BREAKER,
            },
        }
        (self.folder / "config.yaml").write_text(yaml.safe_dump(node))
        cookbook = {
            "models": [
                {
                    "name": name,
                    "profiles": [
                        {
                            "id": "default",
                            "model_path": str(path),
                            "llama_server_args": (args or {}).get(name, "-c 8192 -np 1"),
                        }
                    ],
                }
                for name, path in models.items()
            ]
        }
        (self.folder / "cookbook.yaml").write_text(yaml.safe_dump(cookbook))

    async def start(self) -> processes.Child:
        llamesh = str(Path(sys.executable).parent / "llamesh")
        argv = [llamesh, "serve", "--config", str(self.folder / "config.yaml")]
        argv += ["--cookbook", str(self.folder / "cookbook.yaml")]
        self.child = processes.start(argv, log_path=self.folder / "serve.log")
        await processes.wait_healthy(self.child, self.url, deadline_s=90)
        return self.child

    async def stop(self) -> None:
        if self.child is not None:
            await processes.stop(self.child, grace_s=10)

    def llama_servers(self) -> list[processes.Seen]:
        assert self.child is not None
        return processes.descendants(self.child.pid, matching="llama-server")

    async def get(self, path: str) -> Any:
        async with aiohttp.ClientSession() as session, session.get(self.url + path) as response:
            assert response.status == 200, await response.text()
            return await response.json()


@contextlib.asynccontextmanager
async def cluster_of(nodes: list[MeshNode]) -> AsyncIterator[list[MeshNode]]:
    """Start every node (each waits for /health); stop them all on the way out, whatever happens."""
    try:
        for node in nodes:
            await node.start()
        yield nodes
    finally:
        for node in nodes:
            await node.stop()

"""`llamesh serve`: gateway, node agent and operator in one process over an in-memory store (bare metal).

Start order: load the cookbook into the store (a broken cookbook stops the start with its messages), make
sure llama-server exists (build it if needed, with progress), start the agent and the operator loop, then
open the gateway's port. With `cluster.enabled`, the gateway also joins the mesh (`llamesh_proxy.cluster`:
gossip, mDNS, forwarding to peers over Noise on the same port). Shutdown follows the seed: the first
SIGTERM/SIGINT drains (readyz 503, new and queued requests 503 draining, in-flight ones finish) for up to
`shutdown_grace_period_seconds`; a second signal or the end of the grace period exits; every llama-server
child is stopped on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from llamesh_agent import build, node_agent
from llamesh_api import config, store
from llamesh_operator import controller, cookbook_sync
from llamesh_proxy import app as gateway_app
from llamesh_proxy import cluster, connections
from llamesh_proxy.mesh import discovery, keys, peers, tls, transport

log = logging.getLogger(__name__)


class ServeError(Exception):
    """`llamesh serve` could not start; the message says why and what to fix."""


async def serve(node_config: config.NodeConfig, *, cookbook_path: Path, config_dir: Path) -> None:
    layers = public_port_layers(node_config, config_dir=config_dir)
    memory = store.MemoryStore()
    cookbook_file = cookbook_sync.CookbookFile(path=cookbook_path, resource_store=memory)
    if not await cookbook_file.load():
        raise ServeError(str(cookbook_file.last_error))

    binary = build.BuildManager(node_config.llama_cpp, base_dir=config_dir, progress=_progress)
    try:
        built = await binary.ensure_binary()
    except build.BuildError as exc:
        raise ServeError(f"llama-server is not available: {exc}") from exc
    log.info(
        "llama-server %s (llama.cpp %s)",
        built.binary_path,
        built.llama_cpp_version,
        extra={
            "event": "llama_binary",
            "binary_path": str(built.binary_path),
            "llama_cpp_version": built.llama_cpp_version,
        },
    )

    state_dir = config.resolve_path(node_config.llama_cpp.cache_dir, base_dir=config_dir) / "state"
    agent = node_agent.NodeAgent(
        store=memory, node_config=node_config, binary=binary, state_dir=state_dir, config_dir=config_dir
    )
    operator = controller.Controller(
        resource_store=memory,
        defaults=lambda: node_config.model_defaults,
        drain_grace_s=node_config.shutdown_grace_period_seconds,
    )
    app = gateway_app.create_app(
        node_config,
        store=memory,
        gateway_id=f"{node_config.node_id}-gateway",
        node_name=agent.node_name,
        metrics_path=agent.learned_path,  # one metrics file per node, shared with the agent (`snapshot`)
    )
    if node_config.cluster.enabled:
        cluster.install(app, mesh(app, node_config, layers=layers))
    runner = gateway_app.make_runner(app, layers=layers)

    tasks = [
        asyncio.create_task(agent.run(), name="agent"),
        asyncio.create_task(operator.run(), name="operator"),
        asyncio.create_task(cookbook_file.watch(), name="cookbook-watch"),
    ]
    stop = Signals()
    try:
        await listen(runner, node_config)
        scheme = "https" if layers.tls is not None else "http"
        log.info(
            "llamesh serving the OpenAI API on %s://%s/v1", scheme, node_config.listen_addr, extra={"event": "ready"}
        )

        await stop.first()
        await drain(app, stop, grace_s=node_config.shutdown_grace_period_seconds)
    finally:
        stop.close()
        await runner.cleanup()
        await agent.shutdown()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.info("llamesh stopped", extra={"event": "stopped"})


def public_port_layers(node_config: config.NodeConfig, *, config_dir: Path) -> connections.Layers:
    """What the public port speaks besides HTTP/1.1: Noise for the mesh (keys loaded, or generated on first
    use) and TLS for clients. Secrets with loose permissions, or a certificate that does not load, stop the
    start with a message naming the file and the fix."""
    noise = node_config.cluster.noise
    security = None
    if node_config.cluster.enabled and noise.enabled:
        try:
            security = keys.load(noise, node_id=node_config.node_id, base_dir=config_dir)
        except (keys.KeysError, OSError) as exc:
            raise ServeError(f"cluster.noise: {exc}") from exc
        log.info(
            "mesh identity %s (node %s)",
            security.public_key,
            node_config.node_id,
            extra={"event": "mesh_identity", "public_key": security.public_key},
        )
    server_tls = None
    if node_config.server_tls.enabled:
        try:
            server_tls = tls.ServerTls(node_config.server_tls, base_dir=config_dir)
        except tls.TlsError as exc:
            raise ServeError(str(exc)) from exc
    return connections.Layers(noise=security, tls=server_tls)


def mesh(app: web.Application, node_config: config.NodeConfig, *, layers: connections.Layers) -> cluster.Mesh:
    """The node's side of the cluster: peers reached over Noise when it is on, found through mDNS when
    `cluster.discovery.mdns`, and at `public_url` (else `http://listen_addr`) themselves."""
    own_url = own_mesh_url(node_config)
    settings = node_config.cluster.discovery
    starter: cluster.DiscoveryStarter | None = None
    if settings.mdns:

        def starter(gossiper: peers.Gossiper) -> contextlib.AbstractAsyncContextManager[object]:
            return discovery.advertised(
                service_name=settings.service_name,
                node_id=node_config.node_id,
                url=own_url,
                found=gossiper.add_peer,
            )

    return cluster.Mesh(
        app[gateway_app.GATEWAY],
        connector=mesh_connector(layers),
        own_url=own_url,
        noise=layers.noise is not None,
        discovery=starter,
    )


def mesh_connector(layers: connections.Layers) -> Callable[[], aiohttp.BaseConnector]:
    """Connections to peers: Noise sessions with this node's identity, or plain TCP when Noise is off."""
    security = layers.noise
    if security is None:
        return lambda: aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    return lambda: transport.NoiseConnector(security, limit=0, keepalive_timeout=60)


def own_mesh_url(node_config: config.NodeConfig) -> str:
    """Where peers reach this node: `public_url`, else `http://listen_addr` (the host name for a wildcard)."""
    if node_config.public_url:
        return node_config.public_url.rstrip("/")
    host = node_config.listen_host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"http://{host}:{node_config.listen_port}"


async def listen(runner: web.AppRunner, node_config: config.NodeConfig) -> None:
    """Open the gateway's port (`listen_addr`); a port that cannot be had is a ServeError saying so.

    First the open-file limit is raised as far as allowed: every client connection is a descriptor, and
    the usual soft limit of 1024 would refuse clients long before `http.max_connections`."""
    raise_open_file_limit()
    await runner.setup()
    # A deep backlog: a burst of clients connecting at once must not see dropped SYNs (1 s retries).
    site = web.TCPSite(runner, node_config.listen_host, node_config.listen_port, reuse_address=True, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        raise ServeError(f"cannot listen on {node_config.listen_addr}: {exc.strerror}; set listen_addr") from exc


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as far as the system allows); the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # an unlimited hard limit is more than the kernel gives one process
        log.info("open-file limit stays at %s (raising it to %s failed: %s)", soft, hard, exc)
        return soft
    return hard


async def drain(app: web.Application, stop: Signals, *, grace_s: float) -> None:
    """After the first signal: the gateway drains for up to `grace_s`, or until a second signal."""
    log.info("draining for up to %s s (send the signal again to exit now)", grace_s, extra={"event": "draining"})
    gateway_app.start_draining(app)
    drained = asyncio.create_task(gateway_app.wait_idle(app, grace_s))
    second = asyncio.create_task(stop.second())
    await asyncio.wait({drained, second}, return_when=asyncio.FIRST_COMPLETED)
    drained.cancel()
    second.cancel()


def _progress(message: str) -> None:
    log.info(message, extra={"event": "llama_build_progress"})  # a JSON line like every other


class Signals:
    """SIGTERM and SIGINT as two awaitable moments: the first, and the one after it."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._received)

    def _received(self) -> None:
        self._count += 1
        self._changed.set()

    async def _at_least(self, count: int) -> None:
        while self._count < count:
            self._changed.clear()
            await self._changed.wait()

    async def first(self) -> None:
        await self._at_least(1)

    async def second(self) -> None:
        await self._at_least(2)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def run(node_config: config.NodeConfig, *, cookbook_path: Path, config_dir: Path) -> int:
    """Blocking entry point for the CLI: uvloop when installed, exit status for the shell."""
    return run_main(serve(node_config, cookbook_path=cookbook_path, config_dir=config_dir))


def run_main(main: Coroutine[Any, Any, None]) -> int:
    """Run one role's `main` to the end on uvloop when installed; a ServeError is exit status 1."""
    try:
        import uvloop

        runner: contextlib.AbstractContextManager[asyncio.Runner] = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner as loop_runner:
        try:
            loop_runner.run(main)
        except ServeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0

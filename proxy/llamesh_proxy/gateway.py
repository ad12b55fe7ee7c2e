"""One gateway's runtime state, shared by its handlers and background tasks, and the drain hooks.

`Gateway` ties together what the request path needs (catalog, dispatcher, forwarder, metrics, auth) and
what shutdown needs: `start_draining()` (first SIGTERM: /readyz turns 503, new requests and every queued
one get 503 draining) and `wait_idle(timeout)` (returns once no request is in flight or queued).
It lives in the application under `GATEWAY`; `app.create_app` builds it.

No I/O happens here; the store is read by `following` and written by `dispatch` and the admin handlers,
and the counters are kept in the node's metrics file (`metrics_path`) by `metrics_file`.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

import llamesh_api
from llamesh_api import config, store
from llamesh_proxy import auth, catalog, dispatch, forwarder, metrics, queueing, requestlog, sharing

VERSION = llamesh_api.__version__


class MeshRouter(Protocol):
    """The mesh as the request path sees it (`cluster.Mesh`): None on a node outside a cluster."""

    async def route(
        self,
        request: web.Request,
        *,
        requested: str,
        target: catalog.Target | None,
        body: bytes,
        exchange: requestlog.Exchange,
    ) -> web.StreamResponse | None:
        """Forward to the best peer and return its answer; None when this node should serve it."""

    async def fallback(
        self,
        request: web.Request,
        *,
        requested: str,
        target: catalog.Target,
        body: bytes,
        exchange: requestlog.Exchange,
    ) -> web.StreamResponse | None:
        """After local spawning failed: a peer's answer, or None when no peer can serve it."""

    def peer_models(self) -> list[dict[str, Any]]:
        """The peers' models for /v1/models (those no local profile serves)."""


class Gateway:
    """State of one gateway replica (`gateway_id`), running next to node `node_name`.

    `metrics_path`: the node's metrics file (config.yaml's `metrics_path`, resolved as the agent resolves
    it), where the counters outlive the process; None keeps them for the process only."""

    def __init__(
        self,
        node_config: config.NodeConfig,
        *,
        store: store.Store,
        gateway_id: str,
        node_name: str,
        shared_slots: bool = False,
        metrics_path: Path | None = None,
    ) -> None:
        self.config = node_config
        self.metrics_path = metrics_path
        self.store = store
        self.gateway_id = gateway_id
        self.node_name = node_name
        self.started_at = int(time.time())
        self.draining = False
        self.metrics = metrics.Metrics()
        self.catalog = catalog.Catalog(defaults=node_config.model_defaults)
        self.board = queueing.Board(max_total_queue=node_config.max_total_queue_entries, shared=shared_slots)
        self.dispatcher = dispatch.Dispatcher(
            board=self.board, catalog=self.catalog, store=store, metrics=self.metrics, gateway_id=gateway_id
        )
        # several replicas in front of the same instances keep the slot limit together (`sharing`)
        self.sharing: sharing.SlotClaims | None = None
        if shared_slots:
            self.sharing = sharing.SlotClaims(
                board=self.board,
                catalog=self.catalog,
                store=store,
                gateway_id=gateway_id,
                apply=self.dispatcher.apply,
            )
            self.dispatcher.sharing = self.sharing
        self.authenticator = auth.Authenticator(node_config.auth)
        self.registry = metrics.registry(self.metrics, self.live)
        self._forwarder: forwarder.Forwarder | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.usage_nudge = asyncio.Event()  # set: publish usage now rather than at the next tick
        self.mesh: MeshRouter | None = None  # set by `cluster.install` on a node in a cluster

    @property
    def forwarder(self) -> forwarder.Forwarder:
        if self._forwarder is None:
            raise RuntimeError("the gateway's upstream pool is not open; is the application started?")
        return self._forwarder

    @forwarder.setter
    def forwarder(self, value: forwarder.Forwarder | None) -> None:
        self._forwarder = value

    # --- drain --------------------------------------------------------------------------------

    def start_draining(self) -> None:
        """Stop taking requests: /readyz 503, newcomers and every waiter get 503 draining. Idempotent."""
        self.draining = True
        self.dispatcher.drain()

    async def wait_idle(self, timeout_s: float | None) -> bool:
        """Wait until nothing is in flight or queued; False if `timeout_s` seconds passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def request_started(self) -> None:
        self.metrics.current_requests += 1
        self._idle.clear()

    def request_finished(self) -> None:
        self.metrics.current_requests -= 1
        if self.metrics.current_requests == 0:
            self._idle.set()

    # --- views --------------------------------------------------------------------------------

    def llama_cpp_version(self) -> str:
        return self.catalog.llama_cpp_version(self.node_name) or "unknown"

    def can_spawn(self) -> bool:
        """Whether some node could start another instance now (binary present, ready, below its cap)."""
        for node in self.catalog.nodes():
            status = node.status
            usable = status.binary_path and status.ready and not status.draining and not status.is_building
            if usable and status.active_instances < node.spec.max_instances:
                return True
        return False

    def live(self) -> metrics.Live:
        node = self.catalog.node(self.node_name)
        gauges: dict[str, float] = {}
        wedged_killed = 0
        kv_cache: dict[str, int] = {}
        if node is not None:
            wedged_killed = node.status.wedged_instances_killed  # this node's: the agent next to us killed them
            kv_cache = {
                "saves": node.status.kv_cache_saves,
                "restored": node.status.kv_cache_restores,
                "failed": node.status.kv_cache_restore_failures,
            }
            status = node.status
            gauges = {
                "active_instances": status.active_instances,
                "llamesh_vram_mb": status.llamesh_vram_mb,
                "llamesh_sysmem_mb": status.llamesh_sysmem_mb,
                "device_vram_used_mb": status.device_vram_used_mb,
                "device_vram_total_mb": status.device_vram_total_mb,
                "gpu_telemetry_available": 1 if status.gpu_telemetry_available else 0,
                "max_vram_mb": node.spec.max_vram_mb,
                "max_sysmem_mb": node.spec.max_sysmem_mb,
            }
        return metrics.Live(
            node_id=self.config.node_id,
            version=VERSION,
            llama_cpp_version=self.llama_cpp_version(),
            started_at_unix=self.started_at,
            queue_length=self.board.queue_length(),
            node_gauges=gauges,
            wedged_instances_killed=wedged_killed,
            kv_cache=kv_cache,
        )


GATEWAY = web.AppKey("llamesh_gateway", Gateway)

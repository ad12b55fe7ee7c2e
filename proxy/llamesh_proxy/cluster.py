"""The mesh in the gateway: /cluster/nodes, /cluster/gossip, and forwarding requests to peers.

`install(app, ...)` (from `llamesh serve` when `cluster.enabled`) adds the routes, a `Mesh` as the gateway's
`mesh` (the request path's `MeshRouter`), and on startup: a client session to the peers (Noise when it is
on: `mesh.transport.NoiseConnector`), the gossip loop (`mesh.peers`) and mDNS (`mesh.discovery`).

Routing (`route`): candidates are the fresh, ready peers with a closed (or probing) breaker that serve the
model, scored against this node (`mesh.scoring`). A request goes to the winner with `X-Llama-Mesh-Hops`
one higher and is relayed back as it comes (`forwarder.Relay`: streaming with backpressure, a stalled
peer cut by `upstream_read_timeout_ms`, a client that leaves closes the peer connection, which cancels
the request there and frees its slot). A peer that cannot be reached, or answers 503 (draining, no
capacity), is tried no more for this request and the next candidate is scored; an exchange that fails
feeds the peer's breaker, one that answers feeds it a success. `fallback` is the same after a local spawn
failed repeatedly (the seed).

/cluster/gossip takes a peer's document and answers with ours. With Noise on it is refused (403) unless the
request came over a Noise session, and the document must name the node the session authenticated.
/cluster/* needs a key when auth is on (the auth middleware; Noise peers are let through there).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pydantic
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from llamesh_proxy import catalog, errors, forwarder, gateway, inference, requestlog
from llamesh_proxy.mesh import breaker, peers, scoring, transport, view

log = logging.getLogger(__name__)

DiscoveryStarter = Callable[[peers.Gossiper], contextlib.AbstractAsyncContextManager[object]]
MESH = web.AppKey("llamesh_mesh", object)


class Mesh:
    """This node's side of the cluster; `connector` makes the connections to peers (Noise or plain)."""

    def __init__(
        self,
        gw: gateway.Gateway,
        *,
        connector: Callable[[], aiohttp.BaseConnector],
        own_url: str,
        noise: bool,
        discovery: DiscoveryStarter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        cluster = gw.config.cluster
        self.gw = gw
        self.own_url = own_url.rstrip("/")
        self.noise = noise
        self.clock = clock
        self.view = view.ClusterView(
            node_id=gw.config.node_id,
            version=gateway.VERSION,
            interval_s=cluster.gossip_interval_seconds,
            mismatch_action=cluster.version_mismatch_action,
        )
        self.breakers = breaker.Breakers(cluster.circuit_breaker)
        self.pending: collections.Counter[str] = collections.Counter()
        self.forwards: collections.Counter[tuple[str, str]] = collections.Counter()  # (peer, outcome)
        self.gossiper: peers.Gossiper | None = None
        self._connector = connector
        self._discovery = discovery
        self._forwarder: forwarder.Forwarder | None = None

    # --- what this node gossips -----------------------------------------------------------------

    def document(self) -> view.Document:
        gw = self.gw
        node = gw.catalog.node(gw.node_name)
        capacity = view.Capacity(can_spawn=gw.can_spawn())
        if node is not None:
            capacity.active_instances = node.status.active_instances
            capacity.max_instances = node.spec.max_instances
        return view.Document(
            node_id=gw.config.node_id,
            url=self.own_url,
            version=gateway.VERSION,
            llama_cpp_version=gw.llama_cpp_version(),
            started_at=gw.started_at,
            ready=not gw.draining and gw.catalog.binary_present(),
            current_requests=max(gw.metrics.current_requests - sum(self.pending.values()), 0),
            queue_length=gw.board.queue_length(),
            capacity=capacity,
            models=[self.entry(target, can_spawn=capacity.can_spawn) for target in gw.catalog.targets()],
            known_peers=self.gossiper.known_peers() if self.gossiper is not None else [],
        )

    def entry(self, target: catalog.Target, *, can_spawn: bool) -> view.ModelEntry:
        gw = self.gw
        routable = gw.catalog.pool_view(target.pool).routable
        in_flight = sum(gw.board.in_flight(name) for name in routable)
        per_instance = target.policy.max_concurrent or scoring.SLOTS_CAP
        stats = gw.metrics.hashes.get(target.args_hash)
        node = gw.catalog.node(gw.node_name)
        learned = node.status.learned.get(target.args_hash) if node is not None else None
        return view.ModelEntry(
            id=target.display,
            model=target.model,
            profile_id=target.profile.id,
            description=target.profile.description,
            capability=target.capability.value,
            loaded=bool(routable),
            fits=can_spawn,
            evictions=0 if can_spawn else int(bool(node is not None and node.status.active_instances)),
            tokens_per_second=stats.tokens_per_second() if stats is not None else 0.0,
            queue_length=gw.board.queue_length(target.pool),
            in_flight=in_flight,
            remaining_slots=max(per_instance * len(routable) - in_flight, 0),
            learned_vram_mb=(learned.peak_vram_mb or 0) if learned is not None else 0,
            learned_sysmem_mb=(learned.peak_sysmem_mb or 0) if learned is not None else 0,
        )

    def peer_models(self) -> list[dict[str, Any]]:
        local = [t.display for t in self.gw.catalog.targets()]
        return self.view.peer_models(local_ids=local, now=self.clock(), started_at=self.gw.started_at)

    # --- routing --------------------------------------------------------------------------------

    async def route(
        self,
        request: web.Request,
        *,
        requested: str,
        target: catalog.Target | None,
        body: bytes,
        exchange: requestlog.Exchange,
    ) -> web.StreamResponse | None:
        hops = int(request.headers.get(inference.HOPS_HEADER) or 0)
        return await self._forward(request, requested=requested, target=target, body=body, exchange=exchange, hops=hops)

    async def fallback(
        self,
        request: web.Request,
        *,
        requested: str,
        target: catalog.Target,
        body: bytes,
        exchange: requestlog.Exchange,
    ) -> web.StreamResponse | None:
        hops = int(request.headers.get(inference.HOPS_HEADER) or 0)
        return await self._forward(request, requested=requested, target=None, body=body, exchange=exchange, hops=hops)

    def _local(self, target: catalog.Target | None) -> scoring.Candidate | None:
        if target is None:
            return None
        entry = self.entry(target, can_spawn=self.gw.can_spawn())
        # this request is counted in flight here already; a peer's gossip does not count it either
        current = max(self.gw.metrics.current_requests - 1, 0)
        return view.candidate(self.view.node_id, entry, current_requests=current)

    async def _forward(
        self,
        request: web.Request,
        *,
        requested: str,
        target: catalog.Target | None,
        body: bytes,
        exchange: requestlog.Exchange,
        hops: int,
    ) -> web.StreamResponse | None:
        model_id = target.display if target is not None else view.model_id(requested)
        local: scoring.Candidate | None = None
        refused: set[str] = set()
        last_unavailable: web.StreamResponse | None = None
        while True:
            now = self.clock()
            peer_candidates = [
                c for c in self.view.candidates(model_id, now=now, breakers=self.breakers) if c.node_id not in refused
            ]
            if target is not None and not peer_candidates:
                return None  # no peer to weigh against: the local path, without scoring it
            if local is None:
                local = self._local(target)
            try:
                decision = scoring.choose(
                    local, peer_candidates, hops=hops, max_hops=self.gw.config.max_hops, pending_forwards=self.pending
                )
            except scoring.HopLimitExceeded:
                raise errors.InvalidRequest("Too many hops (loop detected)") from None
            if decision is None:  # neither this node nor any peer left
                if target is None and last_unavailable is None and self._advertised(model_id):
                    raise errors.NoCapacity(f"No peer can take a request for '{requested}' now")
                return last_unavailable
            if decision.node_id is None:
                return None  # this node serves it (after a peer's 503 too)
            if hops + 1 > self.gw.config.max_hops:
                raise errors.InvalidRequest("Too many hops (loop detected)")
            node_id = decision.node_id
            log.info(
                "route %s to %s",
                model_id,
                node_id,
                extra={
                    "event": "route_decision",
                    "chosen_node": node_id,
                    "candidate_nodes": sorted(decision.scores),
                    "scores": decision.scores,
                },
            )
            answer, final = await self._to_peer(request, node_id=node_id, body=body, exchange=exchange, hops=hops)
            if final:
                return answer
            refused.add(node_id)
            last_unavailable = answer or last_unavailable

    def _advertised(self, model_id: str) -> bool:
        return any(m.id == model_id for d in self.view.fresh(now=self.clock()) for m in d.models)

    async def _to_peer(
        self, request: web.Request, *, node_id: str, body: bytes, exchange: requestlog.Exchange, hops: int
    ) -> tuple[web.StreamResponse | None, bool]:
        """The peer's answer and whether it is final; not final: try another peer (it could not be reached,
        or said 503 before any byte: the 503 is returned, to relay if no other peer takes the request)."""
        peer = self.view.peers.get(node_id)
        circuit = self.breakers.of(node_id)
        dispatched_at = self.clock()
        probe = circuit.current(dispatched_at) is breaker.State.HALF_OPEN
        if peer is None or not circuit.allow(dispatched_at):
            return None, False
        relay = forwarder.Relay()
        exchange.instance = f"peer/{node_id}"
        self.pending[node_id] += 1
        try:
            response = await self.forwarder.relay(
                request,
                base_url=peer.document.url,
                body=body,
                stream=exchange.stream,
                max_duration_ms=0,
                api_key=None,
                request_id=exchange.request_id,
                relay=relay,
                extra_headers={inference.HOPS_HEADER: str(hops + 1)},
            )
        except errors.UpstreamError as exc:
            circuit.failed(self.clock(), probe=probe)
            refused = isinstance(exc, errors.UpstreamUnreachable) and exc.refused
            self.forwards[(node_id, "unreachable" if refused else "failed")] += 1
            if refused:
                return None, False  # nothing was sent: another peer may take it
            raise
        finally:
            self.pending[node_id] -= 1
            if self.pending[node_id] <= 0:
                del self.pending[node_id]
            exchange.status = relay.status
            exchange.tokens = relay.tokens
            exchange.client_gone = relay.client_gone
            exchange.upstream_failed = relay.upstream_failed
        if relay.upstream_failed:
            circuit.failed(self.clock(), probe=probe)
            self.forwards[(node_id, "broken")] += 1
            return response, True
        circuit.succeeded(self.clock(), probe=probe)
        if response.status == 503 and not response.prepared:
            self.forwards[(node_id, "unavailable")] += 1
            return response, False
        self.forwards[(node_id, "ok")] += 1
        return response, True

    @property
    def forwarder(self) -> forwarder.Forwarder:
        if self._forwarder is None:
            raise RuntimeError("the mesh's peer session is not open; is the application started?")
        return self._forwarder

    # --- lifecycle ------------------------------------------------------------------------------

    async def running(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: the peer session, the gossip loop (first round at once) and discovery."""
        cluster = self.gw.config.cluster
        # forwarded requests over Noise need no client key (the peer proved the cluster token); without
        # Noise the client's key travels on, since the peer checks it again
        credentials = self.gw.authenticator.credential_headers() if self.noise else ()
        async with aiohttp.ClientSession(
            connector=self._connector(), auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        ) as session:
            self._forwarder = forwarder.Forwarder(
                session,
                credential_headers=credentials,
                upstream_read_timeout_ms=self.gw.config.upstream_read_timeout_ms,
            )
            self.gossiper = peers.Gossiper(
                session=session,
                cluster_view=self.view,
                breakers=self.breakers,
                document=self.document,
                own_url=self.own_url,
                seeds=list(cluster.peers),
                interval_s=cluster.gossip_interval_seconds,
                max_concurrent=cluster.max_concurrent_gossip,
                clock=self.clock,
            )
            async with contextlib.AsyncExitStack() as stack:
                if self._discovery is not None:
                    await stack.enter_async_context(self._discovery(self.gossiper))
                task = asyncio.create_task(self.gossiper.run(), name="mesh: gossip")
                try:
                    yield
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self._forwarder = None


# --- routes -------------------------------------------------------------------------------------


def _mesh(request: web.Request) -> Mesh:
    mesh = request.app[MESH]
    assert isinstance(mesh, Mesh)
    return mesh


async def nodes(request: web.Request) -> web.Response:
    mesh = _mesh(request)
    now = mesh.clock()
    return web.json_response(
        {
            "node_id": mesh.view.node_id,
            "self": mesh.document().model_dump(),
            "nodes": mesh.view.describe(now=now, breakers=mesh.breakers),
            "pending_forwards": dict(mesh.pending),
        }
    )


async def gossip(request: web.Request) -> web.Response:
    mesh = _mesh(request)
    session_peer = request.transport.get_extra_info(transport.PEER_INFO) if request.transport is not None else None
    if mesh.noise and session_peer is None:
        return _forbidden("Plain-HTTP gossip is refused: this node takes gossip over Noise only")
    try:
        document = view.Document.model_validate_json(await request.read())
    except pydantic.ValidationError:
        raise errors.InvalidRequest("Invalid gossip document") from None
    if session_peer is not None and session_peer.node_id != document.node_id:
        return _forbidden(f"The Noise session is node '{session_peer.node_id}', the document says '{document.node_id}'")
    now = mesh.clock()
    if mesh.view.apply(document, now=now) is not view.Verdict.REJECT:
        mesh.breakers.of(document.node_id).succeeded(now)
        if mesh.gossiper is not None:
            mesh.gossiper.add_peer(document.url)
    return web.json_response(text=mesh.document().model_dump_json())


def _forbidden(message: str) -> web.Response:
    body = {"error": {"message": message, "type": "forbidden", "param": None, "code": None}}
    return web.json_response(body, status=403)


# --- metrics ------------------------------------------------------------------------------------


class Collector:
    """proxy_circuit_breaker_state{peer} (0 closed, 1 open, 2 half-open) and proxy_mesh_forwards_total."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    def collect(self) -> Iterator[Metric]:
        mesh = self._mesh
        states = GaugeMetricFamily(
            "proxy_circuit_breaker_state",
            "Circuit breaker state per peer: 0 closed, 1 open, 2 half-open.",
            labels=["peer"],
        )
        for peer, state in mesh.breakers.states(mesh.clock()).items():
            states.add_metric([peer], breaker.STATE_VALUES[state])
        yield states
        forwards = CounterMetricFamily(
            "proxy_mesh_forwards", "Requests forwarded to peers, by peer and outcome.", labels=["peer", "outcome"]
        )
        for (peer, outcome), count in sorted(mesh.forwards.items()):
            forwards.add_metric([peer, outcome], count)
        yield forwards
        yield GaugeMetricFamily(
            "proxy_mesh_pending_forwards", "Requests forwarded to peers and not finished.", sum(mesh.pending.values())
        )


def install(app: web.Application, mesh: Mesh) -> None:
    """Routes, the request path's hook, metrics and the startup work of `mesh` in the gateway `app`."""
    app[MESH] = mesh
    app[gateway.GATEWAY].mesh = mesh
    app.router.add_get("/cluster/nodes", nodes)
    app.router.add_post("/cluster/gossip", gossip)
    app[gateway.GATEWAY].registry.register(Collector(mesh))
    app.cleanup_ctx.append(mesh.running)

"""The gossip loop: every `gossip_interval_seconds`, this node's document to every peer it knows, theirs back.

Peers are the union of `cluster.peers`, those mDNS found (`discovery`), and every URL the view's documents
name (transitive discovery: a peer's known peers become ours). The first round runs at once on start.
At most `max_concurrent_gossip` exchanges are open at a time; each is `POST /cluster/gossip` with this
node's document, answered with the peer's. Over Noise the session authenticates both ends; the node id in
a document must be the one the session proved (checked on the server side, `cluster`).

Each exchange feeds the peer's circuit breaker (a success counts as a half-open probe; a failure as a
failure), so an idle cluster still finds out that a peer came back. Invariant: one loop, one round at a
time; the view and the breakers are only touched on the event loop.

Not here: what a document holds (`cluster` builds it), routing (`scoring`), the HTTP routes (`cluster`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
import pydantic

from llamesh_proxy.mesh import breaker, view

log = logging.getLogger(__name__)

GOSSIP_PATH = "/cluster/gossip"


class Gossiper:
    """Runs the rounds; `add_peer` (mDNS, tests) makes a URL known between rounds."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        cluster_view: view.ClusterView,
        breakers: breaker.Breakers,
        document: Callable[[], view.Document],
        own_url: str,
        seeds: list[str],
        interval_s: float,
        max_concurrent: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._view = cluster_view
        self._breakers = breakers
        self._document = document
        self._own_url = own_url.rstrip("/")
        self._urls: set[str] = {url.rstrip("/") for url in seeds}
        self._interval_s = interval_s
        self._limit = asyncio.Semaphore(max_concurrent)
        self._clock = clock
        self.node_by_url: dict[str, str] = {}
        self._warned: dict[str, str] = {}  # node id -> the mismatched version already warned about
        self.rounds = 0
        self._round_done = asyncio.Event()
        self._wake = asyncio.Event()

    def add_peer(self, url: str) -> None:
        url = url.rstrip("/")
        if url and url != self._own_url and url not in self._urls:
            self._urls.add(url)
            self._wake.set()  # a new peer: a round now rather than at the next tick

    def known_peers(self) -> list[str]:
        """Every peer URL this node knows (for its own document: transitive discovery)."""
        return sorted(self._urls | {u.rstrip("/") for u in self._view.known_urls()} - {self._own_url})

    async def run(self) -> None:
        while True:
            await self.round()
            self._wake.clear()
            try:
                async with asyncio.timeout(self._interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def round(self) -> None:
        document = self._document()
        body = document.model_dump_json().encode()
        urls = [u for u in self.known_peers() if self.node_by_url.get(u) != self._view.node_id]
        await asyncio.gather(*(self._exchange(url, body) for url in urls))
        self.rounds += 1

    async def _exchange(self, url: str, body: bytes) -> None:
        async with self._limit:
            try:
                async with self._session.post(
                    url + GOSSIP_PATH,
                    data=body,
                    headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=max(self._interval_s, 2.0)),
                ) as response:
                    if response.status != 200:
                        raise GossipFailed(f"HTTP {response.status}")
                    answer = view.Document.model_validate_json(await response.read())
            except (aiohttp.ClientError, TimeoutError, ConnectionError, GossipFailed, pydantic.ValidationError) as exc:
                self._failed(url, exc)
                return
        now = self._clock()
        self.node_by_url[url] = answer.node_id
        if answer.node_id == self._view.node_id:
            return  # our own address under another name
        verdict = self._view.apply(answer, now=now)
        if verdict is view.Verdict.REJECT:
            log.warning(
                "peer %s at %s runs version %s: refused (version_mismatch_action)",
                answer.node_id,
                url,
                answer.version,
                extra={"event": "mesh_version_refused", "peer": answer.node_id},
            )
            return
        if verdict is view.Verdict.WARN and self._warned.get(answer.node_id) != answer.version:
            self._warned[answer.node_id] = answer.version  # once per peer and version, not every round
            log.warning(
                "peer %s runs version %s, this node %s (version_mismatch_action: warn)",
                answer.node_id,
                answer.version,
                self._view.version,
                extra={"event": "mesh_version_mismatch", "peer": answer.node_id},
            )
        self._breakers.of(answer.node_id).succeeded(now)
        if answer.url.rstrip("/") != url:
            self.add_peer(answer.url)

    def _failed(self, url: str, exc: BaseException) -> None:
        node_id = self.node_by_url.get(url)
        log.info(
            "gossip with %s failed: %s",
            url,
            exc or type(exc).__name__,
            extra={"event": "mesh_gossip_failed", "peer": node_id or url},
        )
        if node_id is not None and node_id != self._view.node_id:
            self._breakers.of(node_id).failed(self._clock())


class GossipFailed(Exception):
    """A peer answered gossip with something other than its document."""

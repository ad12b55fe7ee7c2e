"""The cluster as this node sees it: the last gossip document of every peer, and what follows from them.

A gossip `Document` is what a node says of itself (SPEC.md "Gossip Metadata"): node id, versions, start
time, ready flag, capacity, in-flight and queued requests, per model (`ModelEntry`) whether it is loaded,
tokens/s, queue length, free slots and learned memory, and the peers it knows (transitive discovery).
`ClusterView` keeps the newest document per node id with the time it was received. A peer unseen for
3 gossip intervals is no routing candidate (it still shows in /cluster/nodes, as stale). The seed's
`version_mismatch_action` decides whether a peer on another proxy version is taken at all.

`peer_models` is the peers' part of /v1/models (the union): every model id no local profile serves, once,
advertised by the lowest node id that is fresh and ready, carrying `source`, `advertised_by`, `cluster_url`
and the owner's start time as `created` (stable across every front end).

Pure: times are passed in (`now`, monotonic seconds); nothing here does I/O or logs.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from typing import Any

import pydantic

from llamesh_proxy.mesh import breaker, scoring

STALE_AFTER_INTERVALS = 3


class ModelEntry(pydantic.BaseModel):
    """One model:profile a node supports, as its gossip says."""

    model_config = pydantic.ConfigDict(extra="ignore")

    id: str  # the /v1/models id: `model` for the default profile, `model:profile` otherwise
    model: str
    profile_id: str
    capability: str = "text"
    loaded: bool = False
    fits: bool = True
    evictions: int = 0
    tokens_per_second: float = 0.0
    queue_length: int = 0
    in_flight: int = 0
    remaining_slots: int = 0
    learned_vram_mb: int = 0
    learned_sysmem_mb: int = 0
    description: str | None = None


class Capacity(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    active_instances: int = 0
    max_instances: int = 0
    can_spawn: bool = False


class Document(pydantic.BaseModel):
    """What one node gossips about itself."""

    model_config = pydantic.ConfigDict(extra="ignore")

    node_id: str = pydantic.Field(min_length=1)
    url: str  # where peers reach its public port
    version: str
    llama_cpp_version: str = "unknown"
    started_at: int = 0
    ready: bool = True
    current_requests: int = 0
    queue_length: int = 0
    capacity: Capacity = pydantic.Field(default_factory=Capacity)
    models: list[ModelEntry] = pydantic.Field(default_factory=list)
    known_peers: list[str] = pydantic.Field(default_factory=list)


def model_id(requested: str) -> str:
    """The /v1/models id a request's `model` names: `name:default` is listed as `name`."""
    return requested.removesuffix(":default")


class Verdict(enum.Enum):
    ACCEPT = "accept"
    WARN = "warn"
    REJECT = "reject"


def version_verdict(ours: str, theirs: str, *, action: str) -> Verdict:
    """`cluster.version_mismatch_action`: warn (take it, say so), reject_major, reject_any."""
    if ours == theirs:
        return Verdict.ACCEPT
    if action == "reject_any":
        return Verdict.REJECT
    if action == "reject_major" and ours.split(".")[0] != theirs.split(".")[0]:
        return Verdict.REJECT
    return Verdict.WARN


@dataclasses.dataclass
class Peer:
    document: Document
    seen_at: float


class ClusterView:
    """The newest gossip document of every peer (never this node's own)."""

    def __init__(self, *, node_id: str, version: str, interval_s: float, mismatch_action: str) -> None:
        self.node_id = node_id
        self.version = version
        self.interval_s = interval_s
        self.mismatch_action = mismatch_action
        self.peers: dict[str, Peer] = {}

    def apply(self, document: Document, *, now: float) -> Verdict:
        """Take a peer's document unless its version is refused; this node's own is never taken."""
        if document.node_id == self.node_id:
            return Verdict.REJECT
        verdict = version_verdict(self.version, document.version, action=self.mismatch_action)
        if verdict is not Verdict.REJECT:
            self.peers[document.node_id] = Peer(document=document, seen_at=now)
        return verdict

    def is_fresh(self, peer: Peer, *, now: float) -> bool:
        return now - peer.seen_at <= STALE_AFTER_INTERVALS * self.interval_s

    def fresh(self, *, now: float) -> list[Document]:
        return [p.document for _, p in sorted(self.peers.items()) if self.is_fresh(p, now=now)]

    def known_urls(self) -> set[str]:
        """Every peer URL named in any document: the peers' own and the peers they know."""
        urls: set[str] = set()
        for peer in self.peers.values():
            urls.add(peer.document.url)
            urls.update(peer.document.known_peers)
        return urls

    def candidates(self, model_id: str, *, now: float, breakers: breaker.Breakers) -> list[scoring.Candidate]:
        """Peers that may take a request for `model_id` now: fresh, ready, supporting it, breaker not open."""
        found: list[scoring.Candidate] = []
        for document in self.fresh(now=now):
            if not document.ready or not breakers.of(document.node_id).available(now):
                continue
            entry = next((m for m in document.models if m.id == model_id), None)
            if entry is not None:
                found.append(candidate(document.node_id, entry, current_requests=document.current_requests))
        return found

    def peer_models(self, *, local_ids: Iterable[str], now: float, started_at: int) -> list[dict[str, Any]]:
        """The peers' entries of /v1/models: models no local profile serves, once each (lowest node id). A
        peer that gossips no start time is shown with this node's (`started_at`), as in the seed."""
        seen = set(local_ids)
        entries: list[dict[str, Any]] = []
        for document in self.fresh(now=now):
            if not document.ready:
                continue
            for entry in document.models:
                if entry.id in seen:
                    continue
                seen.add(entry.id)
                entries.append(model_object(document, entry, fallback_created=started_at))
        return entries

    def describe(self, *, now: float, breakers: breaker.Breakers) -> list[dict[str, Any]]:
        """Every peer for /cluster/nodes: its document, how long ago it was seen, its breaker."""
        nodes = []
        for node_id, peer in sorted(self.peers.items()):
            nodes.append(
                peer.document.model_dump()
                | {
                    "last_seen_seconds_ago": round(now - peer.seen_at, 3),
                    "stale": not self.is_fresh(peer, now=now),
                    "circuit_breaker": breakers.of(node_id).current(now).value,
                }
            )
        return nodes


def candidate(node_id: str, entry: ModelEntry, *, current_requests: int) -> scoring.Candidate:
    return scoring.Candidate(
        node_id=node_id,
        queue_length=entry.queue_length,
        current_requests=current_requests,
        loaded=entry.loaded,
        fits=entry.fits,
        evictions=entry.evictions,
        tokens_per_second=entry.tokens_per_second,
        remaining_slots=entry.remaining_slots,
    )


def model_object(document: Document, entry: ModelEntry, *, fallback_created: int) -> dict[str, Any]:
    """A peer's model in the seed's /v1/models shape."""
    return {
        "id": entry.id,
        "object": "model",
        "created": document.started_at or fallback_created,
        "owned_by": document.node_id,
        "permission": [],
        "root": entry.model,
        "parent": None,
        "metadata": {
            "model": entry.model,
            "profile_id": entry.profile_id,
            "profile_description": entry.description,
            "estimated_tokens_per_second": entry.tokens_per_second,
            "source": "cluster",
            "advertised_by": document.node_id,
            "cluster_url": document.url,
        },
    }

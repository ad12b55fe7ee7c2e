"""Choosing where a request runs in the mesh: this node or one of its peers (the seed's routing score).

`score = load_score + cold_start_cost - performance_bonus` (SPEC.md "Routing"), lowest wins:

- load_score = queue_length * 50 + effective_current_requests * 50, where a peer's in-flight count adds the
  requests this node has forwarded to it and not seen finish (a burst is visible at once, not at the next
  gossip), and this node's subtracts all of those (they hold no local slot);
- cold_start_cost = 0 loaded, 30 fits without eviction, 500 + 200 per eviction, 10000 cannot fit;
- performance_bonus = min(tps, 200) * 5 + min(remaining_slots, 4) * 50.

A forwarded request (hops > 0) is served here whenever this node can serve the model (no ping-pong);
beyond `max_hops` it is the seed's 400. Ties go to this node. Pure: the drivers build `Candidate`s from
the gossip view and the local catalog; nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

LOADED, FITS, EVICTION_BASE, EVICTION_EACH, CANNOT_FIT = 0, 30, 500, 200, 10000
TPS_CAP, TPS_WEIGHT, SLOTS_CAP, SLOT_WEIGHT, LOAD_WEIGHT = 200.0, 5.0, 4, 50, 50


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One node that supports the requested model, as this node sees it."""

    node_id: str
    queue_length: int = 0
    current_requests: int = 0
    loaded: bool = False
    fits: bool = True  # could start an instance without evicting another
    evictions: int = 0  # instances to evict when it does not fit (0 with fits=False: it cannot fit at all)
    tokens_per_second: float = 0.0
    remaining_slots: int = 0


@dataclasses.dataclass(frozen=True)
class Decision:
    """Where to send the request: `node_id` None is this node; `scores` for the route_decision log line."""

    node_id: str | None
    scores: dict[str, float]


class HopLimitExceeded(Exception):
    """More hops than `max_hops`: a forwarding loop (the seed's 400)."""


def cold_start_cost(candidate: Candidate) -> int:
    if candidate.loaded:
        return LOADED
    if candidate.fits:
        return FITS
    if candidate.evictions > 0:
        return EVICTION_BASE + candidate.evictions * EVICTION_EACH
    return CANNOT_FIT


def score(candidate: Candidate, *, effective_current_requests: int) -> float:
    load = candidate.queue_length * LOAD_WEIGHT + max(effective_current_requests, 0) * LOAD_WEIGHT
    bonus = min(candidate.tokens_per_second, TPS_CAP) * TPS_WEIGHT
    bonus += min(max(candidate.remaining_slots, 0), SLOTS_CAP) * SLOT_WEIGHT
    return load + cold_start_cost(candidate) - bonus


def choose(
    local: Candidate | None,
    peers: Sequence[Candidate],
    *,
    hops: int,
    max_hops: int,
    pending_forwards: Mapping[str, int],
) -> Decision | None:
    """Where the request goes; None when no node (this one included) can take it.

    `local` is None when this node cannot serve the model; `peers` are the candidates left after the view's
    filters (fresh, ready, breaker not open). `pending_forwards`: requests forwarded per peer, unfinished."""
    if hops > max_hops:
        raise HopLimitExceeded(f"Too many hops (loop detected): {hops} > max_hops {max_hops}")
    if local is not None and hops > 0:
        return Decision(node_id=None, scores={})
    scores: dict[str, float] = {}
    best: tuple[float, int, str | None] | None = None
    if local is not None:
        forwarded = sum(pending_forwards.values())
        own = score(local, effective_current_requests=local.current_requests - forwarded)
        scores[local.node_id] = own
        best = (own, 0, None)
    for peer in sorted(peers, key=lambda p: p.node_id):
        effective = peer.current_requests + pending_forwards.get(peer.node_id, 0)
        value = score(peer, effective_current_requests=effective)
        scores[peer.node_id] = value
        if best is None or (value, 1) < best[:2]:
            best = (value, 1, peer.node_id)
    if best is None:
        return None
    return Decision(node_id=best[2], scores=scores)

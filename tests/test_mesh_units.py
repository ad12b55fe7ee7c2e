"""The mesh's pure decisions, without sockets or clocks.

Covers: the circuit breaker (opens after failure_threshold failures in a row, a success resets the count,
exponential open durations capped at the maximum, half-open probes paced, success_threshold probes close
it, a failed probe reopens with a longer backoff, a late non-probe failure does not re-block a recovering
peer, disabled never blocks); the routing score (the seed's formula term by term, pending forwards counted
at once on the peer and off this node, ties to this node, forwarded requests served here when possible,
the hop limit); the cluster view (stale after 3 intervals, not ready or open breaker is no candidate,
version_mismatch_action, the union of models with source/advertised_by/cluster_url and the owner's
`created`, transitive peer URLs).
"""

from __future__ import annotations

import pytest

from llamesh_api import config
from llamesh_proxy.mesh import breaker, scoring, view

SETTINGS = config.CircuitBreakerConfig(
    failure_threshold=3,
    success_threshold=2,
    open_duration_base_ms=1000,
    open_duration_max_ms=3000,
    half_open_probe_interval_ms=500,
)


# --- breaker ------------------------------------------------------------------------------------------


def test_breaker_opens_after_threshold_failures_in_a_row() -> None:
    b = breaker.Breaker(SETTINGS)
    b.failed(0.0)
    b.failed(0.0)
    b.succeeded(0.0)  # any success resets the count
    b.failed(0.0)
    b.failed(0.0)
    assert b.current(0.0) is breaker.State.CLOSED
    b.failed(0.0)
    assert b.current(0.0) is breaker.State.OPEN
    assert not b.allow(0.5)
    assert not b.available(0.5)


def test_breaker_half_open_probes_are_paced_and_close_it() -> None:
    b = breaker.Breaker(SETTINGS)
    for _ in range(3):
        b.failed(0.0)
    assert b.current(1.0) is breaker.State.HALF_OPEN
    assert b.available(1.0)
    assert b.allow(1.0)  # the first probe
    assert not b.allow(1.2)  # paced: one per 0.5 s
    b.succeeded(1.2)
    assert b.allow(1.5)
    b.succeeded(1.6)
    assert b.current(1.6) is breaker.State.CLOSED
    assert b.allow(1.6) and b.allow(1.6)


def test_breaker_failed_probe_reopens_with_doubled_backoff_capped() -> None:
    b = breaker.Breaker(SETTINGS)
    for _ in range(3):
        b.failed(0.0)
    assert b.open_until == 1.0
    assert b.allow(1.0)
    b.failed(1.0)
    assert b.current(1.0) is breaker.State.OPEN and b.open_until == 3.0  # 2 s
    assert b.allow(3.0)
    b.failed(3.0)
    assert b.open_until == 6.0  # 4 s capped at 3 s
    assert b.current(5.9) is breaker.State.OPEN


def test_breaker_late_failure_of_an_old_request_does_not_reblock() -> None:
    b = breaker.Breaker(SETTINGS)
    for _ in range(3):
        b.failed(0.0)
    assert b.allow(1.0)
    b.failed(1.1, probe=False)  # dispatched before the circuit opened
    assert b.current(1.1) is breaker.State.HALF_OPEN


def test_breaker_closing_resets_the_backoff() -> None:
    b = breaker.Breaker(SETTINGS)
    for _ in range(3):
        b.failed(0.0)
    b.allow(1.0)
    b.succeeded(1.0)
    b.allow(1.5)
    b.succeeded(1.5)
    for _ in range(3):
        b.failed(2.0)
    assert b.open_until == 3.0  # base again


def test_breaker_disabled_never_blocks() -> None:
    b = breaker.Breaker(SETTINGS.model_copy(update={"enabled": False}))
    for _ in range(10):
        b.failed(0.0)
    assert b.allow(0.0) and b.available(0.0)


def test_breakers_are_per_peer() -> None:
    breakers = breaker.Breakers(SETTINGS)
    for _ in range(3):
        breakers.of("b").failed(0.0)
    assert breakers.states(0.0) == {"b": breaker.State.OPEN}
    assert breakers.of("c").allow(0.0)


# --- scoring ------------------------------------------------------------------------------------------


def test_score_terms() -> None:
    loaded = scoring.Candidate(node_id="x", loaded=True, queue_length=2, tokens_per_second=300, remaining_slots=9)
    assert scoring.score(loaded, effective_current_requests=1) == 2 * 50 + 1 * 50 + 0 - (200 * 5 + 4 * 50)
    assert scoring.cold_start_cost(scoring.Candidate(node_id="x")) == 30
    assert scoring.cold_start_cost(scoring.Candidate(node_id="x", fits=False, evictions=2)) == 900
    assert scoring.cold_start_cost(scoring.Candidate(node_id="x", fits=False)) == 10000


def test_choose_prefers_a_loaded_peer_over_a_cold_local() -> None:
    local = scoring.Candidate(node_id="a")
    peer = scoring.Candidate(node_id="c", loaded=True)
    decision = scoring.choose(local, [peer], hops=0, max_hops=10, pending_forwards={})
    assert decision is not None and decision.node_id == "c"
    assert decision.scores == {"a": 30, "c": 0}


def test_choose_counts_pending_forwards_at_once() -> None:
    local = scoring.Candidate(node_id="a", loaded=True, current_requests=2)
    peer = scoring.Candidate(node_id="c", loaded=True)
    # local's 2 in flight are both forwarded to c: local is idle, c carries them
    decision = scoring.choose(local, [peer], hops=0, max_hops=10, pending_forwards={"c": 2})
    assert decision is not None and decision.node_id is None
    assert decision.scores == {"a": 0, "c": 100}


def test_choose_ties_go_to_this_node_then_the_lowest_peer() -> None:
    same = {"loaded": True}
    local = scoring.Candidate(node_id="a", **same)  # type: ignore[arg-type]
    peers = [scoring.Candidate(node_id="d", **same), scoring.Candidate(node_id="c", **same)]  # type: ignore[arg-type]
    decision = scoring.choose(local, peers, hops=0, max_hops=10, pending_forwards={})
    assert decision is not None and decision.node_id is None
    decision = scoring.choose(None, peers, hops=0, max_hops=10, pending_forwards={})
    assert decision is not None and decision.node_id == "c"


def test_a_forwarded_request_is_served_here_when_it_can_be() -> None:
    local = scoring.Candidate(node_id="a", fits=False)  # the worst local score
    peer = scoring.Candidate(node_id="c", loaded=True, tokens_per_second=100)
    decision = scoring.choose(local, [peer], hops=1, max_hops=10, pending_forwards={})
    assert decision is not None and decision.node_id is None
    # not servable here: it goes on (a second hop)
    decision = scoring.choose(None, [peer], hops=1, max_hops=10, pending_forwards={})
    assert decision is not None and decision.node_id == "c"


def test_hop_limit_and_no_candidate() -> None:
    with pytest.raises(scoring.HopLimitExceeded):
        scoring.choose(None, [scoring.Candidate(node_id="c")], hops=3, max_hops=2, pending_forwards={})
    assert scoring.choose(None, [], hops=0, max_hops=2, pending_forwards={}) is None


# --- view ---------------------------------------------------------------------------------------------


def document(node_id: str, *models: str, ready: bool = True, version: str = "1.0.0", **fields: object) -> view.Document:
    entries = [view.ModelEntry(id=m, model=m.split(":")[0], profile_id="default", loaded=True) for m in models]
    return view.Document(
        node_id=node_id,
        url=f"http://{node_id}:8080",
        version=version,
        ready=ready,
        models=entries,
        started_at=1000 + ord(node_id[0]),
        **fields,  # type: ignore[arg-type]
    )


def cluster_view(action: str = "warn") -> view.ClusterView:
    return view.ClusterView(node_id="a", version="1.0.0", interval_s=5, mismatch_action=action)


def test_view_candidates_filter_stale_unready_and_open_breakers() -> None:
    v = cluster_view()
    breakers = breaker.Breakers(SETTINGS)
    v.apply(document("b", "m"), now=0.0)
    v.apply(document("c", "m"), now=10.0)
    v.apply(document("d", "m", ready=False), now=10.0)
    v.apply(document("e", "other"), now=10.0)
    assert [c.node_id for c in v.candidates("m", now=14.9, breakers=breakers)] == ["b", "c"]
    assert [c.node_id for c in v.candidates("m", now=15.1, breakers=breakers)] == ["c"]  # b: 3 intervals unseen
    for _ in range(3):
        breakers.of("c").failed(15.1)
    assert v.candidates("m", now=15.1, breakers=breakers) == []
    described = {n["node_id"]: n for n in v.describe(now=15.1, breakers=breakers)}
    assert described["b"]["stale"] and described["c"]["circuit_breaker"] == "open"


def test_view_never_takes_its_own_document() -> None:
    v = cluster_view()
    assert v.apply(document("a", "m"), now=0.0) is view.Verdict.REJECT
    assert v.peers == {}


@pytest.mark.parametrize(
    ("action", "theirs", "verdict"),
    [
        ("warn", "2.0.0", view.Verdict.WARN),
        ("reject_major", "1.5.0", view.Verdict.WARN),
        ("reject_major", "2.0.0", view.Verdict.REJECT),
        ("reject_any", "1.0.1", view.Verdict.REJECT),
        ("reject_any", "1.0.0", view.Verdict.ACCEPT),
    ],
)
def test_version_mismatch_action(action: str, theirs: str, verdict: view.Verdict) -> None:
    v = cluster_view(action)
    assert v.apply(document("b", "m", version=theirs), now=0.0) is verdict
    assert ("b" in v.peers) is (verdict is not view.Verdict.REJECT)


def test_union_of_models() -> None:
    v = cluster_view()
    v.apply(document("c", "shared", "only-c:fast"), now=0.0)
    v.apply(document("b", "shared", "local"), now=0.0)
    v.apply(document("d", "only-d"), now=0.0)
    v.peers["d"].document.started_at = 0  # an older peer without a start time
    entries = {e["id"]: e for e in v.peer_models(local_ids=["local"], now=1.0, started_at=42)}
    assert sorted(entries) == ["only-c:fast", "only-d", "shared"]
    assert entries["shared"]["owned_by"] == "b"  # the lowest node id advertises it
    metadata = entries["only-c:fast"]["metadata"]
    assert (metadata["source"], metadata["advertised_by"], metadata["cluster_url"]) == ("cluster", "c", "http://c:8080")
    assert entries["only-c:fast"]["created"] == 1000 + ord("c")
    assert entries["only-d"]["created"] == 42


def test_known_urls_are_transitive() -> None:
    v = cluster_view()
    v.apply(document("b", "m", known_peers=["http://c:8080", "http://a:8080"]), now=0.0)
    assert v.known_urls() == {"http://b:8080", "http://c:8080", "http://a:8080"}


def test_model_id_of_a_request() -> None:
    assert view.model_id("m:default") == "m"
    assert view.model_id("m:fast") == "m:fast"

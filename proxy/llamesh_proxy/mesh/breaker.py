"""Per-peer circuit breakers: stop sending requests to a peer that fails outright, probe it back.

The seed's rules (SPEC.md "Circuit Breaker"): a circuit per peer node id, fed by forwarded requests and by
gossip. Closed: each failure counts, any success resets the count, `failure_threshold` failures in a row
open it. Open: no dispatch for `open_duration_base_ms`, doubling with each consecutive opening up to
`open_duration_max_ms`. Then half-open: one probe at most per `half_open_probe_interval_ms`;
`success_threshold` successful probes close it, a failed probe opens it again with the next backoff.
Only probes move a recovering circuit: the late failure of a request sent before it opened does not.

Pure state: every call takes `now` (monotonic seconds); nothing sleeps, nothing here does I/O. The
drivers (`cluster`, `peers`) report outcomes and ask `allow(now)` before dispatching.
"""

from __future__ import annotations

import dataclasses
import enum

from llamesh_api import config


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


STATE_VALUES = {State.CLOSED: 0, State.OPEN: 1, State.HALF_OPEN: 2}  # proxy_circuit_breaker_state's values


@dataclasses.dataclass
class Breaker:
    """One peer's circuit."""

    settings: config.CircuitBreakerConfig
    state: State = State.CLOSED
    failures: int = 0
    successes: int = 0
    openings: int = 0  # consecutive openings, for the backoff; reset when the circuit closes
    open_until: float = 0.0
    last_probe_at: float | None = None

    def current(self, now: float) -> State:
        """The state at `now`: an open circuit whose backoff ran out is half-open."""
        if self.state is State.OPEN and now >= self.open_until:
            self.state = State.HALF_OPEN
            self.successes = 0
            self.last_probe_at = None
        return self.state

    def allow(self, now: float) -> bool:
        """Whether a request (or a gossip probe) may go to this peer now; a half-open admit is a probe."""
        if not self.settings.enabled:
            return True
        state = self.current(now)
        if state is State.CLOSED:
            return True
        if state is State.OPEN:
            return False
        interval_s = self.settings.half_open_probe_interval_ms / 1000
        if self.last_probe_at is not None and now - self.last_probe_at < interval_s:
            return False
        self.last_probe_at = now
        return True

    def available(self, now: float) -> bool:
        """Whether the peer is a routing candidate (not open); unlike `allow`, takes no probe."""
        return not self.settings.enabled or self.current(now) is not State.OPEN

    def succeeded(self, now: float, *, probe: bool = True) -> None:
        state = self.current(now)
        if state is State.CLOSED:
            self.failures = 0
        elif state is State.HALF_OPEN and probe:
            self.successes += 1
            if self.successes >= self.settings.success_threshold:
                self.state = State.CLOSED
                self.failures = self.successes = self.openings = 0

    def failed(self, now: float, *, probe: bool = True) -> None:
        """A failure; `probe=False` for a request dispatched before the circuit opened (ignored unless closed)."""
        state = self.current(now)
        if state is State.CLOSED:
            self.failures += 1
            if self.failures >= self.settings.failure_threshold:
                self._open(now)
        elif state is State.HALF_OPEN and probe:
            self._open(now)

    def _open(self, now: float) -> None:
        base = self.settings.open_duration_base_ms
        duration_ms = min(base * 2**self.openings, self.settings.open_duration_max_ms)
        self.openings += 1
        self.state = State.OPEN
        self.open_until = now + duration_ms / 1000
        self.failures = self.successes = 0


class Breakers:
    """The circuits of every peer this node has talked to, by node id."""

    def __init__(self, settings: config.CircuitBreakerConfig) -> None:
        self.settings = settings
        self._by_peer: dict[str, Breaker] = {}

    def of(self, node_id: str) -> Breaker:
        found = self._by_peer.get(node_id)
        if found is None:
            found = self._by_peer[node_id] = Breaker(self.settings)
        return found

    def states(self, now: float) -> dict[str, State]:
        return {node_id: b.current(now) for node_id, b in sorted(self._by_peer.items())}

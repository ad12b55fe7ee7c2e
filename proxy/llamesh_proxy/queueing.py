"""Admission: which instance serves a request, who waits in which queue, and when to ask for an instance.

A `Board` is one gateway's bookkeeping, keyed by `model:profile` (a *pool*): the instances that can take
requests (READY, not draining), those still coming (pending to starting, or asked for and not yet seen),
the slots this gateway holds on each instance, and one FIFO queue per pool. Rules (the seed's):

- an instance has a free slot while this gateway's in-flight count on it is below
  `max_concurrent_requests_per_instance` (0 = unlimited); of those, the one with the fewest in flight wins;
- no bypass: while anyone waits in a pool's queue, newcomers queue behind them. A freed slot or a newly
  READY instance is granted to the head of the queue at once, so a free slot never coexists with waiters;
- with a request's affinity key (`affinity`; the pool's policy has `affinity` on), the instance the key was
  last served by, else its rendezvous-hash home, unless that one is full or over the load bound: a free slot
  elsewhere is taken then, never a wait. A queued request granted a slot re-homes its key there;
- when nothing is free, a newcomer queues if the pool's queue (`max_queue_size`, 0 = unlimited) and the
  gateway's total (`max_total_queue_entries`, 0 = unlimited) have room, else it is rejected (queue_full);
- a new instance is asked for when the instances still coming cannot absorb the queue and the pool is below
  `max_instances`; an instance that fails before ever becoming READY while nothing else is live fails the
  whole queue (spawn_failures_exhausted); a pool that loses its instances any other way asks for a new one;
- cold-start OOM recovery: the pool counts its consecutive failed starts (a READY instance resets the
  count). When the failed start was a cold one (the caller says `cold`: no node learned a peak for its args
  hash), the queue is kept and a retry is asked for at recovery stage 1 after the first failure and stage 2
  after the second (`cold_stage`, which the caller puts on the instance for the operator to evict by); the
  third consecutive failure fails the queue (spawn_failures_exhausted), and instances asked for after that
  are stage 3 (the operator places them only on an otherwise empty node) until one becomes READY;
- draining rejects newcomers and fails every waiter;
- with `shared` slots (several gateway replicas in front of the same instances), this gateway may use on an
  instance only the slots it has claimed there (`set_allowance`, see `sharing`), never more than the limit.

Pure apart from its log records (the seed's queue_enqueue, queue_dequeue and queue_drop, each with the
request's ticket as `token_id`): no I/O, no clock, no asyncio. Waiting, timeouts and store writes are
`dispatch`'s; every method here returns what the caller must do (grant, fail, create) and never does it.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import logging
import math
from collections.abc import Callable, Collection, Iterable, Sequence

from llamesh_proxy import affinity

logger = logging.getLogger(__name__)
_ROUTINE_DROPS = frozenset({"withdrawn", "client_gone", "draining", "profile_gone"})  # logged as info, not warning

COLD_START_ATTEMPTS = 3  # consecutive failed cold starts before waiters get spawn_failures_exhausted

NameFactory = Callable[[], str]
"""Makes the name of an instance this gateway asks for (called only when one is asked for)."""


class RejectReason(enum.Enum):
    QUEUE_FULL = "full"
    GLOBAL_LIMIT = "global_limit"
    NO_CAPACITY = "no_capacity"
    DRAINING = "draining"


class FailReason(enum.Enum):
    """Why waiters were turned away after they had queued."""

    SPAWN_FAILED = "spawn_failed"  # answered spawn_failures_exhausted
    CREATE_FAILED = "create_failed"
    PROFILE_GONE = "profile_gone"
    DRAINING = "draining"


@dataclasses.dataclass(frozen=True)
class Policy:
    """A pool's limits, resolved from its profile and the node's model_defaults."""

    max_concurrent: int
    max_queue: int
    max_instances: int
    affinity: bool = True  # route by the request's affinity key (model_defaults.routing: affinity)


@dataclasses.dataclass(frozen=True)
class Admitted:
    ticket: int
    instance: str
    affinity: affinity.Result = affinity.Result.NONE


@dataclasses.dataclass(frozen=True)
class Queued:
    ticket: int
    spawn: str | None  # the name of an instance the caller must create, if one was asked for


@dataclasses.dataclass(frozen=True)
class Rejected:
    reason: RejectReason


Decision = Admitted | Queued | Rejected


@dataclasses.dataclass(frozen=True)
class Grant:
    ticket: int
    instance: str
    affinity: affinity.Result = affinity.Result.NONE


@dataclasses.dataclass(frozen=True)
class Failure:
    ticket: int
    reason: FailReason


@dataclasses.dataclass(frozen=True)
class Spawn:
    pool: str
    name: str


@dataclasses.dataclass
class Changes:
    """What the caller must do after a release or a change of the world."""

    grants: list[Grant] = dataclasses.field(default_factory=list)
    failures: list[Failure] = dataclasses.field(default_factory=list)
    spawns: list[Spawn] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.grants or self.failures or self.spawns)

    def extend(self, other: Changes) -> None:
        self.grants += other.grants
        self.failures += other.failures
        self.spawns += other.spawns


@dataclasses.dataclass
class _Pool:
    policy: Policy
    routable: list[str] = dataclasses.field(default_factory=list)  # READY and not draining, catalog order
    starting: set[str] = dataclasses.field(default_factory=set)  # live, not ready yet
    requested: set[str] = dataclasses.field(default_factory=set)  # asked for by us, not seen yet
    unreachable: int = 0  # READY but routed around (no connection): no slots, yet it counts toward max_instances
    queue: collections.deque[int] = dataclasses.field(default_factory=collections.deque)
    spawn_failures: int = 0  # consecutive starts that failed before READY; a READY instance resets it
    cold: bool = False  # no node learned memory for the pool's args hash (as of the last set_instances)
    homes: affinity.Table = dataclasses.field(default_factory=affinity.Table)  # affinity key → last instance

    @property
    def live(self) -> int:
        return len(self.routable) + len(self.starting) + len(self.requested) + self.unreachable

    def coming_capacity(self) -> float:
        coming = len(self.starting) + len(self.requested)
        if coming == 0:
            return 0
        return math.inf if self.policy.max_concurrent == 0 else coming * self.policy.max_concurrent


class Board:
    """One gateway's admission state. Not thread-safe; one event loop drives it."""

    def __init__(self, *, max_total_queue: int, shared: bool = False) -> None:
        self.max_total_queue = max_total_queue
        self.shared = shared
        self.draining = False
        self._allowance: dict[str, int] = {}  # instance → slots this gateway claimed there (shared only)
        self._pools: dict[str, _Pool] = {}
        self._in_flight: dict[str, int] = {}  # instance → slots held (granted or serving)
        self._waiting: dict[int, str] = {}  # ticket → pool
        self._held: dict[int, tuple[str, str]] = {}  # ticket → (pool, instance)
        self._keys: dict[int, str] = {}  # ticket waiting → its affinity key
        self._tickets = itertools.count(1)

    # --- requests -----------------------------------------------------------------------------

    def admit(self, pool_key: str, policy: Policy, *, name_factory: NameFactory, key: str | None = None) -> Decision:
        """A new request for `pool_key`: serve it now, queue it (maybe asking for an instance), or refuse it.

        `key`: the request's affinity key (`affinity.request_key`), if it has one."""
        if self.draining:
            return Rejected(RejectReason.DRAINING)
        pool = self._pool(pool_key, policy)
        pool.policy = policy
        ticket = next(self._tickets)
        key = key if policy.affinity else None
        if not pool.queue:
            choice = self._free_instance(pool, key)
            if choice is not None:
                self._hold(ticket, pool_key, choice.instance)
                return Admitted(ticket, choice.instance, choice.result)
        if pool.live == 0 and policy.max_instances == 0:
            return Rejected(RejectReason.NO_CAPACITY)
        if policy.max_queue and len(pool.queue) >= policy.max_queue:
            _log_drop(pool_key, RejectReason.QUEUE_FULL.value, ticket=ticket, queue_length=len(pool.queue))
            return Rejected(RejectReason.QUEUE_FULL)
        if self.max_total_queue and len(self._waiting) >= self.max_total_queue:
            _log_drop(pool_key, RejectReason.GLOBAL_LIMIT.value, ticket=ticket, queue_length=len(pool.queue))
            return Rejected(RejectReason.GLOBAL_LIMIT)
        pool.queue.append(ticket)
        self._waiting[ticket] = pool_key
        if key is not None:
            self._keys[ticket] = key
        spawn = self._maybe_spawn(pool, name_factory)
        model, _, profile = pool_key.partition(":")
        logger.info(
            "queued for %s (%d waiting)",
            pool_key,
            len(pool.queue),
            extra={
                "event": "queue_enqueue",
                "model": model,
                "profile": profile,
                "token_id": ticket,
                "queue_length": len(pool.queue),
                "spawn": spawn,
            },
        )
        return Queued(ticket, spawn)

    def release(self, ticket: int) -> Changes:
        """A request that held a slot finished: the slot goes to the head of its pool's queue."""
        held = self._held.pop(ticket, None)
        if held is None:
            return Changes()
        pool_key, instance = held
        remaining = self._in_flight[instance] - 1
        if remaining:
            self._in_flight[instance] = remaining
        else:
            del self._in_flight[instance]
        pool = self._pools.get(pool_key)
        return self._grant(pool) if pool is not None else Changes()

    def withdraw(self, ticket: int, *, reason: str = "withdrawn") -> Changes:
        """A request gave up (timeout, disconnect, error): leave the queue, or give back a granted slot.

        `reason` (timeout, client_gone, ...) only goes into the queue_drop line."""
        pool_key = self._waiting.pop(ticket, None)
        self._keys.pop(ticket, None)
        if pool_key is not None:
            queue = self._pools[pool_key].queue
            queue.remove(ticket)
            _log_drop(pool_key, reason, ticket=ticket, queue_length=len(queue))
            return Changes()
        return self.release(ticket)

    def want_instance(self, pool_key: str, policy: Policy, *, name_factory: NameFactory) -> str | None:
        """Prewarm: ask for an instance if the pool has none live (and may have one)."""
        pool = self._pool(pool_key, policy)
        pool.policy = policy
        if self.draining or pool.live or policy.max_instances == 0:
            return None
        name = name_factory()
        pool.requested.add(name)
        return name

    # --- the world changes --------------------------------------------------------------------

    def set_instances(
        self,
        pool_key: str,
        policy: Policy,
        *,
        routable: Sequence[str],
        starting: Iterable[str],
        known: Collection[str],
        failed_unready: bool,
        name_factory: NameFactory,
        unreachable: int = 0,
        cold: bool = False,
    ) -> Changes:
        """The catalog's view of a pool changed.

        `routable`: READY, not draining; `starting`: live but not ready; `known`: every instance of the pool
        the catalog holds, whatever its phase (asked-for instances it holds are no longer "requested");
        `failed_unready`: an instance of this pool just failed without ever having been READY; `cold`: no
        node has learned memory for the pool's args hash (a failed start is then retried, see above).
        """
        pool = self._pool(pool_key, policy)
        pool.policy = policy
        pool.routable = list(routable)
        pool.starting = set(starting)
        pool.unreachable = unreachable
        pool.cold = cold
        pool.requested.difference_update(known)
        if failed_unready:
            pool.spawn_failures += 1
        if pool.routable:
            pool.spawn_failures = 0
        changes = self._grant(pool)
        if pool.queue and not pool.routable and not pool.starting and not pool.requested:
            if failed_unready and not (pool.cold and pool.spawn_failures < COLD_START_ATTEMPTS):
                changes.extend(self._fail_queue(pool, FailReason.SPAWN_FAILED))
            else:
                name = self._maybe_spawn(pool, name_factory)
                if name is not None:
                    changes.spawns.append(Spawn(pool_key, name))
        return changes

    def cold_stage(self, pool_key: str) -> int:
        """The cold-start recovery stage an instance asked for now in `pool_key` is for (0: a plain start)."""
        pool = self._pools.get(pool_key)
        if pool is None or not pool.cold:
            return 0
        return min(pool.spawn_failures, COLD_START_ATTEMPTS)

    def spawn_failures(self, pool_key: str) -> int:
        pool = self._pools.get(pool_key)
        return pool.spawn_failures if pool is not None else 0

    def is_requested(self, pool_key: str, name: str) -> bool:
        """Whether this gateway asked for `name` in `pool_key` and has not seen it in the catalog yet."""
        pool = self._pools.get(pool_key)
        return pool is not None and name in pool.requested

    def rename_request(self, pool_key: str, old: str, new: str) -> None:
        """The instance asked for as `old` is being asked for as `new` instead (the name was taken)."""
        pool = self._pools.get(pool_key)
        if pool is not None and old in pool.requested:
            pool.requested.discard(old)
            pool.requested.add(new)

    def create_failed(self, pool_key: str, name: str) -> Changes:
        """Asking the store for instance `name` failed; if nothing else is coming, the queue cannot be served."""
        pool = self._pools.get(pool_key)
        if pool is None:
            return Changes()
        pool.requested.discard(name)
        if pool.queue and pool.live == 0:
            return self._fail_queue(pool, FailReason.CREATE_FAILED)
        return Changes()

    def forget(self, pool_key: str) -> Changes:
        """The profile is gone: its waiters cannot be served. Slots held on its instances stay counted."""
        pool = self._pools.pop(pool_key, None)
        if pool is None:
            return Changes()
        return self._fail_queue(pool, FailReason.PROFILE_GONE)

    def drain(self) -> Changes:
        """Shutdown: refuse newcomers from now on and turn every waiter away."""
        self.draining = True
        changes = Changes()
        for pool in self._pools.values():
            changes.extend(self._fail_queue(pool, FailReason.DRAINING))
        return changes

    def rehome(self, pool_key: str, old: str, new: str) -> int:
        """Instance `new` restored the KV caches `old` saved: the keys `old` served now go to `new`."""
        pool = self._pools.get(pool_key)
        return pool.homes.rehome(old, new) if pool is not None else 0

    def affinity_keys(self, pool_key: str) -> int:
        """How many affinity keys the pool remembers (bounded by `affinity.TABLE_SIZE`)."""
        pool = self._pools.get(pool_key)
        return len(pool.homes) if pool is not None else 0

    # --- views --------------------------------------------------------------------------------

    def set_allowance(self, pool_key: str, instance: str, slots: int) -> Changes:
        """Shared slots: this gateway may now hold up to `slots` requests on `instance` (grants if it grew)."""
        if slots:
            self._allowance[instance] = slots
        else:
            self._allowance.pop(instance, None)
        pool = self._pools.get(pool_key)
        return self._grant(pool) if pool is not None else Changes()

    def allowance(self, instance: str) -> int:
        return self._allowance.get(instance, 0)

    def in_flight(self, instance: str) -> int:
        return self._in_flight.get(instance, 0)

    def in_flight_by_instance(self) -> dict[str, int]:
        return dict(self._in_flight)

    def queue_length(self, pool_key: str | None = None) -> int:
        if pool_key is None:
            return len(self._waiting)
        pool = self._pools.get(pool_key)
        return len(pool.queue) if pool is not None else 0

    def queue_lengths(self) -> dict[str, int]:
        return {key: len(pool.queue) for key, pool in self._pools.items() if pool.queue}

    def requested(self, pool_key: str) -> frozenset[str]:
        pool = self._pools.get(pool_key)
        return frozenset(pool.requested) if pool is not None else frozenset()

    def is_waiting(self, ticket: int) -> bool:
        return ticket in self._waiting

    def holds(self, ticket: int) -> str | None:
        held = self._held.get(ticket)
        return held[1] if held is not None else None

    # --- internals ----------------------------------------------------------------------------

    def _pool(self, pool_key: str, policy: Policy) -> _Pool:
        pool = self._pools.get(pool_key)
        if pool is None:
            pool = self._pools[pool_key] = _Pool(policy)
        return pool

    def _free_instance(self, pool: _Pool, key: str | None) -> affinity.Choice | None:
        choice = affinity.choose(
            key,
            instances=pool.routable,
            load=lambda instance: self._in_flight.get(instance, 0),
            has_room=lambda instance, load: self._has_room(instance, load, pool.policy.max_concurrent),
            remembered=pool.homes.get(key) if key is not None else None,
        )
        if choice is not None and key is not None:
            pool.homes.remember(key, choice.instance)
        return choice

    def _has_room(self, instance: str, load: int, limit: int) -> bool:
        if limit == 0:
            return True  # unlimited: nothing to share either
        cap = min(limit, self._allowance.get(instance, 0)) if self.shared else limit
        return load < cap

    def _hold(self, ticket: int, pool_key: str, instance: str) -> None:
        self._held[ticket] = (pool_key, instance)
        self._in_flight[instance] = self._in_flight.get(instance, 0) + 1

    def _grant(self, pool: _Pool) -> Changes:
        changes = Changes()
        while pool.queue:
            # the head's key follows it to the slot it gets (FIFO: its home is not waited for)
            key = self._keys.pop(pool.queue[0], None)
            choice = self._free_instance(pool, key)
            if choice is None:
                if key is not None:
                    self._keys[pool.queue[0]] = key
                break
            instance = choice.instance
            ticket = pool.queue.popleft()
            pool_key = self._waiting.pop(ticket)
            self._hold(ticket, pool_key, instance)
            changes.grants.append(Grant(ticket, instance, choice.result))
            model, _, profile = pool_key.partition(":")
            logger.info(
                "ticket %d of %s goes to %s",
                ticket,
                pool_key,
                instance,
                extra={
                    "event": "queue_dequeue",
                    "model": model,
                    "profile": profile,
                    "token_id": ticket,
                    "instance": instance,
                    "queue_length": len(pool.queue),
                    "request_id": None,  # granted from another request's (or no request's) context
                },
            )
        return changes

    def _maybe_spawn(self, pool: _Pool, name_factory: NameFactory) -> str | None:
        if self.draining or pool.live >= pool.policy.max_instances:
            return None
        if pool.coming_capacity() >= len(pool.queue):
            return None
        name = name_factory()
        pool.requested.add(name)
        return name

    def _fail_queue(self, pool: _Pool, reason: FailReason) -> Changes:
        changes = Changes()
        while pool.queue:
            ticket = pool.queue.popleft()
            pool_key = self._waiting.pop(ticket)
            self._keys.pop(ticket, None)
            changes.failures.append(Failure(ticket, reason))
            _log_drop(pool_key, reason.value, ticket=ticket, queue_length=len(pool.queue), own_context=False)
        return changes


def _log_drop(pool_key: str, reason: str, *, ticket: int, queue_length: int, own_context: bool = True) -> None:
    """The seed's queue_drop line; `own_context` is False when the request dropped is not the current one."""
    model, _, profile = pool_key.partition(":")
    fields: dict[str, object] = {
        "event": "queue_drop",
        "reason": reason,
        "model": model,
        "profile": profile,
        "token_id": ticket,
        "queue_length": queue_length,
    }
    if not own_context:
        fields["request_id"] = None
    level = logging.INFO if reason in _ROUTINE_DROPS else logging.WARNING
    logger.log(level, "ticket %d of %s dropped: %s", ticket, pool_key, reason, extra=fields)

"""Shared slots: several gateway replicas never put more requests on one instance than
`max_concurrent_requests_per_instance`, together.

Invariant: **a replica uses on an instance at most the slots it claimed there, and the claims that count
add up to at most the limit.** The claims live in the instance's status, one entry per replica
(`status.usage.<gateway id>`: `claimed`, `claimedAt`, `waiting`), each written only by its replica:

- **growing** a claim is a status write that names the resourceVersion it read (`GET` first, so the
  sum is computed from the object as it is): two replicas claiming the last slot at once — one gets 409,
  reads again, and finds nothing left. Only growth needs that; shrinking or renewing never breaks the sum;
- a claim **counts** while it was renewed within `CLAIM_TTL_S`; replicas renew theirs every
  `RENEW_EVERY_S`, so a crashed replica's slots come free after the TTL. A replica that could not renew
  for nearly the TTL (the API server was away; it counts from the moment it stamped its last claimedAt, not
  from the write's answer) claims again with the version check before it trusts its claim,
  and keeps only what others did not take meanwhile. While the API server is unreachable a replica keeps
  serving on the slots it holds (nobody can claim them then): availability first. Only a replica cut off
  from an API server that others still reach can overlap with them, after the TTL — llama-server's own
  slots then queue the excess;
- a replica with requests queued and no slot to claim says so (`waiting`); a replica holding slots it does
  not use gives them back at once when it sees another waiting, and after `IDLE_RELEASE_S` anyway.

Claims cost store writes only when a replica's need changes (first request of a burst, hand-overs) and a
renewal every few seconds while it holds slots — never one per request. With `max_concurrent = 0`
(unlimited) nothing is claimed. `llamesh serve` (one gateway in the process) does not share.

The decisions (`others_claimed`, `grow_to`, `surplus_wanted`) are pure; `SlotClaims` does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import functools
import logging
import time
from collections.abc import Callable

from llamesh_api import resources, retrying, store
from llamesh_proxy import catalog, queueing

logger = logging.getLogger(__name__)

CLAIM_TTL_S = 10.0
RENEW_EVERY_S = 3.0
IDLE_RELEASE_S = 60.0  # a replica that waits gets slots at once anyway (`waiting`); this only tidies up
_CLAIM_CONFLICTS = retrying.Policy(attempts=10, first_delay_s=0.005, max_delay_s=0.2)


def others_claimed(instance: resources.LlamaInstance, *, me: str, now: datetime.datetime) -> int:
    """Slots of `instance` that live claims of other replicas hold."""
    total = 0
    for replica, usage in instance.status.usage.items():
        if replica == me or not usage.claimed or usage.claimed_at is None:
            continue
        if (now - usage.claimed_at).total_seconds() < CLAIM_TTL_S:
            total += usage.claimed
    return total


def others_waiting(instance: resources.LlamaInstance, *, me: str, now: datetime.datetime) -> bool:
    return any(
        usage.waiting > 0 and usage.claimed_at is not None and (now - usage.claimed_at).total_seconds() < CLAIM_TTL_S
        for replica, usage in instance.status.usage.items()
        if replica != me
    )


def grow_to(*, limit: int, others: int, current: int, in_flight: int, queued: int) -> int:
    """The claim this replica should hold: what it uses plus what waits, within what others left free."""
    wanted = min(limit, in_flight + queued)
    return max(current, min(wanted, max(limit - others, 0)))


def surplus_wanted(*, current: int, in_flight: int, queued: int) -> int:
    """What this replica keeps when it gives back slots it does not use."""
    return min(current, in_flight + queued)


@dataclasses.dataclass
class _Claim:
    pool: str
    limit: int
    slots: int = 0
    renewed: float = 0.0  # time.monotonic() when the last successful write was stamped (its claimedAt)
    idle_since: float | None = None


class SlotClaims:
    """This replica's claims, kept in step with its board and written to the store."""

    def __init__(
        self,
        *,
        board: queueing.Board,
        catalog: catalog.Catalog,
        store: store.Store,
        gateway_id: str,
        apply: Callable[[queueing.Changes], None],
    ) -> None:
        self._board = board
        self._catalog = catalog
        self._store = store
        self._me = gateway_id
        self._apply = apply
        self._claims: dict[str, _Claim] = {}
        self._busy: dict[str, asyncio.Task[None]] = {}  # pool → the claim attempt running for it
        self._again: set[str] = set()  # pools that changed while their attempt ran

    def need(self, target: catalog.Target) -> None:
        """Requests wait in `target`'s pool: claim slots on its ready instances (in the background)."""
        if not target.policy.max_concurrent or not self._board.queue_length(target.pool):
            return
        if target.pool in self._busy:
            self._again.add(target.pool)
            return
        task = asyncio.create_task(self._grow(target), name=f"claim slots {target.pool}")
        self._busy[target.pool] = task
        task.add_done_callback(functools.partial(self._done, target.pool))

    def changed(self, target: catalog.Target) -> None:
        """The pool's instances changed (an event): claim if we wait, give back what another replica waits for."""
        self.need(target)
        now = resources_now()
        for name in self._catalog.pool_view(target.pool).routable:
            claim = self._claims.get(name)
            instance = self._catalog.instance(name)
            if claim is None or instance is None or not claim.slots:
                continue
            keep = surplus_wanted(
                current=claim.slots,
                in_flight=self._board.in_flight(name),
                queued=self._board.queue_length(target.pool),
            )
            if keep < claim.slots and others_waiting(instance, me=self._me, now=now):
                self._spawn_write(target.pool, name, keep)

    async def close(self) -> None:
        for task in list(self._busy.values()):
            task.cancel()
        await asyncio.gather(*self._busy.values(), return_exceptions=True)

    async def run(self) -> None:
        """Renew what is held, give back what idles, stop using what could not be renewed. Until cancelled."""
        try:
            while True:
                await asyncio.sleep(RENEW_EVERY_S / 3)
                await self._tend()
        finally:
            for name, claim in list(self._claims.items()):
                if claim.slots:
                    with contextlib.suppress(Exception):
                        await self._write(name, 0, waiting=0)

    # --- internals ----------------------------------------------------------------------------

    def _done(self, pool: str, _task: object = None) -> None:
        self._busy.pop(pool, None)
        if pool in self._again:
            self._again.discard(pool)
            target = self._catalog.target(pool)
            if target is not None:
                self.need(target)

    async def _grow(self, target: catalog.Target) -> None:
        limit = target.policy.max_concurrent
        starved = True
        for name in self._catalog.pool_view(target.pool).routable:
            queued = self._board.queue_length(target.pool)
            if not queued:
                break
            try:
                slots = await retrying.conflicts(
                    functools.partial(self._try_grow, name, limit=limit, queued=queued),
                    what=f"claim slots on {name}",
                    policy=_CLAIM_CONFLICTS,
                )
            except store.StoreError as exc:
                logger.warning("could not claim slots on instance %s: %s", name, exc)
                continue
            if slots is None:
                continue
            starved = False
            self._allow(target.pool, name, slots)
        if starved and self._board.queue_length(target.pool):
            for name in self._catalog.pool_view(target.pool).routable:
                with contextlib.suppress(store.StoreError):
                    held = self._claims.get(name)
                    await self._write(name, held.slots if held is not None else 0, waiting=1)

    async def _try_grow(self, name: str, *, limit: int, queued: int) -> int | None:
        """One read-and-claim; the new claim, or None when nothing more can be had."""
        instance = await self._store.get(resources.LlamaInstance, name)
        if instance is None:
            return None
        pool = catalog.pool_key(instance.spec.model, instance.spec.profile)
        claim = self._claims.setdefault(name, _Claim(pool=pool, limit=limit))
        claim.limit = limit
        others = others_claimed(instance, me=self._me, now=resources_now())
        new = grow_to(
            limit=limit, others=others, current=claim.slots, in_flight=self._board.in_flight(name), queued=queued
        )
        if new <= claim.slots:
            return None
        stamped = time.monotonic()  # others count the claim from its claimedAt, stamped before the write
        await self._store.patch_status(
            resources.LlamaInstance,
            name,
            {"usage": {self._me: self._entry(new, waiting=0)}},
            resource_version=instance.metadata.resource_version,
        )
        claim.slots, claim.renewed, claim.idle_since = new, stamped, None
        return new

    def _allow(self, pool: str, name: str, slots: int) -> None:
        self._apply(self._board.set_allowance(pool, name, slots))

    def _spawn_write(self, pool: str, name: str, slots: int) -> None:
        async def shrink() -> None:
            with contextlib.suppress(store.StoreError):
                await self._write(name, slots, waiting=0)
                self._allow(pool, name, slots)

        task = asyncio.create_task(shrink(), name=f"give back slots on {name}")
        self._busy.setdefault(f"shrink {name}", task)
        task.add_done_callback(lambda _t: self._busy.pop(f"shrink {name}", None))

    async def _write(self, name: str, slots: int, *, waiting: int) -> None:
        """Renew, shrink or release (no version needed: the sum cannot grow)."""
        claim = self._claims.get(name)
        stamped = time.monotonic()
        try:
            await self._store.patch_status(
                resources.LlamaInstance, name, {"usage": {self._me: self._entry(slots, waiting=waiting)}}
            )
        except store.NotFound:
            self._claims.pop(name, None)
            return
        if claim is not None:
            claim.slots, claim.renewed = slots, stamped
            if not slots:
                self._claims.pop(name, None)

    def _entry(self, slots: int, *, waiting: int) -> dict[str, object]:
        return {"claimed": slots, "claimedAt": resources_now().isoformat(), "waiting": waiting}

    async def _tend(self) -> None:
        # whoever still waits asks again (and so keeps its `waiting` fresh: older than the TTL, others ignore
        # it); whoever holds slots it does not use gives them to a replica that waits
        wall = resources_now()
        for pool in self._board.queue_lengths():
            target = self._catalog.target(pool)
            if target is not None:
                self.need(target)
        for name, claim in list(self._claims.items()):
            instance = self._catalog.instance(name)
            keep = surplus_wanted(
                current=claim.slots, in_flight=self._board.in_flight(name), queued=self._board.queue_length(claim.pool)
            )
            if instance is not None and keep < claim.slots and others_waiting(instance, me=self._me, now=wall):
                self._spawn_write(claim.pool, name, keep)
        now = time.monotonic()
        for name, claim in list(self._claims.items()):
            in_flight = self._board.in_flight(name)
            queued = self._board.queue_length(claim.pool)
            if in_flight or queued:
                claim.idle_since = None
            elif claim.idle_since is None:
                claim.idle_since = now
            try:
                if claim.idle_since is not None and now - claim.idle_since >= IDLE_RELEASE_S:
                    await self._write(name, 0, waiting=0)
                    self._allow(claim.pool, name, 0)
                elif now - claim.renewed > CLAIM_TTL_S - RENEW_EVERY_S:
                    # others may count it as lapsed soon (or already: a slow write, a late pass): claim
                    # again, with the version check
                    kept = await retrying.conflicts(
                        functools.partial(self._reclaim, name, claim), what=f"reclaim {name}", policy=_CLAIM_CONFLICTS
                    )
                    self._allow(claim.pool, name, kept)
                elif now - claim.renewed >= RENEW_EVERY_S:
                    await self._write(name, claim.slots, waiting=0)
            except store.StoreError as exc:
                logger.warning("could not renew the claim on instance %s: %s", name, exc)

    async def _reclaim(self, name: str, claim: _Claim) -> int:
        instance = await self._store.get(resources.LlamaInstance, name)
        if instance is None:
            self._claims.pop(name, None)
            return 0
        kept = min(claim.slots, max(claim.limit - others_claimed(instance, me=self._me, now=resources_now()), 0))
        stamped = time.monotonic()
        await self._store.patch_status(
            resources.LlamaInstance,
            name,
            {"usage": {self._me: self._entry(kept, waiting=0)}},
            resource_version=instance.metadata.resource_version,
        )
        claim.slots, claim.renewed = kept, stamped
        if not kept:
            self._claims.pop(name, None)
        return kept


def resources_now() -> datetime.datetime:
    return store.utcnow()

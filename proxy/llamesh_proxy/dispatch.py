"""Waiting for a slot: the asyncio side of `queueing`, and asking the store for new instances.

`Dispatcher.acquire` admits a request through the `Board`; when it must wait, it parks on a future that a
grant (a freed slot, a newly READY instance) or a failure (spawn failed, draining, profile removed) settles,
bounded by the profile's `max_wait_in_queue_ms`. Whatever ends the wait early — timeout, a client that
disconnects (the handler is cancelled), an error — withdraws the ticket, so the queue and the slot
counts stay exact. Instances are asked for by creating `LlamaInstance` objects (phase Pending) in the
store from a background task, so a client that goes away never leaves a half-made request behind.

Cold-start OOM recovery: the board decides when a failed cold start is retried (`queueing`); the retry is
asked for with the `llamesh.dev/cold-start-stage` annotation (the operator evicts by it), under a name every
replica derives alike (`<model>-<profile>-<hash>-c<stage>`), and every waiter of the pool gets its deadline
pushed out by another start's budget, so the recovery's stages — not the queue limit — bound the wait. "Cold"
means no node the catalog holds has learned a peak for the profile's args hash.

It does not forward requests (`forwarder`) and does not read the store (`following` feeds the catalog).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import secrets
import time

from llamesh_api import resources, store
from llamesh_proxy import affinity, catalog, errors, metrics, queueing, sharing

logger = logging.getLogger(__name__)

REQUESTED_BY = resources.REQUESTED_BY


@dataclasses.dataclass(frozen=True)
class Lease:
    """A slot on one instance, held from admission until `Dispatcher.release`."""

    ticket: int
    instance: str
    url: str
    queued_ms: float
    affinity: affinity.Result = affinity.Result.NONE  # how the instance was chosen


COLD_START_SLACK_S = 30.0  # on top of the startup budget: placement, binding, the agent picking it up
COLD_RETRY_SLACK_S = 60.0  # on top of that for a cold-start retry: evicting (stage 2 drains for up to its grace)


def instance_name(target: catalog.Target) -> str:
    """A fresh DNS-1123 name: `<model>-<profile>-<6 hex>`, sanitized and kept well under 63 characters."""
    return resources.instance_name(target.model, target.profile.id, secrets.token_hex(3))


class Dispatcher:
    """Admission with waiting, for one gateway."""

    def __init__(
        self,
        *,
        board: queueing.Board,
        catalog: catalog.Catalog,
        store: store.Store,
        metrics: metrics.Metrics,
        gateway_id: str,
    ) -> None:
        self.board = board
        self.catalog = catalog
        self._store = store
        self._metrics = metrics
        self._gateway_id = gateway_id
        self._waiters: dict[int, asyncio.Future[Lease]] = {}
        self._deadlines: dict[int, tuple[str, asyncio.Timeout]] = {}  # ticket → (pool, its wait's deadline)
        self._creating: set[asyncio.Task[None]] = set()
        self.sharing: sharing.SlotClaims | None = None  # set when replicas share slots
        self.last_request_at: dict[str, float] = {}  # instance → time.time() of its last start or end
        self._restores_checked: set[str] = set()  # restored instances whose first returning request was seen

    async def acquire(self, target: catalog.Target, *, key: str | None = None) -> Lease:
        """A slot for `target`, now or after waiting in its queue; raises the seed's 503s (or 404/500).

        `key`: the request's affinity key (`affinity.request_key`), routed by when the policy says so."""
        decision = self.board.admit(
            target.pool, target.policy, name_factory=functools.partial(self._name_for, target), key=key
        )
        if isinstance(decision, queueing.Admitted):
            self._route_decision(decision.instance, decision.affinity, queued=False)
            return self._lease(decision.ticket, decision.instance, queued_ms=0.0, result=decision.affinity)
        if isinstance(decision, queueing.Rejected):
            raise self._rejection(decision.reason)
        ticket = decision.ticket
        if self.sharing is not None:
            self.sharing.need(target)
        wait_s = target.max_wait_ms / 1000 if target.max_wait_ms else None
        if decision.spawn is not None:
            self._create(target, decision.spawn, resources.Reason.DEMAND)
            if wait_s is not None:
                # the request that starts an instance waits for it as long as a start may take (the seed
                # gives it the new instance), not the queue's limit: a cold start slower than
                # max_wait_in_queue_ms must not answer queue_timeout to the very request that caused it
                wait_s = max(wait_s, target.startup_timeout_s + COLD_START_SLACK_S)
        waiter: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = waiter
        started = time.monotonic()
        try:
            async with asyncio.timeout(wait_s) as deadline:
                self._deadlines[ticket] = (target.pool, deadline)
                lease = await waiter
        except BaseException as exc:
            self._deadlines.pop(ticket, None)
            self._waiters.pop(ticket, None)
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # retrieved: a failure we were given is not "never retrieved"
            why = {TimeoutError: "timeout", asyncio.CancelledError: "client_gone"}.get(type(exc), "error")
            self._apply(self.board.withdraw(ticket, reason=why))  # leaves the queue, or gives back a late slot
            if isinstance(exc, TimeoutError):
                self._metrics.queue_drops["timeout"] += 1
                raise errors.QueueTimeout() from None
            raise
        self._deadlines.pop(ticket, None)
        queued_ms = (time.monotonic() - started) * 1000
        self._metrics.observe_queue_wait(queued_ms)
        return dataclasses.replace(lease, queued_ms=queued_ms)

    def observe_cache(self, lease: Lease, cached_tokens: int | None) -> None:
        """What llama-server said it reused for a request routed by affinity (`timings.cache_n`).

        A hit that reused nothing means its cache was gone (evicted from the slot and the RAM cache). The first
        hit on an instance that restored saved caches checks the restore: nothing reused there means llama-server
        could not use what it loaded (e.g. a sliding-window model without `--swa-full`), counted and logged."""
        if lease.affinity is not affinity.Result.HIT or cached_tokens is None:
            return
        self._metrics.affinity_cache["reused" if cached_tokens else "cold"] += 1
        if lease.instance in self._restores_checked or self.catalog.restored_from(lease.instance) is None:
            return
        if len(self._restores_checked) > 4096:  # names of long-gone instances: forget them all, rarely
            self._restores_checked.clear()
        self._restores_checked.add(lease.instance)
        if cached_tokens == 0:
            self._metrics.kv_cache_restores_unused += 1
            logger.warning(
                "instance %s restored saved KV caches, but its first returning conversation reused none of them",
                lease.instance,
                extra={"event": "kv_cache_restore_unused", "instance": lease.instance},
            )

    def release(self, lease: Lease) -> None:
        self.last_request_at[lease.instance] = time.time()
        self._apply(self.board.release(lease.ticket))

    def unreachable(self, lease: Lease) -> None:
        """The leased instance refused or dropped the connection before answering: route around it."""
        pool = self.catalog.mark_unreachable(lease.instance)
        if pool is not None:
            self.refresh(pool)

    def refresh(self, pool: str, *, failed_unready: bool = False) -> None:
        """The catalog's view of `pool` changed: grant, fail or spawn as the board says."""
        target = self.catalog.target(pool)
        if target is None:
            return
        view = self.catalog.pool_view(pool)
        for name in view.routable:  # an instance that restored another's saved KV caches takes its keys
            restored_from = self.catalog.restored_from(name)
            if restored_from is not None:
                self.board.rehome(pool, restored_from, name)
        changes = self.board.set_instances(
            pool,
            target.policy,
            routable=view.routable,
            starting=view.starting,
            known=view.known,
            unreachable=view.unreachable,
            failed_unready=failed_unready,
            name_factory=functools.partial(self._name_for, target),
            cold=self._is_cold(target),
        )
        self._apply(changes)
        if self.sharing is not None:
            self.sharing.changed(target)

    def forget(self, pool: str) -> None:
        """The profile is no longer served: its waiters get 404."""
        self._apply(self.board.forget(pool))

    def drain(self) -> None:
        """Shutdown: every waiter and every newcomer gets 503 draining."""
        self._apply(self.board.drain())

    def prewarm(self, target: catalog.Target) -> str | None:
        """Ask for an instance of `target` unless one is live; the name asked for, or None."""
        name = self.board.want_instance(
            target.pool, target.policy, name_factory=functools.partial(self._name_for, target)
        )
        if name is not None:
            self._create(target, name, resources.Reason.PREWARM)
        return name

    async def close(self) -> None:
        for task in list(self._creating):
            task.cancel()
        await asyncio.gather(*self._creating, return_exceptions=True)

    # --- internals ----------------------------------------------------------------------------

    def _lease(
        self, ticket: int, instance: str, *, queued_ms: float, result: affinity.Result = affinity.Result.NONE
    ) -> Lease:
        url = self.catalog.url(instance)
        if url is None:  # granted from the routable list, so it has a URL; kept as a guard
            self._apply(self.board.release(ticket))
            raise errors.UpstreamError(f"Upstream error: instance {instance} has no address")
        self.last_request_at[instance] = time.time()
        return Lease(ticket=ticket, instance=instance, url=url, queued_ms=queued_ms, affinity=result)

    def apply(self, changes: queueing.Changes) -> None:
        """Carry out what the board decided (grants, failures, spawns); for `sharing`'s allowance changes."""
        self._apply(changes)

    def _apply(self, changes: queueing.Changes) -> None:
        pending = [changes]
        while pending:
            current = pending.pop()
            for grant in current.grants:
                waiter = self._waiters.pop(grant.ticket, None)
                if waiter is None or waiter.done():  # its owner is leaving; give the slot to the next one
                    pending.append(self.board.release(grant.ticket))
                    continue
                self._route_decision(grant.instance, grant.affinity, queued=True)
                try:
                    waiter.set_result(self._lease(grant.ticket, grant.instance, queued_ms=0.0, result=grant.affinity))
                except errors.GatewayError as exc:
                    waiter.set_exception(exc)
            for failure in current.failures:
                waiter = self._waiters.pop(failure.ticket, None)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(self._failure(failure))
            for spawn in current.spawns:
                target = self.catalog.target(spawn.pool)
                if target is not None:
                    self._create(target, spawn.name, resources.Reason.DEMAND)
                else:
                    pending.append(self.board.create_failed(spawn.pool, spawn.name))

    def _route_decision(self, instance: str, result: affinity.Result, *, queued: bool) -> None:
        """Count the routing outcome; log it as `route_decision` when affinity had a say (DEBUG otherwise:
        the request line already names the instance, and one more line per request costs the gateway)."""
        self._metrics.affinity[result.value] += 1
        level = logging.DEBUG if result is affinity.Result.NONE else logging.INFO
        if logger.isEnabledFor(level):
            logger.log(
                level,
                "request goes to %s (affinity %s)",
                instance,
                result.value,
                extra={"event": "route_decision", "instance": instance, "affinity": result.value, "queued": queued},
            )

    def _rejection(self, reason: queueing.RejectReason) -> errors.GatewayError:
        if reason is queueing.RejectReason.DRAINING:
            return errors.Draining()
        if reason is queueing.RejectReason.NO_CAPACITY:
            return errors.NoCapacity()
        self._metrics.queue_drops[reason.value] += 1
        return errors.QueueFull()

    def _failure(self, failure: queueing.Failure) -> errors.GatewayError:
        reason = failure.reason
        if reason is queueing.FailReason.SPAWN_FAILED:
            return errors.SpawnFailuresExhausted()
        if reason is queueing.FailReason.DRAINING:
            return errors.Draining()
        if reason is queueing.FailReason.PROFILE_GONE:
            return errors.ModelNotFound("The requested model was removed while the request waited", param="model")
        return errors.InternalError("Could not request a new instance for this model")

    def _is_cold(self, target: catalog.Target) -> bool:
        """No node has learned peak memory for the profile's args hash (its memory is unknown)."""
        for node in self.catalog.nodes():
            learned = node.status.learned.get(target.args_hash)
            if learned is not None and (learned.peak_sysmem_mb or learned.peak_vram_mb):
                return False
        return True

    def _name_for(self, target: catalog.Target) -> str:
        """Scale from zero: every replica asks for the same name (`<model>-<profile>-<args hash>`), so however
        many ask at once, one instance is made; the others' creates answer AlreadyExists and they wait for
        that one. A cold-start retry likewise (`...-c<stage>`). With instances known (a scale-up), a fresh name."""
        stage = self.board.cold_stage(target.pool)
        if stage:
            retry = resources.instance_name(target.model, target.profile.id, f"{target.args_hash[:8]}-c{stage}")
            if self.catalog.instance(retry) is None and not self.board.is_requested(target.pool, retry):
                return retry
            return instance_name(target)
        cold = resources.instance_name(target.model, target.profile.id, target.args_hash[:10])
        if not self.catalog.pool_view(target.pool).known and not self.board.is_requested(target.pool, cold):
            return cold
        return instance_name(target)

    async def _name_taken(self, target: catalog.Target, name: str, reason: resources.Reason, *, stage: int = 0) -> None:
        try:
            existing = await self._store.get(resources.LlamaInstance, name)
        except Exception:
            existing = None
        if (
            existing is not None
            and not existing.phase.is_terminal
            and not existing.spec.drain
            and existing.spec.args_hash == target.args_hash
        ):
            logger.info(
                "instance %s was asked for by another gateway; waiting for it",
                name,
                extra={"event": "instance_shared", "instance_id": name, "gateway_id": self._gateway_id},
            )
            return  # another replica asked first: this one waits for the same instance
        fresh = instance_name(target)  # the name belongs to a finished instance: ask under another
        self.board.rename_request(target.pool, name, fresh)
        await self._create_instance(target, fresh, reason, stage=stage)

    def _create(self, target: catalog.Target, name: str, reason: resources.Reason) -> None:
        stage = self.board.cold_stage(target.pool)
        if stage:
            self._extend_waits(target)
            logger.warning(
                "cold start of %s failed %d time(s) in a row; asking for %s at recovery stage %d",
                target.display,
                self.board.spawn_failures(target.pool),
                name,
                stage,
                extra={
                    "event": "cold_start_retry",
                    "instance_id": name,
                    "model": target.model,
                    "profile": target.profile.id,
                    "stage": stage,
                    "gateway_id": self._gateway_id,
                },
            )
        task = asyncio.create_task(self._create_instance(target, name, reason, stage=stage), name=f"create {name}")
        self._creating.add(task)
        task.add_done_callback(self._creating.discard)

    def _extend_waits(self, target: catalog.Target) -> None:
        """A cold-start retry: the pool's waiters wait for it (at least another start's budget from now)."""
        until = asyncio.get_running_loop().time() + target.startup_timeout_s + COLD_START_SLACK_S + COLD_RETRY_SLACK_S
        for pool, deadline in self._deadlines.values():
            when = deadline.when()
            if pool == target.pool and when is not None and when < until:
                deadline.reschedule(until)

    async def _create_instance(
        self, target: catalog.Target, name: str, reason: resources.Reason, *, stage: int = 0
    ) -> None:
        instance = resources.new_instance(
            name=name,
            model=target.model,
            model_uid=target.model_uid,
            profile=target.profile.id,
            args_hash=target.args_hash,
            reason=reason,
            requested_by=self._gateway_id,
        )
        if stage:
            instance.metadata.annotations[resources.COLD_START_STAGE] = str(stage)
        try:
            await self._store.create(instance)
        except store.AlreadyExists:
            await self._name_taken(target, name, reason, stage=stage)
            return
        except Exception:
            logger.exception("could not create instance %s for %s", name, target.display)
            self._apply(self.board.create_failed(target.pool, name))
            return
        logger.info(
            "asked for instance %s of %s (%s)",
            name,
            target.display,
            reason.value,
            extra={
                "event": "instance_requested",  # the agent logs instance_spawn, with the port, when it starts
                "instance_id": name,
                "model": target.model,
                "profile": target.profile.id,
                "reason": reason.value,
                "gateway_id": self._gateway_id,
            },
        )

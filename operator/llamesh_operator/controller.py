"""The operator's reconcile loop over a Store: read the world, `planning.plan` it, apply the actions.

Level-triggered: it runs on every change its informers report and on a timer, and each run starts from what
the store holds now (a fresh list, or the in-memory store's objects in place, not the informers' caches, so a
pass never acts twice on a world that its own last write already changed), so a missed event or a restart
costs nothing. Applying an action that
raced with another writer (the object is gone or changed) is skipped; the next run sees the new world.

It writes only what the operator owns (`store`'s table): `spec.nodeName` (binding — a spec write alone),
`spec.drain`, instance deletes and creates (min instances), and `LlamaModel.status`. Why an instance cannot
be placed is logged once per change of reason (Kubernetes Events come with the Kubernetes driver).

Cold-start OOM recovery (the state is the retry instance's `llamesh.dev/cold-start-stage` annotation, see
`planning`): from the planner's `ColdStart` actions it logs the seed's events — `cold_oom_evict_stage1`
and `cold_oom_evict_stage2_start` (with `count`, the instances drained for it) when a retry enters the
stage or drains more, `cold_oom_evict_stage2_drain_complete` once the node is clear — and
`cold_oom_wait_capacity` once for stage 3. The evictions are counted in the profile's status
(`coldOomEvictions`); the drained instances end with `instance_terminate` reason `cold_oom_stage1`/`2`.

A node is lost when its agent wrote no heartbeat for `planning.NODE_LOST_AFTER`, counted from the later of
its last heartbeat and the moment this operator could read the store (its first pass, or the first after
passes that could not): agents cannot write heartbeats while the API server is away either, so an outage,
or an operator that restarts after one, never reads as every node lost at once (Kubernetes' node
lifecycle controller gives nodes the same grace).

It decides nothing itself — every decision is in `planning`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import secrets
from collections.abc import Callable
from typing import Protocol

from llamesh_api import config, informer, resources, store, writes
from llamesh_operator import planning

log = logging.getLogger(__name__)


class Recorder(Protocol):
    """Tells people what happened to an object (Kubernetes Events); best effort, never raises."""

    async def __call__(self, obj: resources.Resource, *, reason: str, message: str, warning: bool = False) -> None: ...


async def _no_record(obj: resources.Resource, *, reason: str, message: str, warning: bool = False) -> None:
    return None  # bare metal: the log lines say it


@dataclasses.dataclass(frozen=True)
class Observed:
    """What the planner reads: every model, instance and node."""

    models: list[resources.LlamaModel]
    instances: list[resources.LlamaInstance]
    nodes: list[resources.LlamaNode]


class WorldSource(Protocol):
    """Where a pass reads the world from (the seam: `world_source` by default, caches if they are enough)."""

    async def __call__(self) -> Observed: ...


def listing(resource_store: store.Store) -> WorldSource:
    """A fresh list of each kind per pass: after its own writes, a pass never plans on an older world."""

    async def observe() -> Observed:
        return Observed(
            models=(await resource_store.list(resources.LlamaModel)).items,
            instances=(await resource_store.list(resources.LlamaInstance)).items,
            nodes=(await resource_store.list(resources.LlamaNode)).items,
        )

    return observe


def viewing(memory: store.MemoryStore) -> WorldSource:
    """The in-memory store's objects as they are now, without copying them (`MemoryStore.view`): as fresh as
    a listing, and the planner only reads. On `llamesh serve` the copies were most of an idle pass's cost."""

    async def observe() -> Observed:
        return Observed(
            models=memory.view(resources.LlamaModel),
            instances=memory.view(resources.LlamaInstance),
            nodes=memory.view(resources.LlamaNode),
        )

    return observe


def world_source(resource_store: store.Store) -> WorldSource:
    """How a pass reads the world by default: the in-memory store in place, any other store listed."""
    return viewing(resource_store) if isinstance(resource_store, store.MemoryStore) else listing(resource_store)


class Controller:
    def __init__(
        self,
        *,
        resource_store: store.Store,
        defaults: Callable[[], config.ModelDefaults],
        interval: float = 1.0,
        record: Recorder = _no_record,
        observe: WorldSource | None = None,
        drain_grace_s: float = planning.DRAIN_GRACE.total_seconds(),
        clock: Callable[[], datetime.datetime] = store.utcnow,
    ) -> None:
        self._clock = clock
        self._store = resource_store
        self._observe = observe or world_source(resource_store)
        self._defaults = defaults
        self._interval = interval
        self._record = record
        self._wake = asyncio.Event()
        self._unschedulable: dict[str, str] = {}  # instance → the reason last logged
        self._lost_nodes: set[str] = set()  # nodes said to be lost, until they are not
        self._drain_grace = datetime.timedelta(seconds=drain_grace_s)
        self._cold_logged: set[tuple[str, str]] = set()  # (instance, event) of cold-start stages logged
        # Whether the last pass could not read the store (or none has yet: an operator that starts, perhaps
        # after the API server was away long enough to cost it the Lease, has seen no heartbeat go by), and
        # when a pass could read it again: from then, each node has the whole grace to write a heartbeat.
        self._blind = True
        self._regained_at: datetime.datetime | None = None

    async def reconcile_once(self) -> list[planning.Action]:
        try:
            observed = await self._observe()
        except Exception:
            self._blind = True
            raise
        if self._blind:  # the agents' heartbeats could not get through either: each node's grace starts again
            if self._regained_at is not None:
                log.info(
                    "the store answers again; every node has %d s from now to write a heartbeat",
                    planning.NODE_LOST_AFTER.total_seconds(),
                    extra={"event": "store_regained"},
                )
            self._blind = False
            self._regained_at = self._clock()
        world = planning.World(
            models=observed.models,
            instances=observed.instances,
            nodes=observed.nodes,
            defaults=self._defaults(),
            drain_grace=self._drain_grace,
            heartbeat_floor=self._regained_at,
        )
        names = {instance.name for instance in world.instances}
        self._unschedulable = {name: why for name, why in self._unschedulable.items() if name in names}
        self._cold_logged = {logged for logged in self._cold_logged if logged[0] in names}
        now = self._clock()
        actions = planning.plan(world, now=now)
        self._lost_nodes &= {action.node for action in actions if isinstance(action, planning.NodeLost)}
        model_uids = {model.name: model.metadata.uid for model in world.models}
        instances = {instance.name: instance for instance in world.instances}
        for action in actions:
            try:
                await self._apply(action, model_uids=model_uids, instances=instances)
            except (store.NotFound, store.Conflict, store.AlreadyExists) as exc:
                log.debug("skipped %s: %s", action, exc)
        return actions

    async def run(self) -> None:
        """Reconcile on every watched change and at least every `interval` seconds, until cancelled."""
        watchers = [
            asyncio.create_task(
                informer.Informer(self._store, kind, on_event=self._changed, on_listed=self._changed).run(),
                name=f"operator-watch-{kind.kind_name}",
            )
            for kind in (resources.LlamaModel, resources.LlamaInstance, resources.LlamaNode)
        ]
        try:
            while True:
                self._wake.clear()
                try:
                    await self.reconcile_once()
                except Exception:  # the loop must survive anything one pass hits
                    log.exception("operator reconcile failed; retrying", extra={"event": "reconcile_failed"})
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel (cpython#86296)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._wake.wait()
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

    def _changed(self, _change: object) -> None:
        self._wake.set()

    async def _apply(
        self,
        action: planning.Action,
        *,
        model_uids: dict[str, str | None],
        instances: dict[str, resources.LlamaInstance],
    ) -> None:
        match action:
            case planning.Bind(instance=name, node=node_name):
                moved = False  # set by the last (conflict-retried) run of `bind`: did this write bind it?

                def bind(obj: resources.LlamaInstance) -> None:
                    nonlocal moved
                    moved = not obj.spec.node_name
                    if moved:  # a binding is never moved
                        obj.spec.node_name = node_name

                bound = await writes.update(self._store, resources.LlamaInstance, name, bind)
                if bound is not None and moved:
                    log.info(
                        "instance %s bound to node %s",
                        name,
                        node_name,
                        extra={"event": "instance_bound", "instance_id": name, "node": node_name},
                    )
                    await self._record(bound, reason="Bound", message=f"bound to node {node_name}")
            case planning.Unschedulable(instance=name, message=message):
                if self._unschedulable.get(name) != message:
                    self._unschedulable[name] = message
                    log.warning(
                        "instance %s: %s", name, message, extra={"event": "instance_unschedulable", "instance_id": name}
                    )
                    if name in instances:
                        await self._record(instances[name], reason="Unschedulable", message=message, warning=True)
            case planning.Drain(instance=name, reason=reason):

                def drain(obj: resources.LlamaInstance) -> None:
                    obj.spec.drain = True
                    obj.spec.drain_reason = reason

                if (drained := await writes.update(self._store, resources.LlamaInstance, name, drain)) is not None:
                    log.info(
                        "instance %s draining: %s",
                        name,
                        reason,
                        extra={"event": "instance_drain", "instance_id": name, "reason": reason},
                    )
                    why = "Evicting" if reason.startswith(("capacity", "cold_oom")) else "Draining"
                    await self._record(drained, reason=why, message=reason)
            case planning.Delete(instance=name, reason=reason):
                await self._store.delete(resources.LlamaInstance, name)
                log.info(
                    "instance %s deleted: %s",
                    name,
                    reason,
                    extra={"event": "instance_deleted", "instance_id": name, "reason": reason},
                )
                if name in instances:
                    await self._record(instances[name], reason="Deleted", message=reason)
            case planning.Create(model=model, profile=profile, args_hash=args_hash, reason=reason):
                instance = resources.new_instance(
                    name=resources.instance_name(model, profile, secrets.token_hex(3)),
                    model=model,
                    model_uid=model_uids.get(model),
                    profile=profile,
                    args_hash=args_hash,
                    reason=reason,
                    requested_by="operator",
                )
                created = await self._store.create(instance)
                await self._record(created, reason="Created", message=f"{reason.value}: {model}:{profile}")
                log.info(
                    "instance %s created: %s",
                    created.name,
                    reason.value,
                    extra={
                        "event": "instance_created",
                        "instance_id": created.name,
                        "model": model,
                        "profile": profile,
                        "reason": reason.value,
                    },
                )
            case planning.NodeLost(node=node_name, message=message):
                if node_name not in self._lost_nodes:
                    self._lost_nodes.add(node_name)
                    log.warning("node %s lost: %s", node_name, message, extra={"event": "node_lost", "node": node_name})
                    node = await self._store.get(resources.LlamaNode, node_name)
                    if node is not None:
                        await self._record(node, reason="NodeLost", message=message, warning=True)
            case planning.ColdStart():
                await self._cold_start(action, instances=instances)
            case planning.SetModelStatus(model=model, status=status):
                await writes.update_status(
                    self._store, resources.LlamaModel, model, lambda obj: setattr(obj, "status", status)
                )

    async def _cold_start(self, action: planning.ColdStart, *, instances: dict[str, resources.LlamaInstance]) -> None:
        """The seed's cold_oom_* log lines (and Events) for one pass of a cold-start retry, each once."""
        name, stage = action.instance, action.stage
        events: list[tuple[str, dict[str, object]]] = []
        if stage == 1 and (action.evicting or (name, "stage1") not in self._cold_logged):
            events.append(("cold_oom_evict_stage1", {"count": len(action.evicting)}))
            self._cold_logged.add((name, "stage1"))
        if stage == 2 and (action.evicting or (name, "stage2") not in self._cold_logged):
            events.append(("cold_oom_evict_stage2_start", {"count": len(action.evicting)}))
            self._cold_logged.add((name, "stage2"))
        if stage == 2 and not action.remaining and (name, "stage2_done") not in self._cold_logged:
            events.append(("cold_oom_evict_stage2_drain_complete", {}))
            self._cold_logged.add((name, "stage2_done"))
        if stage == 3 and (name, "stage3") not in self._cold_logged:
            events.append(("cold_oom_wait_capacity", {}))
            self._cold_logged.add((name, "stage3"))
        for event, fields in events:
            message = f"cold-start recovery of {name} on {action.node}: {event}"
            if "count" in fields:
                message += f" ({fields['count']} instance(s) drained)"
            log.warning(
                message,
                extra={"event": event, "instance_id": name, "node": action.node, "stage": stage, **fields},
            )
            if name in instances:
                await self._record(instances[name], reason="ColdStartRecovery", message=message, warning=True)

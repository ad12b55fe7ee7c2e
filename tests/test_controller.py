"""The operator's reconcile loop (`controller.Controller`) over an in-memory store: what it writes for the
planner's actions and what it tells people.

Covers: binding is a spec write alone (status untouched: the agent's); min-instance creates carry the
owner reference; model status (Accepted, Ready) is written through the status subresource; an
unschedulable instance and a lost node are reported once per change, not every pass; the world source is
injectable (a pass reads what it is given).

Also: a lost node's instances are deleted (and reported), and a node lost again after it came back is
reported again; an unschedulable instance is reported again when the reason changes, then bound; idle
instances drain with their reason (Draining, once), and a full node's idle instance is evicted for another
model (Evicting); a cold-start retry's stage-2 evictions are logged with the seed's cold_oom_* events once
(not every pass), counted in the profile status, and bounded by the drain grace; finished instances are
deleted, a failed one only after its retention; the model's
conditions keep their transition time and are written only when they change; an action whose object went
away or was bound meanwhile is skipped, and a binding is never moved; the loop reconciles on a watched change
without waiting for its timer, and lives through a pass that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import AsyncIterator

import pytest

from llamesh_api import config, cookbook, resources, store
from llamesh_operator import controller, planning
from rig import waiting


class Recorded:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    async def __call__(self, obj: resources.Resource, *, reason: str, message: str, warning: bool = False) -> None:
        self.events.append((obj.name, reason, message))


def model(name: str = "m", **profile_fields: object) -> resources.LlamaModel:
    fields: dict[str, object] = {"id": "default", "model_path": "/m.gguf", **profile_fields}
    return resources.LlamaModel(
        metadata=resources.ObjectMeta(name=name),
        spec=cookbook.ModelSpec(profiles=[cookbook.Profile.model_validate(fields)]),
    )


async def ready_node(memory: store.MemoryStore, name: str = "n1", *, heartbeat_s_ago: float = 0) -> None:
    await memory.create(resources.LlamaNode(metadata=resources.ObjectMeta(name=name)))
    beat = store.utcnow() - datetime.timedelta(seconds=heartbeat_s_ago)
    await memory.patch_status(resources.LlamaNode, name, {"ready": True, "heartbeatAt": beat.isoformat()})


def make(memory: store.MemoryStore, recorded: Recorded, **kwargs: object) -> controller.Controller:
    return controller.Controller(
        resource_store=memory,
        defaults=config.ModelDefaults,
        record=recorded,
        **kwargs,  # type: ignore[arg-type]
    )


async def test_min_instances_are_created_owned_bound_by_spec_alone_and_reported() -> None:
    memory, recorded = store.MemoryStore(), Recorded()
    created_model = await memory.create(model(min_instances=1))
    await ready_node(memory)
    loop = make(memory, recorded)
    await loop.reconcile_once()  # creates
    await loop.reconcile_once()  # binds
    (instance,) = (await memory.list(resources.LlamaInstance)).items
    assert instance.metadata.owner_references[0].uid == created_model.metadata.uid
    assert instance.metadata.annotations[resources.REQUESTED_BY] == "operator"
    assert instance.spec.node_name == "n1"
    assert instance.status.phase is resources.Phase.PENDING and instance.phase is resources.Phase.SCHEDULED
    assert [reason for _, reason, _ in recorded.events] == ["Created", "Bound"]
    status = (await memory.get(resources.LlamaModel, "m")).status  # type: ignore[union-attr]
    assert {c.type: c.status for c in status.conditions} == {"Accepted": "True", "Ready": "False"}


async def test_unschedulable_and_lost_nodes_are_reported_once_per_change() -> None:
    memory, recorded = store.MemoryStore(), Recorded()
    await memory.create(model(min_instances=1))
    await ready_node(memory, heartbeat_s_ago=120)  # its agent is gone
    later = datetime.timedelta(0)
    loop = make(memory, recorded, clock=lambda: store.utcnow() + later)
    await loop.reconcile_once()  # the operator starts: every node has the whole grace from now
    assert "NodeLost" not in [reason for _, reason, _ in recorded.events]
    later = planning.NODE_LOST_AFTER + datetime.timedelta(seconds=1)
    for _ in range(4):
        await loop.reconcile_once()
    reasons = [reason for _, reason, _ in recorded.events]
    assert reasons.count("NodeLost") == 1
    assert reasons.count("Unschedulable") == 1
    assert "Bound" not in reasons


async def test_the_world_source_is_injectable() -> None:
    memory, recorded = store.MemoryStore(), Recorded()
    seen = model(min_instances=1)
    seen.metadata.uid = "from-a-cache"

    async def cached() -> controller.Observed:
        return controller.Observed(models=[seen], instances=[], nodes=[])

    actions = await make(memory, recorded, observe=cached).reconcile_once()
    (instance,) = (await memory.list(resources.LlamaInstance)).items  # it acted on what it was given
    assert instance.metadata.owner_references[0].uid == "from-a-cache"
    assert any(action.__class__.__name__ == "Create" for action in actions)


async def test_over_the_memory_store_a_pass_reads_the_stored_objects_which_no_write_changes_in_place() -> None:
    memory, recorded = store.MemoryStore(), Recorded()
    await memory.create(model(min_instances=1))
    await ready_node(memory)
    first = memory.view(resources.LlamaModel)
    assert first[0] is memory.view(resources.LlamaModel)[0]  # not a copy: the point of a view
    observed = await controller.world_source(memory)()
    assert observed.models[0] is first[0] and observed.nodes[0] is memory.view(resources.LlamaNode)[0]
    assert [a.__class__.__name__ for a in await make(memory, recorded).reconcile_once()] == ["Create", "SetModelStatus"]

    await memory.patch(resources.LlamaModel, "m", {"metadata": {"labels": {"team": "a"}}})
    await memory.patch_status(resources.LlamaNode, "n1", {"ready": False})
    assert first[0].metadata.labels == {} and observed.nodes[0].status.ready  # what was viewed stays as it was
    assert memory.view(resources.LlamaModel)[0].metadata.labels == {"team": "a"}
    assert not memory.view(resources.LlamaNode)[0].status.ready
    (created,) = memory.view(resources.LlamaInstance)
    await memory.delete(resources.LlamaInstance, created.name)
    assert created.metadata.deletion_timestamp is None and memory.view(resources.LlamaInstance) == []
    listed = await controller.world_source(store_without_view(memory))()  # any other store is listed: copies
    assert listed.models == memory.view(resources.LlamaModel)
    assert listed.models[0] is not memory.view(resources.LlamaModel)[0]


def store_without_view(memory: store.MemoryStore) -> store.Store:
    class Listed:  # a Store that is not a MemoryStore (as the Kubernetes one is not)
        get, list, create, patch = memory.get, memory.list, memory.create, memory.patch
        patch_status, delete, watch = memory.patch_status, memory.delete, memory.watch

    return Listed()  # type: ignore[return-value]


# --- more of what a pass does ------------------------------------------------------------------


async def instance(
    memory: store.MemoryStore,
    name: str,
    *,
    node: str | None = "n1",
    phase: resources.Phase = resources.Phase.PENDING,
    model_name: str = "m",
    **status: object,
) -> None:
    """An instance of `model_name`'s default profile as the gateway makes it, then as its agent reports it."""
    found = await memory.get(resources.LlamaModel, model_name)
    assert found is not None
    profile = found.spec.profiles[0]
    await memory.create(
        resources.LlamaInstance(
            metadata=resources.ObjectMeta(name=name),
            spec=resources.InstanceSpec(
                model=model_name, profile=profile.id, args_hash=profile.args_hash(), node_name=node
            ),
        )
    )
    if phase is not resources.Phase.PENDING or status:
        wire = resources.InstanceStatus.model_validate({"phase": phase, **status}).to_wire()
        await memory.patch_status(resources.LlamaInstance, name, wire)


def ago(seconds: float) -> str:
    return (store.utcnow() - datetime.timedelta(seconds=seconds)).isoformat()


async def names(memory: store.MemoryStore) -> set[str]:
    return {item.name for item in (await memory.list(resources.LlamaInstance)).items}


async def test_a_lost_nodes_instances_are_deleted_and_a_second_loss_is_reported_again() -> None:
    memory, recorded = store.MemoryStore(), Recorded()
    await memory.create(model())
    await ready_node(memory, heartbeat_s_ago=120)
    await instance(memory, "on-lost", phase=resources.Phase.READY, readyAt=ago(200))
    later = datetime.timedelta(0)
    loop = make(memory, recorded, clock=lambda: store.utcnow() + later)
    await loop.reconcile_once()  # the first pass: the grace starts
    later = planning.NODE_LOST_AFTER + datetime.timedelta(seconds=1)
    await loop.reconcile_once()
    assert await names(memory) == set()
    assert [(name, reason) for name, reason, _ in recorded.events] == [("n1", "NodeLost"), ("on-lost", "Deleted")]
    assert "no heartbeat" in recorded.events[1][2]

    now = ago(-later.total_seconds())  # on the loop's clock
    await memory.patch_status(resources.LlamaNode, "n1", {"heartbeatAt": now})  # its agent is back
    await loop.reconcile_once()
    await memory.patch_status(resources.LlamaNode, "n1", {"heartbeatAt": ago(120)})  # and gone again
    await loop.reconcile_once()
    await loop.reconcile_once()
    assert [reason for _, reason, _ in recorded.events].count("NodeLost") == 2


async def test_a_node_is_not_lost_for_heartbeats_missed_while_the_store_was_unreachable() -> None:
    """The API server was away past the grace: its agents could not write heartbeats either, so the first
    pass that reads the store again deletes nothing; a node still silent a whole grace later is lost."""
    memory, recorded = store.MemoryStore(), Recorded()
    await memory.create(model())
    await ready_node(memory, heartbeat_s_ago=120)
    await instance(memory, "kept", phase=resources.Phase.READY, readyAt=ago(200))
    reachable = True

    async def observe() -> controller.Observed:
        if not reachable:
            raise store.ServerError("the API server is away")
        return await controller.world_source(memory)()

    later = datetime.timedelta(0)
    loop = make(memory, recorded, observe=observe, clock=lambda: store.utcnow() + later)
    reachable = False
    with pytest.raises(store.ServerError):
        await loop.reconcile_once()
    reachable = True
    await loop.reconcile_once()
    assert await names(memory) == {"kept"} and "NodeLost" not in [r for _, r, _ in recorded.events]
    later = planning.NODE_LOST_AFTER + datetime.timedelta(seconds=1)
    await loop.reconcile_once()  # the grace has passed with no heartbeat
    assert await names(memory) == set()
    assert [reason for _, reason, _ in recorded.events] == ["NodeLost", "Deleted"]


async def test_unschedulable_is_reported_again_when_the_reason_changes_then_bound() -> None:
    memory, recorded = store.MemoryStore(), Recorded()
    await memory.create(model())
    await instance(memory, "waiting", node=None)
    loop = make(memory, recorded)
    await loop.reconcile_once()
    await loop.reconcile_once()
    await memory.create(resources.LlamaNode(metadata=resources.ObjectMeta(name="n1")))  # not ready yet
    await loop.reconcile_once()
    await loop.reconcile_once()
    await memory.patch_status(resources.LlamaNode, "n1", {"ready": True, "heartbeatAt": ago(0)})
    await loop.reconcile_once()
    assert [(reason, message) for _, reason, message in recorded.events] == [
        ("Unschedulable", "Unschedulable: no nodes"),
        ("Unschedulable", "Unschedulable: n1: not ready"),
        ("Bound", "bound to node n1"),
    ]
    bound = await memory.get(resources.LlamaInstance, "waiting")
    assert bound is not None and bound.spec.node_name == "n1"


async def test_idle_instances_drain_once_with_their_reason() -> None:
    memory, recorded = store.MemoryStore(), Recorded()
    await memory.create(model(idle_timeout_seconds=60))
    await ready_node(memory)
    await instance(memory, "idle", phase=resources.Phase.READY, readyAt=ago(120))
    await instance(memory, "fresh", phase=resources.Phase.READY, readyAt=ago(5))
    loop = make(memory, recorded)
    for _ in range(3):
        await loop.reconcile_once()
    idle, fresh = await memory.get(resources.LlamaInstance, "idle"), await memory.get(resources.LlamaInstance, "fresh")
    assert idle is not None and (idle.spec.drain, idle.spec.drain_reason) == (True, "idle")
    assert idle.status.phase is resources.Phase.READY  # the status is its agent's to change
    assert fresh is not None and not fresh.spec.drain
    assert recorded.events == [("idle", "Draining", "idle")]


async def test_a_full_nodes_idle_instance_is_evicted_for_another_model() -> None:
    memory, recorded = store.MemoryStore(), Recorded()
    await memory.create(model("a"))
    await memory.create(model("b"))
    await ready_node(memory)
    await memory.patch(resources.LlamaNode, "n1", {"spec": {"maxInstances": 1}})
    await instance(memory, "a-1", model_name="a", phase=resources.Phase.READY, readyAt=ago(30))
    await instance(memory, "b-1", model_name="b", node=None)
    loop = make(memory, recorded)
    await loop.reconcile_once()
    evicted = await memory.get(resources.LlamaInstance, "a-1")
    assert (
        evicted is not None
        and evicted.spec.drain
        and evicted.spec.drain_reason == "capacity: making room for b:default"
    )
    assert [(name, reason) for name, reason, _ in recorded.events] == [("a-1", "Evicting"), ("b-1", "Unschedulable")]
    assert "Waiting for room on n1" in recorded.events[1][2]

    await memory.patch_status(resources.LlamaInstance, "a-1", {"phase": "Stopped"})  # its agent stopped it
    await loop.reconcile_once()  # the stopped one goes
    await loop.reconcile_once()  # and the waiting one gets the room
    waiting_one = await memory.get(resources.LlamaInstance, "b-1")
    assert waiting_one is not None and waiting_one.spec.node_name == "n1"
    assert await names(memory) == {"b-1"}


async def test_finished_instances_are_deleted_a_failed_one_after_its_retention() -> None:
    memory, recorded = store.MemoryStore(), Recorded()
    await memory.create(model())
    await ready_node(memory)
    await instance(memory, "stopped", phase=resources.Phase.STOPPED, stoppedAt=ago(1))
    await instance(memory, "failed-now", phase=resources.Phase.FAILED, stoppedAt=ago(1))
    retention = planning.FAILED_RETENTION.total_seconds()
    await instance(memory, "failed-long-ago", phase=resources.Phase.FAILED, stoppedAt=ago(retention + 5))
    await make(memory, recorded).reconcile_once()
    assert await names(memory) == {"failed-now"}  # gateways still see why its spawn failed
    assert sorted((name, message) for name, _, message in recorded.events) == [
        ("failed-long-ago", "failed"),
        ("stopped", "stopped"),
    ]


async def test_model_conditions_keep_their_transition_time_and_are_written_on_change_only() -> None:
    memory, recorded = store.MemoryStore(), Recorded()
    await memory.create(model())
    await ready_node(memory)
    await instance(memory, "one", phase=resources.Phase.READY, readyAt=ago(1))
    loop = make(memory, recorded)

    async def current() -> resources.LlamaModel:
        found = await memory.get(resources.LlamaModel, "m")
        assert found is not None
        return found

    await loop.reconcile_once()
    first = await current()
    ready = {c.type: c for c in first.status.conditions}["Ready"]
    assert (ready.status, ready.reason, ready.message) == ("True", "InstancesReady", "1 of 1 instances ready")
    assert first.status.ready_instances == 1 and first.status.profiles["default"].ready_instances == 1
    await loop.reconcile_once()
    again = await current()
    assert again.metadata.resource_version == first.metadata.resource_version  # nothing changed, nothing written

    await memory.patch_status(resources.LlamaInstance, "one", {"phase": "Failed", "stoppedAt": ago(0)})
    await loop.reconcile_once()
    after = await current()
    conditions = {c.type: c for c in after.status.conditions}
    assert (conditions["Ready"].status, conditions["Ready"].reason) == ("False", "NoReadyInstances")
    assert conditions["Ready"].last_transition_time > ready.last_transition_time
    accepted_before = {c.type: c for c in first.status.conditions}["Accepted"]
    assert conditions["Accepted"].last_transition_time == accepted_before.last_transition_time


async def test_actions_on_objects_that_changed_since_the_world_was_read_are_skipped() -> None:
    """A pass acts on the world it read; what changed meanwhile makes its writes miss, never fail the pass."""
    memory, recorded = store.MemoryStore(), Recorded()
    the_model = await memory.create(model())
    await ready_node(memory)
    node = await memory.get(resources.LlamaNode, "n1")
    assert node is not None
    await instance(memory, "bound-elsewhere", node="n2")  # bound meanwhile (the world below says: unbound)
    stale = [
        resources.LlamaInstance(
            metadata=resources.ObjectMeta(name=name, creation_timestamp=store.utcnow()),
            spec=resources.InstanceSpec(model="m", profile="default", args_hash=the_model.spec.profiles[0].args_hash()),
            status=resources.InstanceStatus(phase=phase),
        )
        for name, phase in (
            ("gone-pending", resources.Phase.PENDING),
            ("gone-stopped", resources.Phase.STOPPED),
            ("bound-elsewhere", resources.Phase.PENDING),
        )
    ]

    async def old_world() -> controller.Observed:
        return controller.Observed(models=[the_model], instances=stale, nodes=[node])

    actions = await make(memory, recorded, observe=old_world).reconcile_once()
    planned = {(type(action).__name__, getattr(action, "instance", None)) for action in actions}
    assert {("Bind", "gone-pending"), ("Delete", "gone-stopped"), ("Bind", "bound-elsewhere")} <= planned
    assert await names(memory) == {"bound-elsewhere"}  # nothing was made up for the gone ones
    moved = await memory.get(resources.LlamaInstance, "bound-elsewhere")
    assert moved is not None and moved.spec.node_name == "n2"  # a binding is never moved
    assert not [event for event in recorded.events if event[0].startswith("gone-")]
    assert not [event for event in recorded.events if event[0] == "bound-elsewhere"]  # no "Bound to n1" made up


# --- the loop ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def looping(loop: controller.Controller) -> AsyncIterator[None]:
    task = asyncio.create_task(loop.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()  # it ran until it was cancelled, whatever its passes hit


async def test_the_loop_acts_on_a_watched_change_without_waiting_for_its_timer() -> None:
    memory, recorded = store.MemoryStore(), Recorded()
    await memory.create(model())
    await ready_node(memory)
    # its timer never fires in this test: after the first pass (at start), only the watches wake it
    async with looping(make(memory, recorded, interval=3600)):

        async def model_status_written() -> bool:
            found = await memory.get(resources.LlamaModel, "m")
            return found is not None and bool(found.status.conditions)

        await waiting.eventually(model_status_written, what="the first pass")
        await instance(memory, "asked-for", node=None)

        async def bound() -> bool:
            found = await memory.get(resources.LlamaInstance, "asked-for")
            return found is not None and found.spec.node_name == "n1"

        await waiting.eventually(bound, within_s=10, what="the new instance to be bound")
        await memory.patch(resources.LlamaNode, "n1", {"spec": {"maxInstances": 1}})
        await instance(memory, "one-too-many", node=None)
        await waiting.eventually(
            lambda: any(name == "one-too-many" for name, _, _ in recorded.events), within_s=10, what="the report"
        )


async def test_the_loop_lives_through_a_failing_pass() -> None:
    memory, recorded = store.MemoryStore(), Recorded()
    await memory.create(model(min_instances=1))
    await ready_node(memory)
    fresh = controller.listing(memory)
    calls = 0

    async def flaky() -> controller.Observed:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("the store hiccuped")
        return await fresh()

    async with looping(make(memory, recorded, observe=flaky, interval=0.05)):
        await waiting.eventually(lambda: len(recorded.events) >= 2, what="passes after the failures")
    assert calls > 2
    assert [reason for _, reason, _ in recorded.events][:2] == ["Created", "Bound"]


async def test_cold_start_recovery_logs_the_seeds_events_once_counts_and_bounds_stage_2_by_its_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="llamesh_operator.controller")
    memory, recorded = store.MemoryStore(), Recorded()
    await memory.create(model("big"))
    await memory.create(model("a"))
    await ready_node(memory)
    await instance(memory, "a-1", model_name="a", phase=resources.Phase.READY, readyAt=ago(30))
    await instance(memory, "big-c2", model_name="big", node=None)
    await memory.patch(
        resources.LlamaInstance, "big-c2", {"metadata": {"annotations": {resources.COLD_START_STAGE: "2"}}}
    )
    loop = make(memory, recorded, drain_grace_s=1)
    for _ in range(3):
        await loop.reconcile_once()

    def cold_events() -> list[tuple[str, object]]:
        return [
            (str(r.__dict__["event"]), r.__dict__.get("count"))
            for r in caplog.records
            if str(getattr(r, "event", "")).startswith("cold_oom")
        ]

    assert cold_events() == [("cold_oom_evict_stage2_start", 1)]  # once, not every pass
    evicted = await memory.get(resources.LlamaInstance, "a-1")
    assert evicted is not None and evicted.spec.drain_reason is not None
    assert evicted.spec.drain_reason.startswith("cold_oom_stage2:")
    assert ("a-1", "Evicting") in [(name, reason) for name, reason, _ in recorded.events]
    big = await memory.get(resources.LlamaModel, "big")
    assert big is not None and big.status.profiles["default"].cold_oom_evictions == 1
    assert big.status.profiles["default"].cold_start_stage == 2
    # still draining past the grace (1 s here; shutdown_grace_period_seconds under `llamesh serve`): deleted
    await waiting.eventually(lambda: _reconciled_without(loop, memory, "a-1"), what="a-1 deleted after the grace")
    await loop.reconcile_once()
    bound = await memory.get(resources.LlamaInstance, "big-c2")
    assert bound is not None and bound.spec.node_name == "n1"
    assert cold_events()[-1] == ("cold_oom_evict_stage2_drain_complete", None)


async def _reconciled_without(loop: controller.Controller, memory: store.MemoryStore, name: str) -> bool:
    await loop.reconcile_once()
    return name not in await names(memory)

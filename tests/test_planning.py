"""The operator's pure planner: binding pending instances (readiness, per-node instance cap, memory
guardrails with learned peaks and cookbook estimates, external VRAM), deleting instances past a profile's
max_instances, making room by draining idle instances of other models (LRU, never busy ones or below
min_instances), idle eviction (timeout, in-flight, min_instances), min_instances creation, retiring
instances of changed / disabled / removed profiles, clearing finished instances, model status, and that
planning is idempotent."""

from __future__ import annotations

import datetime

from llamesh_api import config, cookbook, resources
from llamesh_operator import planning

NOW = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)


def model(name: str = "m", **profile_fields: object) -> resources.LlamaModel:
    fields: dict[str, object] = {"id": "default", "model_path": "/m.gguf", **profile_fields}
    spec = cookbook.ModelSpec(profiles=[cookbook.Profile.model_validate(fields)])
    return resources.LlamaModel(metadata=resources.ObjectMeta(name=name, generation=1), spec=spec)


def node(name: str = "n1", *, ready: bool = True, **spec: int) -> resources.LlamaNode:
    return resources.LlamaNode(
        metadata=resources.ObjectMeta(name=name),
        spec=resources.NodeSpec(**spec),
        status=resources.NodeStatus(ready=ready),
    )


def instance(
    name: str,
    *,
    of: resources.LlamaModel,
    phase: resources.Phase = resources.Phase.PENDING,
    node_name: str | None = None,
    age_s: float = 0,
    **status: object,
) -> resources.LlamaInstance:
    profile = of.spec.profiles[0]
    return resources.LlamaInstance(
        metadata=resources.ObjectMeta(name=name, creation_timestamp=NOW - datetime.timedelta(seconds=age_s)),
        spec=resources.InstanceSpec(
            model=of.name, profile=profile.id, args_hash=profile.args_hash(), node_name=node_name
        ),
        status=resources.InstanceStatus(phase=phase, **status),
    )


def used(gateway_in_flight: int, *, seconds_ago: float) -> dict[str, resources.GatewayUsage]:
    return {
        "gw": resources.GatewayUsage(
            in_flight=gateway_in_flight, last_request_at=NOW - datetime.timedelta(seconds=seconds_ago)
        )
    }


def run(*, models: list[resources.LlamaModel], instances: list[resources.LlamaInstance],
        nodes: list[resources.LlamaNode], **defaults: int) -> list[planning.Action]:  # fmt: skip
    world = planning.World(models=models, instances=instances, nodes=nodes, defaults=config.ModelDefaults(**defaults))
    return [a for a in planning.plan(world, now=NOW) if not isinstance(a, planning.SetModelStatus)]


def test_pending_instance_binds_to_the_least_loaded_ready_node() -> None:
    m = model()
    busy = instance("busy", of=m, phase=resources.Phase.READY, node_name="n1", ready_at=NOW)
    actions = run(models=[m], instances=[busy, instance("new", of=m)], nodes=[node("n1"), node("n2")])
    assert actions == [planning.Bind("new", "n2")]


def test_no_ready_node_is_unschedulable_and_says_so_the_same_way_every_pass() -> None:
    m = model()
    pending = instance("new", of=m)
    actions = run(models=[m], instances=[pending], nodes=[node(ready=False)])
    assert len(actions) == 1 and isinstance(actions[0], planning.Unschedulable)
    assert "n1: not ready" in actions[0].message
    # level-triggered: the same world gives the same answer (the controller reports a reason once per change)
    assert run(models=[m], instances=[pending], nodes=[node(ready=False)]) == actions


def test_node_instance_cap_and_memory_guardrails() -> None:
    m = model(estimated_sysmem_mb=600)
    running = instance(
        "a",
        of=model("other"),
        phase=resources.Phase.READY,
        node_name="n1",
        peak_sysmem_mb=500,
        usage=used(1, seconds_ago=0),
    )  # busy: it cannot be drained to make room
    full = run(models=[m, model("other")], instances=[running, instance("new", of=m)],
               nodes=[node(max_instances=1)])  # fmt: skip
    assert isinstance(full[0], planning.Unschedulable) and "max_instances_per_node" in full[0].message
    tight = run(models=[m, model("other")], instances=[running, instance("new", of=m)],
                nodes=[node(max_sysmem_mb=1000)])  # fmt: skip
    assert isinstance(tight[0], planning.Unschedulable) and "600 MB system memory, 500 free" in tight[0].message
    roomy = run(models=[m, model("other")], instances=[running, instance("new", of=m)],
                nodes=[node(max_sysmem_mb=1200)])  # fmt: skip
    assert roomy == [planning.Bind("new", "n1")]


def test_learned_peak_replaces_the_cookbook_estimate_and_external_vram_counts() -> None:
    m = model(estimated_vram_mb=100)
    n = node(max_vram_mb=1000)
    n.status.learned[m.spec.profiles[0].args_hash()] = resources.Learned(peak_vram_mb=1100)
    assert isinstance(run(models=[m], instances=[instance("new", of=m)], nodes=[n])[0], planning.Unschedulable)
    n.status.learned.clear()
    n.status.device_vram_used_mb = 950  # someone else's process
    assert isinstance(run(models=[m], instances=[instance("new", of=m)], nodes=[n])[0], planning.Unschedulable)
    n.status.device_vram_used_mb = 0
    assert run(models=[m], instances=[instance("new", of=m)], nodes=[n]) == [planning.Bind("new", "n1")]


def test_instances_beyond_max_instances_are_deleted_oldest_kept() -> None:
    m = model(max_instances=1)
    actions = run(models=[m], instances=[instance("late", of=m), instance("early", of=m, age_s=5)], nodes=[node()])
    assert actions[0] == planning.Bind("early", "n1")
    assert isinstance(actions[1], planning.Delete) and actions[1].instance == "late"


def test_idle_eviction_needs_timeout_and_nothing_in_flight() -> None:
    m = model(idle_timeout_seconds=60)
    idle = instance("idle", of=m, phase=resources.Phase.READY, node_name="n1", usage=used(0, seconds_ago=61))
    recent = instance("recent", of=m, phase=resources.Phase.READY, node_name="n1", usage=used(0, seconds_ago=30))
    busy = instance("busy", of=m, phase=resources.Phase.READY, node_name="n1", usage=used(1, seconds_ago=600))
    never = instance(
        "never", of=m, phase=resources.Phase.READY, node_name="n1", ready_at=NOW - datetime.timedelta(seconds=90)
    )
    actions = run(models=[m], instances=[idle, recent, busy, never], nodes=[node()], max_instances_per_model=9)
    assert set(actions) == {planning.Drain("idle", "idle"), planning.Drain("never", "idle")}


def test_min_instances_are_kept_and_created() -> None:
    m = model(idle_timeout_seconds=1, min_instances=1)
    idle = instance("idle", of=m, phase=resources.Phase.READY, node_name="n1", usage=used(0, seconds_ago=99))
    assert run(models=[m], instances=[idle], nodes=[node()]) == []
    created = run(models=[m], instances=[], nodes=[node()])
    assert created == [planning.Create("m", "default", m.spec.profiles[0].args_hash(), resources.Reason.MIN_INSTANCES)]


def test_changed_disabled_and_removed_profiles_retire_their_instances() -> None:
    old = model()
    new = model(llama_server_args="-c 512")
    ready = instance("ready", of=old, phase=resources.Phase.READY, node_name="n1")
    pending = instance("pending", of=old)
    assert set(run(models=[new], instances=[ready, pending], nodes=[node()])) == {
        planning.Drain("ready", "profile_changed"),
        planning.Delete("pending", "profile_changed"),
    }
    disabled = model(enabled=False)
    assert run(models=[disabled], instances=[ready], nodes=[node()]) == [planning.Drain("ready", "profile_removed")]
    assert run(models=[], instances=[ready], nodes=[node()]) == [planning.Drain("ready", "profile_removed")]
    ready.spec.drain = True
    assert run(models=[], instances=[ready], nodes=[node()]) == []


def test_finished_instances_are_cleared() -> None:
    m = model()
    stopped = instance("stopped", of=m, phase=resources.Phase.STOPPED)
    fresh_failure = instance("f1", of=m, phase=resources.Phase.FAILED, stopped_at=NOW)
    old_failure = instance("f2", of=m, phase=resources.Phase.FAILED, stopped_at=NOW - datetime.timedelta(minutes=5))
    assert set(run(models=[m], instances=[stopped, fresh_failure, old_failure], nodes=[node()])) == {
        planning.Delete("stopped", "stopped"),
        planning.Delete("f2", "failed"),
    }


def test_model_status_counts_ready_instances_and_is_idempotent() -> None:
    m = model()
    ready = instance("r", of=m, phase=resources.Phase.READY, node_name="n1", parsed_model_params={"n_ctx": 512})
    world = planning.World(models=[m], instances=[ready], nodes=[node()], defaults=config.ModelDefaults())
    statuses = [a for a in planning.plan(world, now=NOW) if isinstance(a, planning.SetModelStatus)]
    assert len(statuses) == 1
    status = statuses[0].status
    assert (status.ready_instances, status.instances) == (1, 1)
    assert status.profiles["default"].parsed_model_params == {"n_ctx": 512}
    assert status.conditions[0].status == "True"
    m.status = status
    assert planning.plan(world, now=NOW) == []


def test_idle_instances_of_other_models_make_room_least_recently_used_first() -> None:
    wanted, other, third = model("wanted"), model("other"), model("third")
    older = instance("older", of=other, phase=resources.Phase.READY, node_name="n1", usage=used(0, seconds_ago=50))
    newer = instance("newer", of=third, phase=resources.Phase.READY, node_name="n1", usage=used(0, seconds_ago=5))
    pending = instance("new", of=wanted)
    world = [wanted, other, third]
    actions = run(models=world, instances=[older, newer, pending], nodes=[node(max_instances=2)])
    assert actions[0] == planning.Drain("older", "capacity: making room for wanted:default")
    assert isinstance(actions[1], planning.Unschedulable) and "Waiting for room on n1" in actions[1].message
    # next round: the drained one still runs; nothing more is drained, the pending instance waits
    older.spec.drain = True
    again = run(models=world, instances=[older, newer, pending], nodes=[node(max_instances=2)])
    assert [type(action) for action in again] == [planning.Unschedulable]
    # once it stopped, the pending instance binds
    older.status.phase = resources.Phase.STOPPED
    assert planning.Bind("new", "n1") in run(
        models=world, instances=[older, newer, pending], nodes=[node(max_instances=2)]
    )


def test_room_is_made_by_memory_too_but_never_from_busy_or_min_instances() -> None:
    wanted = model("wanted", estimated_sysmem_mb=600)
    kept = model("kept", min_instances=1)
    other = model("other")
    pinned = instance("pinned", of=kept, phase=resources.Phase.READY, node_name="n1", peak_sysmem_mb=500,
                      usage=used(0, seconds_ago=500))  # fmt: skip
    busy = instance("busy", of=other, phase=resources.Phase.READY, node_name="n1", peak_sysmem_mb=500,
                    usage=used(1, seconds_ago=0))  # fmt: skip
    actions = run(models=[wanted, kept, other], instances=[pinned, busy, instance("new", of=wanted)],
                  nodes=[node(max_sysmem_mb=1200)])  # fmt: skip
    assert len(actions) == 1 and isinstance(actions[0], planning.Unschedulable)
    assert "Unschedulable" in actions[0].message
    busy.status.usage = used(0, seconds_ago=1)
    actions = run(models=[wanted, kept, other], instances=[pinned, busy, instance("new", of=wanted)],
                  nodes=[node(max_sysmem_mb=1200)])  # fmt: skip
    assert actions[0] == planning.Drain("busy", "capacity: making room for wanted:default")


def test_a_model_being_deleted_drains_its_instances_and_deletes_unstarted_ones() -> None:
    m = model(min_instances=1)
    m.metadata.deletion_timestamp = NOW
    running = instance("running", of=m, phase=resources.Phase.READY, node_name="n1", ready_at=NOW)
    waiting = instance("waiting", of=m)
    actions = run(models=[m], instances=[running, waiting], nodes=[node()])
    assert planning.Drain("running", "profile_removed") in actions
    assert planning.Delete("waiting", "profile_removed") in actions
    assert not any(isinstance(action, planning.Create | planning.Bind) for action in actions)


def test_model_conditions_accepted_and_ready_keep_their_transition_time() -> None:
    m = model()
    ready = instance("a", of=m, phase=resources.Phase.READY, node_name="n1", ready_at=NOW)
    world = planning.World(models=[m], instances=[ready], nodes=[node()], defaults=config.ModelDefaults())
    (status,) = [a.status for a in planning.plan(world, now=NOW) if isinstance(a, planning.SetModelStatus)]
    conditions = {c.type: c for c in status.conditions}
    assert conditions["Accepted"].status == "True" and conditions["Ready"].status == "True"
    assert status.observed_generation == 1
    m.status = status
    later = NOW + datetime.timedelta(minutes=5)
    assert not [a for a in planning.plan(world, now=later) if isinstance(a, planning.SetModelStatus)]
    ready.status.phase = resources.Phase.STOPPED
    (changed,) = [a.status for a in planning.plan(world, now=later) if isinstance(a, planning.SetModelStatus)]
    after = {c.type: c for c in changed.conditions}
    assert after["Ready"].status == "False" and after["Ready"].last_transition_time == later
    assert after["Accepted"].last_transition_time == NOW


def test_a_node_without_heartbeat_is_lost_and_its_instances_are_replaced() -> None:
    m = model(min_instances=1)
    quiet, alive = node("n1"), node("n2")
    quiet.status.heartbeat_at = NOW - datetime.timedelta(seconds=45)
    alive.status.heartbeat_at = NOW - datetime.timedelta(seconds=2)
    stranded = instance("stranded", of=m, phase=resources.Phase.READY, node_name="n1", ready_at=NOW)
    waiting = instance("waiting", of=m, age_s=5)
    actions = run(models=[m], instances=[stranded, waiting], nodes=[quiet, alive])
    lost = [a for a in actions if isinstance(a, planning.NodeLost)]
    assert [a.node for a in lost] == ["n1"] and "45 s" in lost[0].message
    assert planning.Delete("stranded", "node n1 lost: no heartbeat") in actions
    assert planning.Bind("waiting", "n2") in actions  # nothing new goes to the lost node
    # a node that never wrote a heartbeat is only not ready yet, never lost
    fresh = node("n3", ready=False)
    assert not [a for a in run(models=[m], instances=[], nodes=[fresh]) if isinstance(a, planning.NodeLost)]

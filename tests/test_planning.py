"""The operator's pure planner: binding pending instances (readiness, per-node instance cap, memory
guardrails with learned peaks and cookbook estimates, external VRAM), deleting instances past a profile's
max_instances, making room by draining instances of other models (idle ones first, LRU; busy ones only past
their eviction tenure, profile or model_defaults, 0 = none; never below min_instances; Unschedulable when
nothing may go), bound instances counting their estimate until sampled, cold-start OOM recovery (stage 1
drains idle instances, stage 2 everything with a grace bound, stage 3 waits for an empty node; the node is
reserved meanwhile; counted in the profile status; a learned peak ends it), idle eviction (timeout,
in-flight, min_instances), min_instances creation, retiring
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


def test_after_the_store_was_unreachable_every_node_gets_the_whole_grace_again() -> None:
    """An API-server outage stops heartbeats too: from when the operator reads the store again, a node has
    the whole grace before it is lost, however old its last heartbeat is; past that, it is lost as before."""
    m = model()
    quiet = node("n1")
    quiet.status.heartbeat_at = NOW - datetime.timedelta(seconds=120)
    stranded = instance("stranded", of=m, phase=resources.Phase.READY, node_name="n1", ready_at=NOW)

    def lost_after(regained_s_ago: float) -> list[str]:
        world = planning.World(
            models=[m], instances=[stranded], nodes=[quiet], defaults=config.ModelDefaults(),
            heartbeat_floor=NOW - datetime.timedelta(seconds=regained_s_ago),
        )  # fmt: skip
        return [a.node for a in planning.plan(world, now=NOW) if isinstance(a, planning.NodeLost)]

    assert lost_after(10) == []
    assert lost_after(31) == ["n1"]


# --- eviction tenure ----------------------------------------------------------------------------


def ready(name: str, *, of: resources.LlamaModel, served_s: float, in_flight: int = 0, idle_s: float = 0,
          **status: object) -> resources.LlamaInstance:  # fmt: skip
    """A READY instance on n1 that became ready `served_s` ago and last had a request `idle_s` ago."""
    return instance(name, of=of, phase=resources.Phase.READY, node_name="n1",
                    ready_at=NOW - datetime.timedelta(seconds=served_s),
                    usage=used(in_flight, seconds_ago=idle_s), **status)  # fmt: skip


def drains(actions: list[planning.Action]) -> list[str]:
    return [action.instance for action in actions if isinstance(action, planning.Drain)]


def test_an_idle_instance_yields_before_a_busy_one_even_when_the_busy_one_is_less_recently_used() -> None:
    wanted, a, b = model("wanted"), model("a", min_eviction_tenure_secs=0), model("b")
    busy = ready("busy", of=a, served_s=500, in_flight=1, idle_s=400)  # least recently used, but busy
    idle = ready("idle", of=b, served_s=10, idle_s=1)
    actions = run(models=[wanted, a, b], instances=[busy, idle, instance("new", of=wanted)],
                  nodes=[node(max_instances=2)])  # fmt: skip
    assert drains(actions) == ["idle"]


def test_a_busy_instance_is_protected_inside_its_tenure_and_drained_after_it() -> None:
    wanted, other = model("wanted"), model("other", min_eviction_tenure_secs=60)
    world = [wanted, other]
    fresh = ready("busy", of=other, served_s=30, in_flight=2)
    actions = run(models=world, instances=[fresh, instance("new", of=wanted)], nodes=[node(max_instances=1)])
    assert drains(actions) == [] and isinstance(actions[-1], planning.Unschedulable)
    assert "max_instances_per_node" in actions[-1].message
    # its own queue (a gateway's waiting requests) makes it busy too, with nothing in flight
    queued = ready("busy", of=other, served_s=30)
    queued.status.usage["gw"].waiting = 3
    assert (
        drains(run(models=world, instances=[queued, instance("new", of=wanted)], nodes=[node(max_instances=1)])) == []
    )
    served = ready("busy", of=other, served_s=61, in_flight=2)
    actions = run(models=world, instances=[served, instance("new", of=wanted)], nodes=[node(max_instances=1)])
    assert actions[0] == planning.Drain(
        "busy", "capacity: making room for wanted:default (busy, past its eviction tenure)"
    )
    assert isinstance(actions[1], planning.Unschedulable) and "Waiting for room on n1" in actions[1].message
    # once idle it yields at once, whatever its tenure
    idle = ready("busy", of=other, served_s=1)
    assert drains(run(models=world, instances=[idle, instance("new", of=wanted)], nodes=[node(max_instances=1)])) == [
        "busy"
    ]


def test_tenure_comes_from_the_profile_else_model_defaults_and_zero_protects_nothing() -> None:
    wanted, other = model("wanted"), model("other")  # no profile tenure: model_defaults' (15 s by default)
    busy = ready("busy", of=other, served_s=20, in_flight=1)
    everything = {"models": [wanted, other], "instances": [busy, instance("new", of=wanted)],
                  "nodes": [node(max_instances=1)]}  # fmt: skip
    assert drains(run(**everything)) == ["busy"]  # type: ignore[arg-type]
    assert drains(run(**everything, min_eviction_tenure_secs=30)) == []  # type: ignore[arg-type]
    assert drains(run(**everything, min_eviction_tenure_secs=0)) == ["busy"]  # type: ignore[arg-type]
    # 0 removes the protection even for an instance whose ready time is unknown
    unknown = instance("busy", of=other, phase=resources.Phase.READY, node_name="n1", usage=used(1, seconds_ago=0))
    zero = model("other", min_eviction_tenure_secs=0)
    assert drains(run(models=[wanted, zero], instances=[unknown, instance("new", of=wanted)],
                      nodes=[node(max_instances=1)])) == ["busy"]  # fmt: skip
    assert drains(run(models=[wanted, other], instances=[unknown, instance("new", of=wanted)],
                      nodes=[node(max_instances=1)])) == []  # fmt: skip


def test_nothing_evictable_leaves_the_pending_instance_unschedulable_the_same_way_every_pass() -> None:
    wanted = model("wanted", estimated_sysmem_mb=600)
    kept, other = model("kept", min_instances=1), model("other", min_eviction_tenure_secs=600)
    pinned = ready("pinned", of=kept, served_s=900, peak_sysmem_mb=500)
    busy = ready("busy", of=other, served_s=100, in_flight=1, peak_sysmem_mb=500)
    same = ready("same", of=wanted, served_s=900)  # its own profile is never evicted for itself
    world = {"models": [wanted, kept, other], "instances": [pinned, busy, same, instance("new", of=wanted)],
             "nodes": [node(max_sysmem_mb=1200)]}  # fmt: skip
    first = run(**world)  # type: ignore[arg-type]
    assert [type(a) for a in first] == [planning.Unschedulable] and "600 MB system memory" in first[0].message
    assert run(**world) == first  # type: ignore[arg-type]


def test_a_bound_instance_not_yet_sampled_counts_its_estimate() -> None:
    m, other = model("m", estimated_sysmem_mb=400), model("other", estimated_sysmem_mb=400)
    starting = instance("starting", of=other, phase=resources.Phase.STARTING, node_name="n1")
    actions = run(models=[m, other], instances=[starting, instance("new", of=m)], nodes=[node(max_sysmem_mb=700)])
    assert isinstance(actions[0], planning.Unschedulable) and "300 free" in actions[0].message
    starting.status.peak_sysmem_mb = 100  # sampled: the sample replaces the estimate
    assert run(models=[m, other], instances=[starting, instance("new", of=m)], nodes=[node(max_sysmem_mb=700)]) == [
        planning.Bind("new", "n1")
    ]


# --- cold-start OOM recovery ----------------------------------------------------------------------


def retry(name: str, *, of: resources.LlamaModel, stage: int, age_s: float = 0) -> resources.LlamaInstance:
    """A pending cold-start retry, as a gateway asks for one."""
    found = instance(name, of=of, age_s=age_s)
    found.metadata.annotations[resources.COLD_START_STAGE] = str(stage)
    return found


def cold_actions(actions: list[planning.Action]) -> list[planning.ColdStart]:
    return [action for action in actions if isinstance(action, planning.ColdStart)]


def test_cold_start_stage_1_drains_every_idle_instance_then_binds() -> None:
    big, a, b, kept = model("big"), model("a"), model("b"), model("kept", min_instances=1)
    idle_a = ready("idle-a", of=a, served_s=100, idle_s=50)
    idle_kept = ready("idle-kept", of=kept, served_s=100, idle_s=5)  # stage 1 evicts min_instances ones too
    busy_b = ready("busy-b", of=b, served_s=1, in_flight=1)
    pending = retry("big-c1", of=big, stage=1)
    world = [big, a, b, kept]
    actions = run(models=world, instances=[idle_a, idle_kept, busy_b, pending], nodes=[node()])
    reason = "cold_oom_stage1: making room for the cold start of big:default"
    assert planning.Drain("idle-a", reason) in actions and planning.Drain("idle-kept", reason) in actions
    assert "busy-b" not in drains(actions)
    assert cold_actions(actions) == [planning.ColdStart("big-c1", 1, "n1", ("idle-a", "idle-kept"), 2)]
    assert any(isinstance(a, planning.Unschedulable) and a.instance == "big-c1" for a in actions)
    assert not any(isinstance(a, planning.Bind) for a in actions)
    # next pass: they are draining, nothing more is drained, it still waits
    idle_a.spec.drain = idle_kept.spec.drain = True
    again = run(models=world, instances=[idle_a, idle_kept, busy_b, pending], nodes=[node()])
    assert drains(again) == [] and cold_actions(again) == [planning.ColdStart("big-c1", 1, "n1", (), 2)]
    # once they stopped it binds next to the busy one
    idle_a.status.phase = idle_kept.status.phase = resources.Phase.STOPPED
    bound = run(models=world, instances=[idle_a, idle_kept, busy_b, pending], nodes=[node()])
    assert planning.Bind("big-c1", "n1") in bound
    assert cold_actions(bound) == [planning.ColdStart("big-c1", 1, "n1", (), 0)]


def test_cold_start_stage_2_drains_everything_and_deletes_what_outlasts_the_grace() -> None:
    big, b, kept = model("big"), model("b", min_eviction_tenure_secs=600), model("kept", min_instances=1)
    busy_b = ready("busy-b", of=b, served_s=1, in_flight=1)
    pinned = ready("pinned", of=kept, served_s=100)
    pending = retry("big-c2", of=big, stage=2)
    world = [big, b, kept]
    actions = run(models=world, instances=[busy_b, pinned, pending], nodes=[node()])
    reason = "cold_oom_stage2: making room for the cold start of big:default"
    assert set(drains(actions)) == {"busy-b", "pinned"}
    assert planning.Drain("busy-b", reason) in actions
    assert cold_actions(actions) == [planning.ColdStart("big-c2", 2, "n1", ("busy-b", "pinned"), 2)]
    busy_b.spec.drain = pinned.spec.drain = True
    pinned.status.phase = resources.Phase.STOPPED
    # the kept profile's replacement must not take the node while the retry waits for it
    replacement = instance("kept-new", of=kept, age_s=60)
    waiting = run(models=world, instances=[busy_b, pinned, pending, replacement], nodes=[node()])
    assert not any(isinstance(a, planning.Bind) for a in waiting)
    assert cold_actions(waiting) == [planning.ColdStart("big-c2", 2, "n1", (), 1)]
    unschedulable = {a.instance: a.message for a in waiting if isinstance(a, planning.Unschedulable)}
    assert "reserved for the cold start of big-c2" in unschedulable["kept-new"]
    # past the grace period the one still draining is deleted (its agent stops the process)
    late = retry("big-c2", of=big, stage=2, age_s=31)
    deleted = run(models=world, instances=[busy_b, pinned, late], nodes=[node()])
    assert planning.Delete("busy-b", "cold_oom_stage2: not drained within 30 s") in deleted
    busy_b.status.phase = resources.Phase.STOPPED
    done = run(models=world, instances=[busy_b, pinned, pending, replacement], nodes=[node()])
    assert planning.Bind("big-c2", "n1") in done and cold_actions(done)[0].remaining == 0
    assert not any(isinstance(a, planning.Bind) and a.instance == "kept-new" for a in done)
    # while the retry starts, the node stays reserved; once it is READY the others may come back
    pending.spec.node_name, pending.status.phase = "n1", resources.Phase.STARTING
    starting = run(models=world, instances=[pending, replacement], nodes=[node()])
    assert not any(isinstance(a, planning.Bind) for a in starting)
    pending.status.phase = resources.Phase.READY
    assert planning.Bind("kept-new", "n1") in run(models=world, instances=[pending, replacement], nodes=[node()])


def test_cold_start_stage_3_evicts_nothing_and_waits_for_an_empty_node() -> None:
    big, a = model("big"), model("a")
    idle = ready("idle", of=a, served_s=100, idle_s=100)
    pending = retry("big-c3", of=big, stage=3)
    actions = run(models=[big, a], instances=[idle, pending], nodes=[node()])
    assert drains(actions) == [] and cold_actions(actions) == [planning.ColdStart("big-c3", 3, "n1", (), 1)]
    assert any(isinstance(a, planning.Unschedulable) and "an empty node" in a.message for a in actions)
    idle.status.phase = resources.Phase.STOPPED
    assert planning.Bind("big-c3", "n1") in run(models=[big, a], instances=[idle, pending], nodes=[node()])


def test_cold_start_stages_run_in_order_and_are_counted_in_the_profile_status() -> None:
    big, a, b = model("big"), model("a"), model("b")
    idle = ready("idle", of=a, served_s=100, idle_s=100)
    busy = ready("busy", of=b, served_s=1, in_flight=1)
    nodes = [node()]

    def plan_with_status(instances: list[resources.LlamaInstance]) -> list[planning.Action]:
        world = planning.World(models=[big, a, b], instances=instances, nodes=nodes, defaults=config.ModelDefaults())
        actions = planning.plan(world, now=NOW)
        for action in actions:  # the controller's status writes
            if isinstance(action, planning.SetModelStatus):
                next(m for m in (big, a, b) if m.name == action.model).status = action.status
        return actions

    stage1 = plan_with_status([idle, busy, retry("big-c1", of=big, stage=1)])
    assert drains(stage1) == ["idle"]
    assert (big.status.profiles["default"].cold_start_stage, big.status.profiles["default"].cold_oom_evictions) == (
        1,
        1,
    )
    idle.spec.drain = True  # the controller applied the drain: the next pass counts nothing more
    assert drains(plan_with_status([idle, busy, retry("big-c1", of=big, stage=1)])) == []
    assert big.status.profiles["default"].cold_oom_evictions == 1
    idle.status.phase = resources.Phase.STOPPED
    assert planning.Bind("big-c1", "n1") in plan_with_status([idle, busy, retry("big-c1", of=big, stage=1)])
    # stage 1's retry failed too: stage 2 drains the busy one
    failed = retry("big-c1", of=big, stage=1)
    failed.spec.node_name, failed.status.phase = "n1", resources.Phase.FAILED
    failed.status.stopped_at = NOW
    stage2 = plan_with_status([busy, failed, retry("big-c2", of=big, stage=2)])
    assert drains(stage2) == ["busy"]
    assert (big.status.profiles["default"].cold_start_stage, big.status.profiles["default"].cold_oom_evictions) == (
        2,
        2,
    )
    # the same world again changes nothing more (the count is not taken twice)
    busy.spec.drain = True
    plan_with_status([busy, failed, retry("big-c2", of=big, stage=2)])
    assert big.status.profiles["default"].cold_oom_evictions == 2


def test_a_learned_peak_ends_cold_start_recovery_for_its_args_hash() -> None:
    big, a = model("big"), model("a")
    idle = ready("idle", of=a, served_s=100, idle_s=100)
    n = node()
    n.status.learned[big.spec.profiles[0].args_hash()] = resources.Learned(peak_sysmem_mb=100)
    actions = run(models=[big, a], instances=[idle, retry("big-c2", of=big, stage=2)], nodes=[n])
    assert actions == [planning.Bind("big-c2", "n1")]

"""The agent's pure decisions (`plan.plan`): what to start, drain, stop, forget or mark.

Covers: start a scheduled instance bound here, never one bound elsewhere or pending; never again one that
ran here; a scheduled instance already marked to drain is stopped unstarted; running phases with no process
are lost, terminal ones left alone; drain while starting stops at once; drain while ready is noted first,
then stops only when nothing is in flight and the settle time has passed; stopping runners are left alone;
runners of deleted, moved or replaced instances are abandoned (and the replacement waits its turn).
"""

from __future__ import annotations

import pytest

from llamesh_agent import plan
from llamesh_api import resources

NODE = "node-a"
Phase = resources.Phase


def instance(
    name: str,
    phase: Phase = Phase.SCHEDULED,
    *,
    node: str | None = NODE,
    uid: str | None = None,
    drain: bool = False,
    in_flight: int = 0,
) -> resources.LlamaInstance:
    status = resources.InstanceStatus(phase=phase)
    if in_flight:
        status.usage["gw"] = resources.GatewayUsage(in_flight=in_flight)
    return resources.LlamaInstance(
        metadata=resources.ObjectMeta(name=name, uid=uid or f"uid-{name}"),
        spec=resources.InstanceSpec(
            model="m",
            profile="default",
            args_hash="h",
            node_name=node,
            drain=drain,
            drain_reason="idle" if drain else None,
        ),
        status=status,
    )


def run(
    instances: list[resources.LlamaInstance],
    runners: dict[str, plan.RunnerView] | None = None,
    *,
    finished: set[str] | None = None,
    now: float = 100.0,
) -> list[plan.Action]:
    return plan.plan(
        node_name=NODE,
        instances=instances,
        runners=runners or {},
        finished_uids=finished or set(),
        now=now,
        drain_settle_s=2.0,
    )


def ready(name: str, *, noted: float | None = None) -> plan.RunnerView:
    return plan.RunnerView(uid=f"uid-{name}", stage=plan.Stage.READY, drain_noted_at=noted)


def test_starts_scheduled_instances_bound_here() -> None:
    assert run([instance("a"), instance("b", node="node-b"), instance("c", Phase.PENDING, node=None)]) == [
        plan.Start("a")
    ]


def test_never_restarts_what_ran_here() -> None:
    assert run([instance("a")], finished={"uid-a"}) == []
    assert run([instance("a", Phase.READY)], finished={"uid-a"}) == []


def test_scheduled_and_drained_is_stopped_unstarted() -> None:
    [action] = run([instance("a", drain=True)])
    assert isinstance(action, plan.MarkStopped) and action.instance == "a" and "idle" in action.reason


@pytest.mark.parametrize("phase", [Phase.DOWNLOADING, Phase.STARTING, Phase.READY, Phase.DRAINING])
def test_running_phase_without_process_is_lost(phase: Phase) -> None:
    assert run([instance("a", phase)]) == [plan.MarkLost("a")]


@pytest.mark.parametrize("phase", [Phase.STOPPED, Phase.FAILED])
def test_other_phases_without_process_are_left_alone(phase: Phase) -> None:
    assert run([instance("a", phase)]) == []


def test_bound_but_still_pending_is_started() -> None:
    """Binding is the operator's spec write alone; the status stays Pending until this agent picks it up."""
    assert run([instance("a", Phase.PENDING)]) == [plan.Start("a")]


def test_running_instance_without_drain_needs_nothing() -> None:
    assert run([instance("a", Phase.READY)], {"a": ready("a")}) == []


def test_drain_while_starting_stops_at_once() -> None:
    starting = plan.RunnerView(uid="uid-a", stage=plan.Stage.STARTING)
    [action] = run([instance("a", Phase.STARTING, drain=True)], {"a": starting})
    assert isinstance(action, plan.Stop) and "before it was ready (idle)" in action.reason


def test_drain_while_ready_is_noted_first() -> None:
    assert run([instance("a", Phase.READY, drain=True)], {"a": ready("a")}) == [plan.NoteDrain("a")]


@pytest.mark.parametrize(
    ("in_flight", "now", "stops"),
    [(0, 101.0, False), (0, 102.0, True), (1, 110.0, False), (0, 110.0, True)],
)
def test_drain_stops_when_idle_and_settled(in_flight: int, now: float, stops: bool) -> None:
    actions = run(
        [instance("a", Phase.DRAINING, drain=True, in_flight=in_flight)], {"a": ready("a", noted=100.0)}, now=now
    )
    assert actions == ([plan.Stop("a", "drained (idle)")] if stops else [])


def test_stopping_runners_are_left_alone() -> None:
    stopping = plan.RunnerView(uid="uid-a", stage=plan.Stage.STOPPING)
    assert run([instance("a", Phase.DRAINING, drain=True)], {"a": stopping}) == []
    assert run([], {"a": stopping}) == []


def test_deleted_or_moved_instances_are_abandoned() -> None:
    [deleted] = run([], {"a": ready("a")})
    [moved] = run([instance("a", Phase.READY, node="node-b")], {"a": ready("a")})
    assert isinstance(deleted, plan.Abandon) and isinstance(moved, plan.Abandon)


def test_replaced_instance_abandons_the_old_process_and_waits() -> None:
    replacement = instance("a", uid="uid-new")
    [action] = run([replacement], {"a": ready("a")})
    assert isinstance(action, plan.Abandon) and "replaced" in action.reason
    assert run([replacement], {}, finished={"uid-a"}) == [plan.Start("a")]  # once the old one has ended

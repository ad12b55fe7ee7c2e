"""The agent's decisions, as one pure function: which instances this node starts, drains, stops or forgets.

`plan` compares the instances the store binds to this node (desired) with the processes the agent runs
(observed, as `RunnerView`s) and returns actions; the node agent carries them out. It reads no clock (the
caller passes a monotonic `now`), store or process, so running it twice on the same input gives the same
actions, and a missed event only delays a decision to the next pass.

Rules (DESIGN.md, the seed's instance lifecycle):
- a SCHEDULED instance bound here with no process is started, unless it is already marked to drain (then it
  is STOPPED without ever starting), or a process for it ran before (an explicit stop is never undone);
- an instance in a running phase (Downloading, Starting, Ready, Draining) bound here that no process of this
  agent serves was lost (the agent restarted; its children died with it): it is marked FAILED;
- `spec.drain` on a starting instance stops it at once; on a ready one it is noted (the instance turns
  DRAINING) and the process stops once `in_flight` is 0 and `drain_settle_s` have passed since the note,
  because gateways publish their in-flight counts only about once a second;
- a process whose instance was deleted, replaced (same name, new uid) or bound elsewhere is stopped without
  a status write.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Iterable, Mapping

from llamesh_api import resources

RUNNING_PHASES = frozenset(
    {resources.Phase.DOWNLOADING, resources.Phase.STARTING, resources.Phase.READY, resources.Phase.DRAINING}
)


class Stage(enum.Enum):
    """Where a runner is, as far as planning cares."""

    STARTING = "starting"  # downloading, or llama-server not yet healthy
    READY = "ready"
    STOPPING = "stopping"  # a stop was asked for; nothing more to decide


@dataclasses.dataclass(frozen=True)
class RunnerView:
    uid: str | None
    stage: Stage
    drain_noted_at: float | None = None  # monotonic seconds


@dataclasses.dataclass(frozen=True)
class Start:
    instance: str


@dataclasses.dataclass(frozen=True)
class NoteDrain:
    instance: str


@dataclasses.dataclass(frozen=True)
class Stop:
    instance: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Abandon:
    instance: str
    reason: str


@dataclasses.dataclass(frozen=True)
class MarkLost:
    instance: str


@dataclasses.dataclass(frozen=True)
class MarkStopped:
    instance: str
    reason: str


Action = Start | NoteDrain | Stop | Abandon | MarkLost | MarkStopped


def plan(
    *,
    node_name: str,
    instances: Iterable[resources.LlamaInstance],
    runners: Mapping[str, RunnerView],
    finished_uids: Collection[str],
    now: float,
    drain_settle_s: float,
) -> list[Action]:
    actions: list[Action] = []
    mine = {instance.name: instance for instance in instances if instance.spec.node_name == node_name}
    for name, running in runners.items():
        present = mine.get(name)
        if running.stage is Stage.STOPPING:
            continue
        if present is None:
            actions.append(Abandon(name, "the instance was deleted or bound to another node"))
        elif running.uid != present.metadata.uid:
            actions.append(Abandon(name, "the instance was replaced by a new one of the same name"))
    for name, instance in mine.items():
        runner = runners.get(name)
        if runner is None or runner.uid != instance.metadata.uid:
            if runner is None:
                actions += _without_process(instance, finished_uids=finished_uids)
            continue
        if runner.stage is Stage.STOPPING or not instance.spec.drain:
            continue
        reason = instance.spec.drain_reason or "asked to drain"
        if runner.stage is Stage.STARTING:
            actions.append(Stop(name, f"drained before it was ready ({reason})"))
        elif runner.drain_noted_at is None:
            actions.append(NoteDrain(name))
        elif instance.status.in_flight == 0 and now - runner.drain_noted_at >= drain_settle_s:
            actions.append(Stop(name, f"drained ({reason})"))
    return actions


def _without_process(instance: resources.LlamaInstance, *, finished_uids: Collection[str]) -> list[Action]:
    phase = instance.phase
    if instance.metadata.uid in finished_uids:
        return []  # it ran here and ended; its final status may still be on its way through the watch
    if phase is resources.Phase.SCHEDULED:
        if instance.spec.drain:
            return [MarkStopped(instance.name, f"drained before it started ({instance.spec.drain_reason or 'asked'})")]
        return [Start(instance.name)]
    if phase in RUNNING_PHASES:
        return [MarkLost(instance.name)]
    return []

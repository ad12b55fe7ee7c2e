"""The operator's decisions, as one pure function: `plan(world, now) -> actions`.

Given the desired state (models and their profiles), the observed state (instances, nodes) and the time,
it answers what should change: bind pending instances to a node that fits (draining instances of other
models when nothing fits, see below), delete instances beyond a profile's `max_instances`, drain instances
that are idle past their timeout, whose profile changed or went away, or that run another llama.cpp
than their node's live binary (after a swap or a rollback), create instances to keep `min_instances`,
delete finished instances, and what each model's status should say. It reads no clock, store or file;
a driver applies the actions. Being level-triggered, running it twice on the same world gives the same
actions, and missing events never matters.

Memory on a node: a bound instance counts its sampled peak (or the node's learned peak for its args hash,
whichever is higher), else its profile's cookbook estimate; a new one counts the learned peak from any
node, else the estimate (learned peaks replace estimates after one run).

Making room (eviction tenure): when a pending instance fits nowhere, instances of *other* profiles on a
node are drained for it, least recently used first, never below their `min_instances`: an idle one (nothing
in flight, no gateway `waiting` on it) yields at once; a busy one only after it has served
`min_eviction_tenure_secs` (its profile's, else model_defaults'; 0 = no protection) since `ready_at`. A
drained instance finishes its in-flight requests and takes no new ones. When nothing may be drained the
pending instance stays Unschedulable (the gateway keeps the request queued, bounded by its wait limit).

Cold-start OOM recovery: the state lives on the retry instance itself. A gateway whose cold start (an args
hash no node has learned a peak for) failed asks for the retry with the `llamesh.dev/cold-start-stage`
annotation (1, 2, then 3; `queueing` counts the pool's consecutive failed starts). Such a pending instance
is placed before the others and reserves its node (nothing else binds there until it is READY or gone):
stage 1 drains every idle instance on the node, stage 2 drains every other instance there (Deleting those
still draining `drain_grace` after the retry was asked for), stage 3 evicts nothing and waits for the node
to be empty; it binds once nothing else is in the way. Each pass says so with a `ColdStart` action (the
controller logs the seed's `cold_oom_*` events from it), drains carry the reason `cold_oom_stage1`/`2`, and
the profile's status counts the evictions (`coldOomEvictions`) and shows the stage (`coldStartStage`). Once
a node has learned a peak for the args hash, the annotation is ignored: the peak drives placement.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
from collections.abc import Iterable, Sequence

from llamesh_api import config, cookbook, resources

FAILED_RETENTION = datetime.timedelta(seconds=30)  # long enough for gateways to see why a spawn failed
DRAIN_GRACE = datetime.timedelta(seconds=30)  # cold-start stage 2's bound on draining (shutdown_grace_period_seconds)
# A node whose agent has not written a heartbeat for this long is lost (Kubernetes' node-monitor grace
# period is 40 s; agents beat every 5 s): nothing new goes there and its instances are replaced.
NODE_LOST_AFTER = datetime.timedelta(seconds=30)
LIVE_PHASES = frozenset(
    {
        resources.Phase.PENDING,
        resources.Phase.SCHEDULED,
        resources.Phase.DOWNLOADING,
        resources.Phase.STARTING,
        resources.Phase.READY,
    }
)


@dataclasses.dataclass(frozen=True)
class Bind:
    instance: str
    node: str


@dataclasses.dataclass(frozen=True)
class Unschedulable:
    instance: str
    message: str


@dataclasses.dataclass(frozen=True)
class Drain:
    instance: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Delete:
    instance: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Create:
    model: str
    profile: str
    args_hash: str
    reason: resources.Reason


@dataclasses.dataclass(frozen=True)
class NodeLost:
    node: str
    message: str


@dataclasses.dataclass(frozen=True)
class SetModelStatus:
    model: str
    status: resources.ModelStatus


@dataclasses.dataclass(frozen=True)
class ColdStart:
    """Cold-start retry `instance` is at recovery `stage` (1-3) on `node`: `evicting` are drained for it in
    this pass, `remaining` other instances still hold the node (0: it is bound in this pass)."""

    instance: str
    stage: int
    node: str
    evicting: tuple[str, ...] = ()
    remaining: int = 0


Action = Bind | Unschedulable | Drain | Delete | Create | SetModelStatus | NodeLost | ColdStart


@dataclasses.dataclass(frozen=True)
class World:
    models: Sequence[resources.LlamaModel]
    instances: Sequence[resources.LlamaInstance]
    nodes: Sequence[resources.LlamaNode]
    defaults: config.ModelDefaults
    node_lost_after: datetime.timedelta = NODE_LOST_AFTER
    drain_grace: datetime.timedelta = DRAIN_GRACE
    # When the operator could read the store again after it could not: no heartbeat counts as older, since
    # the agents could not write theirs either (Kubernetes' node lifecycle controller does the same)
    heartbeat_floor: datetime.datetime | None = None


def plan(world: World, *, now: datetime.datetime) -> list[Action]:
    profiles = _available_profiles(world.models)
    actions: list[Action] = []
    lost = _lost_nodes(world, now=now)
    if lost:
        actions += lost
        gone = {action.node for action in lost}
        for instance in world.instances:
            if instance.spec.node_name in gone and not instance.phase.is_terminal:
                actions.append(Delete(instance.name, f"node {instance.spec.node_name} lost: no heartbeat"))
        deleted = {action.instance for action in actions if isinstance(action, Delete)}
        world = dataclasses.replace(
            world,
            nodes=[node for node in world.nodes if node.name not in gone],
            instances=[instance for instance in world.instances if instance.name not in deleted],
        )
    actions += _retire(world, profiles, now=now)
    actions += _outdated(world, earlier=actions)
    retired = {action.instance for action in actions if isinstance(action, Drain | Delete)}
    actions += _place(world, profiles, retired=retired, now=now)
    retired |= {action.instance for action in actions if isinstance(action, Drain | Delete)}
    actions += _evict_idle(world, profiles, retired=retired, now=now)
    actions += _keep_minimum(world, profiles, retired=retired)
    keys = {instance.name: _instance_key(instance) for instance in world.instances}
    cold_evictions: collections.Counter[str] = collections.Counter()
    for action in actions:
        if isinstance(action, ColdStart):
            cold_evictions[keys[action.instance]] += len(action.evicting)
    actions += _model_statuses(world, profiles, now=now, cold_evictions=cold_evictions)
    return actions


def _lost_nodes(world: World, *, now: datetime.datetime) -> list[NodeLost]:
    """Nodes whose agent stopped writing heartbeats (a node that never wrote one is only not ready yet); after
    an API-server outage, every node gets the whole grace again from `heartbeat_floor`."""
    lost = []
    for node in world.nodes:
        beat = node.status.heartbeat_at
        if beat is not None and world.heartbeat_floor is not None:
            beat = max(beat, world.heartbeat_floor)
        if beat is not None and now - beat > world.node_lost_after:
            seconds = int((now - beat).total_seconds())
            lost.append(NodeLost(node.name, f"no heartbeat from its agent for {seconds} s; its instances are replaced"))
    return lost


def _available_profiles(models: Iterable[resources.LlamaModel]) -> dict[str, cookbook.Profile]:
    """`model:profile` → profile, for enabled profiles of enabled models (lower-case keys)."""
    found: dict[str, cookbook.Profile] = {}
    for model in models:
        if not model.spec.enabled or model.metadata.deletion_timestamp is not None:
            continue  # a model being deleted is gone for planning: its instances drain, its finalizer waits
        for profile in model.spec.profiles:
            if profile.enabled:
                found[_key(model.name, profile.id)] = profile
    return found


def _key(model: str, profile: str) -> str:
    return f"{model}:{profile}".lower()


def _instance_key(instance: resources.LlamaInstance) -> str:
    return _key(instance.spec.model, instance.spec.profile)


def _is_live(instance: resources.LlamaInstance) -> bool:
    return instance.phase in LIVE_PHASES and not instance.spec.drain


def _retire(world: World, profiles: dict[str, cookbook.Profile], *, now: datetime.datetime) -> list[Action]:
    """Finished instances go; instances of a removed, disabled or changed profile drain (or go, if unstarted)."""
    actions: list[Action] = []
    for instance in world.instances:
        phase = instance.phase
        if phase is resources.Phase.STOPPED:
            actions.append(Delete(instance.name, "stopped"))
            continue
        if phase is resources.Phase.FAILED:
            since = instance.status.stopped_at or instance.metadata.creation_timestamp
            if since is None or now - since >= FAILED_RETENTION:
                actions.append(Delete(instance.name, "failed"))
            continue
        profile = profiles.get(_instance_key(instance))
        if profile is None:
            reason = "profile_removed"
        elif profile.args_hash() != instance.spec.args_hash:
            reason = "profile_changed"
        else:
            continue
        if phase in (resources.Phase.PENDING, resources.Phase.SCHEDULED):
            actions.append(Delete(instance.name, reason))
        elif not instance.spec.drain:
            actions.append(Drain(instance.name, reason))
    return actions


def _outdated(world: World, *, earlier: Sequence[Action]) -> list[Action]:
    """Drain Ready instances running another llama.cpp than their node's live binary (after a swap or rollback).

    The seed's version-aware drain: in-flight requests finish, new ones get fresh instances on the new binary.
    A draining instance does not count against its profile's `max_instances`, so its replacement starts while
    it drains (a node's `max_instances` counts both: they are two processes). Unknown versions drain nothing.
    """
    taken = {action.instance for action in earlier if isinstance(action, Drain | Delete)}
    live_versions = {node.name: node.status.llama_cpp_version for node in world.nodes}
    actions: list[Action] = []
    for instance in world.instances:
        if instance.name in taken or not _is_live(instance) or instance.phase is not resources.Phase.READY:
            continue
        ran, live = instance.status.llama_cpp_version, live_versions.get(instance.spec.node_name or "")
        if ran and live and ran != live:
            actions.append(Drain(instance.name, f"llama_cpp_updated: llama.cpp {ran} -> {live}"))
    return actions


def _place(
    world: World, profiles: dict[str, cookbook.Profile], *, retired: set[str], now: datetime.datetime
) -> list[Action]:
    """Bind pending instances (cold-start retries first, then oldest first) to the ready node with the most
    room; refuse extras; make room when nothing fits."""
    actions: list[Action] = []
    node_load = {node.name: _node_usage(node, world.instances, profiles) for node in world.nodes}
    reserved = _reserved_nodes(world)
    live_per_profile: dict[str, int] = {}
    for instance in world.instances:
        if _is_live(instance) and instance.phase is not resources.Phase.PENDING and instance.name not in retired:
            live_per_profile[_instance_key(instance)] = live_per_profile.get(_instance_key(instance), 0) + 1
    pending = sorted(
        (
            instance
            for instance in world.instances
            if instance.phase is resources.Phase.PENDING
            and not instance.spec.node_name
            and not instance.spec.drain
            and instance.name not in retired
        ),
        key=lambda instance: (
            _cold_stage(instance, world.nodes) == 0,
            _seconds(instance.metadata.creation_timestamp),
            instance.name,
        ),
    )
    for instance in pending:
        key = _instance_key(instance)
        profile = profiles[key]
        limit = profile.max_instances_or(world.defaults)
        if live_per_profile.get(key, 0) >= limit:
            actions.append(Delete(instance.name, f"max_instances ({limit}) reached"))
            continue
        need_vram, need_sysmem = _estimate(instance, profile, world.nodes)
        stage = _cold_stage(instance, world.nodes)
        if stage:
            cold_actions = _place_cold(world, instance, stage, reserved=reserved, retired=retired, now=now)
            actions += cold_actions
            chosen = next((action.node for action in cold_actions if isinstance(action, Bind)), None)
            if chosen is None:
                continue
        else:
            chosen, why_not = _choose_node(
                world.nodes, node_load, need_vram=need_vram, need_sysmem=need_sysmem, reserved=reserved
            )
            if chosen is None:
                room = _make_room(world, profiles, node_load, need_vram=need_vram, need_sysmem=need_sysmem,
                                  wanted_by=key, retired=retired, reserved=reserved, now=now)  # fmt: skip
                if room is not None:
                    node_name, evicted = room
                    by_name = {i.name: i for i in world.instances}
                    for name in evicted:
                        retired.add(name)
                        why = f"capacity: making room for {instance.spec.model}:{instance.spec.profile}"
                        if _busy(by_name[name]):
                            why += " (busy, past its eviction tenure)"
                        actions.append(Drain(name, why))
                    why_not = f"Waiting for room on {node_name}: instances of other models are draining"
                actions.append(Unschedulable(instance.name, why_not))
                continue
            actions.append(Bind(instance.name, chosen))
        load = node_load[chosen]
        node_load[chosen] = _Usage(load.instances + 1, load.vram_mb + need_vram, load.sysmem_mb + need_sysmem)
        live_per_profile[key] = live_per_profile.get(key, 0) + 1
    return actions


def _cold_stage(instance: resources.LlamaInstance, nodes: Iterable[resources.LlamaNode]) -> int:
    """The cold-start recovery stage (1-3) a gateway asked this instance for; 0 when none, or once a node
    has learned a peak for its args hash (no longer a cold start)."""
    try:
        stage = int(instance.metadata.annotations.get(resources.COLD_START_STAGE, "0"))
    except ValueError:
        return 0
    if stage not in (1, 2, 3):
        return 0
    for node in nodes:
        learned = node.status.learned.get(instance.spec.args_hash)
        if learned and (learned.peak_sysmem_mb or learned.peak_vram_mb):
            return 0
    return stage


def _reserved_nodes(world: World) -> dict[str, str]:
    """Node → the cold-start retry bound there and not yet READY: nothing else is placed on that node."""
    return {
        instance.spec.node_name: instance.name
        for instance in sorted(world.instances, key=lambda i: i.name)
        if instance.spec.node_name
        and instance.phase in (resources.Phase.SCHEDULED, resources.Phase.DOWNLOADING, resources.Phase.STARTING)
        and _cold_stage(instance, world.nodes)
    }


def _busy(instance: resources.LlamaInstance) -> bool:
    """Requests in flight on it, or a gateway holding requests queued that it could serve."""
    return instance.status.in_flight > 0 or any(report.waiting > 0 for report in instance.status.usage.values())


def _place_cold(
    world: World,
    instance: resources.LlamaInstance,
    stage: int,
    *,
    reserved: dict[str, str],
    retired: set[str],
    now: datetime.datetime,
) -> list[Action]:
    """One pass of the cold-start recovery of pending `instance` (see the module docstring)."""
    candidates = [
        node
        for node in world.nodes
        if node.status.ready and not node.status.draining and reserved.get(node.name, instance.name) == instance.name
    ]
    title = f"Cold-start recovery stage {stage}"
    if not candidates:
        return [Unschedulable(instance.name, f"{title}: no ready node free of other cold starts")]

    def others_on(node: resources.LlamaNode) -> list[resources.LlamaInstance]:
        return [
            i
            for i in world.instances
            if i.spec.node_name == node.name and not i.phase.is_terminal and i.name != instance.name
        ]

    node = min(candidates, key=lambda n: (len(others_on(n)), n.name))
    reserved[node.name] = instance.name
    others = others_on(node)
    going = [i for i in others if i.spec.drain or i.name in retired]
    staying = [i for i in others if not (i.spec.drain or i.name in retired)]
    if stage == 1:
        evict = [i for i in staying if _is_live(i) and i.phase is resources.Phase.READY and not _busy(i)]
        in_the_way = going + evict
    elif stage == 2:
        evict = staying
        in_the_way = others
    else:
        evict = []
        in_the_way = others
    reason = f"cold_oom_stage{stage}: making room for the cold start of {instance.spec.model}:{instance.spec.profile}"
    actions: list[Action] = []
    for victim in evict:
        retired.add(victim.name)
        actions.append(Drain(victim.name, reason))
    created = instance.metadata.creation_timestamp
    if stage == 2 and created is not None and now - created >= world.drain_grace:
        seconds = int(world.drain_grace.total_seconds())
        actions += [Delete(late.name, f"cold_oom_stage2: not drained within {seconds} s") for late in going]
    full = len(others) - len(in_the_way) >= node.spec.max_instances
    remaining = len(in_the_way)
    actions.append(ColdStart(instance.name, stage, node.name, tuple(victim.name for victim in evict), remaining))
    if remaining or full:
        waiting_for = "an empty node" if stage == 3 else f"{remaining} instance(s) to stop"
        if full and not remaining:
            waiting_for = f"room under max_instances_per_node ({node.spec.max_instances})"
        actions.append(Unschedulable(instance.name, f"{title} on {node.name}: waiting for {waiting_for}"))
    else:
        actions.append(Bind(instance.name, node.name))
    return actions


@dataclasses.dataclass(frozen=True)
class _Usage:
    instances: int
    vram_mb: int
    sysmem_mb: int


def _node_usage(
    node: resources.LlamaNode, instances: Iterable[resources.LlamaInstance], profiles: dict[str, cookbook.Profile]
) -> _Usage:
    """What is committed on a node: live instances bound to it, at their peak or estimated memory."""
    count = vram = sysmem = 0
    for instance in instances:
        if instance.spec.node_name != node.name or instance.phase.is_terminal:
            continue
        count += 1
        used = _footprint(instance, node, profiles)
        vram += used.vram_mb
        sysmem += used.sysmem_mb
    external_vram = max(node.status.device_vram_used_mb - node.status.llamesh_vram_mb, 0)
    return _Usage(count, vram + external_vram, sysmem)


def _footprint(
    instance: resources.LlamaInstance, node: resources.LlamaNode, profiles: dict[str, cookbook.Profile]
) -> _Usage:
    """One bound instance's share of a node: the higher of its own peaks and what the node learned for its
    args, else (not sampled yet) its profile's cookbook estimate."""
    learned = node.status.learned.get(instance.spec.args_hash)
    vram = max(instance.status.peak_vram_mb or 0, (learned.peak_vram_mb if learned else 0) or 0)
    sysmem = max(instance.status.peak_sysmem_mb or 0, (learned.peak_sysmem_mb if learned else 0) or 0)
    profile = profiles.get(_instance_key(instance))
    if not (vram or sysmem) and profile is not None and profile.args_hash() == instance.spec.args_hash:
        vram, sysmem = profile.estimated_vram_mb or 0, profile.estimated_sysmem_mb or 0
    return _Usage(1, vram, sysmem)


def _misfit(node: resources.LlamaNode, usage: _Usage, *, need_vram: int, need_sysmem: int) -> str | None:
    """Why a new instance does not fit on `node` at `usage`, or None when it fits."""
    if not node.status.ready or node.status.draining:
        return f"{node.name}: not ready"
    if usage.instances >= node.spec.max_instances:
        return f"{node.name}: max_instances_per_node ({node.spec.max_instances}) reached"
    if need_vram and usage.vram_mb + need_vram > node.spec.max_vram_mb:
        return f"{node.name}: needs {need_vram} MB VRAM, {node.spec.max_vram_mb - usage.vram_mb} free"
    if node.spec.max_sysmem_mb and usage.sysmem_mb + need_sysmem > node.spec.max_sysmem_mb:
        return f"{node.name}: needs {need_sysmem} MB system memory, {node.spec.max_sysmem_mb - usage.sysmem_mb} free"
    return None


def _minus(usage: _Usage, freed: _Usage) -> _Usage:
    return _Usage(usage.instances - freed.instances, usage.vram_mb - freed.vram_mb, usage.sysmem_mb - freed.sysmem_mb)


def _make_room(
    world: World,
    profiles: dict[str, cookbook.Profile],
    load: dict[str, _Usage],
    *,
    need_vram: int,
    need_sysmem: int,
    wanted_by: str,
    retired: set[str],
    reserved: dict[str, str],
    now: datetime.datetime,
) -> tuple[str, list[str]] | None:
    """Instances of other profiles whose draining lets a new instance fit (the eviction tenure rules in the
    module docstring): idle ones first, then busy ones past their tenure, each least recently used first.

    Never below a profile's `min_instances`, never on a node reserved for a cold-start retry. Returns the
    node and the instances to drain (none when those already draining will free enough), or None.
    """
    live = collections.Counter(_instance_key(i) for i in world.instances if _is_live(i) and i.name not in retired)
    for node in world.nodes:
        if not node.status.ready or node.status.draining or node.name in reserved:
            continue
        mine = [i for i in world.instances if i.spec.node_name == node.name and not i.phase.is_terminal]
        freeing = _Usage(0, 0, 0)
        for instance in mine:
            if instance.spec.drain or instance.name in retired:
                freeing = _plus(freeing, _footprint(instance, node, profiles))
        if _misfit(node, _minus(load[node.name], freeing), need_vram=need_vram, need_sysmem=need_sysmem) is None:
            return node.name, []
        evictable = sorted(
            (
                i
                for i in mine
                if _is_live(i)
                and i.name not in retired
                and i.phase is resources.Phase.READY
                and _instance_key(i) != wanted_by
                and live[_instance_key(i)] > (profiles[k].min_instances if (k := _instance_key(i)) in profiles else 0)
                and _may_yield(i, profiles.get(_instance_key(i)), world.defaults, now=now)
            ),
            key=lambda i: (_busy(i), _seconds(i.status.last_request_at or i.status.ready_at), i.name),
        )
        chosen: list[str] = []
        for candidate in evictable:
            chosen.append(candidate.name)
            live[_instance_key(candidate)] -= 1
            freeing = _plus(freeing, _footprint(candidate, node, profiles))
            if _misfit(node, _minus(load[node.name], freeing), need_vram=need_vram, need_sysmem=need_sysmem) is None:
                return node.name, chosen
        for name in chosen:  # not enough here: give the counts back and try the next node
            live[next(_instance_key(i) for i in mine if i.name == name)] += 1
    return None


def _may_yield(
    instance: resources.LlamaInstance,
    profile: cookbook.Profile | None,
    defaults: config.ModelDefaults,
    *,
    now: datetime.datetime,
) -> bool:
    """Whether `instance` may be drained for a competing model: idle, or busy past its eviction tenure."""
    if not _busy(instance):
        return True
    tenure = profile.min_eviction_tenure_or(defaults) if profile is not None else 0
    if tenure == 0:
        return True
    ready_at = instance.status.ready_at
    return ready_at is not None and now - ready_at >= datetime.timedelta(seconds=tenure)


def _plus(usage: _Usage, more: _Usage) -> _Usage:
    return _Usage(usage.instances + more.instances, usage.vram_mb + more.vram_mb, usage.sysmem_mb + more.sysmem_mb)


def _estimate(
    instance: resources.LlamaInstance, profile: cookbook.Profile, nodes: Iterable[resources.LlamaNode]
) -> tuple[int, int]:
    """Memory a new instance will take: learned peaks for its args hash, else the cookbook's estimates."""
    for node in nodes:
        learned = node.status.learned.get(instance.spec.args_hash)
        if learned and (learned.peak_sysmem_mb or learned.peak_vram_mb):
            return learned.peak_vram_mb or 0, learned.peak_sysmem_mb or 0
    return profile.estimated_vram_mb or 0, profile.estimated_sysmem_mb or 0


def _choose_node(
    nodes: Sequence[resources.LlamaNode],
    load: dict[str, _Usage],
    *,
    need_vram: int,
    need_sysmem: int,
    reserved: dict[str, str],
) -> tuple[str | None, str]:
    candidates: list[tuple[int, str]] = []
    reasons: list[str] = []
    for node in nodes:
        usage = load[node.name]
        reason = _misfit(node, usage, need_vram=need_vram, need_sysmem=need_sysmem)
        if reason is None and node.name in reserved:
            reason = f"{node.name}: reserved for the cold start of {reserved[node.name]}"
        if reason is None:
            candidates.append((usage.instances, node.name))
        else:
            reasons.append(reason)
    if candidates:
        return min(candidates)[1], ""
    return None, "Unschedulable: " + ("; ".join(reasons) if reasons else "no nodes")


def _evict_idle(
    world: World, profiles: dict[str, cookbook.Profile], *, retired: set[str], now: datetime.datetime
) -> list[Action]:
    """Drain READY instances with nothing in flight past their profile's idle timeout (above min_instances)."""
    actions: list[Action] = []
    ready_per_profile: dict[str, int] = {}
    for instance in world.instances:
        if _is_live(instance) and instance.name not in retired:
            ready_per_profile[_instance_key(instance)] = ready_per_profile.get(_instance_key(instance), 0) + 1
    idle_first = sorted(world.instances, key=lambda i: _seconds(i.status.last_request_at or i.status.ready_at))
    for instance in idle_first:
        if instance.name in retired or not _is_live(instance) or instance.phase is not resources.Phase.READY:
            continue
        key = _instance_key(instance)
        profile = profiles.get(key)
        if profile is None or instance.status.in_flight > 0:
            continue
        last_active = instance.status.last_request_at or instance.status.ready_at
        if last_active is None or now - last_active < datetime.timedelta(seconds=profile.idle_timeout_seconds):
            continue
        if ready_per_profile.get(key, 0) <= profile.min_instances:
            continue
        ready_per_profile[key] -= 1
        actions.append(Drain(instance.name, "idle"))
    return actions


def _keep_minimum(world: World, profiles: dict[str, cookbook.Profile], *, retired: set[str]) -> list[Action]:
    live: dict[str, int] = {}
    for instance in world.instances:
        if _is_live(instance) and instance.name not in retired:
            live[_instance_key(instance)] = live.get(_instance_key(instance), 0) + 1
    actions: list[Action] = []
    for model in world.models:
        for profile in model.spec.profiles:
            key = _key(model.name, profile.id)
            if key not in profiles or not profile.min_instances:
                continue
            wanted = min(profile.min_instances, profile.max_instances_or(world.defaults))
            for _ in range(wanted - live.get(key, 0)):
                actions.append(Create(model.name, profile.id, profile.args_hash(), resources.Reason.MIN_INSTANCES))
    return actions


def _model_statuses(
    world: World,
    profiles: dict[str, cookbook.Profile],
    *,
    now: datetime.datetime,
    cold_evictions: collections.Counter[str],
) -> list[Action]:
    actions: list[Action] = []
    for model in world.models:
        status = resources.ModelStatus(observed_generation=model.metadata.generation)
        for profile in model.spec.profiles:
            key = _key(model.name, profile.id)
            if key not in profiles:
                continue
            mine = [i for i in world.instances if _instance_key(i) == key and not i.phase.is_terminal]
            ready = [i for i in mine if i.phase is resources.Phase.READY and not i.spec.drain]
            params = next((i.status.parsed_model_params for i in ready if i.status.parsed_model_params), None)
            previous = model.status.profiles.get(profile.id)
            status.profiles[profile.id] = resources.ProfileStatus(
                args_hash=profile.args_hash(),
                ready_instances=len(ready),
                instances=len(mine),
                parsed_model_params=params,
                cold_start_stage=max(
                    (_cold_stage(i, world.nodes) for i in mine if i.phase is not resources.Phase.READY), default=0
                ),
                cold_oom_evictions=(previous.cold_oom_evictions if previous else 0) + cold_evictions[key],
            )
            status.ready_instances += len(ready)
            status.instances += len(mine)
        status.conditions = [
            _condition(model, "Accepted", True, "Valid", "the spec is valid", now=now),
            _condition(
                model,
                "Ready",
                bool(status.ready_instances),
                "InstancesReady" if status.ready_instances else "NoReadyInstances",
                f"{status.ready_instances} of {status.instances} instances ready",
                now=now,
            ),
        ]
        if status != model.status:
            actions.append(SetModelStatus(model.name, status))
    return actions


def _condition(
    model: resources.LlamaModel, kind: str, true: bool, reason: str, message: str, *, now: datetime.datetime
) -> resources.Condition:
    """A condition of `model`, keeping its last transition time while its status stays the same.

    A model the planner sees was read, so its spec is valid: Accepted is True. An invalid one never reaches
    the planner; the Kubernetes handlers say Accepted=False for it."""
    status = "True" if true else "False"
    previous = next((c for c in model.status.conditions if c.type == kind), None)
    since = previous.last_transition_time if previous is not None and previous.status == status else None
    return resources.Condition(
        type=kind, status=status, reason=reason, message=message, last_transition_time=since or now
    )


def _seconds(moment: datetime.datetime | None) -> float:
    """A sort key for optional timestamps: missing ones sort first."""
    return moment.timestamp() if moment is not None else 0.0

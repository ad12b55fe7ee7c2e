"""The operator's reconcile loop (`controller.Controller`) over an in-memory store: what it writes for the
planner's actions and what it tells people.

Covers: binding is a spec write alone (status untouched: the agent's); min-instance creates carry the
owner reference; model status (Accepted, Ready) is written through the status subresource; an
unschedulable instance and a lost node are reported once per change, not every pass; the world source is
injectable (a pass reads what it is given).
"""

from __future__ import annotations

import datetime

from llamesh_api import config, cookbook, resources, store
from llamesh_operator import controller


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
    loop = make(memory, recorded)
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

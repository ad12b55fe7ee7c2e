"""The dashboard's state document (`GET /ui/state`), built by one pure function from what a gateway knows.

`build(view)` takes a `View` — copies of the catalog's nodes, targets and instances, the board's queue and
in-flight counts, the counters, the rate history and log records — and returns a JSON-ready dict. It reads
no clock (`now` is part of the view) and no store, so tests build views from plain resources.

Who may see it is decided before it is built: the auth middleware answers /ui/state 401 without an accepted
key, like /v1/models, so this document never needs a reduced form.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from llamesh_api import resources
from llamesh_proxy import catalog, history

_TERMINAL = frozenset({resources.Phase.STOPPED, resources.Phase.FAILED})


@dataclasses.dataclass(frozen=True)
class Totals:
    requests_total: int
    errors_total: int
    current_requests: int
    tokens_total: int


@dataclasses.dataclass(frozen=True)
class View:
    """Everything `build` shows, as the gateway held it at `now`."""

    now: datetime.datetime
    gateway_id: str
    node_name: str
    version: str
    draining: bool
    auth_enabled: bool
    nodes: Sequence[resources.LlamaNode]
    targets: Sequence[catalog.Target]
    instances: Sequence[resources.LlamaInstance]
    queue_lengths: Mapping[str, int]  # pool → requests this gateway holds queued
    in_flight: Mapping[str, int]  # instance → requests this gateway has running on it
    totals: Totals
    history: Sequence[history.Point]
    log: Sequence[dict[str, Any]]
    log_next: int
    build_log: Sequence[dict[str, Any]]


def build(view: View) -> dict[str, Any]:
    pools = {target.pool: target for target in view.targets}
    return {
        "generated_at": _iso(view.now),
        "gateway": {
            "id": view.gateway_id,
            "node": view.node_name,
            "version": view.version,
            "draining": view.draining,
            "auth_enabled": view.auth_enabled,
        },
        "totals": {
            **dataclasses.asdict(view.totals),
            "queue_length": sum(view.queue_lengths.values()),
        },
        "nodes": [_node(node, now=view.now) for node in sorted(view.nodes, key=lambda n: n.name)],
        "models": _models(view),
        "instances": [
            _instance(instance, view=view, pools=pools)
            for instance in sorted(view.instances, key=lambda i: (i.spec.model, i.spec.profile, i.name))
        ],
        "queues": _queues(view, pools),
        "history": [dataclasses.asdict(point) for point in view.history],
        "log": {"next": view.log_next, "records": list(view.log)},
        "build_log": list(view.build_log),
    }


def _queues(view: View, pools: Mapping[str, catalog.Target]) -> list[dict[str, Any]]:
    """Every servable profile's queue (empty ones too, so a queue that empties is seen to), and any other
    pool still holding requests (its profile just went away)."""
    every = sorted(set(pools) | {pool for pool, queued in view.queue_lengths.items() if queued})
    return [
        {
            "pool": pool,
            "model": pools[pool].display if pool in pools else pool,
            "queued": view.queue_lengths.get(pool, 0),
        }
        for pool in every
    ]


def _node(node: resources.LlamaNode, *, now: datetime.datetime) -> dict[str, Any]:
    spec, status = node.spec, node.status
    return {
        "name": node.name,
        "address": spec.address,
        "ready": status.ready,
        "draining": status.draining,
        "heartbeat_age_s": _age(status.heartbeat_at, now),
        "max_instances": spec.max_instances,
        "active_instances": status.active_instances,
        "memory": {
            "vram_used_mb": status.llamesh_vram_mb,
            "vram_max_mb": spec.max_vram_mb,
            "sysmem_used_mb": status.llamesh_sysmem_mb,
            "sysmem_max_mb": spec.max_sysmem_mb,
        },
        "gpu": {
            "available": status.gpu_telemetry_available,
            "vram_used_mb": status.device_vram_used_mb,
            "vram_total_mb": status.device_vram_total_mb,
        },
        "llama_cpp": {
            "version": status.llama_cpp_version,
            "binary_present": bool(status.binary_path),
            "is_building": status.is_building,
            # asked for and not yet picked up by the agent: the build is about to start
            "rebuild_pending": spec.rebuild_requests > status.rebuilds_handled,
            "last_build_at": _iso(status.last_build_at),
            "last_build_error": status.last_build_error,
            "last_rollback": status.last_rollback,
        },
    }


def _models(view: View) -> list[dict[str, Any]]:
    """Servable `model:profile`s grouped by model, with each profile's instance counts and queue."""
    live: dict[str, list[resources.LlamaInstance]] = {}
    for instance in view.instances:
        if instance.phase not in _TERMINAL:
            live.setdefault(catalog.pool_key(instance.spec.model, instance.spec.profile), []).append(instance)
    models: dict[str, dict[str, Any]] = {}
    for target in sorted(view.targets, key=lambda t: (t.model, t.profile.id)):
        entry = models.setdefault(
            target.model, {"name": target.model, "description": target.model_description, "profiles": []}
        )
        members = live.get(target.pool, [])
        entry["profiles"].append(
            {
                "id": target.profile.id,
                "display": target.display,
                "description": target.profile.description,
                "capability": target.capability.value,
                "instances": len(members),
                "ready_instances": sum(1 for i in members if catalog.is_routable(i)),
                "max_instances": target.policy.max_instances,
                "queued": view.queue_lengths.get(target.pool, 0),
                "max_queue": target.policy.max_queue,
                "idle_timeout_seconds": target.profile.idle_timeout_seconds,
            }
        )
    return list(models.values())


def _instance(instance: resources.LlamaInstance, *, view: View, pools: Mapping[str, catalog.Target]) -> dict[str, Any]:
    spec, status = instance.spec, instance.status
    target = pools.get(catalog.pool_key(spec.model, spec.profile))
    usage = status.usage.values()
    last_request = max((u.last_request_at for u in usage if u.last_request_at is not None), default=None)
    reported = sum(u.in_flight for u in usage)
    return {
        "name": instance.name,
        "model": target.display if target is not None else f"{spec.model}:{spec.profile}",
        "phase": instance.phase.value,
        "draining": spec.drain,
        "drain_reason": spec.drain_reason,
        "node": spec.node_name,
        "port": status.port,
        # this gateway's own count is current; other replicas' come from their usage reports
        "in_flight": max(reported, view.in_flight.get(instance.name, 0)),
        "slots": status.n_slots,
        "memory": {"sysmem_mb": status.peak_sysmem_mb, "vram_mb": status.peak_vram_mb},
        "age_s": _age(status.started_at or instance.metadata.creation_timestamp, view.now),
        "last_request_age_s": _age(last_request, view.now),
        "message": status.message,
    }


def _age(moment: datetime.datetime | None, now: datetime.datetime) -> float | None:
    if moment is None:
        return None
    return round(max(0.0, (now - moment).total_seconds()), 1)


def _iso(moment: datetime.datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment is not None else None

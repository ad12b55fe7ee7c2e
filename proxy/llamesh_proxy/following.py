"""The gateway's store traffic in the background: watching resources into the catalog, publishing usage.

`follow` runs an `informer.Informer` per kind: each lists (replacing that part of the catalog), then
watches from the list's version, and lists again whenever a watch cannot resume — so missed events never
leave the caches wrong (level-triggered, as on a real API server whose watches expire).
Every instance event re-evaluates that instance's pool (grant waiters a new READY instance, fail them on a
spawn failure); every model event re-evaluates every pool.

`publish_usage` writes this gateway's traffic per instance (`status.usage[gateway_id]`: in flight, last
request) about once a second and only when it changed — never a store write per request — and at once
when an instance it holds requests on is marked drained. Each write is a merge patch of this replica's own
usage entry and nothing else, so replicas and the agent never overwrite each other. The operator's idle
eviction and the agent's drain read it.

While requests are in flight, a newer last-request stamp alone is written only every `STAMP_REFRESH_S`
(`worth_publishing`): nothing reads it as idle then (`in_flight > 0` is busy), and a write a second under
steady traffic made every watcher (catalog, agent, operator) react once a second, which at one stream was
about a quarter of `llamesh serve`'s CPU. A change of the in-flight count, and the stamp of an instance
that went idle (its idle timeout counts from it), are written at the next tick as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
from collections.abc import Iterable
from typing import Any

from llamesh_api import informer, resources, store
from llamesh_proxy import gateway

logger = logging.getLogger(__name__)


async def follow(gw: gateway.Gateway) -> list[asyncio.Task[None]]:
    """Start an informer per kind — nodes, then models, then instances, each listed before the next starts,
    so the first request finds a full catalog — and return their tasks."""
    informers: list[informer.Informer[Any]] = [
        informer.Informer(
            gw.store,
            resources.LlamaNode,
            on_event=lambda e: gw.catalog.apply_node(e.type, e.object),
            on_listed=gw.catalog.replace_nodes,
        ),
        informer.Informer(
            gw.store,
            resources.LlamaModel,
            on_event=lambda e: _model_event(gw, e),
            on_listed=lambda objs: _models_replaced(gw, objs),
        ),
        informer.Informer(
            gw.store,
            resources.LlamaInstance,
            on_event=lambda e: _instance_event(gw, e),
            on_listed=lambda objs: _instances_replaced(gw, objs),
        ),
    ]
    tasks: list[asyncio.Task[None]] = []
    try:
        for each in informers:
            tasks.append(asyncio.create_task(each.run(), name=f"gateway: watch {each.kind.kind_name}"))
            await each.listed.wait()
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    return tasks


def _model_event(gw: gateway.Gateway, event: store.Event[resources.LlamaModel]) -> None:
    # a model being deleted serves no new requests (its instances are draining for its finalizer)
    kind = "DELETED" if event.object.metadata.deletion_timestamp is not None else event.type
    _models_changed(gw, gw.catalog.apply_model(kind, event.object))


def _models_replaced(gw: gateway.Gateway, models: Iterable[resources.LlamaModel]) -> None:
    live = [model for model in models if model.metadata.deletion_timestamp is None]
    _models_changed(gw, gw.catalog.replace_models(live))


def _models_changed(gw: gateway.Gateway, vanished: set[str]) -> None:
    for pool in vanished:
        gw.dispatcher.forget(pool)
    for pool in gw.catalog.pools():
        gw.dispatcher.refresh(pool)


def _instance_event(gw: gateway.Gateway, event: store.Event[resources.LlamaInstance]) -> None:
    instance = event.object
    change = gw.catalog.apply_instance(event.type, instance)
    gw.dispatcher.refresh(change.pool, failed_unready=change.failed_unready)
    if instance.spec.drain and gw.board.in_flight(instance.name):
        gw.usage_nudge.set()  # its agent stops it at in_flight 0: tell it about ours now, not in a second


def _instances_replaced(gw: gateway.Gateway, instances: Iterable[resources.LlamaInstance]) -> None:
    for pool in gw.catalog.replace_instances(instances):
        gw.dispatcher.refresh(pool)


# --- usage ------------------------------------------------------------------------------------


STAMP_REFRESH_S = 10.0


@dataclasses.dataclass(frozen=True)
class Usage:
    """What was last written for one instance."""

    in_flight: int
    last_request_at: float | None


def worth_publishing(published: Usage | None, current: Usage, *, refresh_s: float = STAMP_REFRESH_S) -> bool:
    """Whether `current` should be written over `published` (what the store has from this gateway)."""
    if published is None or published.in_flight != current.in_flight:
        return True
    if current.last_request_at == published.last_request_at:
        return False
    if current.in_flight == 0 or current.last_request_at is None or published.last_request_at is None:
        return True  # idle now: the stamp is where its idle timeout starts
    return current.last_request_at - published.last_request_at >= refresh_s


async def publish_usage(gw: gateway.Gateway, *, interval_s: float = 1.0, refresh_s: float = STAMP_REFRESH_S) -> None:
    """Every `interval_s`, write what changed; when cancelled (shutdown), one last write."""
    published: dict[str, Usage] = {}
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await gw.usage_nudge.wait()
            gw.usage_nudge.clear()
            await publish_once(gw, published, refresh_s=refresh_s)
    finally:
        await publish_once(gw, published, refresh_s=0.0)  # the last word: the stamp as it is


async def publish_once(gw: gateway.Gateway, published: dict[str, Usage], *, refresh_s: float = STAMP_REFRESH_S) -> None:
    in_flight = gw.board.in_flight_by_instance()
    last = gw.dispatcher.last_request_at
    for name in list(last):
        if gw.catalog.instance(name) is None and name not in in_flight:
            del last[name]  # the instance is gone and we hold nothing on it
            published.pop(name, None)
    for name in set(in_flight) | set(last):
        usage = Usage(in_flight.get(name, 0), last.get(name))
        if not worth_publishing(published.get(name), usage, refresh_s=refresh_s) or gw.catalog.instance(name) is None:
            continue
        stamp = usage.last_request_at
        report = resources.GatewayUsage(
            in_flight=usage.in_flight,
            last_request_at=datetime.datetime.fromtimestamp(stamp, datetime.UTC) if stamp is not None else None,
        )

        try:
            # only the traffic fields: the same entry's slot claims are `sharing`'s to write
            traffic = {key: report.to_wire().get(key) for key in ("inFlight", "lastRequestAt")}
            await gw.store.patch_status(resources.LlamaInstance, name, {"usage": {gw.gateway_id: traffic}})
        except store.NotFound:
            published.pop(name, None)
        except Exception:
            logger.warning("could not publish usage of instance %s; retrying next tick", name, exc_info=True)
        else:
            published[name] = usage

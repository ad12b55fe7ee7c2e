"""The gateway's cumulative counters in the node's metrics file, so that they outlive the process.

`persisted(app)` is a `cleanup_ctx`: at start it adds what the file holds to the gateway's `Metrics`, while
running it writes them every `SAVE_INTERVAL_S` seconds when they changed, and once more at shutdown. The
gateway writes only its own keys (`OWNED`: the seed's counters at the top level and per args hash, plus
the latency samples behind p95); the agent's learned data in the same file (`llamesh_agent.learned`; the
two share it in `llamesh serve`) is kept as it is, through `llamesh_api.snapshot`'s locked read-modify-write.

The file is an aid, never a reason to stop: a missing one starts from zero, an unreadable one starts from
zero with one warning, and a failed write is warned about once and tried again at the next tick. Without a
path (`Gateway.metrics_path` None: Kubernetes gateway pods, most tests) counters live for the process.
Gauges and the Streaming group are per process by design (`metrics`) and are neither saved nor loaded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from llamesh_api import snapshot
from llamesh_proxy import gateway, metrics

log = logging.getLogger(__name__)

SAVE_INTERVAL_S = 10.0
_TOP = ("requests_total", "errors_total", "queue_wait_total_ms", "queue_wait_count")
_DROPS = {reason: f"queue_drops_{reason}" for reason in metrics.DROP_REASONS}
_PER_HASH = ("requests_total", "errors_total", "tokens_generated_total", "total_latency_ms", "latency_samples_ms")
OWNED = snapshot.Owned(
    top=frozenset({*_TOP, *_DROPS.values(), "updated_at"}),
    per_hash=frozenset({*_PER_HASH, "avg_latency_ms", "p95_latency_ms"}),
    union=frozenset({"display_names"}),
)


def document(counters: metrics.Metrics) -> dict[str, Any]:
    """The gateway's part of the file (without `updated_at`, so that two parts compare equal when nothing
    was counted in between)."""
    part: dict[str, Any] = {
        "requests_total": counters.requests_total,
        "errors_total": counters.errors_total,
        **{key: counters.queue_drops[reason] for reason, key in _DROPS.items()},
        "queue_wait_total_ms": counters.queue_wait_total_ms,
        "queue_wait_count": counters.queue_wait_count,
    }
    part[snapshot.HASHES] = {
        args_hash: {
            "display_names": sorted(stats.names),
            "requests_total": stats.requests,
            "errors_total": stats.errors,
            "tokens_generated_total": stats.tokens,
            "total_latency_ms": stats.total_latency_ms,
            "avg_latency_ms": stats.total_latency_ms / stats.requests if stats.requests else 0.0,  # as the seed
            "p95_latency_ms": stats.p95_latency_ms(),
            "latency_samples_ms": list(stats.latencies),
        }
        for args_hash, stats in sorted(counters.hashes.items())
    }
    return part


def restore(counters: metrics.Metrics, saved: dict[str, Any]) -> None:
    """Add the counters in `saved` (a whole file) to `counters`; values that are not counts are skipped."""
    counters.requests_total += _count(saved.get("requests_total"))
    counters.errors_total += _count(saved.get("errors_total"))
    for reason, key in _DROPS.items():
        counters.queue_drops[reason] += _count(saved.get(key))
    counters.queue_wait_total_ms += _count(saved.get("queue_wait_total_ms"))
    counters.queue_wait_count += _count(saved.get("queue_wait_count"))
    hashes = saved.get(snapshot.HASHES)
    for args_hash, entry in (hashes if isinstance(hashes, dict) else {}).items():
        if not isinstance(entry, dict) or not any(key in entry for key in _PER_HASH):
            continue  # only the agent's learned data for this hash: nothing was counted
        stats = counters.hashes.setdefault(str(args_hash), metrics.HashStats())
        names = entry.get("display_names")
        if isinstance(names, list):
            stats.names.update(name for name in names if isinstance(name, str))
        stats.requests += _count(entry.get("requests_total"))
        stats.errors += _count(entry.get("errors_total"))
        stats.tokens += _count(entry.get("tokens_generated_total"))
        stats.total_latency_ms += _count(entry.get("total_latency_ms"))
        samples = entry.get("latency_samples_ms")
        kept = [_count(sample) for sample in samples] if isinstance(samples, list) else []
        stats.latencies = collections.deque([*kept, *stats.latencies], maxlen=metrics.LATENCY_SAMPLES)


def load(path: Path, counters: metrics.Metrics) -> None:
    """Blocking: add the file's counters to `counters`; never raises for a missing or unusable file."""
    try:
        saved = snapshot.read(path)
    except snapshot.SnapshotError as exc:
        log.warning("%s; the gateway's counters start from zero", exc)
        return
    if saved is None:
        log.info("no metrics file at %s yet; the gateway's counters start from zero", path)
        return
    restore(counters, saved)


def save(path: Path, part: dict[str, Any]) -> None:
    """Blocking: write the gateway's `part` into the file, keeping every other writer's keys."""
    stamped = {**part, "updated_at": datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")}
    snapshot.update(path, lambda current: snapshot.merge(current, stamped, owned=OWNED))


class _Saver:
    """Writes when the counters changed since the last successful write; warns once per run of failures."""

    def __init__(self, path: Path, counters: metrics.Metrics) -> None:
        self._path = path
        self._counters = counters
        self._saved: dict[str, Any] | None = None
        self._failing = False

    async def save_if_changed(self) -> None:
        part = document(self._counters)
        if part == self._saved:
            return
        try:
            await asyncio.to_thread(save, self._path, part)
        except (OSError, TypeError, ValueError) as exc:
            if not self._failing:
                log.warning("cannot write the gateway's counters to %s (%s); trying again later", self._path, exc)
            self._failing = True
            return
        if self._failing:
            log.info("the gateway's counters are written to %s again", self._path)
        self._failing = False
        self._saved = part

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SAVE_INTERVAL_S)
            try:
                await self.save_if_changed()
            except Exception:  # a bug here must not end the saves, let alone the gateway
                log.exception("saving the gateway's counters failed; trying again later")


async def persisted(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: load at start, save periodically and at shutdown (nothing when the gateway has no path)."""
    gw = app[gateway.GATEWAY]
    path = gw.metrics_path
    if path is None:
        yield
        return
    await asyncio.to_thread(load, path, gw.metrics)
    saver = _Saver(path, gw.metrics)
    task = asyncio.create_task(saver.run(), name="gateway: save metrics")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await saver.save_if_changed()


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

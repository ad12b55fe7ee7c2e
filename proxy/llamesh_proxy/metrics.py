"""The gateway's counters, and their two renderings: Prometheus text (/metrics) and JSON (/metrics/json).

Counting is plain integer arithmetic on the request path; the Prometheus families are built only when
scraped, by a collector registered in a private `CollectorRegistry` per app (never the global one).
Names follow the seed's `proxy_*` series. `proxy_queue_wait_total_ms` and `proxy_queue_wait_count` keep the
seed's exact names, which prometheus-client cannot render as `counter` (it would append `_total`), so they
are exposed untyped, as is `proxy_hash_total_latency_ms`.

The cumulative counters (requests, errors, queue drops and waits, everything per args hash including the
latency samples behind p95) outlive the process through the node's metrics file: `metrics_file` loads
and saves them. Gauges and the **Streaming** group are per process, as in the seed. That group holds the
seed's three series — `proxy_peer_stream_body_aborts_total` counts streams whose upstream body broke off
mid-stream (every upstream is reached by forwarding here); skipped stream cleanups and disabled token
counting cannot happen in this gateway (a slot is released in a `finally`, and only a stream's last
chunks are kept for counting), so those two stay 0 — and llamesh's `proxy_stream_requests_total` and
`proxy_stream_tokens_total` (streamed answers relayed, and the tokens they carried).

`proxy_wedged_instances_killed_total` is not counted here: the node's agent kills wedged instances, so it
is the count in the LlamaNode status of the node this gateway runs next to (a live value, lasting as the
status does), like the `proxy_node_*` gauges. Each node's gateway reports its own node's kills, the
seed's "local instances", so a sum over scraped gateways counts every kill once.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import registry as prometheus_registry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, UnknownMetricFamily

LATENCY_SAMPLES = 100
DROP_REASONS = ("full", "timeout", "global_limit")
AFFINITY_RESULTS = ("hit", "miss", "fallback", "none")  # affinity.Result's values


NODE_GAUGES = {
    "active_instances": "Number of llama-server instances currently managed on this node.",
    "llamesh_vram_mb": "VRAM attributed to llamesh-managed instances.",
    "llamesh_sysmem_mb": "System memory attributed to llamesh-managed instances.",
    "device_vram_used_mb": "Device-wide used VRAM reported by GPU telemetry.",
    "device_vram_total_mb": "Device-wide total VRAM reported by GPU telemetry.",
    "gpu_telemetry_available": "Whether device-wide GPU telemetry is available (1=true, 0=false).",
    "max_vram_mb": "Configured VRAM admission guardrail in MB (max_vram_mb).",
    "max_sysmem_mb": "Configured system-memory admission guardrail in MB (max_sysmem_mb).",
}


@dataclasses.dataclass
class HashStats:
    """One args hash (a profile's effective launch arguments)."""

    names: set[str] = dataclasses.field(default_factory=set)
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    total_latency_ms: int = 0
    latencies: collections.deque[int] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=LATENCY_SAMPLES)
    )

    def observe(self, latency_ms: int, tokens: int) -> None:
        self.total_latency_ms += latency_ms
        self.latencies.append(latency_ms)
        self.tokens += tokens

    def tokens_per_second(self) -> float:
        return self.tokens * 1000 / self.total_latency_ms if self.total_latency_ms else 0.0

    def p95_latency_ms(self) -> int:
        if not self.latencies:
            return 0
        ordered = sorted(self.latencies)
        return ordered[int((len(ordered) - 1) * 0.95)]


@dataclasses.dataclass
class Streaming:
    """The seed's per-process Streaming group (reset on restart, never persisted)."""

    requests: int = 0
    tokens: int = 0
    body_aborts: int = 0  # the upstream body broke off after the answer had started
    skipped_cleanups: int = 0  # cannot happen here (releases run in `finally`); the seed's series, kept at 0
    token_counting_disabled: int = 0  # cannot happen here (only a stream's tail is kept); likewise


@dataclasses.dataclass(frozen=True)
class Live:
    """Values read from the gateway's state at scrape time rather than counted."""

    node_id: str
    version: str
    llama_cpp_version: str
    started_at_unix: int
    queue_length: int
    node_gauges: dict[str, float]
    wedged_instances_killed: int = 0  # this node's LlamaNode status.wedged_instances_killed
    kv_cache: dict[str, int] = dataclasses.field(default_factory=dict)  # this node's saves, restored, failed


class Metrics:
    """Counters updated on the request path."""

    def __init__(self) -> None:
        self.requests_total = 0
        self.errors_total = 0
        self.current_requests = 0
        self.queue_drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.queue_wait_total_ms = 0
        self.queue_wait_count = 0
        self.hashes: dict[str, HashStats] = {}
        self.streaming = Streaming()
        self.affinity: dict[str, int] = dict.fromkeys(AFFINITY_RESULTS, 0)  # per process, like Streaming
        self.affinity_cache: dict[str, int] = {"reused": 0, "cold": 0}  # affinity hits: did llama-server reuse?
        self.kv_cache_restores_unused = 0  # restored instances whose first returning request reused nothing

    def hash(self, args_hash: str, display: str) -> HashStats:
        stats = self.hashes.get(args_hash)
        if stats is None:
            stats = self.hashes[args_hash] = HashStats()
        if display not in stats.names:
            stats.names.add(display)
        return stats

    def observe_queue_wait(self, waited_ms: float) -> None:
        self.queue_wait_total_ms += round(waited_ms)
        self.queue_wait_count += 1

    def observe_stream(self, *, status: int, tokens: int, upstream_failed: bool) -> None:
        """A `"stream": true` request that reached an instance; only a 2xx answer was relayed as a stream."""
        if not 200 <= status < 300:
            return
        self.streaming.requests += 1
        self.streaming.tokens += tokens
        self.streaming.body_aborts += upstream_failed

    def snapshot(self, live: Live) -> dict[str, Any]:
        """/metrics/json: the seed's snapshot fields."""
        return {
            "node_id": live.node_id,
            "version": live.version,
            "llama_cpp_version": live.llama_cpp_version,
            "started_at_unix": live.started_at_unix,
            "requests_total": self.requests_total,
            "errors_total": self.errors_total,
            "current_requests": self.current_requests,
            "queue_length": live.queue_length,
            "queue_drops_full": self.queue_drops["full"],
            "queue_drops_timeout": self.queue_drops["timeout"],
            "queue_drops_global_limit": self.queue_drops["global_limit"],
            "queue_wait_total_ms": self.queue_wait_total_ms,
            "queue_wait_count": self.queue_wait_count,
            "stream_requests_total": self.streaming.requests,
            "stream_tokens_total": self.streaming.tokens,
            "peer_stream_body_aborts_total": self.streaming.body_aborts,
            "wedged_instances_killed_total": live.wedged_instances_killed,
            "node": live.node_gauges,
            "hash_metrics": {
                args_hash: {
                    "display_names": sorted(stats.names),
                    "requests_total": stats.requests,
                    "errors_total": stats.errors,
                    "tokens_generated_total": stats.tokens,
                    "total_latency_ms": stats.total_latency_ms,
                    "p95_latency_ms": stats.p95_latency_ms(),
                    "tokens_per_second": stats.tokens_per_second(),
                }
                for args_hash, stats in self.hashes.items()
            },
        }


HashFamily = type[CounterMetricFamily] | type[GaugeMetricFamily] | type[UnknownMetricFamily]
HASH_FAMILIES: list[tuple[str, str, HashFamily, Callable[[HashStats], float]]] = [
    ("proxy_hash_requests_total", "Total requests per model/profile hash.", CounterMetricFamily, lambda s: s.requests),
    ("proxy_hash_errors_total", "Total errors per model/profile hash.", CounterMetricFamily, lambda s: s.errors),
    ("proxy_hash_tokens_generated_total", "Total tokens generated per hash.", CounterMetricFamily, lambda s: s.tokens),
    (
        "proxy_hash_total_latency_ms",
        "Total latency in milliseconds per hash.",
        UnknownMetricFamily,
        lambda s: s.total_latency_ms,
    ),
    (
        "proxy_hash_p95_latency_ms",
        "P95 latency in milliseconds (last 100 samples).",
        GaugeMetricFamily,
        lambda s: s.p95_latency_ms(),
    ),
]


class Collector(prometheus_registry.Collector):
    """Builds the `proxy_*` families from `Metrics` and the live values, at scrape time."""

    def __init__(self, metrics: Metrics, live: Callable[[], Live]) -> None:
        self._metrics = metrics
        self._live = live

    def collect(self) -> Iterator[Metric]:
        m, live = self._metrics, self._live()
        build = GaugeMetricFamily(
            "proxy_build_info",
            "Build information for the llamesh proxy; value is always 1.",
            labels=["version", "llama_cpp_version"],
        )
        build.add_metric([live.version, live.llama_cpp_version], 1)
        yield build
        yield GaugeMetricFamily(
            "process_start_time_seconds", "Start time of the process since unix epoch in seconds.", live.started_at_unix
        )
        yield CounterMetricFamily("proxy_requests_total", "Total number of requests received.", m.requests_total)
        yield CounterMetricFamily("proxy_errors_total", "Total number of request errors.", m.errors_total)
        yield GaugeMetricFamily("proxy_current_requests", "Number of requests currently in flight.", m.current_requests)
        yield GaugeMetricFamily(
            "proxy_queue_length", "Current number of requests waiting in model queues.", live.queue_length
        )
        drops = CounterMetricFamily(
            "proxy_queue_drops_total", "Requests dropped from model queues, by reason.", labels=["reason"]
        )
        for reason, count in m.queue_drops.items():
            drops.add_metric([reason], count)
        yield drops
        yield UnknownMetricFamily(
            "proxy_queue_wait_total_ms", "Total queue wait time in milliseconds.", m.queue_wait_total_ms
        )
        yield UnknownMetricFamily(
            "proxy_queue_wait_count", "Total number of requests that waited in queue.", m.queue_wait_count
        )
        for name, value in live.node_gauges.items():
            yield GaugeMetricFamily(f"proxy_node_{name}", NODE_GAUGES.get(name, name), value)
        yield CounterMetricFamily(
            "proxy_wedged_instances_killed_total",
            "Local instances stopped by the wedged-instance watchdog.",
            live.wedged_instances_killed,
        )
        routed = CounterMetricFamily(
            "proxy_affinity",
            "Requests routed, by KV-cache affinity outcome: hit (to the instance that served its prompt before), "
            "miss (new or re-homed key), fallback (its instance was full or over the load bound), none (no key).",
            labels=["result"],
        )
        for result, count in m.affinity.items():
            routed.add_metric([result], count)
        yield routed
        reuse = CounterMetricFamily(
            "proxy_affinity_cache",
            "Affinity hits by whether llama-server reported prompt tokens reused from its KV cache (timings.cache_n).",
            labels=["result"],
        )
        for result, count in m.affinity_cache.items():
            reuse.add_metric([result], count)
        yield reuse
        yield CounterMetricFamily(
            "proxy_kv_cache_saves",
            "Slot KV caches this node saved to disk before an idle or evicted instance stopped.",
            live.kv_cache.get("saves", 0),
        )
        restores = CounterMetricFamily(
            "proxy_kv_cache_restores",
            "Saved slot KV caches loaded into a new instance on this node: restored, or failed (refused, empty or "
            "saved by another llama.cpp build; that conversation's prompt is read again); unused (counted by this "
            "gateway): restored, yet the first returning request reused none of it.",
            labels=["result"],
        )
        restores.add_metric(["restored"], live.kv_cache.get("restored", 0))
        restores.add_metric(["failed"], live.kv_cache.get("failed", 0))
        restores.add_metric(["unused"], m.kv_cache_restores_unused)
        yield restores
        for name, help_text, count in _streaming_series(m.streaming):
            yield CounterMetricFamily(name, help_text, count)
        yield from self._hash_families()

    def _hash_families(self) -> Iterator[Metric]:
        hashes = self._metrics.hashes
        for name, help_text, family_type, value in HASH_FAMILIES:
            family = family_type(name, help_text, labels=["hash", "names"])
            for args_hash, stats in hashes.items():
                family.add_metric([args_hash, ",".join(sorted(stats.names))], value(stats))
            yield family


def _streaming_series(streaming: Streaming) -> list[tuple[str, str, int]]:
    return [
        ("proxy_stream_requests_total", "Streamed answers relayed by this process.", streaming.requests),
        ("proxy_stream_tokens_total", "Tokens generated in streamed answers by this process.", streaming.tokens),
        (
            "proxy_peer_stream_body_aborts_total",
            "Forwarded streams whose upstream body aborted mid-stream.",
            streaming.body_aborts,
        ),
        ("proxy_skipped_stream_cleanups_total", "Stream cleanups skipped during shutdown.", streaming.skipped_cleanups),
        (
            "proxy_token_counting_disabled_total",
            "Streams whose token counting was disabled.",
            streaming.token_counting_disabled,
        ),
    ]


def registry(metrics: Metrics, live: Callable[[], Live]) -> prometheus_registry.CollectorRegistry:
    """A private registry holding only this gateway's collector."""
    private = prometheus_registry.CollectorRegistry(auto_describe=False)
    private.register(Collector(metrics, live))
    return private

"""The benchmark's arithmetic and its report: medians over rounds, the budget checks, the printed table.

Pure functions of the results dictionary bench/run.py fills in; nothing here starts or measures anything.
The budget's numbers are DESIGN.md's "Performance budget", and issue 11's CPU line (gateway CPU per 1,000
requests at most 1.3x the bare relay's).

CPU figures: a throughput or stream run's `cpu` holds the CPU seconds of the server process (`server_s`) and
of the upstream behind it (`upstream_s`, None for direct) over the measured window; each run gives CPU ms per
1,000 requests (throughput) or per 100,000 tokens (stream), and the figure is the median over the runs.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any, Literal, TypedDict

TARGETS = ("direct", "relay", "gateway")
PEERS = ("nginx", "litellm")  # measured only when run.py is asked to (--nginx, --litellm)
REQUESTS_PER = 1_000  # CPU ms per this many non-streaming requests
TOKENS_PER = 100_000  # CPU ms per this many streamed tokens


class Check(TypedDict):
    name: str
    measured: float | None
    comparison: Literal[">=", "<="]
    limit: float
    unit: str
    passed: bool | None


def targets_in(results: dict[str, Any]) -> tuple[str, ...]:
    """The three targets, then the peers this run measured, in the table's order."""
    return TARGETS + tuple(peer for peer in PEERS if peer in results.get("runs", {}))


def median_of(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def cpu_ms_per(cpu_s: float | None, count: int, per: int) -> float | None:
    """CPU milliseconds per `per` units of work, from `cpu_s` seconds over `count` units; None when unknown."""
    return cpu_s * 1000 * per / count if cpu_s is not None and count > 0 else None


def median_cpu_ms(runs: Sequence[dict[str, Any]], *, part: str, count_key: str, per: int) -> float | None:
    """Median over `runs` of CPU ms per `per` units of `count_key`, for `part` ("server_s" or "upstream_s")."""
    figures = [{"ms": cpu_ms_per(run["cpu"].get(part), run[count_key], per)} for run in runs if run.get("cpu")]
    return median_of(figures, "ms")


_WINDOW_COUNTS = {"throughput": ("requests", "requests_per_s"), "stream": ("tokens", "tokens_per_s")}


def merge_windows(windows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One round's throughput or stream result for a target from its windows (run.py interleaves them with
    the other targets'): the windows' requests or tokens over their seconds, counts, errors and CPU seconds
    summed; the windows kept."""
    if not windows:
        raise ValueError("no windows to merge")
    mode = windows[0]["mode"]
    count_key, rate_key = _WINDOW_COUNTS[mode]
    count = sum(window[count_key] for window in windows)
    seconds = sum(window["seconds"] for window in windows)
    cpus = [window.get("cpu") for window in windows]
    cpu = None
    if all(cpus):

        def total(part: str) -> float | None:
            parts = [c[part] for c in cpus if c is not None]
            return None if any(value is None for value in parts) else sum(parts)

        pids = sorted({pid for c in cpus if c is not None for pid in c.get("upstream_pids", [])})
        cpu = {"server_s": total("server_s"), "upstream_s": total("upstream_s"), "upstream_pids": pids}
    first_errors = [window["first_error"] for window in windows if window.get("first_error")]
    merged: dict[str, Any] = {
        "mode": mode,
        "concurrency": windows[0]["concurrency"],
        count_key: count,
        "errors": sum(window["errors"] for window in windows),
        "first_error": first_errors[0] if first_errors else None,
        "seconds": seconds,
        rate_key: count / seconds if seconds > 0 else 0.0,
    }
    if mode == "stream":
        merged["streams"] = sum(window["streams"] for window in windows)
        merged["tokens_per_stream_min"] = min(window["tokens_per_stream_min"] for window in windows)
        merged["tokens_per_stream_max"] = max(window["tokens_per_stream_max"] for window in windows)
    return {**merged, "cpu": cpu, "windows": list(windows)}


def checks(medians: dict[str, dict[str, float | None]], rss_mb: float | None, first_ms: float | None) -> list[Check]:
    gateway, relay, direct = medians["gateway"], medians["relay"], medians["direct"]

    def check(name: str, measured: float | None, comparison: Literal[">=", "<="], limit: float, unit: str) -> Check:
        passed = None
        if measured is not None:
            passed = measured >= limit if comparison == ">=" else measured <= limit
        return {
            "name": name,
            "measured": measured,
            "comparison": comparison,
            "limit": limit,
            "unit": unit,
            "passed": passed,
        }

    added_p50 = None
    if gateway["p50_ms"] is not None and direct["p50_ms"] is not None:
        added_p50 = gateway["p50_ms"] - direct["p50_ms"]
    return [
        check(
            "non-streaming throughput, gateway / bare relay",
            ratio(gateway["requests_per_s"], relay["requests_per_s"]),
            ">=",
            0.8,
            "x",
        ),
        check("p50 latency at 1 connection, gateway - direct", added_p50, "<=", 0.5, "ms"),
        check(  # not against direct: with two cores, "vs direct" measures who gets the core (DESIGN.md)
            "streaming tokens/s at 32 streams, gateway / bare relay",
            ratio(gateway["tokens_per_s"], relay["tokens_per_s"]),
            ">=",
            0.95,
            "x",
        ),
        check("gateway RSS with 256 open streams", rss_mb, "<=", 150.0, "MB"),
        check("scale-from-zero: first token after healthy", first_ms, "<=", 150.0, "ms"),
        check(
            "CPU per 1,000 requests, gateway / bare relay",
            ratio(gateway["cpu_ms_per_1k_requests"], relay["cpu_ms_per_1k_requests"]),
            "<=",
            1.3,
            "x",
        ),
    ]


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(results: dict[str, Any]) -> str:
    plan = results["plan"]
    medians: dict[str, dict[str, float | None]] = results["medians"]
    rss = results["rss"]
    rows = [
        (f"non-streaming req/s ({plan['concurrency']} connections)", "requests_per_s", 0),
        ("latency p50 ms (1 connection)", "p50_ms", 3),
        ("latency p90 ms (1 connection)", "p90_ms", 3),
        ("latency p99 ms (1 connection)", "p99_ms", 3),
        (f"streaming tokens/s ({plan['concurrency']} streams)", "tokens_per_s", 0),
        ("CPU ms per 1,000 requests, server process", "cpu_ms_per_1k_requests", 1),
        ("CPU ms per 100,000 tokens, server process", "cpu_ms_per_100k_tokens", 0),
        ("  the upstream behind it, per 1,000 requests", "upstream_cpu_ms_per_1k_requests", 1),
        ("  the upstream behind it, per 100,000 tokens", "upstream_cpu_ms_per_100k_tokens", 0),
    ]
    targets = targets_in(results)
    lines = [f"{'':44}" + "".join(f"{target:>12}" for target in targets)]
    for label, key, digits in rows:
        lines.append(f"{label:44}" + "".join(f"{_number(medians[t][key], digits):>12}" for t in targets))
    for label, key, digits in (
        ("RSS MB idle, before the streams", "idle_rss_mb", 1),
        (f"RSS MB, {plan['open_streams']} open streams (peak)", "peak_rss_mb", 1),
    ):
        cells = ["-", *(_number(rss.get(name, {}).get(key), digits) for name in targets[1:])]
        lines.append(f"{label:44}" + "".join(f"{cell:>12}" for cell in cells))
    open_s = [
        "-",
        *(_number(rss.get(name, {}).get("open_event", {}).get("seconds_to_open"), 2) for name in targets[1:]),
    ]
    lines.append(f"{'seconds until all streams were open':44}" + "".join(f"{cell:>12}" for cell in open_s))
    lines.append("(CPU: user + system time of the process alone over each measured window, warm-up excluded;")
    lines.append(" the upstream behind the relay is direct's process, the one behind the gateway its child)")
    windows = plan.get("windows", 1)
    interleaved = f"; throughput and streaming in {windows} interleaved windows per round" if windows > 1 else ""
    lines.append(
        f"(medians of {plan['rounds']} round(s){interleaved}; errors in any run: {results['errors'] or 'none'})"
    )
    env = results["environment"]
    if env["load_cpus"]:
        lines.append(f"(CPU pinning: load generator on CPU {env['load_cpus']}, servers on CPU {env['server_cpus']})")
    else:
        lines.append("(no CPU pinning)")
    lines.append("")
    lines.append(f"{'budget (DESIGN.md, issue 11)':54}{'measured':>12}{'limit':>14}  verdict")
    for item in results["checks"]:
        unit = item["unit"]
        measured = "-" if item["measured"] is None else f"{item['measured']:.2f} {unit}"
        limit = f"{item['comparison']} {item['limit']:g} {unit}"
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[item["passed"]]
        lines.append(f"{item['name']:54}{measured:>12}{limit:>14}  {verdict}")
    direct, relay = medians["direct"], medians["relay"]
    relay_stream = ratio(relay["tokens_per_s"], direct["tokens_per_s"])
    relay_p50 = None if relay["p50_ms"] is None or direct["p50_ms"] is None else relay["p50_ms"] - direct["p50_ms"]
    gateway_stream = ratio(medians["gateway"]["tokens_per_s"], direct["tokens_per_s"])
    lines.append(
        f"for reference, streaming vs direct: gateway {_number(gateway_stream, 2)} x, "
        f"bare relay {_number(relay_stream, 2)} x; the bare relay's "
        f"p50 {_number(relay_p50, 3)} ms over direct"
    )
    gateway = medians["gateway"]
    stream_cpu = ratio(gateway["cpu_ms_per_100k_tokens"], relay["cpu_ms_per_100k_tokens"])
    lines.append(f"for reference, CPU per 100,000 streamed tokens, gateway / bare relay: {_number(stream_cpu, 2)} x")
    for peer in targets[len(TARGETS) :]:
        lines.append(
            f"for reference, {peer} / bare relay: non-streaming req/s "
            f"{_number(ratio(medians[peer]['requests_per_s'], relay['requests_per_s']), 2)} x, streaming tokens/s "
            f"{_number(ratio(medians[peer]['tokens_per_s'], relay['tokens_per_s']), 2)} x, CPU per 1,000 requests "
            f"{_number(ratio(medians[peer]['cpu_ms_per_1k_requests'], relay['cpu_ms_per_1k_requests']), 2)} x"
        )
    sfz = results["scale_from_zero"]
    if sfz:
        per_profile = ", ".join(_number(entry["first_token_after_healthy_ms"], 1) for entry in sfz)
        spawn = ", ".join(_number(entry["request_to_first_token_ms"], 0) for entry in sfz)
        lines.append(f"scale-from-zero per cold instance: {per_profile} ms after healthy; {spawn} ms after request")
    return "\n".join(lines)


def summarize(results: dict[str, Any]) -> None:
    runs: dict[str, dict[str, list[dict[str, Any]]]] = results.get("runs", {})
    medians: dict[str, dict[str, float | None]] = {}
    errors: list[str] = []
    for target in targets_in(results):
        modes = runs.get(target, {"throughput": [], "latency": [], "stream": []})
        medians[target] = {
            "requests_per_s": median_of(modes["throughput"], "requests_per_s"),
            "p50_ms": median_of(modes["latency"], "p50_ms"),
            "p90_ms": median_of(modes["latency"], "p90_ms"),
            "p99_ms": median_of(modes["latency"], "p99_ms"),
            "tokens_per_s": median_of(modes["stream"], "tokens_per_s"),
        }
        for part, prefix in (("server_s", ""), ("upstream_s", "upstream_")):
            medians[target][f"{prefix}cpu_ms_per_1k_requests"] = median_cpu_ms(
                modes["throughput"], part=part, count_key="requests", per=REQUESTS_PER
            )
            medians[target][f"{prefix}cpu_ms_per_100k_tokens"] = median_cpu_ms(
                modes["stream"], part=part, count_key="tokens", per=TOKENS_PER
            )
        for mode, mode_runs in modes.items():
            errors += [f"{target} {mode}: {run['first_error']}" for run in mode_runs if run["errors"]]
    results["medians"] = medians
    results["errors"] = errors
    rss_mb = results.get("rss", {}).get("gateway", {}).get("peak_rss_mb")
    first = [e["first_token_after_healthy_ms"] for e in results.get("scale_from_zero", [])]
    first_ms = statistics.median(first) if first and None not in first else None
    results["checks"] = checks(medians, rss_mb, first_ms)

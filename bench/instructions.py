"""Instructions per request: `llamesh serve` or the bare relay under valgrind's callgrind, one connection.

    .venv/bin/python bench/instructions.py [--target gateway|relay] [--requests 500] [--streams 30]

CPU time per request moves ±10% between runs on a shared 2-core machine; instructions do not. The target runs
under `valgrind --tool=callgrind --separate-threads=yes` with collection off until it is warm (100
non-streamed and 10 streamed requests); then `--requests` sequential non-streamed chat completions, an idle
window as long as they took, and `--streams` sequential 64-token streams, each phase ended by a
`callgrind_control` dump. A thread's instructions per request are its count over the requests less its count
over the idle window (what its timers and background loops spend in that time, under valgrind's slowdown);
the gateway's threads that matter are the event loop's and the log writer's. Streams are counted without
that correction. The upstream runs natively: for the gateway the fake upstream it spawns, for the relay one
started here. The instructions are the interpreter's and the C extensions' alike; system calls and cache
misses are not in them, so they compare code paths, not wall time (CPU time in `run.py` is the verdict).
Needs valgrind (Debian's package). Prints a table and writes the counts to a JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

import servers

WARM_REQUESTS = 100
WARM_STREAMS = 10
_TOTALS = re.compile(r"^totals:\s+(\d+)", re.MULTILINE)
_TRIGGER = re.compile(r"Trigger: dump (\w+)")
_THREAD = re.compile(r"^thread:\s+(\d+)", re.MULTILINE)


def say(message: str) -> None:
    print(f"[instructions {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def read_dumps(paths: list[Path]) -> dict[str, dict[int, int]]:
    """Instructions per thread of each dump: {trigger: {thread number: count}} from callgrind's output files."""
    counts: dict[str, dict[int, int]] = {}
    for path in paths:
        text = path.read_text(errors="replace")
        trigger, thread, totals = _TRIGGER.search(text), _THREAD.search(text), _TOTALS.search(text)
        if trigger and thread and totals:
            counts.setdefault(trigger.group(1), {})[int(thread.group(1))] = int(totals.group(1))
    return counts


def per_request(counts: Mapping[str, Mapping[int, int]], *, requests: int, streams: int) -> dict[str, Any]:
    """Per thread: instructions per request net of the idle window, and per stream (not corrected)."""
    plain, idle, stream = counts.get("requests", {}), counts.get("idle", {}), counts.get("streams", {})
    threads = sorted(set(plain) | set(stream))
    net = {thread: (plain.get(thread, 0) - idle.get(thread, 0)) / requests for thread in threads}
    return {
        "per_request": net,
        "per_request_total": sum(max(value, 0.0) for value in net.values()),
        "per_stream": {thread: stream.get(thread, 0) / streams for thread in threads} if streams else {},
        "idle_per_request": {thread: idle.get(thread, 0) / requests for thread in threads},
    }


async def _post(session: aiohttp.ClientSession, url: str, body: Mapping[str, Any]) -> int:
    async with session.post(url, json=body) as response:
        await response.read()
        return response.status


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Runs the phases; the counts are read from the dump files afterwards (`read_dumps`)."""
    port = servers.free_port()
    env = {**os.environ, "FAKE_UPSTREAM_TOKENS": "64", "FAKE_UPSTREAM_STARTUP_MS": "0"}
    quiet = asyncio.subprocess.DEVNULL
    upstream: asyncio.subprocess.Process | None = None
    if args.target == "relay":
        upstream_port = servers.free_port()
        upstream_argv = servers.fake_upstream_argv(upstream_port)
        upstream = await asyncio.create_subprocess_exec(*upstream_argv, env=env, stdout=quiet, stderr=quiet)
        argv = servers.bare_relay_argv(port, f"http://{servers.HOST}:{upstream_port}")
    else:
        config_path, cookbook_path = servers.write_llamesh_files(workdir, port=port, cold_profiles=[])
        argv = servers.llamesh_argv(config_path, cookbook_path)
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes"]
    out = f"--callgrind-out-file={workdir / 'callgrind.out'}"
    with (workdir / "target.log").open("wb") as log:
        target = await asyncio.create_subprocess_exec(*valgrind, out, *argv, env=env, stdout=log, stderr=log)
    url = f"http://{servers.HOST}:{port}/v1/chat/completions"
    body = {"model": servers.MODEL, "messages": [{"role": "user", "content": "Say hi."}]}
    streamed = {**body, "stream": True}

    async def control(option: str) -> None:
        process = await asyncio.create_subprocess_exec("callgrind_control", option, str(target.pid), stdout=quiet)
        if await process.wait() != 0:
            raise SystemExit(f"callgrind_control {option} failed")

    try:
        async with aiohttp.ClientSession() as session:
            say(f"starting {args.target} under callgrind (slow: everything runs ~50x slower)")
            deadline = time.monotonic() + args.start_timeout_s
            while True:
                with contextlib.suppress(aiohttp.ClientConnectionError):  # not listening yet
                    if await _post(session, url, body) == 200:
                        break
                if target.returncode is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{args.target} did not answer; see {workdir / 'target.log'}")
                await asyncio.sleep(0.5)
            for _ in range(WARM_REQUESTS):
                await _post(session, url, body)
            for _ in range(WARM_STREAMS):
                await _post(session, url, streamed)
            say(f"counting {args.requests} requests")
            await control("--instr=on")
            started = time.monotonic()
            statuses = [await _post(session, url, body) for _ in range(args.requests)]
            await control("--dump=requests")
            took = time.monotonic() - started
            say(f"counting an idle window of {took:.1f} s")
            await asyncio.sleep(took)  # the window measured is this long by design, not a wait for a condition
            await control("--dump=idle")
            say(f"counting {args.streams} streams")
            statuses += [await _post(session, url, streamed) for _ in range(args.streams)]
            await control("--dump=streams")
    finally:
        for process in (target, upstream):
            if process is not None and process.returncode is None:
                process.terminate()
                await asyncio.wait_for(process.wait(), 60)
    return {
        "target": args.target,
        "requests": args.requests,
        "streams": args.streams,
        "errors": sum(status != 200 for status in statuses),
        "requests_seconds_under_valgrind": took,
    }


def render(result: Mapping[str, Any]) -> str:
    lines = [f"{result['target']}: instructions per request, net of idle, by thread (1 = the event loop's)"]
    for thread, value in sorted(result["per_request"].items()):
        stream = result["per_stream"].get(thread)
        per_stream = f"   per 64-token stream {stream:>12,.0f}" if stream is not None else ""
        lines.append(f"  thread {thread:>2}: {value:>12,.0f}{per_stream}")
    lines.append(f"  all threads: {result['per_request_total']:>10,.0f}   errors: {result['errors']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--target", choices=("gateway", "relay"), default="gateway")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--streams", type=int, default=30)
    parser.add_argument("--start-timeout-s", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: a new temporary file)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="llamesh-instructions-"))
    result = asyncio.run(measure(args, workdir))
    counts = read_dumps(sorted(workdir.glob("callgrind.out*")))
    result["counts"] = {trigger: {str(t): n for t, n in threads.items()} for trigger, threads in counts.items()}
    result.update(per_request(counts, requests=args.requests, streams=args.streams))
    print(render(result))
    out = args.out or workdir / "instructions.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

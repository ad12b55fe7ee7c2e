"""The benchmark's load generator: one process, one event loop, one ClientSession; prints its result as JSON.

    python bench/load.py --url http://127.0.0.1:P --mode MODE [options]

Modes (each prints one JSON object as its last stdout line):
- throughput: `--concurrency` workers send non-streaming chat completions back to back for `--duration` s
  (after `--warmup-s` s not counted) -> requests/s. A request started before the deadline is finished and
  counted; the clock stops when the last one ends.
- latency: one connection, `--warmup` requests not counted, then `--requests` sequential ones -> p50/p90/p99 ms.
- stream: `--concurrency` workers each read streams back to back for `--duration` s -> tokens/s, where a token
  is one SSE `data:` event other than the final usage event and `[DONE]` (counted on the raw bytes, never
  parsed), and every stream's token count, so a caller can check it against what the upstream sent.
- open-streams: `--streams` streams opened at once, each paced by the fake upstream (`bench_delay_ms`) and read
  slowly; once every one has its first event, an `{"event": "streams_open", ...}` line is printed (the moment
  to sample the gateway's memory), and after `--hold` s more they are all closed.
- first-token: one streaming request -> `time.time()` stamps of sending, headers, first token and end (the
  scale-from-zero measurement compares the first-token stamp with the upstream's healthy stamp).
- generate: for a real llama-server (bench/real.py): `--concurrency` workers each read `--streams` streams of
  `--max-tokens` tokens one after another (`ignore_eos`, temperature 0, so every stream has exactly that
  many) -> aggregate tokens/s over the whole run, and each stream's time to first token (request sent ->
  first event with content). Here a token is an event whose delta has content, counted by parsing each
  event: llama-server's first (role) and last (finish, usage) events carry none. With `--alt-url`, each
  worker alternates between the two targets stream by stream (half the workers start with each), so both
  are measured under the same batch and load; `ttft_ms` is then `--url`'s streams, `alt_ttft_ms` the other's.
  With `--together` as well, `--concurrency` / 2 workers each send one stream to each target at the same
  moment, pair after pair (both join the same batch); the two lists are then aligned pair by pair, NaN
  where a stream failed.

With `--sync` (throughput, stream), the measured window is announced so that a caller can sample the server
around exactly the requests counted: once the warm-up's last request has ended (nothing in flight), it prints
`{"event": "warm"}` and blocks until a line arrives on stdin; once the measured window's last request has
ended, it prints `{"event": "measured"}`. The JSON result follows as the last line, as always.

The session's connection limit is the concurrency, so each worker keeps one keep-alive connection. It runs on
uvloop when installed. Deliberately nothing else: no retries, no server start-up, no comparison of targets
(bench/run.py does those).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypedDict

import aiohttp

JSON_HEADERS = {"Content-Type": "application/json"}
DATA = b"data:"
DONE = b"data: [DONE]"
NON_TOKEN_EVENTS = 2  # the final event (finish_reason and usage) and [DONE]
OPEN_STREAM_TOKENS = 1_000_000  # "forever" at any pace the benchmark uses


class ThroughputResult(TypedDict):
    mode: str
    concurrency: int
    requests: int
    errors: int
    first_error: str | None
    seconds: float
    requests_per_s: float


class LatencyResult(TypedDict):
    mode: str
    requests: int
    errors: int
    first_error: str | None
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float


class StreamResult(TypedDict):
    mode: str
    concurrency: int
    streams: int
    tokens: int
    errors: int
    first_error: str | None
    seconds: float
    tokens_per_s: float
    tokens_per_stream_min: int
    tokens_per_stream_max: int


class OpenStreamsResult(TypedDict):
    mode: str
    streams: int
    opened: int
    errors: int
    first_error: str | None
    seconds_to_open: float
    held_s: float


class GenerateResult(StreamResult):
    ttft_ms: list[float]
    alt_ttft_ms: list[float]
    stream_rates: list[float]  # each stream's tokens over its seconds from sending to its end, in order; NaN: failed
    alt_stream_rates: list[float]


class FirstTokenResult(TypedDict):
    mode: str
    status: int
    tokens: int
    sent_at: float
    headers_at: float
    first_token_at: float
    done_at: float


def request_body(model: str, *, stream: bool, max_tokens: int | None = None, delay_ms: int | None = None) -> bytes:
    """A small chat completion request; built once per run and sent as is."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Say something."}]}
    if stream:
        body["stream"] = True
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if delay_ms is not None:
        body["bench_delay_ms"] = delay_ms
    return json.dumps(body).encode()


class Errors:
    """How many requests failed, and what the first failure said (enough to diagnose a broken target)."""

    def __init__(self) -> None:
        self.count = 0
        self.first: str | None = None

    def add(self, what: str) -> None:
        self.count += 1
        if self.first is None:
            self.first = what


class EventCounter:
    """Counts SSE `data:` events in a byte stream that arrives in arbitrary pieces, without parsing it."""

    def __init__(self) -> None:
        self.events = 0
        self._tail = b""  # the last bytes seen, to find a `data:` split across two pieces and the final [DONE]

    def feed(self, piece: bytes) -> None:
        # An occurrence split across pieces lies wholly in the 4 bytes either side of the seam.
        self.events += piece.count(DATA) + (self._tail[-4:] + piece[:4]).count(DATA)
        self._tail = (self._tail + piece)[-16:] if len(piece) < 16 else piece[-16:]

    @property
    def done(self) -> bool:
        return self._tail.rstrip().endswith(DONE)

    @property
    def tokens(self) -> int:
        return max(self.events - NON_TOKEN_EVENTS, 0)


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(math.ceil(fraction * len(sorted_values)), 1)
    return sorted_values[min(rank, len(sorted_values)) - 1]


def announce(event: str) -> None:
    print(json.dumps({"event": event}), flush=True)


async def _warm_then_measure(
    worker: Callable[..., Awaitable[None]], *, concurrency: int, warmup_s: float, duration: float, sync: bool
) -> float:
    """Run `concurrency` workers uncounted for `warmup_s`, then counted for `duration`; the measured seconds.

    With `sync`, the window is announced (see the module's docstring); the wait for the caller's line blocks
    the event loop on purpose: nothing is in flight then, and nothing may start before the caller says so.
    """
    if warmup_s > 0:
        deadline = time.perf_counter() + warmup_s
        await asyncio.gather(*(worker(deadline, counted=False) for _ in range(concurrency)))
    if sync:
        announce("warm")
        sys.stdin.readline()
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(*(worker(deadline, counted=True) for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    if sync:
        announce("measured")
    return seconds


async def throughput(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    concurrency: int,
    duration: float,
    warmup_s: float,
    sync: bool = False,
) -> ThroughputResult:
    errors = Errors()
    completed = 0

    async def worker(deadline: float, *, counted: bool) -> None:
        nonlocal completed
        while time.perf_counter() < deadline:
            try:
                async with session.post(url, data=body, headers=JSON_HEADERS) as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors.add(repr(exc))
                continue
            if not counted:
                continue
            if ok:
                completed += 1
            else:
                errors.add(f"HTTP {response.status}")

    seconds = await _warm_then_measure(worker, concurrency=concurrency, warmup_s=warmup_s, duration=duration, sync=sync)
    return {
        "mode": "throughput",
        "concurrency": concurrency,
        "requests": completed,
        "errors": errors.count,
        "first_error": errors.first,
        "seconds": seconds,
        "requests_per_s": completed / seconds,
    }


async def latency(
    session: aiohttp.ClientSession, url: str, body: bytes, *, requests: int, warmup: int
) -> LatencyResult:
    errors = Errors()
    samples: list[float] = []
    for index in range(warmup + requests):
        started = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=JSON_HEADERS) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            errors.add(repr(exc))
            continue
        elapsed_ms = (time.perf_counter() - started) * 1000
        if status != 200:
            errors.add(f"HTTP {status}")
        elif index >= warmup:
            samples.append(elapsed_ms)
    samples.sort()
    if not samples:
        samples = [math.nan]
    return {
        "mode": "latency",
        "requests": len(samples),
        "errors": errors.count,
        "first_error": errors.first,
        "p50_ms": percentile(samples, 0.50),
        "p90_ms": percentile(samples, 0.90),
        "p99_ms": percentile(samples, 0.99),
        "mean_ms": sum(samples) / len(samples),
        "min_ms": samples[0],
        "max_ms": samples[-1],
    }


async def read_stream(session: aiohttp.ClientSession, url: str, body: bytes, errors: Errors) -> int | None:
    """One whole stream; its token count, or None (and an error noted) when it failed or did not end in [DONE]."""
    counter = EventCounter()
    try:
        async with session.post(url, data=body, headers=JSON_HEADERS) as response:
            if response.status != 200:
                errors.add(f"HTTP {response.status}: {(await response.read())[:200]!r}")
                return None
            async for piece in response.content.iter_any():
                counter.feed(piece)
    except (aiohttp.ClientError, TimeoutError) as exc:
        errors.add(repr(exc))
        return None
    if not counter.done:
        errors.add(f"stream ended without [DONE] after {counter.events} events")
        return None
    return counter.tokens


async def stream(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    concurrency: int,
    duration: float,
    warmup_s: float,
    sync: bool = False,
) -> StreamResult:
    errors = Errors()
    per_stream: list[int] = []

    async def worker(deadline: float, *, counted: bool) -> None:
        while time.perf_counter() < deadline:
            tokens = await read_stream(session, url, body, errors if counted else Errors())
            if counted and tokens is not None:
                per_stream.append(tokens)

    seconds = await _warm_then_measure(worker, concurrency=concurrency, warmup_s=warmup_s, duration=duration, sync=sync)
    return stream_totals("stream", concurrency=concurrency, per_stream=per_stream, errors=errors, seconds=seconds)


def stream_totals(
    mode: str, *, concurrency: int, per_stream: list[int], errors: Errors, seconds: float
) -> StreamResult:
    """What a run of streamed requests adds up to: `per_stream` holds each counted stream's tokens."""
    total = sum(per_stream)
    return {
        "mode": mode,
        "concurrency": concurrency,
        "streams": len(per_stream),
        "tokens": total,
        "errors": errors.count,
        "first_error": errors.first,
        "seconds": seconds,
        "tokens_per_s": total / seconds,
        "tokens_per_stream_min": min(per_stream, default=0),
        "tokens_per_stream_max": max(per_stream, default=0),
    }


async def open_streams(
    session: aiohttp.ClientSession, url: str, body: bytes, *, streams: int, hold: float, open_timeout: float
) -> OpenStreamsResult:
    errors = Errors()
    opened = 0
    all_open = asyncio.Event()

    async def hold_one() -> None:
        nonlocal opened
        try:
            async with session.post(url, data=body, headers=JSON_HEADERS) as response:
                if response.status != 200:
                    errors.add(f"HTTP {response.status}: {(await response.read())[:200]!r}")
                    return
                await response.content.readany()
                opened += 1
                if opened == streams:
                    all_open.set()
                async for _piece in response.content.iter_any():
                    await asyncio.sleep(0.5)  # a slow reader: the rest waits in socket buffers
        except (aiohttp.ClientError, TimeoutError) as exc:
            errors.add(repr(exc))

    started = time.perf_counter()
    tasks = [asyncio.create_task(hold_one()) for _ in range(streams)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_open.wait(), open_timeout)
    seconds_to_open = time.perf_counter() - started
    event = {"event": "streams_open", "streams": streams, "opened": opened, "seconds_to_open": seconds_to_open}
    print(json.dumps(event), flush=True)
    held_from = time.perf_counter()
    await asyncio.sleep(hold)
    held_s = time.perf_counter() - held_from
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "mode": "open-streams",
        "streams": streams,
        "opened": opened,
        "errors": errors.count,
        "first_error": errors.first,
        "seconds_to_open": seconds_to_open,
        "held_s": held_s,
    }


def generate_body(model: str, *, max_tokens: int) -> bytes:
    """A streamed chat completion that always generates `max_tokens` tokens, the same ones every time."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # llama-server's: no early end, so every stream is max_tokens long
        "cache_prompt": True,
    }
    return json.dumps(body).encode()


def content_tokens(event_lines: list[bytes]) -> int:
    """How many of these SSE `data:` lines are chat chunks whose delta carries content (one token each)."""
    tokens = 0
    for line in event_lines:
        payload = line[len(DATA) :].strip()
        if not payload or payload == b"[DONE]":
            continue
        try:
            choices = json.loads(payload).get("choices") or []
        except ValueError:
            continue
        if choices and (choices[0].get("delta") or {}).get("content"):
            tokens += 1
    return tokens


async def generate_one(
    session: aiohttp.ClientSession, url: str, body: bytes, errors: Errors
) -> tuple[int, float, float] | None:
    """One stream: (tokens, ms from sending to the first token, seconds from sending to its end), or None when
    it failed."""
    sent = time.perf_counter()
    first_ms = math.nan
    tokens = 0
    buffer = b""
    try:
        async with session.post(url, data=body, headers=JSON_HEADERS) as response:
            if response.status != 200:
                errors.add(f"HTTP {response.status}: {(await response.read())[:200]!r}")
                return None
            async for piece in response.content.iter_any():
                buffer += piece
                *lines, buffer = buffer.split(b"\n")
                found = content_tokens([line for line in lines if line.startswith(DATA)])
                if found and math.isnan(first_ms):
                    first_ms = (time.perf_counter() - sent) * 1000
                tokens += found
    except (aiohttp.ClientError, TimeoutError) as exc:
        errors.add(repr(exc))
        return None
    return tokens, first_ms, time.perf_counter() - sent


async def generate(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    concurrency: int,
    streams: int,
    alt_url: str | None = None,
    together: bool = False,
) -> GenerateResult:
    errors = Errors()
    per_stream: list[int] = []
    ttft: dict[str, list[float]] = {url: [], **({alt_url: []} if alt_url else {})}
    rates: dict[str, list[float]] = {target: [] for target in ttft}
    targets = list(ttft)

    async def worker(index: int) -> None:
        for number in range(streams):
            target = targets[(index + number) % len(targets)]
            outcome = await generate_one(session, target, body, errors)
            if outcome is not None:
                per_stream.append(outcome[0])
                ttft[target].append(outcome[1])
            rates[target].append(math.nan if outcome is None else outcome[0] / outcome[2])

    async def pairs() -> None:
        for _ in range(streams):
            outcomes = await asyncio.gather(*(generate_one(session, target, body, errors) for target in targets))
            for target, outcome in zip(targets, outcomes, strict=True):
                if outcome is not None:
                    per_stream.append(outcome[0])
                ttft[target].append(math.nan if outcome is None else outcome[1])
                rates[target].append(math.nan if outcome is None else outcome[0] / outcome[2])

    started = time.perf_counter()
    if together and alt_url:
        await asyncio.gather(*(pairs() for _ in range(max(concurrency // 2, 1))))
    else:
        await asyncio.gather(*(worker(index) for index in range(concurrency)))
    seconds = time.perf_counter() - started
    totals = stream_totals("generate", concurrency=concurrency, per_stream=per_stream, errors=errors, seconds=seconds)
    return GenerateResult(
        **totals,
        ttft_ms=ttft[url],
        alt_ttft_ms=ttft[alt_url] if alt_url else [],
        stream_rates=rates[url],
        alt_stream_rates=rates[alt_url] if alt_url else [],
    )


async def first_token(session: aiohttp.ClientSession, url: str, body: bytes) -> FirstTokenResult:
    counter = EventCounter()
    first_token_at = math.nan
    sent_at = time.time()
    async with session.post(url, data=body, headers=JSON_HEADERS) as response:
        headers_at = time.time()
        async for piece in response.content.iter_any():
            counter.feed(piece)
            if counter.events and math.isnan(first_token_at):
                first_token_at = time.time()
    return {
        "mode": "first-token",
        "status": response.status,
        "tokens": counter.tokens,
        "sent_at": sent_at,
        "headers_at": headers_at,
        "first_token_at": first_token_at,
        "done_at": time.time(),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    url = args.url.rstrip("/") + "/v1/chat/completions"
    streaming = args.mode in ("stream", "open-streams", "first-token")
    if args.mode == "open-streams":
        body = request_body(args.model, stream=True, max_tokens=OPEN_STREAM_TOKENS, delay_ms=args.delay_ms)
        limit = args.streams
    elif args.mode == "generate":
        body = generate_body(args.model, max_tokens=args.max_tokens or 64)
        limit = args.concurrency
    else:
        body = request_body(args.model, stream=streaming, max_tokens=args.max_tokens)
        limit = args.concurrency if args.mode in ("throughput", "stream") else 1
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=args.read_timeout)
    # generate: a new connection per stream. llama-server closes a kept-alive connection after a few requests
    # and the client would fail on it ("Can not write request body"), losing streams from direct's count only
    # (the gateway retries such a drop); a connect on loopback costs every path the same ~0.1 ms of TTFT.
    connector = aiohttp.TCPConnector(limit=limit, force_close=args.mode == "generate")
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        result: Any
        if args.mode in ("throughput", "stream"):  # the timed modes: a warm-up, then `duration` measured
            timed = throughput if args.mode == "throughput" else stream
            result = await timed(
                session,
                url,
                body,
                concurrency=args.concurrency,
                duration=args.duration,
                warmup_s=args.warmup_s,
                sync=args.sync,
            )
        elif args.mode == "latency":
            result = await latency(session, url, body, requests=args.requests, warmup=args.warmup)
        elif args.mode == "open-streams":
            result = await open_streams(
                session, url, body, streams=args.streams, hold=args.hold, open_timeout=args.open_timeout
            )
        elif args.mode == "generate":
            alt_url = args.alt_url.rstrip("/") + "/v1/chat/completions" if args.alt_url else None
            result = await generate(
                session,
                url,
                body,
                concurrency=args.concurrency,
                streams=args.streams,
                alt_url=alt_url,
                together=args.together,
            )
        else:
            result = await first_token(session, url, body)
    return dict(result)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", required=True, help="base URL of the target, e.g. http://127.0.0.1:8080")
    parser.add_argument(
        "--mode",
        required=True,
        choices=("throughput", "latency", "stream", "open-streams", "first-token", "generate"),
    )
    parser.add_argument("--alt-url", default=None, help="generate: a second target, alternated with --url per stream")
    parser.add_argument("--together", action="store_true", help="generate --alt-url: pairs sent at once")
    parser.add_argument("--model", default="bench", help="the request's `model` field")
    parser.add_argument("--concurrency", type=int, default=32, help="connections (throughput, stream)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds (throughput, stream)")
    parser.add_argument("--warmup-s", type=float, default=0.5, help="unmeasured seconds first (throughput, stream)")
    parser.add_argument("--sync", action="store_true", help="announce the measured window, begin it on a stdin line")
    parser.add_argument("--requests", type=int, default=2000, help="measured requests (latency)")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests first (latency)")
    parser.add_argument("--max-tokens", type=int, default=None, help="sent as max_tokens (default: upstream's N)")
    parser.add_argument(
        "--streams", type=int, default=256, help="streams held open (open-streams); streams per worker (generate)"
    )
    parser.add_argument("--delay-ms", type=int, default=250, help="upstream pause between events (open-streams)")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds held once all are open (open-streams)")
    parser.add_argument("--open-timeout", type=float, default=60.0, help="longest wait for all to open")
    parser.add_argument("--read-timeout", type=float, default=120.0, help="longest silence on a connection")
    return parser.parse_args(argv)


def run_fast(main: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run `main` on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main(argv: list[str]) -> int:
    result = run_fast(run(parse_args(argv)))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

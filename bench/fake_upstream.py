"""The benchmark's upstream: a llama-server-shaped HTTP server that answers as fast as Python can.

    python bench/fake_upstream.py --host 127.0.0.1 --port P [-m model.gguf] [-np SLOTS] [--bench-tokens N]

It exists so that the benchmark measures the gateway, not the model: every answer is built once at start-up
and only written afterwards. It serves GET /health, /props, /slots, /v1/models and POST /v1/chat/completions;
a request with `"stream": true` gets N `chat.completion.chunk` events (one per token), a final event with
`finish_reason` and `usage`, then `data: [DONE]`, each written as its own send as llama-server does, with no
pause unless the request asks for one. The request body is searched as bytes, never parsed as JSON:
- `"stream": true` streams; `"max_tokens": K` sends K tokens instead of N;
- `"bench_delay_ms": D` (not a llama-server field; the benchmark's) waits D ms between events, which keeps a
  stream open for the open-streams (RSS) measurement.

It takes llama-server's command line, so llamesh can spawn it as its `binary_path` (through a small wrapper
script): `--host`, `--port`, `-m`, `-np`, `-a` are read, anything else is ignored; `--version` and `--help`
answer as llama-server does and return at once (before aiohttp is imported).

Environment: FAKE_UPSTREAM_TOKENS (N when --bench-tokens is absent, default 64), FAKE_UPSTREAM_STARTUP_MS
(every path answers 503 "Loading model" for this long after the port is bound, as llama-server does while it
loads; default 0), FAKE_UPSTREAM_HEALTHY_FILE (one JSON line is appended to it the first time /health answers
200: model path, port, and `healthy_at`, a full-precision `time.time()` — the scale-from-zero measurement
subtracts it from the client's first-token time).

Deliberately absent: tokenizing, templates, slot accounting, other endpoints, faults (tests/rig has the
fault-injecting fake llama-server; this one only needs to be fast).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

VERSION_TEXT = "version: 0.5.0-dev (build 1, commit 0c1e570)\nbuilt with cc for x86_64-linux-gnu (bench fake)\n"
HELP_TEXT = """usage: llama-server [options]  (llamesh benchmark fake)

----- common params -----
-m,    --model FNAME          model path
-c,    --ctx-size N           size of the prompt context (ignored)
-np,   --parallel N           number of slots reported by /props and /slots (default: 512)
-a,    --alias STRING         model name reported by /v1/models
--fit  [on|off]               ignored
--host HOST                   ip address to listen on (default: 127.0.0.1)
--port PORT                   port to listen on (default: 8080)
--bench-tokens N              tokens per answer (default: FAKE_UPSTREAM_TOKENS or 64)
"""
BUILD_INFO = "b1-0c1e570"
CREATED = 1_732_000_000
WORDS = (" The", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ".")
DEFAULT_SLOTS = 512  # large, so that a gateway that caps in-flight requests at /props' total_slots never queues

_STREAM = re.compile(rb'"stream"\s*:\s*true')
_MAX_TOKENS = re.compile(rb'"max_tokens"\s*:\s*(\d+)')
_DELAY_MS = re.compile(rb'"bench_delay_ms"\s*:\s*(\d+)')

Json = dict[str, Any]
Handler = Callable[["web.BaseRequest"], Awaitable["web.StreamResponse"]]


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    model_path: str
    model_id: str
    n_slots: int
    tokens: int
    startup_s: float
    healthy_file: Path | None


def parse_settings(argv: list[str], environ: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("-m", "--model", default="bench.gguf")
    parser.add_argument("-a", "--alias", default=None)
    parser.add_argument("-np", "--parallel", type=int, default=0)
    parser.add_argument("--bench-tokens", type=int, default=None)
    args, _ignored = parser.parse_known_args(argv)
    healthy_file = environ.get("FAKE_UPSTREAM_HEALTHY_FILE")
    return Settings(
        host=args.host,
        port=args.port,
        model_path=args.model,
        model_id=args.alias or os.path.basename(args.model),
        n_slots=args.parallel or DEFAULT_SLOTS,
        tokens=args.bench_tokens or int(environ.get("FAKE_UPSTREAM_TOKENS", "64")),
        startup_s=int(environ.get("FAKE_UPSTREAM_STARTUP_MS", "0")) / 1000,
        healthy_file=Path(healthy_file) if healthy_file else None,
    )


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class Answers:
    """Every response body, built once; bodies for an unusual `max_tokens` are built once per count."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.envelope: Json = {
            "created": CREATED,
            "id": "chatcmpl-benchbenchbenchbenchbenchbench",
            "model": settings.model_id,
            "system_fingerprint": BUILD_INFO,
        }
        # One event per distinct word; token i is event i % len(WORDS).
        self.token_events = [self._event({"content": word}) for word in WORDS]
        self._finals: dict[int, bytes] = {}
        self._completions: dict[int, bytes] = {}
        n_ctx = 4096
        self.health = b'{"status":"ok"}'
        self.loading = b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'
        self.props = _dumps(
            {
                "default_generation_settings": {"n_ctx": n_ctx, "params": {"n_predict": -1}},
                "total_slots": settings.n_slots,
                "model_alias": settings.model_id,
                "model_path": settings.model_path,
                "build_info": BUILD_INFO,
                "is_sleeping": False,
            }
        )
        self.slots = _dumps([{"id": slot, "n_ctx": n_ctx, "is_processing": False} for slot in range(settings.n_slots)])
        meta = {"n_ctx_train": 131072, "n_vocab": 32000, "n_embd": 64, "n_params": 1_000_000}
        model = {"id": settings.model_id, "object": "model", "created": CREATED, "owned_by": "llamacpp"}
        self.models = _dumps({"object": "list", "data": [{**model, "meta": meta}]})
        self.final_event(settings.tokens)
        self.completion(settings.tokens)

    def _event(self, delta: Json, *, finish: str | None = None, extra: Json | None = None) -> bytes:
        chunk = {
            "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
            **self.envelope,
            "object": "chat.completion.chunk",
            **(extra or {}),
        }
        return b"data: " + _dumps(chunk) + b"\n\n"

    def _usage(self, n_tokens: int) -> Json:
        return {
            "usage": {"completion_tokens": n_tokens, "prompt_tokens": 9, "total_tokens": n_tokens + 9},
            "timings": {"prompt_n": 9, "prompt_ms": 1.0, "predicted_n": n_tokens, "predicted_ms": float(n_tokens)},
        }

    def final_event(self, n_tokens: int) -> bytes:
        if (event := self._finals.get(n_tokens)) is None:
            event = self._event({}, finish="length", extra=self._usage(n_tokens))
            self._finals[n_tokens] = event
        return event

    def completion(self, n_tokens: int) -> bytes:
        if (body := self._completions.get(n_tokens)) is None:
            text = "".join(WORDS[i % len(WORDS)] for i in range(n_tokens))
            choice = {"finish_reason": "length", "index": 0, "message": {"role": "assistant", "content": text}}
            answer = {"choices": [choice], **self.envelope, "object": "chat.completion", **self._usage(n_tokens)}
            body = _dumps(answer)
            self._completions[n_tokens] = body
        return body


def build_handler(settings: Settings, answers: Answers) -> Handler:
    """The one request handler: a dict lookup on (method, path), no router, no middleware."""
    from aiohttp import web

    ready_at = time.monotonic() + settings.startup_s
    healthy_seen = False
    json_type = "application/json"
    sse_headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    n_events = len(answers.token_events)

    def record_healthy() -> None:
        nonlocal healthy_seen
        healthy_seen = True
        if settings.healthy_file is not None:
            line = {"model_path": settings.model_path, "port": settings.port, "healthy_at": time.time()}
            with settings.healthy_file.open("a") as sink:
                sink.write(json.dumps(line) + "\n")

    async def chat(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        n_tokens = int(match[1]) if (match := _MAX_TOKENS.search(body)) else settings.tokens
        if not _STREAM.search(body):
            return web.Response(body=answers.completion(n_tokens), content_type=json_type)
        delay_s = int(match[1]) / 1000 if (match := _DELAY_MS.search(body)) else 0.0
        response = web.StreamResponse(headers=sse_headers)
        await response.prepare(request)
        events = answers.token_events
        for index in range(n_tokens):
            await response.write(events[index % n_events])
            if delay_s:
                await asyncio.sleep(delay_s)
        await response.write(answers.final_event(n_tokens))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    static: dict[str, bytes] = {
        "/props": answers.props,
        "/slots": answers.slots,
        "/v1/models": answers.models,
        "/models": answers.models,
    }

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if not healthy_seen and time.monotonic() < ready_at:
            return web.Response(status=503, body=answers.loading, content_type=json_type)
        if request.method == "POST" and path in ("/v1/chat/completions", "/chat/completions"):
            return await chat(request)
        if request.method == "GET":
            if path == "/health":
                if not healthy_seen:
                    record_healthy()
                return web.Response(body=answers.health, content_type=json_type)
            if (body := static.get(path)) is not None:
                return web.Response(body=body, content_type=json_type)
        return web.Response(status=404, body=b'{"error":{"code":404,"message":"File Not Found"}}')

    return handle


async def serve(settings: Settings) -> None:
    from aiohttp import web

    server = web.Server(build_handler(settings, Answers(settings)), access_log=None)
    runner = web.ServerRunner(server, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=4096, reuse_address=True)
    await site.start()
    print(f"fake upstream listening on http://{settings.host}:{settings.port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run_fast(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def main(argv: list[str]) -> int:
    if "--version" in argv:
        sys.stderr.write(VERSION_TEXT)  # llama-server prints its version on stderr
        return 0
    if "--help" in argv or "-h" in argv:
        sys.stdout.write(HELP_TEXT)
        return 0
    run_fast(serve(parse_settings(argv, dict(os.environ))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

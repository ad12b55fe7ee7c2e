"""A fault-injecting stand-in for llama-server, run by tests as a child process.

    python tests/rig/fake_llama_server.py --host 127.0.0.1 --port P -m model.gguf [-c N] [-np N] [...]

It speaks enough of llama-server's HTTP API for the gateway and the agent (/health, /props, /slots, /v1/models,
/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/rerank) and writes llama-server-style startup lines
on stderr (wording from the llama.cpp build the project tests against). Other llama-server arguments are
accepted and ignored. What the real server does and this one copies: the port is bound before the model
"loads" and every path answers 503 "Loading model" until then; a chat stream carries a `usage` chunk (with
empty `choices`) only when `stream_options.include_usage` is set; a completions stream's last chunk always
carries `usage`; requests wait for a free slot.

FAKE_LLAMA_FAULT chooses the fault:
- none: a well-behaved server;
- slow_stream: FAKE_LLAMA_TOKEN_DELAY_MS (200 by default) after every SSE chunk;
- stall_body: headers and the first chunk (half the body when not streaming), then silence;
- crash_mid_stream: the process exits (status 1) after FAKE_LLAMA_CRASH_AFTER chunks, or before a
  non-streamed answer;
- busy: /slots shows every slot processing and requests wait for one forever;
- never_healthy: every path answers 503 "Loading model" forever;
- exit_on_start: llama-server's model-load failure lines, then exit status 1, without binding the port;
- hang_health: /health accepts the request and never answers; the other paths work;
- stall: a chat or text completion takes its slot and goes silent for good, using no CPU (a wedged
  llama-server, for the wedge watchdog): not one byte when not streaming; the headers and nothing more
  when streaming (llama-server sends a stream's headers at once). With FAKE_LLAMA_STALL_ONCE set to a
  file path, only the completion that creates that file stalls (one across every fake given the same
  path); the rest are served. The other paths work;
- oom_when_crowded: a stand-in for a model that does not fit next to others: llama-server's out-of-memory
  model-load failure lines, then exit status 1, while more than FAKE_LLAMA_MAX_PEERS (default 0) other fakes
  registered in FAKE_LLAMA_PEERS_DIR are alive; otherwise a well-behaved server.
Every fake given FAKE_LLAMA_PEERS_DIR registers there (a file named by its pid, removed when it exits; a
dead pid's file is ignored), so the faulty one can count the others.
A request holds its slot until its last byte or until its client goes away, whichever comes first.

Tunables: FAKE_LLAMA_SLOTS (slots when no -np is given, default 1), FAKE_LLAMA_TOKENS (tokens when a request sets no
  max_tokens, default 8), FAKE_LLAMA_TOKEN_DELAY_MS (between tokens; default 0, or 200 under slow_stream),
  FAKE_LLAMA_STARTUP_DELAY_MS (time spent "loading", default 0), FAKE_LLAMA_N_CTX_TRAIN (default 2048),
  FAKE_LLAMA_CRASH_AFTER (chunks sent before crash_mid_stream exits, default 3), FAKE_LLAMA_TOKEN_CPU_MS (CPU
  time each token costs, spent computing before the token delay, as a real CPU decode does; default 0, so a
  slow_stream alone sleeps and looks idle to the wedge watchdog), FAKE_LLAMA_RSS_MB (memory held resident
  from start to exit, so the agent's memory samples see a known size; default 0).

It deliberately does not tokenize, template, or check arguments: one "token" is one word of a fixed text.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import hashlib
import itertools
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

FAULTS = (
    "none",
    "slow_stream",
    "stall_body",
    "crash_mid_stream",
    "busy",
    "never_healthy",
    "exit_on_start",
    "hang_health",
    "stall",
    "oom_when_crowded",
)
BUILD_INFO = "b1-fake"
EMBEDDING_WIDTH = 64
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog")
STARTED = time.monotonic()
COMPLETION_IDS = itertools.count(1)

Json = dict[str, Any]


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    model_id: str
    model_path: str
    n_ctx: int
    n_ctx_train: int
    n_slots: int
    verbosity: int
    fault: str
    tokens: int
    token_delay_s: float
    startup_delay_s: float
    crash_after: int
    stall_once: str | None = None  # FAKE_LLAMA_STALL_ONCE
    token_cpu_s: float = 0.0  # FAKE_LLAMA_TOKEN_CPU_MS
    rss_mb: int = 0  # FAKE_LLAMA_RSS_MB
    peers_dir: str | None = None  # FAKE_LLAMA_PEERS_DIR
    max_peers: int = 0  # FAKE_LLAMA_MAX_PEERS


def parse_settings(argv: list[str], environ: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("-m", "--model", default="model.gguf")
    parser.add_argument("-a", "--alias", default=None)
    parser.add_argument("-c", "--ctx-size", type=int, default=0)
    parser.add_argument("-np", "--parallel", type=int, default=0)
    parser.add_argument("-lv", "--verbosity", "--log-verbosity", type=int, default=3)
    args, _ignored = parser.parse_known_args(argv)
    fault = environ.get("FAKE_LLAMA_FAULT", "none")
    if fault not in FAULTS:
        raise SystemExit(f"FAKE_LLAMA_FAULT={fault!r} is not one of {', '.join(FAULTS)}")
    n_ctx_train = int(environ.get("FAKE_LLAMA_N_CTX_TRAIN", "2048"))
    default_delay_ms = "200" if fault == "slow_stream" else "0"
    return Settings(
        host=args.host,
        port=args.port,
        model_id=args.alias or os.path.basename(args.model),
        model_path=args.model,
        n_ctx=args.ctx_size or n_ctx_train,
        n_ctx_train=n_ctx_train,
        n_slots=args.parallel or int(environ.get("FAKE_LLAMA_SLOTS", "1")),
        verbosity=args.verbosity,
        fault=fault,
        tokens=int(environ.get("FAKE_LLAMA_TOKENS", "8")),
        token_delay_s=int(environ.get("FAKE_LLAMA_TOKEN_DELAY_MS", default_delay_ms)) / 1000,
        startup_delay_s=int(environ.get("FAKE_LLAMA_STARTUP_DELAY_MS", "0")) / 1000,
        crash_after=int(environ.get("FAKE_LLAMA_CRASH_AFTER", "3")),
        stall_once=environ.get("FAKE_LLAMA_STALL_ONCE") or None,
        token_cpu_s=int(environ.get("FAKE_LLAMA_TOKEN_CPU_MS", "0")) / 1000,
        rss_mb=int(environ.get("FAKE_LLAMA_RSS_MB", "0")),
        peers_dir=environ.get("FAKE_LLAMA_PEERS_DIR") or None,
        max_peers=int(environ.get("FAKE_LLAMA_MAX_PEERS", "0")),
    )


def log(level: str, message: str) -> None:
    """One line as llama.cpp's common logger writes it: `M.SS.mmm.uuu L message`."""
    elapsed_us = int((time.monotonic() - STARTED) * 1_000_000)
    minutes, rest = divmod(elapsed_us, 60_000_000)
    stamp = f"{minutes}.{rest // 1_000_000:02d}.{rest // 1000 % 1000:03d}.{rest % 1000:03d}"
    print(f"{stamp} {level} {message}", file=sys.stderr, flush=True)


def srv(level: str, func: str, message: str) -> None:
    log(level, f"srv  {func[:12]:>12}: {message}")  # llama-server's SRV_INF: "srv  %12.*s: "


class Slots:
    """Which slots are processing; a request holds one from its first byte to its last."""

    def __init__(self, count: int, *, busy: bool) -> None:
        self.count = count
        self.processing: set[int] = set(range(count)) if busy else set()
        self.free: asyncio.Queue[int] = asyncio.Queue()
        for slot in set(range(count)) - self.processing:
            self.free.put_nowait(slot)

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[int]:
        slot = await self.free.get()  # waits while every slot is busy, as llama-server defers the task
        self.processing.add(slot)
        try:
            yield slot
        finally:
            self.processing.discard(slot)
            self.free.put_nowait(slot)


SETTINGS = web.AppKey("settings", Settings)
SLOTS = web.AppKey("slots", Slots)
READY = web.AppKey("ready", asyncio.Event)


@web.middleware
async def loading_gate(request: web.Request, handler: Any) -> web.StreamResponse:
    if not request.app[READY].is_set():
        loading = {"code": 503, "message": "Loading model", "type": "unavailable_error"}
        return web.json_response({"error": loading}, status=503)
    response: web.StreamResponse = await handler(request)
    return response


async def health(request: web.Request) -> web.Response:
    if request.app[SETTINGS].fault == "hang_health":
        await asyncio.Event().wait()  # never answers; ends when the client goes or the server stops
    return web.json_response({"status": "ok"})


async def props(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return web.json_response(
        {
            "default_generation_settings": {"n_ctx": settings.n_ctx // settings.n_slots, "params": {}},
            "total_slots": settings.n_slots,
            "model_alias": settings.model_id,
            "model_path": settings.model_path,
            "build_info": BUILD_INFO,
            "is_sleeping": False,
        }
    )


async def slots(request: web.Request) -> web.Response:
    settings, state = request.app[SETTINGS], request.app[SLOTS]
    n_ctx_slot = settings.n_ctx // settings.n_slots
    return web.json_response(
        [{"id": slot, "n_ctx": n_ctx_slot, "is_processing": slot in state.processing} for slot in range(state.count)]
    )


async def models(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    meta = {"n_ctx": settings.n_ctx, "n_ctx_train": settings.n_ctx_train, "n_embd": EMBEDDING_WIDTH}
    model = {"id": settings.model_id, "object": "model", "created": int(time.time()), "owned_by": "llamacpp"}
    return web.json_response({"object": "list", "data": [{**model, "meta": meta}]})


def count_tokens(value: Any) -> int:
    return len(json.dumps(value).split())


async def generate(request: web.Request) -> web.StreamResponse:
    """/v1/chat/completions and /v1/completions, streamed or not."""
    settings = request.app[SETTINGS]
    body: Json = await request.json()
    chat = request.path.endswith("/chat/completions")
    limit = body.get("max_tokens") or body.get("max_completion_tokens") or body.get("n_predict")
    n_tokens = int(limit) if limit else settings.tokens
    n_prompt = count_tokens(body.get("messages") if chat else body.get("prompt"))
    usage = {"completion_tokens": n_tokens, "prompt_tokens": n_prompt, "total_tokens": n_tokens + n_prompt}
    finish_reason = "length" if limit else "stop"
    envelope = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-fake{next(COMPLETION_IDS)}",
        "created": int(time.time()),
        "model": settings.model_id,
        "system_fingerprint": BUILD_INFO,
        "object": "chat.completion.chunk" if chat else "text_completion",
    }
    pieces = [WORDS[i % len(WORDS)] + " " for i in range(n_tokens)]

    def chunk(text: str | None, *, finish: str | None = None) -> Json:
        if not chat:
            return {**envelope, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
        delta: Json = {"role": "assistant", "content": None} if text is None else {"content": text}
        return {**envelope, "choices": [{"finish_reason": finish, "index": 0, "delta": {} if finish else delta}]}

    async with request.app[SLOTS].hold() as slot:
        if settings.fault == "stall" and claim_stall(settings):
            if body.get("stream"):
                await web.StreamResponse(headers={"Content-Type": "text/event-stream"}).prepare(request)
            await asyncio.Event().wait()  # until the client goes away or the process is killed
        if not body.get("stream"):
            await pause(settings, n_tokens)
            if settings.fault == "crash_mid_stream":
                crash(f"slot {slot} crashed while generating")
            if chat:
                message = {"role": "assistant", "content": "".join(pieces)}
                choice = {"finish_reason": finish_reason, "index": 0, "message": message}
                final = {**envelope, "object": "chat.completion", "choices": [choice], "usage": usage}
            else:
                final = {**chunk("".join(pieces), finish=finish_reason), "usage": usage}
            return await send_json(request, final, stall=settings.fault == "stall_body")

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        events = ([chunk(None)] if chat else []) + [chunk(piece) for piece in pieces]
        last = chunk("", finish=finish_reason)
        if not chat:
            events.append({**last, "usage": usage})
        elif (body.get("stream_options") or {}).get("include_usage"):
            events += [last, {**envelope, "choices": [], "usage": usage}]
        else:
            events.append(last)
        for sent, event in enumerate(events):
            if settings.fault == "crash_mid_stream" and sent >= settings.crash_after:
                crash(f"slot {slot} crashed after {sent} chunks")
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
            if settings.fault == "stall_body":
                await asyncio.Event().wait()  # until the client goes away, which cancels this handler
            compute(settings.token_cpu_s)
            await asyncio.sleep(settings.token_delay_s)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def embeddings(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    body: Json = await request.json()
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    async with request.app[SLOTS].hold():
        await pause(settings, 1)
    data = [{"object": "embedding", "index": i, "embedding": vector(str(text))} for i, text in enumerate(inputs)]
    n_prompt = sum(count_tokens(text) for text in inputs)
    usage = {"prompt_tokens": n_prompt, "total_tokens": n_prompt}
    return web.json_response({"model": settings.model_id, "object": "list", "usage": usage, "data": data})


async def rerank(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    body: Json = await request.json()
    async with request.app[SLOTS].hold():
        await pause(settings, 1)
    query = vector(body["query"])
    scores = [sum(a * b for a, b in zip(query, vector(doc), strict=True)) for doc in body["documents"]]
    ranked = sorted(range(len(scores)), key=lambda index: -scores[index])[: body.get("top_n") or len(scores)]
    results = [{"index": index, "relevance_score": scores[index]} for index in ranked]
    usage = {"prompt_tokens": count_tokens(body), "total_tokens": count_tokens(body)}
    return web.json_response({"model": settings.model_id, "object": "list", "usage": usage, "results": results})


def vector(text: str) -> list[float]:
    """A stable, unit-length pseudo-embedding of `text`."""
    raw = [byte - 127.5 for byte in hashlib.shake_256(text.encode()).digest(EMBEDDING_WIDTH)]
    norm = math.sqrt(sum(x * x for x in raw))
    return [x / norm for x in raw]


async def pause(settings: Settings, n_tokens: int) -> None:
    compute(settings.token_cpu_s * n_tokens)
    if settings.token_delay_s:
        await asyncio.sleep(settings.token_delay_s * n_tokens)


async def send_json(request: web.Request, payload: Json, *, stall: bool) -> web.StreamResponse:
    """Send `payload`; when stalling, send the headers and half the body, then nothing more."""
    if not stall:
        return web.json_response(payload)
    body = json.dumps(payload).encode()
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    await asyncio.Event().wait()
    return response


def compute(cpu_s: float) -> None:
    """Spend `cpu_s` seconds of this process's CPU time (not wall time: a loaded machine only slows it)."""
    until = time.process_time() + cpu_s
    while time.process_time() < until:
        pass


def claim_stall(settings: Settings) -> bool:
    """Whether this completion stalls: always, or under FAKE_LLAMA_STALL_ONCE only if it made the file."""
    if settings.stall_once is None:
        return True
    try:
        os.close(os.open(settings.stall_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def live_peers(folder: str) -> int:
    """Other fakes registered in `folder` whose process is still alive."""
    count = 0
    for entry in os.listdir(folder):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            os.kill(int(entry), 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass  # alive, someone else's
        count += 1
    return count


def register_peer(folder: str) -> None:
    path = os.path.join(folder, str(os.getpid()))
    with open(path, "w") as handle:
        handle.write("fake llama-server\n")

    def unregister() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)

    atexit.register(unregister)


def crash(reason: str) -> None:
    log("E", f"fake crash: {reason}")
    os._exit(1)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[loading_gate])
    app[SETTINGS] = settings
    app.router.add_get("/health", health)
    app.router.add_get("/props", props)
    app.router.add_get("/slots", slots)
    for prefix in ("/v1", ""):  # llama-server answers both spellings
        app.router.add_get(f"{prefix}/models", models)
        app.router.add_post(f"{prefix}/chat/completions", generate)
        app.router.add_post(f"{prefix}/completions", generate)
        app.router.add_post(f"{prefix}/embeddings", embeddings)
        app.router.add_post(f"{prefix}/rerank", rerank)

    async def load_model(app: web.Application) -> Any:
        app[SLOTS] = Slots(settings.n_slots, busy=settings.fault == "busy")
        app[READY] = asyncio.Event()
        loading = asyncio.create_task(finish_loading(app))
        yield
        loading.cancel()

    app.cleanup_ctx.append(load_model)
    return app


async def finish_loading(app: web.Application) -> None:
    settings = app[SETTINGS]
    await asyncio.sleep(settings.startup_delay_s)
    if settings.verbosity >= 4:
        log("I", f"print_info: n_ctx_train           = {settings.n_ctx_train}")
        log("I", f"llama_context: n_seq_max             = {settings.n_slots}")
        log("I", f"llama_context: n_ctx                 = {settings.n_ctx}")
    n_ctx_slot = settings.n_ctx // settings.n_slots
    srv(
        "I",
        "load_model",
        f"initializing, n_slots = {settings.n_slots}, n_ctx_slot = {n_ctx_slot}, kv_unified = 'false'",
    )
    if settings.fault == "never_healthy":
        return
    app[READY].set()
    srv("I", "llama_server", "model loaded")
    srv("I", "llama_server", f"listening on http://{settings.host}:{settings.port}")


def main() -> None:
    settings = parse_settings(sys.argv[1:], dict(os.environ))
    srv("I", "llama_server", "initializing ...")
    log("I", f"cmn  common_param: common_params_print_info: verbosity = {settings.verbosity} (fake llama-server)")
    srv("I", "load_model", f"loading model '{settings.model_path}'")
    if settings.fault == "exit_on_start":
        log("E", f"llama_model_load: error loading model: fake failure for '{settings.model_path}'")
        srv("E", "load_model", f"failed to load model, '{settings.model_path}'")
        srv("E", "llama_server", "exiting due to model loading error")
        sys.exit(1)
    if settings.fault == "oom_when_crowded" and settings.peers_dir is not None:
        crowd = live_peers(settings.peers_dir)
        if crowd > settings.max_peers:
            log("E", f"ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer ({crowd} others run)")
            log("E", f"llama_model_load: error loading model: unable to allocate buffer for '{settings.model_path}'")
            srv("E", "load_model", f"failed to load model, '{settings.model_path}'")
            srv("E", "llama_server", "exiting due to model loading error")
            sys.exit(1)
    if settings.peers_dir is not None:
        register_peer(settings.peers_dir)
    ballast = b"\x01" * (settings.rss_mb * 1024 * 1024)  # written, so resident
    # handler_cancellation: a client that goes away cancels its handler, whose `finally` frees the slot.
    # shutdown_timeout: SIGTERM ends stalled and waiting requests at once, as it does llama-server's.
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=0.1,
    )
    del ballast


if __name__ == "__main__":
    main()

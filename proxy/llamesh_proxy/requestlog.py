"""One structured JSON line per OpenAI request, written when the request ends (whatever ended it).

The line carries the seed's minimum fields (timestamp, level, event, node_id, session_id, request_id) and
what an operator asks first about a request: model, profile, instance, status, duration, tokens, time
queued, and whether the client or the upstream gave up. The fields travel as the record's `extra` on the
`llamesh.requests` logger; the process's JSON formatter (set up by the CLI) writes them as one line.

Other lines logged while a request is handled (in its task, or in tasks it started) get its request_id
and session_id too: creating an `Exchange` makes it the context's current request, and `RequestContext`,
a filter the CLI installs, copies the ids onto each record until the request's line is written. A record
that sets `request_id` itself (None included: "not this context's request") keeps its own.

Counting for /metrics is `metrics`' business; this module only describes.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import os
import random
import threading
import time
from typing import Any

logger = logging.getLogger("llamesh.requests")

_current: contextvars.ContextVar[Exchange | None] = contextvars.ContextVar("llamesh_request", default=None)


@dataclasses.dataclass
class Exchange:
    """One request as it goes through the gateway."""

    request_id: str
    session_id: str | None  # the client's X-Session-Id; a UUID is made up for the log line when absent
    path: str
    model: str | None = None
    profile: str | None = None
    instance: str | None = None
    status: int = 0
    tokens: int = 0
    queued_ms: float = 0.0
    stream: bool = False
    error_type: str | None = None
    affinity: str | None = None  # how its instance was chosen (affinity.Result), once it got one
    cached_tokens: int | None = None  # prompt tokens llama-server reused from its KV cache, when it said
    client_gone: bool = False
    upstream_failed: bool = False
    finished: bool = dataclasses.field(default=False, init=False)  # its line was written
    _session_for_log: str | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _current.set(self)  # the handler's task (aiohttp runs each request in its own) and tasks it starts

    @property
    def session_for_log(self) -> str:
        """The client's session id, or one UUID made up for all of this request's lines."""
        if self.session_id:
            return self.session_id
        if self._session_for_log is None:
            self._session_for_log = random_uuid4()
        return self._session_for_log


_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))  # the version nibble and the variant's two bits
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def random_uuid4() -> str:
    """A version-4 UUID string, as `str(uuid.uuid4())` but from `random`: unique, not secret, and without
    `uuid4`'s system call to the OS's random source on every request (bench/, profiled)."""
    digits = f"{random.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


class RequestContext(logging.Filter):
    """Adds the current request's request_id and session_id to a record logged while it is handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        exchange = _current.get()
        if exchange is not None and not exchange.finished:
            fields = record.__dict__
            if "request_id" not in fields:
                fields["request_id"] = exchange.request_id
                fields.setdefault("session_id", exchange.session_for_log)
        return True


def emit(exchange: Exchange, *, duration_ms: float) -> None:
    exchange.finished = True  # from here on, lines of this context are no longer about this request
    if not logger.isEnabledFor(logging.INFO):
        return
    level = logging.WARNING if exchange.status >= 500 or exchange.upstream_failed else logging.INFO
    fields: dict[str, Any] = {
        "event": "request_complete",
        "request_id": exchange.request_id,
        "session_id": exchange.session_for_log,
        "path": exchange.path,
        "model": exchange.model,
        "profile": exchange.profile,
        "instance": exchange.instance,
        "status": exchange.status,
        "duration_ms": round(duration_ms, 1),
        "queued_ms": round(exchange.queued_ms, 1),
        "tokens": exchange.tokens,
        "stream": exchange.stream,
    }
    if exchange.affinity is not None:
        fields["affinity"] = exchange.affinity
    if exchange.cached_tokens is not None:
        fields["cached_tokens"] = exchange.cached_tokens
    if exchange.error_type:
        fields["error_type"] = exchange.error_type
    if exchange.client_gone:
        fields["client_disconnected"] = True
    if exchange.upstream_failed:
        fields["upstream_failed"] = True
    # What `logger.log` does, less its walk up the stack for the caller's file and line (written nowhere)
    # and `makeRecord`'s check of each field against the record's own names (none of these is one).
    record = _new_record(level, f"{exchange.path} {exchange.model} -> {exchange.status}")
    record.__dict__.update(fields)
    logger.handle(record)


# The attributes every request line's LogRecord starts with, and the `logging` module's start time
# (`relativeCreated` counts from it); made at the first line.
_template: tuple[dict[str, Any], float] | None = None


def _new_record(level: int, message: str) -> logging.LogRecord:
    """The LogRecord `logger.log(level, message)` would make here, with every attribute the standard one
    has. With the standard record factory, its fixed attributes (this file's name and module, no
    arguments, no exception, ...) are copied from one record made at the first call, and only the clock,
    the level and the message are set per line: `LogRecord.__init__` was a third of `emit`'s time
    (bench/, profiled). Another factory (set by an application or a test) is called as `logging` would."""
    global _template
    factory = logging.getLogRecordFactory()
    if factory is not logging.LogRecord:
        return factory(logger.name, level, __file__, 0, message, None, None)
    if _template is None:
        first = logging.LogRecord(logger.name, level, __file__, 0, "", None, None)
        _template = dict(vars(first)), first.created - first.relativeCreated / 1000
    template, started = _template
    record = logging.LogRecord.__new__(logging.LogRecord)
    fields = record.__dict__
    fields.update(template)
    now = time.time()
    fields["created"] = now
    fields["msecs"] = int((now - int(now)) * 1000) + 0.0  # as LogRecord computes them
    fields["relativeCreated"] = (now - started) * 1000
    fields["msg"] = message
    fields["levelno"] = level
    fields["levelname"] = logging.getLevelName(level)
    if logging.logThreads:  # the thread and process as of this line, when the process records them
        fields["thread"], fields["threadName"] = threading.get_ident(), threading.current_thread().name
    if logging.logProcesses:
        fields["process"] = os.getpid()
    return record

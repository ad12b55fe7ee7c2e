"""Process-wide logging: one JSON object per line on stderr, and optionally in a daily-rotated file.

Every line carries the seed's minimum fields: timestamp, level, node_id, event, and request_id and
session_id while a gateway request is being handled (`requestlog.RequestContext` adds them). Fields a
caller passes through `extra=` (model, instance_id, port, ...) are top-level keys. `event` is always a real
field: the caller's (`extra={"event": "instance_spawn", ...}`, the seed's names), or else the logger's
name, so a third-party record (aiohttp, kopf, asyncio, `py.warnings`) is still one flat object and never a
JSON string inside `message`.

The event loop only enqueues records. A writer thread formats and writes them in batches, and the file
handler's rollover runs there too: at midnight UTC the file is renamed with the date appended, gzipped when
`logging.compression` is on, and rotated files beyond `logging.max_keep_files` (compressed or not) are
deleted. Configured once by the CLI; library modules only call `logging.getLogger(__name__)`.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gzip
import json
import logging
import logging.handlers
import math
import os
import queue
import re
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from llamesh_api import config
from llamesh_proxy import requestlog

_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}
# kopf's ObjectLogger passes its whole OperatorSettings and a flag for its event poster in `extra`.
_DROPPED = frozenset({"settings", "k8s_skip"})
_REQUEST_KEYS = ("request_id", "session_id")  # only written when known
_SMALLEST_PLAIN_FLOAT = 1e-4  # json and orjson write every finite float from here up alike (tests/test_logsetup.py)
# A record's attributes that are not its `extra` fields: the standard ones, those dropped, and the names
# of the line's own first fields (an `extra` under one of those names would not replace them).
_NOT_EXTRA = _STANDARD | _DROPPED | {"timestamp", "level", "node_id", "logger", "event"}


class JsonFormatter(logging.Formatter):
    def __init__(self, *, node_id: str) -> None:
        super().__init__()
        self._node_id = node_id
        # `json.dumps(entry, default=str)` builds this encoder anew on every call
        self._encode = json.JSONEncoder(default=str).encode
        self._second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text

    def _timestamp(self, created: float) -> str:
        """`created` in ISO 8601, UTC, to the millisecond: `datetime.isoformat`'s text, with the part up to
        the second formatted once per second (it cost more than the JSON encoding of the line)."""
        second = int(created)
        micros = round((created - second) * 1e6)  # rounded to the microsecond first, as `datetime` does
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        if second != self._second[0]:
            text = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = (second, text)
        return f"{self._second[1]}.{micros // 1000:03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "node_id": self._node_id,
            "logger": record.name,
            "event": getattr(record, "event", None) or record.name,
            "message": record.getMessage(),
        }
        entry.update(
            {
                key: value
                for key, value in vars(record).items()
                if key not in _NOT_EXTRA and (value is not None or key not in _REQUEST_KEYS)
            }
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return self.dumps(entry)

    def dumps(self, entry: dict[str, Any]) -> str:
        """`json.dumps(entry, default=str)`, byte for byte: the separators `": "` and `", "` that log pipelines
        and greps match on, ASCII only, non-JSON values as their str().

        A line whose values are all plain (str, int, bool, None, and floats the two libraries write alike)
        is written by orjson, ten times faster: encoding cost the writer thread more than the rest of a
        request line (bench/, callgrind). orjson's indented form has exactly these separators once its
        newlines are taken out, and a newline is never inside a JSON string. Anything else goes to the
        standard library: other types, floats below 1e-4 (orjson writes 1e-05 as 0.00001), NaN and the
        infinities, integers beyond 64 bits, and text orjson writes raw that `json` escapes (non-ASCII, DEL).
        """
        for value in entry.values():
            kind = type(value)
            if kind is str or kind is int or kind is bool or value is None:
                continue
            if kind is float and (value == 0.0 or _SMALLEST_PLAIN_FLOAT <= abs(value) < math.inf):
                continue
            return self._encode(entry)
        if not entry:
            return "{}"
        try:
            text = orjson.dumps(entry, option=orjson.OPT_INDENT_2)
        except orjson.JSONEncodeError:  # an integer beyond 64 bits, a lone surrogate
            return self._encode(entry)
        if not text.isascii() or b"\x7f" in text:
            return self._encode(entry)
        # b'{\n  "a": 1,\n  "b": 2\n}': the items between the braces, one per line
        return "{" + text[4:-2].replace(b",\n  ", b", ").decode() + "}"


class _RecordQueueHandler(logging.handlers.QueueHandler):
    """Hands the record over as it is; the listener's JSON formatter needs its `extra` fields."""

    def handle(self, record: logging.LogRecord) -> bool:
        """`Handler.handle` without its lock, a cost on every log call of the event loop: the queue is
        thread-safe and `prepare` changes only this record."""
        passed = self.filter(record)
        if isinstance(passed, logging.LogRecord):  # Python 3.12+: a filter may hand back another record
            record = passed
        if passed:
            self.emit(record)
        return bool(passed)

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.exc_info:  # tracebacks are rendered here: they cannot cross threads lazily
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        record.message = record.getMessage()
        record.msg, record.args = record.message, None
        return record


_STOP = logging.makeLogRecord({"msg": "llamesh-log-writer: stop"})  # a marker on the queue, never written


class _BatchWriter(threading.Thread):
    """Writes queued records in batches: the first record wakes it, it waits `interval` seconds for more,
    then writes them all; with nothing logged it does not wake at all.

    A listener that wakes per record trades the GIL with the event loop on every request; on a one-core
    gateway that cost more than half the streaming throughput (bench/, measured). Waking at most a few
    times a second keeps the write off the loop without that cost.
    """

    def __init__(
        self, records: queue.SimpleQueue[logging.LogRecord], handlers: list[logging.Handler], *, interval: float = 0.1
    ) -> None:
        super().__init__(name="llamesh-log-writer", daemon=True)
        self._records = records
        self._handlers = handlers
        self._interval = interval
        self._stopped = threading.Event()

    def run(self) -> None:
        while True:
            first = self._records.get()  # blocks while nothing is logged
            if first is not _STOP:
                self._stopped.wait(self._interval)  # what else comes meanwhile goes in the same batch
            if not self._drain([first]):
                return

    def stop(self) -> None:
        self._stopped.set()
        self._records.put(_STOP)
        self.join(timeout=5)
        for handler in self._handlers:
            handler.close()

    def _drain(self, batch: list[logging.LogRecord]) -> bool:
        """Write `batch` and everything queued behind it; False once the stop marker was among them."""
        with contextlib.suppress(queue.Empty):
            while True:
                batch.append(self._records.get_nowait())
        running = not any(record is _STOP for record in batch)
        if not running:
            batch = [record for record in batch if record is not _STOP]
        for handler in self._handlers:
            wanted = [record for record in batch if record.levelno >= handler.level]
            if not wanted:
                continue
            if type(handler) is logging.StreamHandler:
                _write_joined(handler, wanted)
            else:  # file handlers decide about rotation per record
                for record in wanted:
                    handler.handle(record)
            try:
                handler.flush()
            except (OSError, ValueError):  # a closed or broken stream: `handle` reports it, the thread lives on
                continue
        return running


def _write_joined(handler: logging.StreamHandler[Any], records: list[logging.LogRecord]) -> None:
    """What `handle` does per record, with one write for the whole batch: stderr is line-buffered, so a
    write per line is a system call per request on a busy gateway."""
    lines = []
    for record in records:
        if not handler.filter(record):
            continue
        try:
            lines.append(handler.format(record))
        except Exception:  # as `emit` does: report the record that could not be formatted, keep the rest
            handler.handleError(record)
    if not lines:
        return
    with handler.lock or contextlib.nullcontext():
        try:
            handler.stream.write("\n".join(lines) + handler.terminator)
        except Exception:
            handler.handleError(records[-1])


class DailyFileHandler(logging.handlers.TimedRotatingFileHandler):
    """The seed's file log: rotated at midnight UTC to `<filename>.<YYYY-MM-DD>` (`.gz` added when
    compressing), keeping the newest `keep` rotated files (0 = all).

    Retention is counted here rather than by the standard library, whose matching of rotated names changes
    between Python versions and does not always see a renamed (compressed) file.
    """

    def __init__(self, path: Path, *, keep: int, compress: bool) -> None:
        super().__init__(path, when="midnight", backupCount=keep, utc=True, encoding="utf-8")
        self._rotated = re.compile(re.escape(path.name) + r"\.\d{4}-\d{2}-\d{2}(?:\.gz)?")
        if compress:
            self.namer = _gzip_name
            self.rotator = _gzip_rotate

    def getFilesToDelete(self) -> list[str]:  # the standard library calls it by this name
        folder = os.path.dirname(self.baseFilename)
        rotated = sorted(name for name in os.listdir(folder) if self._rotated.fullmatch(name))
        surplus = len(rotated) - self.backupCount
        if self.backupCount == 0 or surplus <= 0:
            return []
        return [os.path.join(folder, name) for name in rotated[:surplus]]  # the dates sort oldest first


def _gzip_name(default_name: str) -> str:
    return default_name + ".gz"


def _gzip_rotate(source: str, dest: str) -> None:
    """Compress the file just closed into `dest` and remove it (on the writer thread, like every write)."""
    if not os.path.exists(source):
        return
    with open(source, "rb") as plain, gzip.open(dest, "wb") as packed:
        shutil.copyfileobj(plain, packed)
    os.remove(source)


def file_handler(settings: config.LoggingConfig, *, config_dir: Path) -> DailyFileHandler:
    """The file handler `logging.*` asks for (the folder is created); the caller checks `enabled`."""
    directory = config.resolve_path(settings.directory, base_dir=config_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return DailyFileHandler(directory / settings.filename, keep=settings.max_keep_files, compress=settings.compression)


def configure(node_config: config.NodeConfig, *, config_dir: Path, level: int = logging.INFO) -> Callable[[], None]:
    """Send every record of the process to stderr (and the file) as JSON lines; returns `stop`, which
    writes what is queued and closes the handlers (also run at exit)."""
    formatter = JsonFormatter(node_id=node_config.node_id)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if node_config.logging.enabled:
        handlers.append(file_handler(node_config.logging, config_dir=config_dir))
    for handler in handlers:
        handler.setFormatter(formatter)
    # Formatting, writing and rotating happen on a writer thread: the event loop only enqueues the record.
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    writer = _BatchWriter(records, handlers)
    writer.start()
    atexit.register(writer.stop)
    enqueue = _RecordQueueHandler(records)
    enqueue.addFilter(requestlog.RequestContext())  # runs on the logging thread, where the request's context is
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(enqueue)
    root.setLevel(level)
    # Record fields the JSON lines never carry; each costs a lookup per record, on the event loop.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.captureWarnings(True)  # warnings become records (event py.warnings), not bare stderr text
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # the gateway writes its own request lines
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every change in the watched folder
    return writer.stop

"""Process-wide logging: one JSON object per line on stderr (and optionally a rotated file).

The seed logs structured JSON with at least timestamp, level, node_id and event; fields a caller passes
through `extra=` (request_id, session_id, model, ...) are kept as top-level keys. Configured once by the
CLI; library modules only call `logging.getLogger(__name__)`.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import logging.handlers
import queue
import sys
import threading
from pathlib import Path
from typing import Any

from llamesh_api import config

_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def __init__(self, *, node_id: str) -> None:
        super().__init__()
        self._node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "node_id": self._node_id,
            "logger": record.name,
            "event": getattr(record, "event", None) or "log",
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


class _RecordQueueHandler(logging.handlers.QueueHandler):
    """Hands the record over as it is; the listener's JSON formatter needs its `extra` fields."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.exc_info:  # tracebacks are rendered here: they cannot cross threads lazily
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        record.message = record.getMessage()
        record.msg, record.args = record.message, None
        return record


class _BatchWriter(threading.Thread):
    """Writes queued records in batches every `interval` seconds.

    A listener that wakes per record trades the GIL with the event loop on every request; on a one-core
    gateway that cost more than half the streaming throughput (bench/, measured). Waking a few times a
    second keeps the write off the loop without that cost.
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
        while not self._stopped.wait(self._interval):
            self._drain()
        self._drain()

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=5)

    def _drain(self) -> None:
        while True:
            try:
                record = self._records.get_nowait()
            except queue.Empty:
                break
            for handler in self._handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)
        for handler in self._handlers:
            handler.flush()


def configure(node_config: config.NodeConfig, *, config_dir: Path, level: int = logging.INFO) -> None:
    formatter = JsonFormatter(node_id=node_config.node_id)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    settings = node_config.logging
    if settings.enabled:
        directory = config.resolve_path(settings.directory, base_dir=config_dir)
        directory.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.TimedRotatingFileHandler(
                directory / settings.filename, when="midnight", backupCount=settings.max_keep_files, utc=True
            )
        )
    for handler in handlers:
        handler.setFormatter(formatter)
    # Formatting and writing happen on a writer thread: the event loop only enqueues the record.
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    writer = _BatchWriter(records, handlers)
    writer.start()
    atexit.register(writer.stop)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_RecordQueueHandler(records))
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # the gateway writes its own request lines
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every change in the watched folder

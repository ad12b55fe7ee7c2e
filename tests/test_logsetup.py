"""Process logging: one JSON object per line with the seed's minimum fields, `extra` fields kept as keys,
tracebacks rendered; the batch writer hands every queued record to the handlers and drains on stop."""

from __future__ import annotations

import json
import logging
import queue
import sys

from llamesh_operator import logsetup


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def record(message: str, **extra: object) -> logging.LogRecord:
    made = logging.makeLogRecord({"name": "llamesh.test", "levelno": logging.INFO, "levelname": "INFO"})
    made.msg = message
    made.__dict__.update(extra)
    return made


def test_json_line_has_the_seed_fields_and_extras() -> None:
    line = json.loads(
        logsetup.JsonFormatter(node_id="n1").format(record("hello", event="request_complete", request_id="r1"))
    )
    assert {key: line[key] for key in ("level", "node_id", "event", "message", "request_id")} == {
        "level": "info",
        "node_id": "n1",
        "event": "request_complete",
        "message": "hello",
        "request_id": "r1",
    }
    assert line["timestamp"].endswith("+00:00")


def test_tracebacks_survive_the_queue() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.makeLogRecord({"msg": "failed", "levelno": logging.ERROR, "levelname": "ERROR"})
        failed.exc_info = sys.exc_info()
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    prepared = logsetup._RecordQueueHandler(records).prepare(failed)
    line = json.loads(logsetup.JsonFormatter(node_id="n").format(prepared))
    assert "ValueError: boom" in line["exception"]


def test_batch_writer_writes_everything_and_drains_on_stop() -> None:
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    sink = ListHandler()
    sink.setFormatter(logsetup.JsonFormatter(node_id="n"))
    writer = logsetup._BatchWriter(records, [sink], interval=60)  # only the stop drains in this test
    writer.start()
    for index in range(5):
        records.put(record(f"m{index}"))
    writer.stop()
    assert [json.loads(line)["message"] for line in sink.lines] == [f"m{index}" for index in range(5)]

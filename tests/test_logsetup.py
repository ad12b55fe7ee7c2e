"""Process logging: one JSON object per line with the seed's minimum fields, `extra` fields kept as keys,
tracebacks rendered; the batch writer hands every queued record to the handlers and drains on stop, and does
not wake while nothing is logged.

Also: through `configure`, every line (ours, aiohttp's, kopf's, a Python warning) is one flat JSON object
with a real `event`, the same on stderr and in the file; lines logged during a gateway request carry its
request_id and session_id, and only while it runs; the file rotates daily through the real handler, gzips
rotated files, keeps `max_keep_files` of them counting compressed and plain ones (0 keeps all), and the
rotation and compression run on the writer thread.
"""

from __future__ import annotations

import contextvars
import datetime
import enum
import gzip
import io
import json
import logging
import math
import queue
import random
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import kopf
import pytest

from llamesh_api import config
from llamesh_operator import logsetup
from llamesh_proxy import requestlog


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


def test_timestamps_are_datetimes_iso_text_to_the_millisecond() -> None:
    """The cached-second timestamp says what `datetime.isoformat(timespec="milliseconds")` says, rounding
    at the microsecond included, and moves on with the second."""
    formatter = logsetup.JsonFormatter(node_id="n1")
    stamps = [0.0, 1.9999, 1764000000.0005, 1764000000.9994999, 1764000000.9999996, 1795955044.6919997]
    stamps += [1764000000 + step / 997 for step in range(3000)]
    for created in stamps:
        expected = datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat(timespec="milliseconds")
        assert formatter._timestamp(created) == expected, created


def test_values_json_cannot_encode_are_written_as_text() -> None:
    """Any value a caller passes is written: what `json` knows as itself, the rest as its str()."""
    formatter = logsetup.JsonFormatter(node_id="n1")
    huge = json.loads(formatter.format(record("big", tokens=2**70, by_slot={1: "a"})))
    assert (huge["tokens"], huge["by_slot"]) == (2**70, {"1": "a"})
    odd = json.loads(formatter.format(record("odd", path=Path("/tmp/x"), started=datetime.date(2026, 12, 2))))
    assert (odd["path"], odd["started"]) == ("/tmp/x", "2026-12-02")
    assert '"event": "llamesh.test"' in formatter.format(record("spaced"))  # the separators lines always had


class _Colour(enum.Enum):
    RED = "red"


class _Shade(enum.StrEnum):
    DARK = "dark"


class _Size(enum.IntEnum):
    BIG = 3


def _random_text(rng: random.Random) -> str:
    """ASCII with every control character and DEL, a little non-ASCII and a lone surrogate now and then."""
    pool = [chr(code) for code in range(128)] + ["é", "ü", "漢", "🙂", "\u2028", "\ud800"]
    return "".join(rng.choice(pool) for _ in range(rng.randrange(0, 16)))


def _random_value(rng: random.Random) -> object:
    kind = rng.randrange(9)
    if kind == 0:
        return _random_text(rng)
    if kind == 1:
        return rng.choice(
            [0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1, 2**70, rng.randrange(-(10**12), 10**12)]
        )
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:  # every magnitude, the tiny ones that orjson writes differently included
        return rng.choice([1, -1]) * 10 ** rng.uniform(-330, 308)
    if kind == 4:
        return rng.choice(
            [0.0, -0.0, 1e-4, 9.99e-5, 1e16, 1e-5, math.nan, math.inf, -math.inf, round(rng.uniform(0, 1e5), 1)]
        )
    if kind == 5:
        return rng.choice([Path("/tmp/x"), datetime.date(2026, 12, 2), logging.INFO, {"nested": [1, "two"]}, [1, 2.5]])
    if kind == 6:  # enums: json writes a str or int enum as its value and any other as its str()
        return rng.choice([_Colour.RED, _Shade.DARK, _Size.BIG])
    if kind == 7:
        return datetime.datetime(2026, 12, 2, 10, 0, tzinfo=datetime.UTC)
    return rng.uniform(-1e6, 1e6)


def test_json_lines_are_byte_for_byte_what_the_standard_library_writes() -> None:
    """The fast encoder (orjson for plain values) writes exactly `json.dumps(entry, default=str)`: the same
    separators, escapes, numbers, and str() for everything else, whichever of the two writes a line."""
    formatter = logsetup.JsonFormatter(node_id="n1")
    standard = json.JSONEncoder(default=str).encode
    rng = random.Random(20261202)
    for _ in range(20_000):
        entry = {_random_text(rng) or "k": _random_value(rng) for _ in range(rng.randrange(0, 6))}
        assert formatter.dumps(entry) == standard(entry), entry
    for _ in range(20_000):  # lines whose values are all plain: the orjson path
        entry = {
            "k": rng.choice([1, -1]) * 10 ** rng.uniform(-4, 308),
            "s": "".join(chr(rng.randrange(32, 127)) for _ in range(8)),
        }
        assert formatter.dumps(entry) == standard(entry), entry
    request_line = {"event": "request_complete", "status": 200, "duration_ms": 12.3, "stream": False, "model": None}
    assert formatter.dumps(request_line) == standard(request_line)


def test_a_request_line_record_has_every_attribute_a_standard_record_has() -> None:
    """Request lines' records are made from a template: the same attributes, the clock read per line."""
    exchange = requestlog.Exchange(request_id="r-9", session_id="s-9", path="/v1/completions", model="m", status=200)
    before = time.time()
    handler = ListHandler()
    logger = logging.getLogger("llamesh.requests")
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    records: list[logging.LogRecord] = []
    handler.emit = records.append  # type: ignore[method-assign]
    try:
        contextvars.Context().run(requestlog.emit, exchange, duration_ms=1.5)
        exchange.status = 502
        contextvars.Context().run(requestlog.emit, exchange, duration_ms=2.5)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    standard = logging.LogRecord("llamesh.requests", logging.INFO, requestlog.__file__, 0, "x", None, None)
    first, second = records
    assert set(vars(standard)) <= set(vars(first))
    assert (first.levelname, first.levelno, first.getMessage()) == ("INFO", logging.INFO, "/v1/completions m -> 200")
    assert (second.levelname, second.levelno) == ("WARNING", logging.WARNING)
    assert before <= first.created <= second.created <= time.time()
    assert first.msecs == int((first.created - int(first.created)) * 1000)
    assert abs(first.relativeCreated - (first.created - standard.created) * 1000 - standard.relativeCreated) < 1
    assert (first.filename, first.module, first.args, first.exc_info) == ("requestlog.py", "requestlog", None, None)
    assert (first.status, second.status, first.duration_ms) == (200, 502, 1.5)


def test_a_record_factory_of_the_application_makes_request_lines_too() -> None:
    made: list[str] = []
    standard_factory = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = standard_factory(*args, **kwargs)  # type: ignore[arg-type]
        made.append(record.getMessage())
        return record

    logging.setLogRecordFactory(factory)
    logger = logging.getLogger("llamesh.requests")
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        exchange = requestlog.Exchange(request_id="r-3", session_id=None, path="/v1/embeddings", model="e", status=200)
        contextvars.Context().run(requestlog.emit, exchange, duration_ms=1.0)
    finally:
        logging.setLogRecordFactory(standard_factory)
        logger.setLevel(previous_level)
    assert made == ["/v1/embeddings e -> 200"]


def test_the_queue_handler_still_applies_its_filters() -> None:
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    enqueue = logsetup._RecordQueueHandler(records)
    enqueue.addFilter(lambda record: record.getMessage() != "dropped")
    assert enqueue.handle(record("kept")) and not enqueue.handle(record("dropped"))
    assert records.get_nowait().getMessage() == "kept" and records.empty()


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


class WatchedQueue(queue.SimpleQueue):  # type: ignore[type-arg]
    """Counts the writer's non-blocking reads: each is a wake-up."""

    def __init__(self) -> None:
        self.polls = 0

    def get_nowait(self) -> logging.LogRecord:
        self.polls += 1
        return super().get_nowait()  # type: ignore[no-any-return]


def test_batch_writer_sleeps_while_nothing_is_logged_and_writes_a_batch_soon_after_it_starts() -> None:
    records = WatchedQueue()
    sink = ListHandler()
    sink.setFormatter(logsetup.JsonFormatter(node_id="n"))
    writer = logsetup._BatchWriter(records, [sink], interval=0.01)
    writer.start()
    try:
        time.sleep(0.3)  # thirty intervals with nothing logged
        assert records.polls == 0
        records.put(record("first"))
        records.put(record("second"))
        deadline = time.monotonic() + 30
        while len(sink.lines) < 2 and time.monotonic() < deadline:  # written without a stop
            time.sleep(0.01)
        assert [json.loads(line)["message"] for line in sink.lines] == ["first", "second"]
    finally:
        writer.stop()


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_a_batch_reaches_stderr_in_one_write_with_every_line() -> None:
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    stream = CountingStream()
    console = logging.StreamHandler(stream)
    console.setFormatter(logsetup.JsonFormatter(node_id="n"))
    console.addFilter(lambda made: made.getMessage() != "m3")  # a handler's filters still apply per record
    writer = logsetup._BatchWriter(records, [console], interval=60)  # only the stop drains in this test
    writer.start()
    for index in range(50):
        records.put(record(f"m{index}"))
    writer.stop()
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["message"] for line in lines] == [f"m{index}" for index in range(50) if index != 3]
    assert stream.writes == 1


# --- every line a flat JSON object, with a real event ------------------------------------------------


@pytest.fixture
def process_logging() -> Iterator[None]:
    """`configure` changes the root logger and the warnings hook: put them back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in ("aiohttp.access", "watchfiles")}
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        for name, was in quiet.items():
            logging.getLogger(name).setLevel(was)


def log_every_kind() -> None:
    """One line of each kind `configure` must turn into a flat JSON object."""
    logging.getLogger("llamesh_agent.instance_runner").info(
        "spawned", extra={"event": "instance_spawn", "instance_id": "tiny-1", "port": 4242}
    )
    try:
        raise OSError("connection reset")
    except OSError:
        logging.getLogger("aiohttp.server").exception("Error handling request")  # third party: no event of ours
    # kopf's object logger passes its settings object and a posting flag along: they are no fields of a line
    # (a real settings object: when kopf is loaded, its own handler on this logger reads it)
    logging.getLogger("kopf.objects").info(
        "Handler succeeded.",
        extra={"settings": kopf.OperatorSettings(), "k8s_skip": True, "k8s_ref": {"name": "tiny-1"}},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("an old API", DeprecationWarning, stacklevel=1)

    def during_a_request() -> None:
        exchange = requestlog.Exchange(request_id="r-5", session_id=None, path="/v1/chat/completions")
        logging.getLogger("llamesh_proxy.queueing").info("queued", extra={"event": "queue_enqueue"})
        requestlog.emit(exchange, duration_ms=1.0)
        logging.getLogger("llamesh_proxy.dispatch").info("after the request", extra={"event": "after"})

    contextvars.Context().run(during_a_request)


def test_every_line_is_one_json_object_with_a_real_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], process_logging: None
) -> None:
    node_config = config.NodeConfig(
        node_id="n7", logging=config.LoggingConfig(enabled=True, directory="logs", filename="proxy.log")
    )
    stop = logsetup.configure(node_config, config_dir=tmp_path)
    try:
        log_every_kind()
    finally:
        stop()

    file_lines = (tmp_path / "logs" / "proxy.log").read_text().splitlines()
    assert capsys.readouterr().err.splitlines() == file_lines  # the same lines on stderr and in the file
    entries = [json.loads(line) for line in file_lines]
    assert all(isinstance(entry, dict) and entry["node_id"] == "n7" for entry in entries)
    by_event = {entry["event"]: entry for entry in entries}
    assert set(by_event) == {
        "instance_spawn",
        "aiohttp.server",
        "kopf.objects",
        "py.warnings",
        "queue_enqueue",
        "request_complete",
        "after",
    }
    assert (by_event["instance_spawn"]["instance_id"], by_event["instance_spawn"]["port"]) == ("tiny-1", 4242)
    assert "OSError: connection reset" in by_event["aiohttp.server"]["exception"]
    assert by_event["kopf.objects"]["k8s_ref"] == {"name": "tiny-1"}
    assert not {"settings", "k8s_skip"} & set(by_event["kopf.objects"])
    assert "an old API" in by_event["py.warnings"]["message"]
    enqueue, request = by_event["queue_enqueue"], by_event["request_complete"]
    assert enqueue["request_id"] == request["request_id"] == "r-5"
    assert enqueue["session_id"] == request["session_id"] and len(request["session_id"]) == 36  # one made-up id
    assert "request_id" not in by_event["after"] and "session_id" not in by_event["after"]


def test_a_record_that_names_no_request_keeps_none_and_the_line_leaves_it_out() -> None:
    def granted_elsewhere() -> logging.LogRecord:
        requestlog.Exchange(request_id="r-1", session_id="s-1", path="/v1/completions")
        made = record("ticket 3 granted", event="queue_dequeue", request_id=None)
        requestlog.RequestContext().filter(made)
        return made

    line = json.loads(logsetup.JsonFormatter(node_id="n").format(contextvars.Context().run(granted_elsewhere)))
    assert line["event"] == "queue_dequeue" and "request_id" not in line and "session_id" not in line


# --- the file: daily rotation, gzip, retention -------------------------------------------------------


def day(text: str) -> int:
    return int(datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC).timestamp())


def roll(handler: logsetup.DailyFileHandler, *, for_day: str) -> None:
    """Rotate now, as the handler does at the midnight that ends `for_day` (UTC)."""
    handler.rolloverAt = day(for_day) + 24 * 3600
    handler.doRollover()


def test_rollover_gzips_and_keeps_max_keep_files_counting_compressed_ones(tmp_path: Path) -> None:
    settings = config.LoggingConfig(enabled=True, directory="logs", filename="proxy.log", max_keep_files=3)
    handler = logsetup.file_handler(settings, config_dir=tmp_path)
    handler.setFormatter(logsetup.JsonFormatter(node_id="n"))
    folder = tmp_path / "logs"
    (folder / "proxy.log.2020-12-30").write_text("from before compression was on\n")  # counts too
    (folder / "other.log.2020-12-29").write_text("not ours\n")
    for index, date in enumerate(["2021-01-01", "2021-01-02", "2021-01-03"]):
        handler.handle(record(f"line of {date}", event="e", index=index))
        roll(handler, for_day=date)
    handler.handle(record("today", event="e"))
    handler.close()

    assert sorted(path.name for path in folder.iterdir()) == [
        "other.log.2020-12-29",
        "proxy.log",
        "proxy.log.2021-01-01.gz",
        "proxy.log.2021-01-02.gz",
        "proxy.log.2021-01-03.gz",
    ]
    for date in ["2021-01-01", "2021-01-02", "2021-01-03"]:
        with gzip.open(folder / f"proxy.log.{date}.gz", "rt") as rotated:
            (line,) = [json.loads(text) for text in rotated.read().splitlines()]
        assert line["message"] == f"line of {date}" and line["event"] == "e"
    assert json.loads((folder / "proxy.log").read_text())["message"] == "today"


def test_zero_keeps_every_rotated_file_and_no_compression_keeps_them_plain(tmp_path: Path) -> None:
    settings = config.LoggingConfig(
        enabled=True, directory=str(tmp_path), filename="p.log", max_keep_files=0, compression=False
    )
    handler = logsetup.file_handler(settings, config_dir=tmp_path / "elsewhere")
    handler.setFormatter(logsetup.JsonFormatter(node_id="n"))
    for date in ["2021-02-01", "2021-02-02", "2021-02-03"]:
        handler.handle(record(date))
        roll(handler, for_day=date)
    handler.close()
    rotated = sorted(path.name for path in tmp_path.glob("p.log.*"))
    assert rotated == ["p.log.2021-02-01", "p.log.2021-02-02", "p.log.2021-02-03"]
    assert json.loads((tmp_path / "p.log.2021-02-02").read_text())["message"] == "2021-02-02"


def test_rotation_and_compression_happen_on_the_writer_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real_rotate = logsetup._gzip_rotate

    def rotate(source: str, dest: str) -> None:
        threads.append(threading.current_thread().name)
        real_rotate(source, dest)

    monkeypatch.setattr(logsetup, "_gzip_rotate", rotate)
    settings = config.LoggingConfig(enabled=True, directory=".", filename="w.log")
    handler = logsetup.file_handler(settings, config_dir=tmp_path)
    handler.setFormatter(logsetup.JsonFormatter(node_id="n"))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    writer = logsetup._BatchWriter(records, [handler], interval=60)  # only the stop drains
    writer.start()
    records.put(record("before midnight"))
    writer.stop()  # writes the first line, and closes the file
    handler.rolloverAt = int(time.time()) - 1  # midnight has passed: the next record rotates first
    writer = logsetup._BatchWriter(records, [handler], interval=60)
    writer.start()
    records.put(record("after midnight"))
    writer.stop()

    assert threads == ["llamesh-log-writer"] and threading.current_thread().name != "llamesh-log-writer"
    (rotated,) = tmp_path.glob("w.log.*.gz")
    with gzip.open(rotated, "rt") as packed:
        assert json.loads(packed.read())["message"] == "before midnight"
    assert json.loads((tmp_path / "w.log").read_text())["message"] == "after midnight"

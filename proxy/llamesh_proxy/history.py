"""The dashboard's short memory: counter samples of the last minutes, and the last log records.

Both are bounded rings filled off the request path: `RateHistory` gets a `Sample` of the gateway's counters
every few seconds (the dashboard's sampler task) and turns neighbouring samples into rates; `LogTail` keeps
the newest records of the process's log, numbered, so a page can ask for what is new since the last number
it saw. Records are kept as they are and turned into JSON-ready fields only when read: a log call costs the
loop one deque append, and nothing is formatted unless someone looks. Readers copy the ring first
(`tuple(deque)` runs without releasing the GIL): records also arrive from other threads, and a deque changed
while iterated raises.

Nothing here does I/O, reads the clock or knows about HTTP.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import itertools
import logging
from typing import Any

# Attributes every LogRecord has; anything else on a record came through `extra=` (or a filter) and is shown.
_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}
_DROPPED = frozenset({"settings", "k8s_skip"})  # kopf's bulky extras, as the JSON log drops them
_SCALARS = (str, int, float, bool, type(None))


@dataclasses.dataclass(frozen=True)
class Sample:
    """The gateway's counters at one moment (`at`: seconds on a monotonic or wall clock, only differences count)."""

    at: float
    requests_total: int
    errors_total: int
    tokens_total: int
    queue_length: int
    in_flight: int


@dataclasses.dataclass(frozen=True)
class Point:
    """What happened between two samples: per-second rates over the interval, and the levels at its end."""

    at: float
    requests_per_s: float
    errors_per_s: float
    tokens_per_s: float
    queue_length: int
    in_flight: int


class RateHistory:
    """The newest `capacity` samples; `points()` gives one rate point per pair of neighbours."""

    def __init__(self, capacity: int = 150) -> None:
        if capacity < 2:
            raise ValueError("a rate needs two samples: capacity must be at least 2")
        self._samples: collections.deque[Sample] = collections.deque(maxlen=capacity)

    def add(self, sample: Sample) -> None:
        if self._samples and sample.at <= self._samples[-1].at:
            return  # a clock that did not move gives no interval to divide by
        self._samples.append(sample)

    def points(self) -> list[Point]:
        points = []
        for before, after in itertools.pairwise(self._samples):
            span = after.at - before.at
            points.append(
                Point(
                    at=after.at,
                    # a counter that went down was reset (e.g. a restart of the metrics): count from zero
                    requests_per_s=_rate(before.requests_total, after.requests_total, span),
                    errors_per_s=_rate(before.errors_total, after.errors_total, span),
                    tokens_per_s=_rate(before.tokens_total, after.tokens_total, span),
                    queue_length=after.queue_length,
                    in_flight=after.in_flight,
                )
            )
        return points


def _rate(before: int, after: int, span: float) -> float:
    grown = after - before if after >= before else after
    return round(grown / span, 3)


class LogTail:
    """The newest `capacity` log records, each with a sequence number that only grows."""

    def __init__(self, capacity: int = 300) -> None:
        self._records: collections.deque[tuple[int, logging.LogRecord]] = collections.deque(maxlen=capacity)
        self._numbers = itertools.count()  # next() is atomic: records also come from threads (builds, the log writer)
        self._next = 0

    @property
    def next_seq(self) -> int:
        """The number the next record will get: a reader that saw everything asks `since(next_seq)` next."""
        return self._next

    def add(self, record: logging.LogRecord) -> None:
        seq = next(self._numbers)
        self._records.append((seq, record))
        self._next = seq + 1

    def since(self, seq: int, *, limit: int) -> list[dict[str, Any]]:
        """Records numbered `seq` or later, oldest first, at most the newest `limit` of them."""
        newer = [(number, record) for number, record in tuple(self._records) if number >= seq]
        return [record_fields(number, record) for number, record in newer[-limit:]] if limit > 0 else []

    def latest(self, *, events: tuple[str, ...], limit: int) -> list[dict[str, Any]]:
        """The newest `limit` records whose event starts with one of `events`, oldest first."""
        matching = [(n, r) for n, r in tuple(self._records) if str(getattr(r, "event", "") or "").startswith(events)]
        return [record_fields(number, record) for number, record in matching[-limit:]] if limit > 0 else []


def record_fields(seq: int, record: logging.LogRecord) -> dict[str, Any]:
    """One record as the JSON log writes it (timestamp, level, logger, event, message, its extra fields)."""
    fields: dict[str, Any] = {
        "seq": seq,
        "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "event": getattr(record, "event", None) or record.name,
        "message": _message(record),
    }
    for key, value in vars(record).items():
        if key in _STANDARD or key in fields or key in _DROPPED:
            continue
        fields[key] = value if isinstance(value, _SCALARS) else str(value)
    if record.exc_text:  # the JSON log's queue handler renders tracebacks into exc_text before we read it
        fields["exception"] = record.exc_text
    elif record.exc_info:
        fields["exception"] = logging.Formatter().formatException(record.exc_info)
    return fields


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # arguments that do not fit the format: the logging module reports those itself
        return str(record.msg)


class TailHandler(logging.Handler):
    """Puts every record it is handed into a `LogTail`; installed on the root logger while a gateway runs."""

    def __init__(self, tail: LogTail) -> None:
        super().__init__()
        self.tail = tail

    def handle(self, record: logging.LogRecord) -> bool:
        # No lock and no formatting: a deque append is atomic, and the loop must not wait on a log call.
        self.tail.add(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.tail.add(record)

"""llama-server's output, appended to its instance's log file by one writer thread per process.

The supervisor reads a child's output on the event loop, which `llamesh serve` shares with the gateway.
Writing and flushing each line there would put file I/O on the loop for every line a busy llama-server
prints. Here the loop only puts the line on a queue (`ChildLog.write`: no I/O, no lock beyond the queue's);
the writer thread creates the folder, opens the file, appends what has queued — waiting `_GATHER_S` after
the first line so that a burst becomes one write, and not waking at all while nothing comes — and flushes.
`close()` returns once every line written before it is in the file and the file is closed, so a
supervisor that reports its child gone has a complete log.

A file that cannot be written (disk full, permissions) is reported once and its lines are dropped: the
child keeps running. Not here: rotating instance logs (one file per instance, appended to across
attempts) or reading them back (the supervisor keeps the last lines in memory for messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

_GATHER_S = 0.02
THREAD_NAME = "llamesh-child-logs"


@dataclasses.dataclass(frozen=True)
class _Closing:
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[None]


_Item = tuple["ChildLog", "str | _Closing"]


def open_log(path: Path) -> TextIO:
    """Open `path` for appending (on the writer thread), creating its folder; tests wrap it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", encoding="utf-8", errors="replace")


class ChildLog:
    """One child's log file. `write` from the event loop; `close` once its output has ended."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, line: str) -> None:
        _writer().put((self, line + "\n"))

    async def close(self) -> None:
        """Until everything written so far is in the file and the file is closed."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        _writer().put((self, _Closing(loop, done)))
        await done  # the writer closes the file whether or not anyone still waits


class _Writer(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name=THREAD_NAME, daemon=True)
        self.items: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._files: dict[ChildLog, TextIO | None] = {}  # None: it could not be opened or written

    def put(self, item: _Item) -> None:
        self.items.put(item)

    def run(self) -> None:
        while True:
            batch = [self.items.get()]  # blocks while there is nothing to write
            time.sleep(_GATHER_S)
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self.items.get_nowait())
            self._write(batch)

    def _write(self, batch: list[_Item]) -> None:
        touched: dict[ChildLog, TextIO] = {}
        for child_log, item in batch:
            if isinstance(item, _Closing):
                touched.pop(child_log, None)
                self._close(child_log)
                _resolve(item)
                continue
            file = self._file(child_log)
            if file is None:
                continue
            try:
                file.write(item)
            except (OSError, ValueError) as exc:
                self._broken(child_log, exc)
                continue
            touched[child_log] = file
        for child_log, file in touched.items():
            try:
                file.flush()
            except (OSError, ValueError) as exc:
                self._broken(child_log, exc)

    def _file(self, child_log: ChildLog) -> TextIO | None:
        if child_log in self._files:
            return self._files[child_log]
        try:
            file: TextIO | None = open_log(child_log.path)
        except OSError as exc:
            _report(child_log, exc)
            file = None
        self._files[child_log] = file
        return file

    def _close(self, child_log: ChildLog) -> None:
        file = self._files.pop(child_log, None)
        if file is None:
            return
        try:
            file.close()  # flushes first
        except (OSError, ValueError) as exc:
            _report(child_log, exc)

    def _broken(self, child_log: ChildLog, exc: Exception) -> None:
        file = self._files.get(child_log)
        self._files[child_log] = None  # until its close: later lines are dropped, not retried
        if file is not None:
            with contextlib.suppress(OSError, ValueError):
                file.close()
            _report(child_log, exc)


def _report(child_log: ChildLog, exc: Exception) -> None:
    log.warning(
        "cannot write llama-server's log %s: %s; its lines are dropped",
        child_log.path,
        exc,
        extra={"event": "child_log_failed", "path": str(child_log.path)},
    )


def _resolve(closing: _Closing) -> None:
    def settle() -> None:
        if not closing.done.done():
            closing.done.set_result(None)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        closing.loop.call_soon_threadsafe(settle)


_lock = threading.Lock()
_instance: _Writer | None = None


def _writer() -> _Writer:
    global _instance
    if _instance is None:
        with _lock:
            if _instance is None:
                writer = _Writer()
                writer.start()
                _instance = writer
    return _instance

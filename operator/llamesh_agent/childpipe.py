"""A child's stdout+stderr pipe, read on the event loop as lines, in bursts once the child serves.

Under `llamesh serve` the gateway shares the event loop with the supervisors. llama-server prints about ten
lines per request, most of them while the request starts (slot chosen, prompt processed), each written in
pieces: read eagerly, that is some thirty wake-ups of the loop per request, several of them between the
gateway forwarding a request and relaying its first token. So once `gather()` says so (the supervisor: the
child is READY), a read is followed by `GATHER_S` without reading: what the child prints meanwhile waits in
the pipe and comes in one read. A read of `EAGER_BYTES` or more means the pipe is filling (a child at a
high log verbosity); reading then stays eager, so the child never blocks on its own output. While
starting, every line is read as it comes (the startup parser and error messages want them at once).

Lines go to `on_line` without their end of line, decoded as UTF-8 with replacement. A line longer than
`limit` bytes is dropped and reported by one marker line; the end of input delivers a last unterminated
line. `closed` resolves when the pipe closes (the child and everything it started have exited).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

GATHER_S = 0.05
EAGER_BYTES = 1 << 15
LIMIT = 1 << 20
DROPPED = "[llamesh: an over-long line was dropped]"


class LinePipe(asyncio.Protocol):
    """Protocol for `loop.connect_read_pipe`; see the module docstring."""

    def __init__(
        self,
        on_line: Callable[[str], None],
        *,
        gather: Callable[[], bool],
        gather_s: float = GATHER_S,
        limit: int = LIMIT,
    ) -> None:
        self._on_line = on_line
        self._gather = gather
        self._gather_s = gather_s
        self._limit = limit
        self._partial = b""
        self._dropping = False
        self._transport: asyncio.ReadTransport | None = None
        self._resume: asyncio.TimerHandle | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's pipe transport (what `llamesh serve` runs on) is no asyncio.ReadTransport subclass.
        self._transport = cast(asyncio.ReadTransport, transport)

    def data_received(self, data: bytes) -> None:
        self._split(self._partial + data if self._partial else data)
        if self._resume is None and len(data) < EAGER_BYTES and self._gather():
            assert self._transport is not None
            self._transport.pause_reading()
            self._resume = asyncio.get_running_loop().call_later(self._gather_s, self._resume_reading)

    def eof_received(self) -> bool | None:
        if self._partial and not self._dropping:
            self._deliver(self._partial)
        self._partial = b""
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if not self.closed.done():
            self.closed.set_result(None)

    def _resume_reading(self) -> None:
        self._resume = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _split(self, data: bytes) -> None:
        *lines, self._partial = data.split(b"\n")
        for raw in lines:
            if self._dropping:  # the end of a line already reported as dropped
                self._dropping = False
            elif len(raw) > self._limit:
                self._on_line(DROPPED)
            else:
                self._deliver(raw)
        if len(self._partial) > self._limit:
            if not self._dropping:
                self._on_line(DROPPED)
            self._dropping = True
            self._partial = b""

    def _deliver(self, raw: bytes) -> None:
        self._on_line(raw.decode(errors="replace").rstrip("\r"))

"""childpipe: a child's output pipe read as lines, eagerly while starting and in bursts once it serves.

Covers, on a real OS pipe and the running event loop:
- lines split across reads are whole, `\\r\\n` ends are stripped, invalid UTF-8 is replaced, and the end of
  input delivers a last unterminated line and resolves `closed`;
- a line over the limit becomes one marker line, whether it arrives whole or in pieces, and the next line is kept;
- eager (gather off): every write is read as it comes, the transport is never paused;
- gathering: after a read the transport is paused for `gather_s`, so three writes made meanwhile come in one read;
- a read of EAGER_BYTES or more does not pause (a child printing fast never blocks on its own output).
Each runs on the standard event loop and on uvloop (which `llamesh serve` uses; its pipe transport is no
`asyncio.ReadTransport` subclass).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import uvloop

from agent_support import eventually
from llamesh_agent import childpipe

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


@dataclass
class Pipe:
    write_fd: int
    transport: asyncio.ReadTransport
    protocol: childpipe.LinePipe
    lines: list[str] = field(default_factory=list)
    reads: list[float] = field(default_factory=list)

    def write(self, data: bytes) -> None:
        assert os.write(self.write_fd, data) == len(data)

    def close(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1


async def open_pipe(*, gather: bool, gather_s: float = childpipe.GATHER_S, limit: int = childpipe.LIMIT) -> Pipe:
    read_fd, write_fd = os.pipe()
    lines: list[str] = []
    reads: list[float] = []

    class Counting(childpipe.LinePipe):
        def data_received(self, data: bytes) -> None:
            reads.append(time.monotonic())
            super().data_received(data)

    transport, protocol = await asyncio.get_running_loop().connect_read_pipe(
        lambda: Counting(lines.append, gather=lambda: gather, gather_s=gather_s, limit=limit),
        os.fdopen(read_fd, "rb", buffering=0),
    )
    return Pipe(write_fd, transport, protocol, lines, reads)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_factory(request: pytest.FixtureRequest) -> LoopFactory:
    return asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop


def run(loop_factory: LoopFactory, test: Callable[[list[Pipe]], Awaitable[None]]) -> None:
    """`test` on a loop of its own (standard or uvloop), every pipe it opened closed afterwards."""

    async def body() -> None:
        opened: list[Pipe] = []
        try:
            await test(opened)
        finally:
            for pipe in opened:
                pipe.close()
                pipe.transport.close()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(body())


def test_lines_are_whole_decoded_and_the_last_one_comes_at_the_end(loop_factory: LoopFactory) -> None:
    async def test(pipes: list[Pipe]) -> None:
        pipe = await open_pipe(gather=False)
        pipes.append(pipe)
        pipe.write(b"first li")
        await eventually(lambda: pipe.reads, what="the first read")
        assert pipe.lines == []
        pipe.write(b"ne\r\nsecond \xff line\nno end of line")
        await eventually(lambda: len(pipe.lines) == 2, what="two lines")
        pipe.close()
        await asyncio.wait_for(pipe.protocol.closed, 30)
        assert pipe.lines == ["first line", "second \ufffd line", "no end of line"]

    run(loop_factory, test)


def test_an_over_long_line_becomes_one_marker_and_the_next_line_is_kept(loop_factory: LoopFactory) -> None:
    async def test(pipes: list[Pipe]) -> None:
        pipe = await open_pipe(gather=False, limit=100)
        pipes.append(pipe)
        pipe.write(b"y" * 150 + b"\nshort\n")  # whole
        await eventually(lambda: len(pipe.lines) == 2, what="marker and line")
        for _ in range(3):  # in pieces, each read adding to an unterminated line
            pipe.write(b"x" * 60)
            reads = len(pipe.reads)
            await eventually(lambda: len(pipe.reads) > reads, what="a read")  # noqa: B023 - awaited at once
        pipe.write(b"x" * 60 + b"\nafter\n")
        await eventually(lambda: len(pipe.lines) == 4, what="second marker and line")
        assert pipe.lines == [childpipe.DROPPED, "short", childpipe.DROPPED, "after"]

    run(loop_factory, test)


def test_eager_reads_every_write_as_it_comes(loop_factory: LoopFactory) -> None:
    async def test(pipes: list[Pipe]) -> None:
        pipe = await open_pipe(gather=False)
        pipes.append(pipe)
        for number in range(3):
            pipe.write(f"line {number}\n".encode())
            await eventually(lambda: len(pipe.lines) == number + 1, what=f"line {number}")  # noqa: B023
            assert pipe.transport.is_reading()
        assert len(pipe.reads) == 3

    run(loop_factory, test)


def test_gathering_pauses_after_a_read_so_what_follows_comes_in_one_read(loop_factory: LoopFactory) -> None:
    async def test(pipes: list[Pipe]) -> None:
        pipe = await open_pipe(gather=True, gather_s=2.0)
        pipes.append(pipe)
        pipe.write(b"slot launched\n")
        await eventually(lambda: pipe.lines, what="the first line")
        assert not pipe.transport.is_reading()
        for text in (b"prompt processed\n", b"first token\n", b"timings\n"):
            pipe.write(text)
            await asyncio.sleep(0.01)  # separate writes, each one the loop could have read on its own
        await eventually(lambda: len(pipe.lines) == 4, what="the gathered lines")
        assert pipe.lines == ["slot launched", "prompt processed", "first token", "timings"]
        assert len(pipe.reads) == 2
        assert pipe.reads[1] - pipe.reads[0] >= 1.8  # the pause; uvloop's millisecond clock may fire a little early

    run(loop_factory, test)


def test_a_big_read_does_not_pause(loop_factory: LoopFactory) -> None:
    async def test(pipes: list[Pipe]) -> None:
        pipe = await open_pipe(gather=True, gather_s=30.0)
        pipes.append(pipe)
        burst = b"".join(f"verbose line {number:05d} {'.' * 60}\n".encode() for number in range(600))
        assert childpipe.EAGER_BYTES <= len(burst) < 60_000  # one write into an empty pipe, one read
        pipe.write(burst)
        await eventually(lambda: len(pipe.lines) == 600, what="the burst")
        assert pipe.transport.is_reading()
        pipe.write(b"next\n")
        await eventually(lambda: pipe.lines[-1] == "next", what="the next line, without waiting 30 s")

    run(loop_factory, test)

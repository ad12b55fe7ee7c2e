"""Waiting in tests for state that something else converges to (a watcher, a reconcile loop, a child).

Polling is the point here: the tests observe level state from outside, the way a person would.

- `eventually`: until a condition holds (the usual wait: for a positive signal, with a generous deadline);
- `stays_true_for`: a condition that must hold for a stretch of time, for "nothing happens" checks. It is
  the one deliberate wait on the clock; a test first waits for a positive signal that the thing that could
  go wrong has had its chance (a reconcile pass, a log line), and uses this only where no such signal exists.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def _ask(condition: Callable[[], T | Awaitable[T]]) -> T:
    value = condition()
    if inspect.isawaitable(value):
        value = await value
    return value  # type: ignore[return-value]


async def eventually(
    condition: Callable[[], T | Awaitable[T]], *, within_s: float = 30.0, interval_s: float = 0.02, what: str = ""
) -> T:
    """The first truthy value `condition` (plain or async) returns, polling until `within_s` seconds pass."""
    deadline = time.monotonic() + within_s
    while True:
        value = await _ask(condition)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s:g} s waiting for {what or condition}")
        await asyncio.sleep(interval_s)


async def stays_true_for(
    condition: Callable[[], object | Awaitable[object]], *, seconds: float, interval_s: float = 0.05, what: str = ""
) -> None:
    """`condition` (plain or async) holds every time it is asked during `seconds`; fails at the first lapse."""
    deadline = time.monotonic() + seconds
    while True:
        if not await _ask(condition):
            raise AssertionError(f"no longer true: {what or condition}")
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(interval_s)

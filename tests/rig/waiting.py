"""Waiting in tests for state that something else converges to (a watcher, a reconcile loop, a child).

Polling is the point here: the tests observe level state from outside, the way a person would.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    condition: Callable[[], T | Awaitable[T]], *, within_s: float = 30.0, interval_s: float = 0.02, what: str = ""
) -> T:
    """The first truthy value `condition` (plain or async) returns, polling until `within_s` seconds pass."""
    deadline = time.monotonic() + within_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s:g} s waiting for {what or condition}")
        await asyncio.sleep(interval_s)

"""Waiting in tests for state that something else converges to (a watcher, a reconcile loop, a child).

Polling is the point here: the tests observe level state from outside, the way a person would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def until(predicate: Callable[[], Awaitable[bool]], *, within: float = 10.0, every: float = 0.05) -> None:
    """Return once `predicate()` is true; TimeoutError after `within` seconds."""
    async with asyncio.timeout(within):
        while not await predicate():  # noqa: ASYNC110 - polling observed state on purpose
            await asyncio.sleep(every)

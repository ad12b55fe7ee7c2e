"""The one retry policy for store calls: what is retried, how often, and how long to wait in between.

- `Transient` failures (429 Too Many Requests, 5xx, a connection that could not be made or broke) are
  retried by `transient` with exponential backoff and jitter, honouring a server's Retry-After, up to
  `Policy.attempts` tries or `Policy.deadline_s` seconds, whichever comes first; then the last error is
  raised.
- `Conflict` (409: the object changed since it was read) is retried by `conflicts`, which calls the
  whole read-modify-write again so the next try starts from the object as it is now.
- Nothing else is retried: NotFound, AlreadyExists, Invalid, Forbidden and Gone say something the caller
  must act on (Gone: re-list; `informer` does it).

Deliberately not here: how long a watch is kept open or when an informer re-lists (`informer`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from llamesh_api import store

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Policy:
    attempts: int = 8
    first_delay_s: float = 0.05
    max_delay_s: float = 5.0
    deadline_s: float = 30.0

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait before try `attempt + 1` (attempt counts from 1)."""
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.max_delay_s)
        backoff: float = min(self.first_delay_s * 2 ** (attempt - 1), self.max_delay_s)
        return backoff * random.uniform(0.5, 1.0)  # jitter: many clients must not retry in step


DEFAULT = Policy()
# Conflicts resolve by re-reading, and many writers of one object (gateways' usage, the agent, the operator)
# may collide in bursts: more tries, shorter waits.
CONFLICTS = Policy(attempts=20, first_delay_s=0.01, max_delay_s=0.5)


async def transient(call: Callable[[], Awaitable[T]], *, what: str, policy: Policy = DEFAULT) -> T:
    """`await call()`, retried on `store.Transient` failures."""
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except store.Transient as exc:
            delay = policy.delay(attempt, exc.retry_after_s)
            if attempt >= policy.attempts or time.monotonic() - started + delay > policy.deadline_s:
                raise
            log.debug("%s: %s; retry %d in %.2f s", what, exc, attempt, delay)
            await asyncio.sleep(delay)


async def conflicts(call: Callable[[], Awaitable[T]], *, what: str, policy: Policy = CONFLICTS) -> T:
    """`await call()` — a whole read-modify-write — again while it ends in `store.Conflict`."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except store.Conflict:
            if attempt >= policy.attempts:
                raise
            delay = policy.delay(attempt)
            log.debug("%s: conflict; retry %d in %.2f s", what, attempt, delay)
            await asyncio.sleep(delay)

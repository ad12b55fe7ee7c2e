"""The informer: one loop that keeps a local cache of one kind equal to the store, for every role.

Invariant: **after `listed` is set, `cache` is the store's state as of some recent resourceVersion, and
every change after it is delivered to `on_event` in order — or a full re-list is delivered to `on_listed`.**

The loop, as kopf's watcher and client-go's reflector do it:

1. list the kind; replace the cache; call `on_listed(items)`; set `listed` (the first time: the role may
   start serving);
2. watch from the list's resourceVersion; apply each event to the cache, remember its version, call
   `on_event(event)`;
3. a watch that ends normally (the server's timeout) is opened again from the last version seen;
4. `Gone` (410: the version is too old, e.g. after an API-server restart or compaction) → list again (1);
5. any other failure (connection lost, 5xx, a bug in a callback) is logged, counted in `failures`, and
   retried after an exponential backoff (capped) from the last version seen — or with a re-list if that
   version is gone by then. The loop never ends by itself; only cancelling its task stops it.

So no role can hold a watch that died silently: the only way out of `run` is cancellation.
Callbacks run on the loop and must not block; they may be called again with the same object.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Generic, TypeVar

from llamesh_api import resources, store

log = logging.getLogger(__name__)

R = TypeVar("R", bound=resources.Resource)


class Informer(Generic[R]):
    def __init__(
        self,
        resource_store: store.Store,
        kind: type[R],
        *,
        on_event: Callable[[store.Event[R]], None] | None = None,
        on_listed: Callable[[list[R]], None] | None = None,
        first_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.kind = kind
        self.cache: dict[str, R] = {}
        self.listed = asyncio.Event()
        self.lists = 0  # how many times it listed (1 + re-lists)
        self.failures = 0  # watch or list failures other than Gone
        self.resource_version: str | None = None
        self._store = resource_store
        self._on_event = on_event
        self._on_listed = on_listed
        self._first_backoff_s = first_backoff_s
        self._max_backoff_s = max_backoff_s

    async def run(self) -> None:
        """List and watch until cancelled."""
        must_list = True
        failures_in_a_row = 0
        while True:
            try:
                if must_list:
                    await self._list()
                    must_list = False
                async for event in self._store.watch(self.kind, resource_version=self.resource_version):
                    self._apply(event)
                    failures_in_a_row = 0
                failures_in_a_row = 0  # the server ended the watch (timeout): resume from where it stopped
            except asyncio.CancelledError:
                raise
            except store.Gone as exc:
                log.info("watch of %s: %s; listing again", self.kind.kind_name, exc)
                must_list = True
            except Exception as exc:
                self.failures += 1
                failures_in_a_row += 1
                backoff = min(self._first_backoff_s * 2 ** (failures_in_a_row - 1), self._max_backoff_s)
                backoff *= random.uniform(0.75, 1.0)
                log.warning(
                    "watch of %s failed (%s: %s); resuming in %.1f s",
                    self.kind.kind_name,
                    type(exc).__name__,
                    exc,
                    backoff,
                    exc_info=not isinstance(exc, store.StoreError),
                )
                await asyncio.sleep(backoff)
                if self.resource_version is None:
                    must_list = True

    async def _list(self) -> None:
        listing = await self._store.list(self.kind)
        self.cache = {obj.name: obj for obj in listing.items}
        self.resource_version = listing.resource_version
        self.lists += 1
        if self._on_listed is not None:
            self._on_listed(list(listing.items))
        self.listed.set()

    def _apply(self, event: store.Event[R]) -> None:
        obj = event.object
        if event.type == "DELETED":
            self.cache.pop(obj.name, None)
        else:
            self.cache[obj.name] = obj
        if obj.metadata.resource_version:
            self.resource_version = obj.metadata.resource_version
        if self._on_event is not None:
            self._on_event(event)

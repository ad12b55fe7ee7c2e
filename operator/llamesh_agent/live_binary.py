"""The live llama-server as the agent sees it, and rebuilds asked for through `LlamaNode.spec.rebuild_requests`.

The agent depends on the build manager only through the `LlamaServerBinary` protocol (`build.BuildManager`
satisfies it): the path of the live binary, the build status, and `build()`. A rebuild request is carried
out once: `Rebuilds.request` starts one when `spec.rebuild_requests` is ahead of what was handled and no
build runs (one already running, started by anyone, is waited out and the request handled after it). A
failed rebuild counts as handled and is not retried, as in the seed; the build manager records its error.
Whether a swapped binary drains running instances is not decided here: instances carry the version they
started with, and the operator compares it with the node's. Scheduled update checks and the rollback of a
bad new binary are `updates`'s.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from llamesh_api import resources

log = logging.getLogger(__name__)


class BuildStatusView(Protocol):
    """What the agent reads of the build manager's status (`build.BuildStatus` satisfies it)."""

    @property
    def is_building(self) -> bool: ...

    @property
    def last_build_error(self) -> str | None: ...

    @property
    def last_build_at(self) -> datetime.datetime | None: ...

    @property
    def llama_cpp_version(self) -> str | None: ...


class LlamaServerBinary(Protocol):
    """The live llama-server and how to rebuild it (`build.BuildManager` satisfies it)."""

    @property
    def binary_path(self) -> Path: ...

    @property
    def status(self) -> BuildStatusView: ...

    async def build(self, *, force: bool = False) -> object: ...


def is_present(binary: LlamaServerBinary) -> bool:
    """Whether the live binary exists and may be run (a blocking stat: call it from a thread)."""
    path = binary.binary_path
    return path.is_file() and os.access(path, os.X_OK)


class Rebuilds:
    """Carries out rebuild requests one at a time; `on_change` is called when building starts or ends."""

    def __init__(self, binary: LlamaServerBinary, *, on_change: Callable[[], None]) -> None:
        self._binary = binary
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self.error: str | None = None  # a failure the build manager did not record itself
        self.handled: int | None = None  # the last request carried out by this agent

    @property
    def is_building(self) -> bool:
        return self._running or self._binary.status.is_building

    def request(self, node: resources.LlamaNode) -> None:
        """Start a rebuild if `node` asks for one that has not been handled and none runs."""
        handled = max(node.status.rebuilds_handled, self.handled or 0)
        if node.spec.rebuild_requests <= handled or self.is_building:
            return
        self._task = asyncio.create_task(self._rebuild(node.spec.rebuild_requests), name="agent-rebuild")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _rebuild(self, requested: int) -> None:
        log.info("rebuilding llama.cpp (request %d)", requested, extra={"event": "llama_rebuild", "request": requested})
        self._running = True
        self._on_change()
        try:
            await self._binary.build()
            self.error = None
        except Exception as exc:  # the build manager records its own errors; anything else is ours to show
            log.warning(
                "llama.cpp rebuild failed: %s", exc, extra={"event": "llama_rebuild_failed", "request": requested}
            )
            self.error = None if self._binary.status.last_build_error else f"rebuild failed: {exc}"
        finally:
            self._running = False
        self.handled = requested
        self._on_change()

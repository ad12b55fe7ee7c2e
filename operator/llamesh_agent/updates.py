"""Scheduled llama.cpp updates, and the automatic rollback of a new binary that crashes its first instances.

Schedule: `Updates.run` asks the build manager for a build every `llama_cpp.auto_update_interval_seconds`
(the first an interval after the agent starts, each stretched by up to 10 % so that nodes do not all fetch
at once; 0 or `enabled: false` turns it off). The build manager fetches the source, builds a new revision,
smoke-tests it and swaps `binary_path` (logging the seed's llama_build_* events); a check that finds the
live revision already built swaps nothing. Never two builds at once: a tick while a build runs (a requested
rebuild, or another process's holding the build lock) is skipped, and a failed check is not retried before
the next tick. Nothing is drained here: instances carry the llama.cpp version they started with, and the
operator's planner drains those whose version differs from the node's once the node publishes the new one.

Probation: when the live version changes while the agent runs (a scheduled or a requested rebuild swapped
it), the first starts on the new binary are judged. `starts_of` reads them from an instance's status: each
failed spawn attempt counts as a failed start, and an instance that became ready counts as a good start once
it has stayed up `crash_window` (or was stopped on request), as a crash when it exited on its own sooner.
Only instances whose args hash already became ready on an earlier binary on this node are judged, so a
broken model file or a new profile never blames the binary. `judge` (pure) turns the judged starts into a
verdict; on ROLL_BACK the build manager points `binary_path` back at the previous build and marks the bad
one so that no later check swaps it in again until a new revision. The rollback is logged by the build
manager (`llama_build_rollback`) and shown in the node's status (`last_rollback`, `last_rollback_at`); the
planner then drains the bad binary's instances like any other version change.

Invariant: one task at a time builds or rolls back; `observe` never blocks, it only starts that task.

It deliberately does not keep a probation across agent restarts (a restart ends it; the rollback mark is the
build manager's and persists), and rolls back only with a binary that can (`RollbackCapable`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, runtime_checkable

from llamesh_agent import live_binary
from llamesh_api import resources

log = logging.getLogger(__name__)
_JITTER = 0.1  # each interval is stretched by up to this fraction


class Start(enum.Enum):
    """How one start of llama-server on a binary on probation went."""

    SERVED = "served"  # became ready and stayed up the crash window, or was stopped on request
    FAILED = "failed"  # the spawn attempt never became ready
    CRASHED = "crashed"  # became ready, then exited on its own within the crash window


class Verdict(enum.Enum):
    WATCHING = "watching"  # not enough starts judged yet
    TRUSTED = "trusted"  # too few failures are left possible for a rollback
    ROLL_BACK = "roll_back"


@dataclasses.dataclass(frozen=True)
class Policy:
    """When a new binary is rolled back: `failures_to_roll_back` bad ones among its first `judged_starts`."""

    judged_starts: int = 5
    failures_to_roll_back: int = 3
    crash_window: datetime.timedelta = datetime.timedelta(minutes=2)


def judge(starts: Sequence[Start], policy: Policy) -> Verdict:
    """The verdict on a new binary from its first starts, in the order they were judged."""
    judged = starts[: policy.judged_starts]
    failures = sum(1 for start in judged if start is not Start.SERVED)
    if failures >= policy.failures_to_roll_back:
        return Verdict.ROLL_BACK
    served = len(judged) - failures
    if served > policy.judged_starts - policy.failures_to_roll_back:
        return Verdict.TRUSTED
    return Verdict.WATCHING


def starts_of(
    instance: resources.LlamaInstance, *, now: datetime.datetime, crash_window: datetime.timedelta
) -> list[Start] | None:
    """The starts an instance made, once its fate is known; None while it may still go either way."""
    status = instance.status
    phase = status.phase
    if status.ready_at is None:
        # FAILED before ever being ready: each spawn attempt failed (none: it failed before spawning, e.g. a
        # download, which says nothing about the binary).
        return [Start.FAILED] * status.spawn_attempts if phase is resources.Phase.FAILED else None
    retried = [Start.FAILED] * max(status.spawn_attempts - 1, 0)
    if phase is resources.Phase.FAILED:
        lived = (status.stopped_at or now) - status.ready_at
        return [*retried, Start.CRASHED if lived < crash_window else Start.SERVED]
    if phase is resources.Phase.STOPPED or now - status.ready_at >= crash_window:
        return [*retried, Start.SERVED]
    return None


class RolledBack(Protocol):
    """What the agent reads of a rollback (`build.Rollback` satisfies it)."""

    @property
    def to_version(self) -> str: ...

    @property
    def at(self) -> datetime.datetime: ...

    def describe(self) -> str: ...


@runtime_checkable
class RollbackCapable(Protocol):
    """A binary that can be pointed back at its previous build (`build.BuildManager` satisfies it)."""

    async def roll_back(self, *, reason: str) -> RolledBack: ...


@dataclasses.dataclass
class _Probation:
    version: str
    starts: dict[str, list[Start]] = dataclasses.field(default_factory=dict)  # per instance uid, judged order

    def all_starts(self) -> list[Start]:
        return [start for starts in self.starts.values() for start in starts]


class Updates:
    """Runs scheduled update checks and watches each new binary's first starts; see the module docstring."""

    def __init__(
        self,
        binary: live_binary.LlamaServerBinary,
        *,
        interval_s: float,
        on_change: Callable[[], None],
        policy: Policy | None = None,
    ) -> None:
        self._binary = binary
        self._rollbacks = binary if isinstance(binary, RollbackCapable) else None
        self._interval_s = interval_s
        self._on_change = on_change
        self._policy = policy or Policy()
        self._live_version: str | None = None  # the version observe() last saw
        self._proven: set[str] = set()  # args hashes that became ready on an earlier binary here
        self._probation: _Probation | None = None
        self._rollback: asyncio.Task[None] | None = None
        self.checks = 0  # scheduled checks carried out (tests wait on it)
        self.last_rollback: str | None = None
        self.last_rollback_at: datetime.datetime | None = None

    async def run(self) -> None:
        """Check for an update every interval until cancelled (at once returns when scheduling is off)."""
        if self._interval_s <= 0:
            return
        while True:
            await asyncio.sleep(self._interval_s * (1 + random.uniform(0, _JITTER)))
            await self.check()

    async def check(self) -> None:
        """One scheduled update: build what the source has now, unless a build runs already."""
        before = self._binary.status.llama_cpp_version
        if self._binary.status.is_building:
            log.info("llama.cpp update check skipped: a build runs", extra={"event": "llama_update_skipped"})
            return
        log.info("llama.cpp update check (live: %s)", before, extra={"event": "llama_update_check", "live": before})
        try:
            await self._binary.build()
        except Exception as exc:  # the build manager logs and records its failures; the next tick tries again
            log.info("llama.cpp update check failed: %s", exc, extra={"event": "llama_update_failed"})
        finally:
            self.checks += 1
            self._on_change()

    def observe(self, instances: Iterable[resources.LlamaInstance], *, node_name: str, now: datetime.datetime) -> None:
        """Follow the live version and judge a new binary's first starts (a pass of the agent's loop)."""
        if self._rollbacks is None:
            return
        version = self._binary.status.llama_cpp_version
        if version != self._live_version:
            if self._live_version is not None and version is not None and self._rollback is None:
                log.info(
                    "llama.cpp %s is live (was %s); watching its first starts",
                    version,
                    self._live_version,
                    extra={"event": "llama_update_probation", "llama_cpp_version": version},
                )
                self._probation = _Probation(version)
            self._live_version = version
        mine = [instance for instance in instances if instance.spec.node_name == node_name]
        probation = self._probation
        for instance in mine:
            ran_on = instance.status.llama_cpp_version
            if instance.status.ready_at is not None and ran_on and (probation is None or ran_on != probation.version):
                self._proven.add(instance.spec.args_hash)
        if probation is None or self._rollback is not None:
            return
        for instance in mine:
            uid = instance.metadata.uid or instance.name
            judged = instance.status.llama_cpp_version == probation.version and uid not in probation.starts
            if not judged or instance.spec.args_hash not in self._proven:
                continue
            starts = starts_of(instance, now=now, crash_window=self._policy.crash_window)
            if starts:
                probation.starts[uid] = starts
        verdict = judge(probation.all_starts(), self._policy)
        if verdict is Verdict.TRUSTED:
            log.info("llama.cpp %s passed its first starts", probation.version, extra={"event": "llama_update_trusted"})
            self._probation = None
        elif verdict is Verdict.ROLL_BACK:
            self._rollback = asyncio.create_task(self._roll_back(self._rollbacks, probation), name="agent-rollback")

    async def close(self) -> None:
        if self._rollback is not None:
            self._rollback.cancel()
            await asyncio.gather(self._rollback, return_exceptions=True)

    async def _roll_back(self, binary: RollbackCapable, probation: _Probation) -> None:
        starts = probation.all_starts()[: self._policy.judged_starts]
        bad = sum(1 for start in starts if start is not Start.SERVED)
        reason = f"{bad} of its first {len(starts)} starts failed or crashed"
        try:
            rollback = await binary.roll_back(reason=reason)
        except Exception as exc:  # nothing to roll back to: keep serving with what is live, and say so
            log.error(
                "llama.cpp %s cannot be rolled back: %s",
                probation.version,
                exc,
                extra={"event": "llama_rollback_failed", "llama_cpp_version": probation.version},
            )
            self.last_rollback = f"llama.cpp {probation.version} should be rolled back ({reason}) but: {exc}"
            self.last_rollback_at = datetime.datetime.now(datetime.UTC)
        else:
            self.last_rollback, self.last_rollback_at = rollback.describe(), rollback.at
            self._live_version = rollback.to_version  # going back is no new binary to watch
        finally:
            self._probation = None
            self._rollback = None
            self._on_change()

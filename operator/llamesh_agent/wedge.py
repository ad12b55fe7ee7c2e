"""The wedged-instance watchdog's judge: which instances hold a slot while doing nothing at all.

A llama-server that accepts a request and then goes silent keeps the request in flight forever: it is never
idle (so never evicted) and a drain never finishes. The seed's watchdog (`wedge_detector`, opt-in) stops such
a process. This module only decides; the agent samples, and stops what `Judge.observe` names.

Every sweep gives, per Ready instance, its llama-server pid, the pid's CPU time (utime + stime, seconds) and
whether the instance holds a slot (some gateway reports a request in flight), plus one node-wide NVML sweep
of per-process GPU utilization (`sampling.GpuUtilization`). Between two sweeps of the same pid, both while
holding a slot, an instance is *flat* when

- its CPU time grew by at most `CPU_IDLE_FRACTION` of the elapsed time plus `CPU_TICK_SLACK_S` (procfs counts
  CPU time in 10 ms clock ticks, so a short interval needs slack for a tick or two of housekeeping), and
- its GPU is idle: a per-process reading at most `GPU_IDLE_PERCENT` sm_util. An *absent* reading counts as
  idle only once per-process utilization has reported a busy process on this node at least once (NVML
  tracks this host's processes, then) and the current sweep is complete (no device errored). Without NVML,
  GPU activity is unknown (a Metal, ROCm or Vulkan GPU may be busy), unless the operator set `cpu_only`,
  asserting the node has no GPU of any vendor: then an absent or incomplete reading counts as idle. A busy
  reading is never ignored, `cpu_only` or not.

An instance flat across consecutive sweeps for `window_s` or longer is wedged. Anything else breaks the
streak: CPU or GPU activity, unknown GPU activity, the slot released, another pid (a new process), the
instance missing from a sweep, its CPU time unreadable. A wedged instance is forgotten once named, so it is
named once; if it is still there at the next sweep it starts from scratch.

Pure: no clock (callers pass `now`, monotonic seconds), no I/O, no logging.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable

from llamesh_agent import sampling

CPU_IDLE_FRACTION = 0.02  # CPU seconds per second (2 % of one core) that still count as "~0 %"
CPU_TICK_SLACK_S = 0.02  # two procfs clock ticks, whatever the interval
GPU_IDLE_PERCENT = 1  # sm_util at or below this counts as "~0 %"


class GpuActivity(enum.Enum):
    BUSY = "busy"
    IDLE = "idle"
    UNKNOWN = "unknown"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One instance at one sweep."""

    instance: str
    pid: int
    cpu_s: float | None  # utime + stime of the pid; None: it could not be read (the process is gone)
    holding_slot: bool  # some gateway has a request of it in flight


@dataclasses.dataclass(frozen=True)
class Wedged:
    """An instance to stop, with what the verdict rests on (for the log line)."""

    instance: str
    pid: int
    flat_for_s: float  # how long it was flat, holding a slot
    cpu_used_s: float  # CPU time it used in that stretch
    gpu_sm_util: int | None  # its last per-process GPU reading; None: none (trusted as idle, or cpu_only)


@dataclasses.dataclass
class _Track:
    pid: int
    at: float  # when cpu_s was read
    cpu_s: float
    flat_since: float | None = None  # start of the current flat stretch
    flat_cpu_s: float = 0.0  # CPU time used during it


class Judge:
    """Remembers each slot-holding instance's last sample and flat stretch; see the module docstring."""

    def __init__(self, *, window_s: float, cpu_only: bool) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, not {window_s}")
        self.window_s = window_s
        self.cpu_only = cpu_only
        self._tracks: dict[str, _Track] = {}
        self._seen_busy_gpu = False

    @property
    def seen_busy_gpu(self) -> bool:
        """Whether per-process GPU utilization ever reported a busy process on this node."""
        return self._seen_busy_gpu

    def tracked(self) -> frozenset[str]:
        """Instances with a sample to compare the next one with (for diagnostics and tests)."""
        return frozenset(self._tracks)

    def gpu_activity(self, pid: int, gpu: sampling.GpuUtilization) -> GpuActivity:
        """What the sweep says about `pid`'s GPU use, under the rules above."""
        reading = gpu.sm_util.get(pid) if gpu.available else None
        if reading is not None and reading > GPU_IDLE_PERCENT:
            return GpuActivity.BUSY
        if self.cpu_only:
            return GpuActivity.IDLE
        if not gpu.available or not gpu.complete:
            return GpuActivity.UNKNOWN
        if reading is not None or self._seen_busy_gpu:
            return GpuActivity.IDLE
        return GpuActivity.UNKNOWN

    def observe(self, *, now: float, samples: Iterable[Sample], gpu: sampling.GpuUtilization) -> list[Wedged]:
        """Take one sweep; return the instances that have now been flat for the whole window."""
        if gpu.available and any(util > GPU_IDLE_PERCENT for util in gpu.sm_util.values()):
            self._seen_busy_gpu = True
        wedged: list[Wedged] = []
        tracks: dict[str, _Track] = {}
        for sample in samples:
            if not sample.holding_slot or sample.cpu_s is None:
                continue
            track = self._tracks.get(sample.instance)
            if track is None or track.pid != sample.pid:  # the first sample of this process: a baseline
                tracks[sample.instance] = _Track(sample.pid, now, sample.cpu_s)
                continue
            if now <= track.at:  # no time passed since the last sample: nothing to compare
                tracks[sample.instance] = track
                continue
            elapsed, used = now - track.at, max(sample.cpu_s - track.cpu_s, 0.0)
            activity = self.gpu_activity(sample.pid, gpu)
            cpu_flat = used <= CPU_IDLE_FRACTION * elapsed + CPU_TICK_SLACK_S
            if cpu_flat and activity is GpuActivity.IDLE:
                if track.flat_since is None:
                    track.flat_since, track.flat_cpu_s = track.at, 0.0
                track.flat_cpu_s += used
            else:
                track.flat_since = None
            track.at, track.cpu_s = now, sample.cpu_s
            if track.flat_since is not None and now - track.flat_since >= self.window_s:
                wedged.append(
                    Wedged(
                        instance=sample.instance,
                        pid=sample.pid,
                        flat_for_s=now - track.flat_since,
                        cpu_used_s=track.flat_cpu_s,
                        gpu_sm_util=gpu.sm_util.get(sample.pid) if gpu.available else None,
                    )
                )
                continue  # named once: forgotten
            tracks[sample.instance] = track
        self._tracks = tracks
        return wedged

"""Samples of this node's llama-server processes: memory (psutil, NVML) and activity (psutil, NVML).

NVML is reached through the small `Nvml` protocol (the `pynvml` module of nvidia-ml-py satisfies it), so
tests hand in a fake. A node without NVML, or whose NVML fails to start or to answer, reports
`available=False` and zeros: sampling never raises, because a missing GPU is a normal node, not an error.
Per-process VRAM sums compute and graphics processes over all devices; device totals sum all devices.

Activity (`sample_activity`, for the wedge watchdog's judge in `wedge`) is each pid's CPU time (utime +
stime, from psutil's `cpu_times`, i.e. procfs) and one node-wide sweep of NVML per-process utilization:
the highest `smUtil` of every process NVML reports on any device since the previous sweep (the sampler
remembers each device's last sample timestamp), and whether every device answered. NVML's "not found"
answer means no process used that device since then: a complete, empty answer, not an error.

A sample is one blocking call (NVML and /proc reads): run it in a worker thread. Peaks, intervals and what
to do with the numbers belong to the agent.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import psutil  # type: ignore[import-untyped]  # psutil ships no types; types-psutil is not a dependency

log = logging.getLogger(__name__)

MIB = 1024 * 1024


class MemoryInfo(Protocol):
    @property
    def total(self) -> int: ...

    @property
    def used(self) -> int: ...


class ProcessInfo(Protocol):
    @property
    def pid(self) -> int: ...

    @property
    def usedGpuMemory(self) -> int | None: ...


class ProcessUtilization(Protocol):
    """One per-process utilization sample, as `nvmlDeviceGetProcessUtilization` returns them."""

    @property
    def pid(self) -> int: ...

    @property
    def timeStamp(self) -> int: ...

    @property
    def smUtil(self) -> int: ...


class Nvml(Protocol):
    """The part of NVML (as `pynvml` spells it) that sampling uses."""

    def nvmlDeviceGetCount(self) -> int: ...

    def nvmlDeviceGetHandleByIndex(self, index: int, /) -> object: ...

    def nvmlDeviceGetMemoryInfo(self, handle: object, /) -> MemoryInfo: ...

    def nvmlDeviceGetComputeRunningProcesses(self, handle: object, /) -> Sequence[ProcessInfo]: ...

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: object, /) -> Sequence[ProcessInfo]: ...

    def nvmlDeviceGetProcessUtilization(self, handle: object, timestamp: int, /) -> Sequence[ProcessUtilization]: ...

    def nvmlShutdown(self) -> None: ...


NVML_SUCCESS = 0  # pynvml raises NVMLError(0) when a device reports zero samples without "not found"
NVML_ERROR_NOT_FOUND = 6  # pynvml.NVML_ERROR_NOT_FOUND: no samples since the timestamp


@dataclasses.dataclass(frozen=True)
class GpuSample:
    available: bool = False
    total_mb: int = 0
    used_mb: int = 0
    per_pid_mb: Mapping[int, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Sample:
    sysmem_mb: Mapping[int, int]  # resident memory of each sampled pid that still runs
    gpu: GpuSample

    def vram_mb(self, pid: int) -> int:
        return self.gpu.per_pid_mb.get(pid, 0)


@dataclasses.dataclass(frozen=True)
class GpuUtilization:
    """One NVML per-process utilization sweep of the node."""

    available: bool = False  # NVML answered for at least one device
    complete: bool = False  # every device answered
    sm_util: Mapping[int, int] = dataclasses.field(default_factory=dict)  # pid → highest smUtil % since last sweep


@dataclasses.dataclass(frozen=True)
class Activity:
    cpu_s: Mapping[int, float]  # utime + stime of each sampled pid that still runs, in seconds
    gpu: GpuUtilization


def load_nvml() -> Nvml | None:
    """`pynvml`, initialised, or None where there is no NVIDIA driver (or no nvidia-ml-py)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver errors: all mean "no NVML"
        log.info("no GPU telemetry: NVML is not available (%s)", exc, extra={"event": "gpu_telemetry_unavailable"})
        return None
    nvml: Nvml = pynvml
    return nvml


class Sampler:
    """Takes samples; `close()` shuts NVML down."""

    def __init__(self, nvml: Nvml | None) -> None:
        self._nvml = nvml
        self._utilization_seen: dict[int, int] = {}  # device index → newest sample timestamp read (µs)

    @classmethod
    def probe(cls) -> Sampler:
        """A sampler with real NVML where this host has it."""
        return cls(load_nvml())

    @property
    def has_nvml(self) -> bool:
        return self._nvml is not None

    def sample(self, pids: Iterable[int]) -> Sample:
        wanted = list(pids)
        return Sample(sysmem_mb=rss_mb(wanted), gpu=self.sample_gpu(wanted))

    def sample_gpu(self, pids: Iterable[int]) -> GpuSample:
        nvml = self._nvml
        if nvml is None:
            return GpuSample()
        wanted = set(pids)
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:  # an NVML error type; pynvml has many
            log.warning(
                "NVML stopped answering (%s); reporting no GPU telemetry", exc, extra={"event": "gpu_telemetry_failed"}
            )
            return GpuSample()
        total = used = 0
        read_any = False
        per_pid: dict[int, int] = {}
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:
                log.warning(
                    "NVML cannot read GPU %d (%s); leaving it out", index, exc, extra={"event": "gpu_telemetry_failed"}
                )
                continue
            read_any = True
            total += memory.total // MIB
            used += -(-memory.used // MIB)  # round up: a few bytes in use is not "free"
            on_device: dict[int, int] = {}  # a process listed as compute and graphics is counted once
            for process in _processes(nvml, handle):
                if process.pid in wanted and process.usedGpuMemory:
                    on_device[process.pid] = max(on_device.get(process.pid, 0), -(-process.usedGpuMemory // MIB))
            for pid, mb in on_device.items():
                per_pid[pid] = per_pid.get(pid, 0) + mb
        if not read_any:
            return GpuSample()
        return GpuSample(available=True, total_mb=total, used_mb=used, per_pid_mb=per_pid)

    def sample_activity(self, pids: Iterable[int]) -> Activity:
        return Activity(cpu_s=cpu_seconds(pids), gpu=self.sample_utilization())

    def sample_utilization(self) -> GpuUtilization:
        """Per-process sm_util of every process NVML reports since the previous sweep; see the docstring."""
        nvml = self._nvml
        if nvml is None:
            return GpuUtilization()
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:
            log.warning("NVML stopped answering (%s)", exc, extra={"event": "gpu_telemetry_failed"})
            return GpuUtilization()
        answered = 0
        sm_util: dict[int, int] = {}
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                samples = list(nvml.nvmlDeviceGetProcessUtilization(handle, self._utilization_seen.get(index, 0)))
            except Exception as exc:
                if getattr(exc, "value", None) in (NVML_SUCCESS, NVML_ERROR_NOT_FOUND):
                    answered += 1  # nothing ran on it since the last sweep
                    continue
                log.debug("NVML per-process utilization of GPU %d failed: %s", index, exc)
                continue
            answered += 1
            for sample in samples:
                sm_util[sample.pid] = max(sm_util.get(sample.pid, 0), sample.smUtil)
                self._utilization_seen[index] = max(self._utilization_seen.get(index, 0), sample.timeStamp)
        return GpuUtilization(available=answered > 0, complete=answered == count and count > 0, sm_util=sm_util)

    def close(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except Exception as exc:
                log.debug("NVML shutdown failed: %s", exc)


def rss_mb(pids: Iterable[int]) -> dict[int, int]:
    """Resident memory in MiB of each pid that still runs."""
    found: dict[int, int] = {}
    for pid in pids:
        try:
            found[pid] = psutil.Process(pid).memory_info().rss // MIB
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """CPU time (user + system, its own threads, not its children's) of each pid that still runs."""
    found: dict[int, float] = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        found[pid] = times.user + times.system
    return found


def _processes(nvml: Nvml, handle: object) -> list[ProcessInfo]:
    found: list[ProcessInfo] = []
    for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        try:
            found.extend(query(handle))
        except Exception as exc:  # e.g. NVMLError_NotSupported on some boards
            log.debug("NVML process query failed: %s", exc)
    return found

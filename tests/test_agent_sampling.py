"""Memory sampling: resident memory with psutil, VRAM through NVML (a fake here; the real one on GPU hosts).

Covers: RSS of a running pid, vanished pids left out; no NVML → not available and zeros, never an exception;
NVML that fails to load (a stand-in `pynvml` module whose init raises); device totals summed over GPUs,
per-process VRAM summed over GPUs, a process listed as compute and graphics counted once, unknown
(`None`) usage ignored, a failing device left out, NVML failing outright → unavailable; close shuts NVML down.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types

import pytest

from llamesh_agent import sampling

MIB = 1024 * 1024


@dataclasses.dataclass
class Proc:
    pid: int
    usedGpuMemory: int | None


@dataclasses.dataclass
class Memory:
    total: int
    used: int


class FakeNvml:
    """GPUs given as (total, used, compute processes, graphics processes); index `broken` raises."""

    def __init__(self, gpus: list[tuple[int, int, list[Proc], list[Proc]]], *, broken: int | None = None) -> None:
        self.gpus = gpus
        self.broken = broken
        self.fail_count = False
        self.shut_down = False

    def nvmlDeviceGetCount(self) -> int:
        if self.fail_count:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index == self.broken:
            raise RuntimeError("NVML_ERROR_UNKNOWN")
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Memory:
        total, used, _, _ = self.gpus[handle]
        return Memory(total=total, used=used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Proc]:
        return self.gpus[handle][2]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[Proc]:
        graphics = self.gpus[handle][3]
        if graphics is None:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return graphics

    def nvmlShutdown(self) -> None:
        self.shut_down = True


def test_rss_of_running_and_vanished_pids() -> None:
    found = sampling.rss_mb([os.getpid(), 2**22 + 12345])
    assert set(found) == {os.getpid()} and found[os.getpid()] > 0


def test_without_nvml() -> None:
    sample = sampling.Sampler(None).sample([os.getpid()])
    assert sample.gpu == sampling.GpuSample()
    assert not sample.gpu.available and sample.vram_mb(os.getpid()) == 0
    assert sample.sysmem_mb[os.getpid()] > 0


def test_nvml_that_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = types.ModuleType("pynvml")

    def init() -> None:
        raise OSError("NVML Shared Library Not Found")

    broken.nvmlInit = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert sampling.load_nvml() is None
    assert not sampling.Sampler.probe().has_nvml


def test_devices_and_processes() -> None:
    me = os.getpid()
    nvml = FakeNvml(
        [
            (80 * 1024 * MIB, 10 * 1024 * MIB + 1, [Proc(me, 512 * MIB), Proc(4242, 9 * MIB)], [Proc(me, 512 * MIB)]),
            (24 * 1024 * MIB, 2 * 1024 * MIB, [Proc(me, 100 * MIB + 1), Proc(me + 1, None)], []),
        ]
    )
    gpu = sampling.Sampler(nvml).sample_gpu([me, me + 1])
    assert gpu.available
    assert gpu.total_mb == 104 * 1024
    assert gpu.used_mb == 12 * 1024 + 1  # rounded up
    assert dict(gpu.per_pid_mb) == {me: 512 + 101}  # other pids ignored, graphics duplicate counted once


def test_a_failing_device_is_left_out() -> None:
    nvml = FakeNvml([(8 * MIB, 1 * MIB, [], []), (16 * MIB, 2 * MIB, [], [])], broken=0)
    gpu = sampling.Sampler(nvml).sample_gpu([])
    assert gpu.available and gpu.total_mb == 16


def test_unsupported_process_query_is_not_fatal() -> None:
    nvml = FakeNvml([(8 * MIB, 1 * MIB, [Proc(7, 3 * MIB)], None)])  # type: ignore[list-item]
    assert dict(sampling.Sampler(nvml).sample_gpu([7]).per_pid_mb) == {7: 3}


def test_nvml_failing_outright_reports_unavailable() -> None:
    nvml = FakeNvml([(8 * MIB, 1 * MIB, [], [])])
    nvml.fail_count = True
    assert sampling.Sampler(nvml).sample_gpu([]) == sampling.GpuSample()
    all_broken = FakeNvml([(8 * MIB, 1 * MIB, [], [])], broken=0)
    assert not sampling.Sampler(all_broken).sample_gpu([]).available


def test_close_shuts_nvml_down() -> None:
    nvml = FakeNvml([])
    sampler = sampling.Sampler(nvml)
    sampler.close()
    sampler.close()
    assert nvml.shut_down and not sampler.has_nvml

"""Memory sampling: resident memory with psutil, VRAM through NVML (a fake here; the real one on GPU hosts).

Covers: RSS of a running pid, vanished pids left out; no NVML → not available and zeros, never an exception;
NVML that fails to load (a stand-in `pynvml` module whose init raises); device totals summed over GPUs,
per-process VRAM summed over GPUs, a process listed as compute and graphics counted once, unknown
(`None`) usage ignored, a failing device left out, NVML failing outright → unavailable; close shuts NVML down.
Activity (for the wedge watchdog): CPU time of a running pid grows as it works, vanished pids left out;
per-process utilization (highest smUtil per pid over all devices, each device asked only for samples newer
than the last it gave), "not found" as a complete empty answer, a failing or unsupported device makes the
sweep incomplete, no device answering or no NVML → not available.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import types

import pytest

from llamesh_agent import sampling

MIB = 1024 * 1024


@dataclasses.dataclass
class Proc:
    pid: int
    usedGpuMemory: int | None


@dataclasses.dataclass
class Utilization:
    pid: int
    timeStamp: int
    smUtil: int


class NvmlError(Exception):
    """Like pynvml's NVMLError: the NVML return code in `value`."""

    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


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
        # per device: its utilization samples, or an NVML return code it answers with instead
        self.utilization: dict[int, list[Utilization] | int] = {}
        self.utilization_asked: list[tuple[int, int]] = []  # (device, timestamp) of each query

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

    def nvmlDeviceGetProcessUtilization(self, handle: int, timestamp: int) -> list[Utilization]:
        self.utilization_asked.append((handle, timestamp))
        answer = self.utilization.get(handle, sampling.NVML_ERROR_NOT_FOUND)
        if isinstance(answer, int):
            raise NvmlError(answer)
        return [sample for sample in answer if sample.timeStamp > timestamp]

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


# --- activity -------------------------------------------------------------------------------------


def test_cpu_time_grows_while_a_process_works_and_vanished_pids_are_left_out() -> None:
    me = os.getpid()
    before = sampling.cpu_seconds([me, 2**22 + 12345])
    assert set(before) == {me}
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # burn 0.2 s of CPU
        pass
    after = sampling.cpu_seconds([me])
    assert after[me] - before[me] >= 0.15


def test_activity_without_nvml() -> None:
    activity = sampling.Sampler(None).sample_activity([os.getpid()])
    assert activity.gpu == sampling.GpuUtilization() and not activity.gpu.available
    assert activity.cpu_s[os.getpid()] > 0


def test_per_process_utilization_over_devices() -> None:
    nvml = FakeNvml([(8 * MIB, 0, [], []), (8 * MIB, 0, [], [])])
    nvml.utilization = {
        0: [Utilization(7, 10, 30), Utilization(7, 20, 55), Utilization(9, 20, 0)],
        1: [Utilization(7, 15, 40), Utilization(4242, 16, 99)],
    }
    sampler = sampling.Sampler(nvml)
    sweep = sampler.sample_utilization()
    assert sweep.available and sweep.complete
    assert dict(sweep.sm_util) == {7: 55, 9: 0, 4242: 99}  # the highest per pid; every process, not only ours
    assert nvml.utilization_asked == [(0, 0), (1, 0)]
    nvml.utilization[0].append(Utilization(9, 30, 12))  # type: ignore[union-attr]
    again = sampler.sample_utilization()
    assert nvml.utilization_asked[2:] == [(0, 20), (1, 16)]  # only samples newer than the last sweep's
    assert dict(again.sm_util) == {9: 12} and again.complete  # device 1 had none: "not found"


def test_not_found_is_a_complete_empty_answer() -> None:
    nvml = FakeNvml([(8 * MIB, 0, [], [])])
    sweep = sampling.Sampler(nvml).sample_utilization()
    assert sweep == sampling.GpuUtilization(available=True, complete=True, sm_util={})


def test_a_failing_or_unsupported_device_makes_the_sweep_incomplete() -> None:
    not_supported = 3
    nvml = FakeNvml([(8 * MIB, 0, [], []), (8 * MIB, 0, [], [])])
    nvml.utilization = {0: [Utilization(7, 1, 20)], 1: not_supported}
    sweep = sampling.Sampler(nvml).sample_utilization()
    assert sweep.available and not sweep.complete and dict(sweep.sm_util) == {7: 20}
    lost = FakeNvml([(8 * MIB, 0, [], []), (8 * MIB, 0, [], [])], broken=1)
    assert not sampling.Sampler(lost).sample_utilization().complete


def test_no_device_answering_is_no_utilization() -> None:
    nvml = FakeNvml([(8 * MIB, 0, [], [])])
    nvml.utilization = {0: 999}
    assert not sampling.Sampler(nvml).sample_utilization().available
    nvml.fail_count = True
    assert sampling.Sampler(nvml).sample_utilization() == sampling.GpuUtilization()
    assert sampling.Sampler(FakeNvml([])).sample_utilization() == sampling.GpuUtilization(available=False)

"""The LlamaNode the agent writes (`node_status`), as a pure mapping.

Covers: capacity into spec without touching `rebuild_requests`; every status field from the report, memory
in use summed over processes; `rebuilds_handled` never going down and kept when the agent has handled none.
"""

from __future__ import annotations

import datetime

from llamesh_agent import node_status, sampling
from llamesh_api import resources

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def report(**changes: object) -> node_status.NodeReport:
    fields: dict[str, object] = {
        "max_vram_mb": 24000,
        "max_sysmem_mb": 64000,
        "max_instances": 5,
        "address": "10.0.0.7",
        "ready": True,
        "draining": False,
        "binary_path": "/opt/llama-server",
        "llama_cpp_version": "7099-abc",
        "is_building": False,
        "last_build_error": None,
        "last_build_at": NOW,
        "usage": sampling.Sample(
            sysmem_mb={1: 100, 2: 250},
            gpu=sampling.GpuSample(available=True, total_mb=81920, used_mb=30000, per_pid_mb={1: 9000, 2: 1000}),
        ),
        "active_instances": 2,
        "rebuilds_handled": None,
        "learned": {"h": resources.Learned(peak_sysmem_mb=250)},
        "heartbeat_at": NOW,
    }
    fields.update(changes)
    return node_status.NodeReport(**fields)  # type: ignore[arg-type]


def test_report_fills_spec_and_status() -> None:
    node = resources.LlamaNode(metadata=resources.ObjectMeta(name="n"))
    node.spec.rebuild_requests = 3
    node_status.apply(node, report())
    assert node.spec.model_dump() == {
        "max_vram_mb": 24000,
        "max_sysmem_mb": 64000,
        "max_instances": 5,
        "address": "10.0.0.7",
        "rebuild_requests": 3,
    }
    status = node.status
    assert status.ready and not status.draining and status.binary_path == "/opt/llama-server"
    assert (status.gpu_telemetry_available, status.device_vram_total_mb, status.device_vram_used_mb) == (
        True,
        81920,
        30000,
    )
    assert (status.llamesh_vram_mb, status.llamesh_sysmem_mb, status.active_instances) == (10000, 350, 2)
    assert status.learned == {"h": resources.Learned(peak_sysmem_mb=250)} and status.heartbeat_at == NOW


def test_rebuilds_handled_never_goes_down() -> None:
    node = resources.LlamaNode(metadata=resources.ObjectMeta(name="n"))
    node.status.rebuilds_handled = 4
    node_status.apply(node, report(rebuilds_handled=None))
    assert node.status.rebuilds_handled == 4
    node_status.apply(node, report(rebuilds_handled=2))
    assert node.status.rebuilds_handled == 4
    node_status.apply(node, report(rebuilds_handled=5))
    assert node.status.rebuilds_handled == 5

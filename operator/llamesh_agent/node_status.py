"""What the agent says about its node: the LlamaNode it creates and keeps current.

`spec` carries the node's capacity from config.yaml (`max_vram_mb`, `max_sysmem_mb`,
`max_instances_per_node` → `max_instances`) and where its instances are reached (`address`);
`rebuild_requests` is left to whoever asks for rebuilds. `status` means, when the agent writes it:

- `ready`: a llama-server binary is present and executable and the node is not shutting down;
- `draining`: the agent is shutting down (no new instances should come here);
- `binary_path`, `llama_cpp_version`: the live binary and its version (None while there is none);
- `is_building`, `last_build_error`, `last_build_at`: the build manager's state (a rebuild the agent runs
  counts as building; a rebuild error the build manager did not record is shown here);
- `last_rollback`, `last_rollback_at`: the last automatic rollback of a new build (`updates`), described;
  kept until the next one, across agent restarts;
- `gpu_telemetry_available`, `device_vram_total_mb`, `device_vram_used_mb`: NVML's device totals at the last
  sample (False and zeros without NVML);
- `llamesh_vram_mb`, `llamesh_sysmem_mb`: VRAM and resident memory of this agent's llama-server processes at
  the last sample;
- `active_instances`: instances this agent runs now (starting, ready or stopping);
- `rebuilds_handled`: how many of `spec.rebuild_requests` have been carried out (never goes down);
- `wedged_instances_killed`: instances the wedge watchdog killed on this node, over the node's life (the
  agent starts from the count it finds; never goes down);
- `kv_cache_saves`, `kv_cache_restores`, `kv_cache_restore_failures`: slot KV caches saved before instances
  stopped, loaded into new ones, and not loaded (`kv_cache`); never go down;
- `learned`: per args hash, what the node learned (parsed params withheld when another llama.cpp produced
  them; peak memory);
- `heartbeat_at`: when this was written.

The mapping is pure (`apply`); `publish` creates the node when it does not exist and writes it: spec and
status in separate writes, as the API server's status subresource wants them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime

from llamesh_agent import sampling
from llamesh_api import resources, store, writes


@dataclasses.dataclass(frozen=True)
class NodeReport:
    max_vram_mb: int
    max_sysmem_mb: int
    max_instances: int
    address: str
    ready: bool
    draining: bool
    binary_path: str | None
    llama_cpp_version: str | None
    is_building: bool
    last_build_error: str | None
    last_build_at: datetime.datetime | None
    usage: sampling.Sample
    active_instances: int
    rebuilds_handled: int | None  # None: none carried out by this agent yet
    learned: dict[str, resources.Learned]
    heartbeat_at: datetime.datetime
    wedged_instances_killed: int = 0
    kv_cache_saves: int = 0  # over the node's life (the agent counts on from what its LlamaNode said)
    kv_cache_restores: int = 0
    kv_cache_restore_failures: int = 0
    last_rollback: str | None = None
    last_rollback_at: datetime.datetime | None = None


def apply_spec(node: resources.LlamaNode, report: NodeReport) -> None:
    node.spec.max_vram_mb = report.max_vram_mb
    node.spec.max_sysmem_mb = report.max_sysmem_mb
    node.spec.max_instances = report.max_instances
    node.spec.address = report.address


def apply(node: resources.LlamaNode, report: NodeReport) -> None:
    apply_spec(node, report)
    status = node.status
    status.ready = report.ready
    status.draining = report.draining
    status.binary_path = report.binary_path
    status.llama_cpp_version = report.llama_cpp_version
    status.is_building = report.is_building
    status.last_build_error = report.last_build_error
    status.last_build_at = report.last_build_at
    if report.last_rollback is not None:  # kept across agent restarts until the next rollback
        status.last_rollback, status.last_rollback_at = report.last_rollback, report.last_rollback_at
    status.gpu_telemetry_available = report.usage.gpu.available
    status.device_vram_total_mb = report.usage.gpu.total_mb
    status.device_vram_used_mb = report.usage.gpu.used_mb
    status.llamesh_vram_mb = sum(report.usage.gpu.per_pid_mb.values())
    status.llamesh_sysmem_mb = sum(report.usage.sysmem_mb.values())
    status.active_instances = report.active_instances
    if report.rebuilds_handled is not None:
        status.rebuilds_handled = max(status.rebuilds_handled, report.rebuilds_handled)
    status.wedged_instances_killed = max(status.wedged_instances_killed, report.wedged_instances_killed)
    status.kv_cache_saves = max(status.kv_cache_saves, report.kv_cache_saves)
    status.kv_cache_restores = max(status.kv_cache_restores, report.kv_cache_restores)
    status.kv_cache_restore_failures = max(status.kv_cache_restore_failures, report.kv_cache_restore_failures)
    status.learned = dict(report.learned)
    status.heartbeat_at = report.heartbeat_at


async def publish(resource_store: store.Store, name: str, report: NodeReport) -> None:
    """Write `report` into the LlamaNode `name`, creating it first when it does not exist."""

    def write_spec(node: resources.LlamaNode) -> None:
        apply_spec(node, report)

    def write_status(node: resources.LlamaNode) -> None:
        apply(node, report)

    if await writes.update(resource_store, resources.LlamaNode, name, write_spec) is None:
        fresh = resources.LlamaNode(metadata=resources.ObjectMeta(name=name))
        apply_spec(fresh, report)
        with contextlib.suppress(store.AlreadyExists):  # another writer was quicker; the writes below still land
            await resource_store.create(fresh)
        await writes.update(resource_store, resources.LlamaNode, name, write_spec)
    await writes.update_status(resource_store, resources.LlamaNode, name, write_status)

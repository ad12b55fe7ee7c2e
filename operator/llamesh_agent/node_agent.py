"""The node agent (the kubelet of llamesh): runs the instances bound to this node and publishes the node.

It talks to the other roles only through the store. It watches LlamaInstance, LlamaModel and its own
LlamaNode into local caches and, on every change and at least every `reconcile_interval_s`, lets
`plan.plan` compare them with the processes it runs; `InstanceRunner`s carry out starts and stops and write
instance status. Beside that loop: a heartbeat that publishes LlamaNode status (capacity from config.yaml,
the live binary and its build status, GPU telemetry, memory in use, learned data), a sampler that records
peak memory per instance and per args hash (persisted in the node's metrics JSON), rebuilds of
llama.cpp when `spec.rebuild_requests` runs ahead of `status.rebuilds_handled`, and `updates`: scheduled
update checks (`llama_cpp.auto_update_interval_seconds`) and the rollback of a new binary whose first
instances fail, judged from the instances each pass sees.

The wedge watchdog (`wedge_detector.enabled`, off by default) runs beside them: every `sample_interval_ms`
it samples each Ready (or draining) instance's llama-server pid — CPU time, NVML per-process utilization —
and whether some gateway reports a request of it in flight, and lets `wedge.Judge` decide. A wedged
instance gets an `instance_wedged` warning and is stopped (instance_terminate reason `wedged`) by SIGKILL
to its pid, as an operator would kill it: its stuck requests then fail through the gateway's normal
upstream error path, and the next request gets a fresh instance. Kills are counted in LlamaNode
`status.wedged_instances_killed`, continuing from the count the agent finds at startup.

Nothing here blocks the event loop: file reads and writes, stats and NVML run in worker threads, children
are asyncio subprocesses and their output is written by `childlog`'s thread. Actions are carried out one
after another with awaits between them, so a runner planned for may have ended by the time its action
comes: such an action is skipped (the next pass plans again). The uids of instances whose process ended
(which must not be started again) are forgotten once the store no longer lists the instance, so the set
stays as small as the store. It does not build llama.cpp at startup (the composition root calls the
build manager's `ensure_binary` first), decide placement or eviction (the operator), or route requests
(the gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llamesh_agent import (
    instance_runner,
    kv_cache,
    learned,
    live_binary,
    node_status,
    plan,
    ports,
    sampling,
    updates,
    wedge,
)
from llamesh_api import config, cookbook, informer, resources, writes
from llamesh_api import store as store_api  # `store` is NodeAgent's parameter, as the callers spell it

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Health:
    alive: bool
    ready: bool
    message: str


@dataclasses.dataclass(frozen=True)
class Timings:
    """How often the agent does things; tests shorten them."""

    reconcile_interval_s: float = 1.0  # a reconcile pass at least this often, besides one per watch event
    heartbeat_interval_s: float = 5.0  # LlamaNode status at least this often, besides one per change
    sample_interval_s: float = 10.0  # memory samples (the seed's interval)
    drain_settle_s: float = 2.0  # gateways publish in-flight counts about once a second
    watch_retry_s: float = 0.5  # first pause before a failed watch is resumed (doubling, up to 5 s)
    runner: instance_runner.RunnerSettings = dataclasses.field(default_factory=instance_runner.RunnerSettings)


class NodeAgent:
    """Runs this node's instances; see the module docstring. `run()` until `shutdown()` (or cancellation)."""

    def __init__(
        self,
        *,
        store: store_api.Store,
        node_config: config.NodeConfig,
        binary: live_binary.LlamaServerBinary,
        state_dir: Path,
        config_dir: Path,
        node_name: str | None = None,
        timings: Timings | None = None,
        sampler: sampling.Sampler | None = None,
        address: str = "127.0.0.1",
        models_cache_dir: Path | None = None,
        child_env: Mapping[str, str] | None = None,
    ) -> None:
        self._store = store
        self._config = node_config
        self._binary = binary
        self._state_dir = state_dir
        self._config_dir = config_dir
        self.node_name = node_name or node_config.node_id
        self._timings = timings or Timings()
        self._sampler = sampler
        self._address = address
        cache_dir = config.resolve_path(node_config.llama_cpp.cache_dir, base_dir=config_dir)
        self._models_cache_dir = models_cache_dir or cache_dir / "huggingface"
        self._child_env = {**os.environ, **child_env} if child_env else None
        candidates = node_config.llama_cpp_ports.candidates() if node_config.llama_cpp_ports else None
        self._ports = ports.PortAllocator(candidates)
        metrics_path = config.resolve_path(node_config.metrics_path, base_dir=config_dir)
        self._learned = learned.LearnedStore(metrics_path, node_id=self.node_name)
        self._learned_dirty = False  # learned data changed since the file was last written

        wake, backoff = self._wake_on_change, self._timings.watch_retry_s
        self._instance_informer = informer.Informer(
            store, resources.LlamaInstance, on_event=wake, on_listed=wake, first_backoff_s=backoff
        )
        self._model_informer = informer.Informer(
            store, resources.LlamaModel, on_event=wake, on_listed=wake, first_backoff_s=backoff
        )
        self._node_informer = informer.Informer(
            store, resources.LlamaNode, on_event=self._node_event, on_listed=self._nodes_listed, first_backoff_s=backoff
        )
        self._node: resources.LlamaNode | None = None
        self._runners: dict[str, instance_runner.InstanceRunner] = {}
        self._runner_tasks: dict[str, asyncio.Task[None]] = {}
        self._finished_uids: set[str] = set()
        self._wake: asyncio.Event = asyncio.Event()
        self._publish_soon = asyncio.Event()
        self._sample_soon = asyncio.Event()
        self._save_lock = asyncio.Lock()
        self._background: list[asyncio.Task[None]] = []
        self._rebuilds = live_binary.Rebuilds(binary, on_change=self._publish_soon.set)
        llama_cpp = node_config.llama_cpp
        self._updates = updates.Updates(
            binary,
            interval_s=llama_cpp.auto_update_interval_seconds if llama_cpp.enabled else 0,
            on_change=self._publish_soon.set,
        )
        self._usage = sampling.Sample(sysmem_mb={}, gpu=sampling.GpuSample())
        self._shutting_down = False
        self._heartbeat_tried_at: float | None = None  # time.monotonic() of the last heartbeat attempt
        self._heartbeat_ok_at: float | None = None  # ... and of the last one that was written
        self._binary_present = False  # as the last heartbeat saw it (a stat, so never on the loop)
        self._stopping = False
        self._stopped = asyncio.Event()
        watchdog = node_config.wedge_detector
        self._judge = (
            wedge.Judge(window_s=watchdog.window_ms / 1000, cpu_only=watchdog.cpu_only) if watchdog.enabled else None
        )
        self.wedged_instances_killed = 0  # over the node's life: counting on from what its LlamaNode says
        kv = node_config.kv_cache
        self._slot_cache = (
            kv_cache.SlotCache(
                config.resolve_path(kv.directory, base_dir=config_dir),
                budget_bytes=kv.max_disk_mb * 1024 * 1024,
                min_tokens=kv.min_cached_tokens,
            )
            if kv.enabled
            else None
        )
        self.kv_cache_saves = self.kv_cache_restores = self.kv_cache_restore_failures = 0  # over the node's life
        self.reconcile_passes = 0  # passes run so far: tests wait for passes instead of guessing with sleeps

    # --- public -----------------------------------------------------------------------------------

    @property
    def learned_path(self) -> Path:
        return self._learned.path

    def runner(self, instance: str) -> instance_runner.InstanceRunner | None:
        """The runner of an instance this agent runs now (for diagnostics and tests)."""
        return self._runners.get(instance)

    @property
    def wedge_judge(self) -> wedge.Judge | None:
        """The wedge watchdog's judge, None when `wedge_detector` is off (for diagnostics and tests)."""
        return self._judge

    @property
    def finished_uids(self) -> frozenset[str]:
        """Uids of instances whose process ended here and that the store still lists (for tests)."""
        return frozenset(self._finished_uids)

    async def run(self) -> None:
        """Publish the node and keep this node's instances converged until `shutdown()` or cancellation."""
        await asyncio.to_thread(self._learned.load)
        if self._sampler is None:
            self._sampler = await asyncio.to_thread(sampling.Sampler.probe)
        if self._judge is not None or self._slot_cache is not None:
            # count on from the node's counts (a report never lowers them: no read otherwise)
            published = await self._store.get(resources.LlamaNode, self.node_name)
            if published is not None:
                status = published.status
                self.wedged_instances_killed = status.wedged_instances_killed
                self.kv_cache_saves, self.kv_cache_restores = status.kv_cache_saves, status.kv_cache_restores
                self.kv_cache_restore_failures = status.kv_cache_restore_failures
        await self._publish_node()
        self._background = [
            asyncio.create_task(self._instance_informer.run(), name="agent-watch-instances"),
            asyncio.create_task(self._model_informer.run(), name="agent-watch-models"),
            asyncio.create_task(self._node_informer.run(), name="agent-watch-node"),
            asyncio.create_task(self._heartbeat(), name="agent-heartbeat"),
            asyncio.create_task(self._sample_loop(), name="agent-sampler"),
            asyncio.create_task(self._updates.run(), name="agent-updates"),
        ]
        if self._judge is not None:
            self._background.append(asyncio.create_task(self._wedge_loop(self._judge), name="agent-wedge-watchdog"))
        try:
            while not self._shutting_down:
                self._wake.clear()
                try:
                    await self._reconcile_once()
                except Exception:  # one bad pass must not end the agent
                    log.exception("agent reconcile failed; retrying", extra={"event": "agent_reconcile_failed"})
                self.reconcile_passes += 1
                await _wait(self._wake, self._timings.reconcile_interval_s)
        finally:
            await self._stop_everything()

    async def shutdown(self) -> None:
        """Mark the node draining, stop every child (SIGTERM, then SIGKILL), and end `run()`."""
        self._shutting_down = True
        self._wake.set()
        await self._stop_everything()

    # --- reconcile --------------------------------------------------------------------------------

    async def _reconcile_once(self) -> None:
        if not (self._instance_informer.listed.is_set() and self._model_informer.listed.is_set()):
            # before both first lists, an instance may be cached whose model is not yet: it would be failed
            # for a profile the cookbook has (each list wakes the loop)
            return
        now = time.monotonic()
        actions = plan.plan(
            node_name=self.node_name,
            instances=self._instances.values(),
            runners={name: runner.view for name, runner in self._runners.items()},
            finished_uids=self._finished_uids,
            now=now,
            drain_settle_s=self._timings.drain_settle_s,
        )
        for action in actions:
            await self._apply(action, now=now)
        self._forget_finished()
        if self._node is not None and not self._shutting_down:
            self._rebuilds.request(self._node)
        self._updates.observe(self._instances.values(), node_name=self.node_name, now=store_api.utcnow())

    def _forget_finished(self) -> None:
        """Keep only the finished uids the store still lists: a deleted instance's uid never comes back."""
        if self._instance_informer.listed.is_set():  # before the first list the cache is not the store's
            self._finished_uids.intersection_update(
                uid for instance in self._instances.values() if (uid := instance.metadata.uid) is not None
            )

    async def _apply(self, action: plan.Action, *, now: float) -> None:
        """Carry out one action. Earlier actions of the same pass awaited, so the runner or instance it was
        planned for may be gone by now: then it is skipped, and the next pass plans with what is left."""
        runner = self._runners.get(action.instance)
        match action:
            case plan.Start(instance=name):
                if runner is None and name in self._instances:
                    await self._start(name)
            case plan.NoteDrain(instance=name) if runner is not None:
                await runner.note_drain(now)
            case plan.Stop(instance=name, reason=reason) if runner is not None:
                runner.request_stop(reason, publish=True, cause=self._drain_cause(name), save_cache=True)
            case plan.Abandon(instance=name, reason=reason) if runner is not None:
                runner.request_stop(reason, publish=False, cause="deleted")
            case plan.NoteDrain() | plan.Stop() | plan.Abandon():
                log.debug(
                    "%s: its runner ended before the action came", action, extra={"event": "agent_action_skipped"}
                )
            case plan.MarkLost(instance=name):
                await self._mark(
                    name,
                    resources.Phase.FAILED,
                    "no llama-server runs for it on this node any more (its agent restarted)",
                )
            case plan.MarkStopped(instance=name, reason=reason):
                await self._mark(name, resources.Phase.STOPPED, reason)

    def _drain_cause(self, name: str) -> str:
        """The short reason of a drain (idle, capacity, profile_changed, ...) for instance_terminate."""
        instance = self._instances.get(name)
        drain_reason = instance.spec.drain_reason if instance is not None else None
        return (drain_reason or "manual").split(":", 1)[0].strip() or "manual"

    async def _start(self, name: str) -> None:
        instance = self._instances[name]
        try:
            profile = await self._profile_of(instance)
        except store_api.StoreError as error:
            log.info(
                "instance %s: its model %r is not cached and the store could not be asked (%s); trying again",
                name,
                instance.spec.model,
                error,
                extra={"event": "instance_start_deferred", "instance_id": name},
            )
            return
        if name not in self._instances or name in self._runners:
            return  # while the store was asked, the instance went away or another pass started it
        if profile is None:
            await self._mark(
                name,
                resources.Phase.FAILED,
                f"the cookbook has no profile {instance.spec.profile!r} of model {instance.spec.model!r}",
            )
            return
        runner = instance_runner.InstanceRunner(
            instance=instance,
            profile=profile,
            resource_store=self._store,
            binary_path=self._binary.binary_path,
            model_dir=self._config_dir,
            llama_cpp_version=self._binary.status.llama_cpp_version,
            port_allocator=self._ports,
            log_dir=self._state_dir / "logs",
            models_cache_dir=self._models_cache_dir,
            on_params=self._learn_params,
            settings=self._timings.runner,
            env=self._child_env,
            slot_cache=self._slot_cache,
            on_kv_cache=self._count_kv_cache,
        )
        log.info(
            "instance %s (%s): starting on %s",
            name,
            runner.display_name,
            self.node_name,
            extra={"event": "instance_start", "instance_id": name, "model": instance.spec.model},
        )
        self._runners[name] = runner
        task = asyncio.create_task(self._run_runner(runner), name=f"instance-{name}")
        self._runner_tasks[name] = task
        self._publish_soon.set()

    async def _profile_of(self, instance: resources.LlamaInstance) -> cookbook.Profile | None:
        """The instance's profile: from the model cache, or, when the cache lacks it, from a live read.

        The caches are filled by separate watches: after a watch breaks (an API server restart), the
        instance watch may list a new instance before the model watch lists its new model. Failing the
        instance on the cache alone would fail a model that exists; so the store decides. A store that
        cannot answer raises, and the pass is retried (the instance is not failed)."""
        model = self._models.get(instance.spec.model)
        profile = model.spec.profile(instance.spec.profile) if model is not None else None
        if profile is not None:
            return profile
        live = await self._store.get(resources.LlamaModel, instance.spec.model)
        return live.spec.profile(instance.spec.profile) if live is not None else None

    async def _run_runner(self, runner: instance_runner.InstanceRunner) -> None:
        try:
            await runner.run()
        except Exception:
            log.exception("instance %s: its runner failed", runner.name, extra={"event": "instance_runner_failed"})
        finally:
            if runner.uid is not None:
                self._finished_uids.add(runner.uid)
            if self._runners.get(runner.name) is runner:
                del self._runners[runner.name]
                self._runner_tasks.pop(runner.name, None)
            self._publish_soon.set()
            self._sample_soon.set()  # so the node's memory in use drops with it
            self._wake.set()

    async def _mark(self, name: str, phase: resources.Phase, message: str) -> None:
        """A final phase for an instance no process of ours serves (only if it is not final already)."""
        log.info(
            "instance %s: %s (%s)",
            name,
            phase.value,
            message,
            extra={"event": "instance_marked", "instance_id": name, "phase": phase.value},
        )
        uid = self._instances[name].metadata.uid if name in self._instances else None

        def mark(obj: resources.LlamaInstance) -> None:
            if not obj.status.phase.is_terminal:
                obj.status.phase, obj.status.message = phase, message
                obj.status.pid = None
                obj.status.stopped_at = store_api.utcnow()

        await writes.update_status(self._store, resources.LlamaInstance, name, mark, uid=uid)
        if uid is not None:
            self._finished_uids.add(uid)

    async def _stop_everything(self) -> None:
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        reason = "the node is shutting down" if self._shutting_down else "the node agent stopped"
        cause = "shutdown" if self._shutting_down else "agent_stopped"
        self._shutting_down = True  # from here on the node is draining, and it says so first
        with contextlib.suppress(Exception):
            await self._publish_node()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background = []
        for runner in list(self._runners.values()):
            runner.request_stop(reason, publish=True, cause=cause)
        await asyncio.gather(*self._runner_tasks.values(), return_exceptions=True)
        await self._rebuilds.close()
        await self._updates.close()
        with contextlib.suppress(Exception):
            await self._publish_node()
        with contextlib.suppress(OSError):
            await self._save_learned()
        if self._sampler is not None:
            await asyncio.to_thread(self._sampler.close)
        self._stopped.set()

    # --- watches ----------------------------------------------------------------------------------

    @property
    def _instances(self) -> dict[str, resources.LlamaInstance]:
        return self._instance_informer.cache

    @property
    def _models(self) -> dict[str, resources.LlamaModel]:
        return self._model_informer.cache

    def _wake_on_change(self, _change: object) -> None:
        self._wake.set()

    def _node_event(self, event: store_api.Event[resources.LlamaNode]) -> None:
        if event.object.name != self.node_name:
            return
        if event.type == "DELETED":
            self._node = None
            self._publish_soon.set()  # it is this agent's to publish: create it again
        else:
            self._node = event.object
            self._wake.set()  # a rebuild request is looked at in the next pass

    def _nodes_listed(self, nodes: list[resources.LlamaNode]) -> None:
        self._node = next((node for node in nodes if node.name == self.node_name), None)
        if self._node is None:
            self._publish_soon.set()
        self._wake.set()

    # --- the node's status ------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            await _wait(self._publish_soon, self._timings.heartbeat_interval_s)
            self._publish_soon.clear()
            self._heartbeat_tried_at = time.monotonic()
            try:
                await self._publish_node()
                self._heartbeat_ok_at = time.monotonic()
            except Exception:
                log.exception(
                    "publishing LlamaNode %s failed; retrying", self.node_name, extra={"event": "node_publish_failed"}
                )

    def health(self) -> Health:
        """For probes. Alive: its heartbeat loop still turns (a wedged loop is restarted). Ready: it published
        its node recently, the llama-server binary is there and it is not shutting down."""
        now, interval = time.monotonic(), self._timings.heartbeat_interval_s
        tried = self._heartbeat_tried_at
        alive = tried is None or now - tried < 3 * interval + 30  # None: still starting
        fresh = self._heartbeat_ok_at is not None and now - self._heartbeat_ok_at < 3 * interval + 5
        ready = fresh and self._binary_present and not self._shutting_down
        if not alive:
            return Health(False, False, f"heartbeat loop stuck for {now - (tried or now):.0f} s")
        if not ready:
            why = "shutting down" if self._shutting_down else "no recent LlamaNode write or no llama-server binary"
            return Health(True, False, why)
        return Health(True, True, "ok")

    async def _publish_node(self) -> None:
        settings, build = self._config, self._binary.status
        present = self._binary_present = await asyncio.to_thread(live_binary.is_present, self._binary)
        report = node_status.NodeReport(
            max_vram_mb=settings.max_vram_mb,
            max_sysmem_mb=settings.max_sysmem_mb,
            max_instances=settings.max_instances_per_node,
            address=self._address,
            ready=present and not self._shutting_down,
            draining=self._shutting_down,
            binary_path=str(self._binary.binary_path) if present else None,
            llama_cpp_version=build.llama_cpp_version,
            is_building=self._rebuilds.is_building,
            last_build_error=build.last_build_error or self._rebuilds.error,
            last_build_at=build.last_build_at,
            usage=self._usage,
            active_instances=len(self._runners),
            rebuilds_handled=self._rebuilds.handled,
            learned=self._learned.published(build.llama_cpp_version),
            heartbeat_at=store_api.utcnow(),
            wedged_instances_killed=self.wedged_instances_killed,
            kv_cache_saves=self.kv_cache_saves,
            kv_cache_restores=self.kv_cache_restores,
            kv_cache_restore_failures=self.kv_cache_restore_failures,
            last_rollback=self._updates.last_rollback,
            last_rollback_at=self._updates.last_rollback_at,
        )
        await node_status.publish(self._store, self.node_name, report)

    # --- memory and learned data ------------------------------------------------------------------

    def _count_kv_cache(self, *, saved: int = 0, restored: int = 0, failed: int = 0) -> None:
        self.kv_cache_saves += saved
        self.kv_cache_restores += restored
        self.kv_cache_restore_failures += failed
        self._publish_soon.set()

    def _learn_params(self, runner: instance_runner.InstanceRunner, params: dict[str, Any]) -> None:
        version = self._binary.status.llama_cpp_version
        if self._learned.learn_params(
            runner.args_hash, display_name=runner.display_name, params=params, llama_cpp_version=version
        ):
            self._learned_dirty = True
        self._sample_soon.set()  # a first memory sample right away, and a save with it

    async def _sample_loop(self) -> None:
        while True:
            await _wait(self._sample_soon, self._timings.sample_interval_s)
            self._sample_soon.clear()
            try:
                await self._sample_once()
            except Exception:
                log.exception("memory sampling failed; trying again later", extra={"event": "memory_sample_failed"})

    async def _sample_once(self) -> None:
        sampler = self._sampler
        if sampler is None:
            return
        running = {runner.name: (runner, pid) for runner in self._runners.values() if (pid := runner.pid)}
        sample = await asyncio.to_thread(sampler.sample, [pid for _, pid in running.values()])
        self._usage = sample
        for runner, pid in running.values():
            if pid not in sample.sysmem_mb:
                continue  # it exited between listing and sampling
            sysmem, vram = sample.sysmem_mb[pid], sample.vram_mb(pid)
            await runner.observe_memory(sysmem_mb=sysmem, vram_mb=vram)
            # only a start that became ready teaches its args' memory (a failed cold start's partial sample
            # would pass for a learned peak and end its cold-start OOM recovery)
            if runner.stage is plan.Stage.READY and self._learned.learn_peaks(
                runner.args_hash, display_name=runner.display_name, sysmem_mb=sysmem, vram_mb=vram
            ):
                self._learned_dirty = True
        if self._learned_dirty:
            self._learned_dirty = False
            await self._save_learned()
        self._publish_soon.set()

    # --- the wedge watchdog ------------------------------------------------------------------------

    async def _wedge_loop(self, judge: wedge.Judge) -> None:
        interval_s = self._config.wedge_detector.sample_interval_ms / 1000
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._wedge_sweep(judge)
            except Exception:
                log.exception("the wedge watchdog's sweep failed; trying again", extra={"event": "wedge_sweep_failed"})

    async def _wedge_sweep(self, judge: wedge.Judge) -> None:
        sampler = self._sampler
        if sampler is None:
            return
        serving = {
            name: pid
            for name, runner in self._runners.items()
            if runner.stage is plan.Stage.READY and (pid := runner.pid) is not None
        }
        activity = await asyncio.to_thread(sampler.sample_activity, serving.values())
        samples = [
            wedge.Sample(instance=name, pid=pid, cpu_s=activity.cpu_s.get(pid), holding_slot=self._holds_slot(name))
            for name, pid in serving.items()
        ]
        for verdict in judge.observe(now=time.monotonic(), samples=samples, gpu=activity.gpu):
            runner = self._runners.get(verdict.instance)
            if runner is not None and runner.stage is plan.Stage.READY and runner.pid == verdict.pid:
                self._kill_wedged(runner, verdict)

    def _holds_slot(self, name: str) -> bool:
        """Whether some gateway reports a request of the instance in flight (they publish about once a second)."""
        instance = self._instances.get(name)
        return instance is not None and instance.status.in_flight > 0

    def _kill_wedged(self, runner: instance_runner.InstanceRunner, verdict: wedge.Wedged) -> None:
        gpu = "no GPU reading" if verdict.gpu_sm_util is None else f"GPU {verdict.gpu_sm_util}%"
        reason = (
            f"wedged: held a slot for {verdict.flat_for_s:.1f} s using {verdict.cpu_used_s:.2f} s of CPU "
            f"({gpu}); killed pid {verdict.pid}"
        )
        instance = self._instances.get(runner.name)
        log.warning(
            "instance %s (%s): %s",
            runner.name,
            runner.display_name,
            reason,
            extra={
                "event": "instance_wedged",
                "instance_id": runner.name,
                "model": instance.spec.model if instance is not None else None,
                "pid": verdict.pid,
                "flat_for_s": round(verdict.flat_for_s, 3),
                "cpu_used_s": round(verdict.cpu_used_s, 3),
                "gpu_sm_util": verdict.gpu_sm_util,
            },
        )
        self.wedged_instances_killed += 1
        # The stop first, so the supervisor takes the exit for a stop (instance_terminate reason "wedged"),
        # not a crash; then SIGKILL at once, as an operator killing the PID would: a wedged process may
        # not honour SIGTERM, and nothing it holds is worth a grace period.
        runner.request_stop(reason, publish=True, cause="wedged")
        with contextlib.suppress(ProcessLookupError):
            os.kill(verdict.pid, signal.SIGKILL)
        self._publish_soon.set()

    async def _save_learned(self) -> None:
        async with self._save_lock:
            document = self._learned.document(llama_cpp_version=self._binary.status.llama_cpp_version)
            await asyncio.to_thread(learned.write_atomic, self._learned.path, document)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Until `event` is set or `seconds` pass.

    Not `asyncio.wait_for`: before Python 3.12 it can swallow a cancellation that arrives as the event is
    set, and a loop built on it then never ends (python/cpython#86296).
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()

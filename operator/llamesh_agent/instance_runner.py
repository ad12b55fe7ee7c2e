"""One LlamaInstance on this node, from SCHEDULED to its final phase, with its status written as it goes.

    SCHEDULED ─► [DOWNLOADING] ─► STARTING ─► READY ─► [DRAINING] ─► STOPPED
                                      └───────────┴──────────────────► FAILED

A Hugging Face source is downloaded first (phase DOWNLOADING, progress in `status.message`) and llama-server
gets `-m <file>`; the download and the start share the profile's startup budget. Each spawn attempt writes
STARTING with its port, pid and attempt number. READY is written the moment `/health` answers 200, with the
parameters the startup log gave so far; `/props` and `/v1/models` are asked right after and the merged
parameters written in a second update, so a waiting request is not held up by them. A crash of a ready
process, or a start that failed every attempt, ends in FAILED with the exit code and the log's last lines.

A stop is asked for with `request_stop`; `run` then ends with STOPPED (or writes nothing when the instance
was deleted or moved). Deciding when to stop is the agent's `plan`; keeping processes alive is the
supervisor's.

The seed's lifecycle lines are logged here, where model, profile and port are all known: `instance_spawn`
for each spawn attempt (with the reason the instance was created for), `instance_ready`, and one
`instance_terminate` at the end (reason: the drain's reason, deleted, shutdown or error; the memory the
process last held as freed_sysmem_mb and freed_vram_mb).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from llamesh_agent import downloads, introspect, kv_cache, launch, plan, ports, supervisor
from llamesh_api import cookbook, launch_args, resources, store, writes

log = logging.getLogger(__name__)


class ParamsListener(Protocol):
    def __call__(self, runner: InstanceRunner, params: dict[str, Any], /) -> None: ...


class KvCacheListener(Protocol):
    """Counts slot caches saved, restored, and not restored (refused, empty, or of another build)."""

    def __call__(self, *, saved: int = 0, restored: int = 0, failed: int = 0) -> None: ...


SLOT_SAVE_FLAGS = ("--slot-save-path",)
# drains whose caches are worth nothing to a later instance: its args hash (or llama.cpp build) is gone
_NO_SAVE_CAUSES = frozenset({"profile_changed", "profile_removed", "llama_cpp_updated"})


@dataclasses.dataclass(frozen=True)
class RunnerSettings:
    process: supervisor.Settings = dataclasses.field(default_factory=supervisor.Settings)  # startup budget: profile's
    download_progress_interval_s: float = 2.0
    introspect_timeout_s: float = 2.0


class InstanceRunner:
    """Runs one instance; `run()` is its whole life."""

    def __init__(
        self,
        *,
        instance: resources.LlamaInstance,
        profile: cookbook.Profile,
        resource_store: store.Store,
        binary_path: Path,
        model_dir: Path,
        llama_cpp_version: str | None,
        port_allocator: ports.PortAllocator,
        log_dir: Path,
        models_cache_dir: Path,
        on_params: ParamsListener,
        settings: RunnerSettings | None = None,
        env: Mapping[str, str] | None = None,
        slot_cache: kv_cache.SlotCache | None = None,
        on_kv_cache: KvCacheListener | None = None,
    ) -> None:
        self.name = instance.name
        self.uid = instance.metadata.uid
        self.display_name = cookbook.display_name(instance.spec.model, instance.spec.profile)
        self.args_hash = profile.args_hash()
        self.stage = plan.Stage.STARTING
        self.drain_noted_at: float | None = None
        self.peak_sysmem_mb = 0
        self.peak_vram_mb = 0
        self._model, self._profile_id = instance.spec.model, instance.spec.profile
        self._created_for = instance.spec.reason.value
        self._sysmem_mb: int | None = None  # the last sample: what stopping the process frees
        self._vram_mb: int | None = None
        self._profile = profile
        self._store = resource_store
        self._binary = binary_path
        self._model_dir = model_dir  # relative model paths are taken from here (the config's folder)
        self._version = llama_cpp_version
        self._ports = port_allocator
        self._log_path = log_dir / f"{instance.name}.log"
        self._models_cache_dir = models_cache_dir
        self._on_params = on_params
        self._settings = settings or RunnerSettings()
        self._env = env
        self._supervisor: supervisor.Supervisor | None = None
        self._download: asyncio.Task[Path] | None = None
        self._progress_write: asyncio.Task[Any] | None = None
        self._stopper: asyncio.Task[supervisor.State] | None = None
        self._stop_reason: str | None = None
        self._stop_cause = "stopped"  # the instance_terminate reason
        self._publish_stop = True
        self._sampled = False
        self._slot_cache = slot_cache  # None, or until the profile manages --slot-save-path itself
        self._on_kv_cache = on_kv_cache

    @property
    def pid(self) -> int | None:
        return self._supervisor.pid if self._supervisor is not None else None

    @property
    def view(self) -> plan.RunnerView:
        return plan.RunnerView(uid=self.uid, stage=self.stage, drain_noted_at=self.drain_noted_at)

    @property
    def log_path(self) -> Path:
        return self._log_path

    # --- commands from the agent --------------------------------------------------------------------

    def request_stop(
        self, reason: str, *, publish: bool = True, cause: str = "manual", save_cache: bool = False
    ) -> None:
        """Stop the instance (SIGTERM, then SIGKILL); `publish=False` when its status is not ours to write.

        `reason` is the sentence for status and logs; `cause` the short word instance_terminate carries;
        `save_cache`: save its slots' KV caches first (a drain; not for a removed or changed profile)."""
        if self._stop_reason is not None:
            return
        log.info("instance %s: stopping: %s", self.name, reason, extra=self._fields("instance_stopping", reason=cause))
        self._stop_reason, self._publish_stop, self._stop_cause = reason, publish, cause
        self.stage = plan.Stage.STOPPING
        if self._download is not None:
            self._download.cancel()
        if self._supervisor is not None:
            save = save_cache and cause not in _NO_SAVE_CAUSES
            self._stopper = asyncio.create_task(self._stop(self._supervisor, save=save), name=f"stop-{self.name}")

    async def _stop(self, sup: supervisor.Supervisor, *, save: bool) -> supervisor.State:
        """Stop the process; first save its slots' KV caches when asked and it is serving."""
        if save and self._slot_cache is not None and sup.state is supervisor.State.READY:
            try:
                saved = await self._slot_cache.save(
                    f"http://{sup.host}:{sup.port}", args_hash=self.args_hash, instance=self.name
                )
            except Exception:  # a cache is never worth failing a stop for
                log.exception("instance %s: saving KV caches failed", self.name, extra=self._fields("kv_cache_failed"))
            else:
                if saved and self._on_kv_cache is not None:
                    self._on_kv_cache(saved=saved)
        return await sup.stop()

    async def note_drain(self, now: float) -> None:
        """The instance is to drain: remember when that was first seen and report DRAINING."""
        self.drain_noted_at = now

        def draining(obj: resources.LlamaInstance) -> None:
            if obj.status.phase is resources.Phase.READY:
                obj.status.phase = resources.Phase.DRAINING
                obj.status.message = f"draining ({obj.spec.drain_reason or 'asked to drain'})"

        await self._write(draining)

    async def observe_memory(self, *, sysmem_mb: int, vram_mb: int) -> bool:
        """Take a memory sample; write the instance's peaks when one grew (peaks never shrink)."""
        grew = not self._sampled or sysmem_mb > self.peak_sysmem_mb or vram_mb > self.peak_vram_mb
        self._sampled = True
        self._sysmem_mb, self._vram_mb = sysmem_mb, vram_mb
        self.peak_sysmem_mb = max(self.peak_sysmem_mb, sysmem_mb)
        self.peak_vram_mb = max(self.peak_vram_mb, vram_mb)
        if grew:
            sysmem, vram = self.peak_sysmem_mb, self.peak_vram_mb

            def peaks(obj: resources.LlamaInstance) -> None:
                obj.status.peak_sysmem_mb, obj.status.peak_vram_mb = sysmem, vram

            await self._write(peaks)
        return grew

    # --- the life of the instance -------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            for task in (self._download, self._progress_write):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            sup = self._supervisor
            if sup is not None and not sup.state.is_terminal:
                await sup.stop()  # cancelled or broken: never leave a child behind
            if self._stopper is not None:
                await asyncio.gather(self._stopper, return_exceptions=True)

    async def _run(self) -> None:
        if not await asyncio.to_thread(_is_executable, self._binary):
            await self._finish_failed(
                f"no llama-server binary at {self._binary}; the node's llama.cpp build has not finished or failed"
            )
            return
        args = launch.with_resolved_model_path(self._profile.effective_args(), base_dir=self._model_dir)
        budget = float(self._profile.startup_timeout())
        source = launch.hf_source(args)
        if source is not None:
            started = time.monotonic()
            model_path = await self._fetch(source, timeout_s=budget)
            if model_path is None:
                return
            args = launch.with_local_model(args, model_path)
            budget = max(budget - (time.monotonic() - started), 1.0)
        if self._stop_reason is not None:
            await self._finish_stopped()
            return
        args = await self._with_slot_save_path(args)
        try:
            sup = supervisor.Supervisor(
                binary=self._binary,
                args=args,
                log_path=self._log_path,
                port_allocator=self._ports,
                settings=dataclasses.replace(self._settings.process, startup_timeout_s=budget),
                env=self._env,
                on_spawn=self._on_spawn,
            )
        except launch.LaunchError as exc:
            await self._finish_failed(f"cannot build the llama-server command line: {exc}")
            return
        self._supervisor = sup
        state = await sup.start()
        if state is supervisor.State.READY:
            await self._on_ready(sup)
            state = await sup.wait()
        await self._finish(sup, state)

    async def _with_slot_save_path(self, args: list[str]) -> list[str]:
        """`args` with this args hash's saved-cache folder, when caches are kept (and the profile sets none)."""
        cache = self._slot_cache
        if cache is None:
            return args
        if launch_args.has_flag(args, SLOT_SAVE_FLAGS):
            self._slot_cache = None  # the profile keeps its own caches; the agent leaves them alone
            return args
        try:
            stale = await asyncio.to_thread(cache.prepare, self.args_hash, llama_cpp_version=self._version)
        except OSError as exc:
            log.warning(
                "instance %s: no KV cache folder (%s); running without saved caches",
                self.name,
                exc,
                extra=self._fields("kv_cache_failed"),
            )
            self._slot_cache = None
            return args
        if stale and self._on_kv_cache is not None:
            self._on_kv_cache(failed=stale)
        return [*args, "--slot-save-path", str(cache.directory(self.args_hash))]

    async def _restore_slots(self, sup: supervisor.Supervisor) -> kv_cache.Restored:
        if self._slot_cache is None:
            return kv_cache.Restored()
        try:
            restored = await self._slot_cache.restore(
                f"http://{sup.host}:{sup.port}", args_hash=self.args_hash, instance=self.name
            )
        except Exception:  # a cache is never worth failing a start for
            log.exception("instance %s: restoring KV caches failed", self.name, extra=self._fields("kv_cache_failed"))
            return kv_cache.Restored()
        if (restored.slots or restored.failed) and self._on_kv_cache is not None:
            self._on_kv_cache(restored=restored.slots, failed=restored.failed)
        return restored

    async def _fetch(self, source: launch.HfSource, *, timeout_s: float) -> Path | None:
        """The downloaded model file, or None when the download failed or a stop came (status written)."""
        what = f"{source.repo}/{source.filename}" if source.filename else source.repo

        def downloading(obj: resources.LlamaInstance) -> None:
            obj.status.phase = resources.Phase.DOWNLOADING
            obj.status.message = f"downloading {what} from Hugging Face"
            obj.status.started_at = obj.status.started_at or store.utcnow()
            obj.status.llama_cpp_version = self._version

        await self._write(downloading)
        self._download = asyncio.create_task(
            downloads.fetch(
                source.repo,
                source.filename,
                cache_dir=self._models_cache_dir,
                timeout_s=timeout_s,
                on_progress=self._on_progress,
                progress_interval_s=self._settings.download_progress_interval_s,
            ),
            name=f"download-{self.name}",
        )
        await asyncio.wait({self._download})
        if self._download.cancelled():
            await self._finish_stopped()
            return None
        error = self._download.exception()
        if isinstance(error, downloads.DownloadError):
            await self._finish_failed(str(error))
            return None
        if error is not None:
            raise error
        path = self._download.result()
        log.info("instance %s: model file %s", self.name, path, extra=self._fields("model_file_ready", path=str(path)))
        return path

    def _on_progress(self, progress: downloads.Progress) -> None:
        if self._progress_write is not None and not self._progress_write.done():
            return  # the previous report is still being written; this one would only race it
        message = f"downloading {progress.filename or 'the model'}: {progress.describe()}"
        log.info(
            "instance %s: %s",
            self.name,
            message,
            extra=self._fields(
                "model_download_progress",
                file=progress.filename,
                downloaded_bytes=progress.downloaded_bytes,
                total_bytes=progress.total_bytes,
            ),
        )

        def report(obj: resources.LlamaInstance) -> None:
            if obj.status.phase is resources.Phase.DOWNLOADING:
                obj.status.message = message

        self._progress_write = asyncio.create_task(self._write(report))

    async def _on_spawn(self, attempt: supervisor.Attempt) -> None:
        limit = self._settings.process.max_attempts
        log.info(
            "instance %s: llama-server spawned on %s:%s (pid %d, attempt %d of %d)",
            self.name,
            attempt.host,
            attempt.port,
            attempt.pid,
            attempt.number,
            limit,
            extra=self._fields(
                "instance_spawn",
                reason=self._created_for,
                host=attempt.host,
                port=attempt.port,
                pid=attempt.pid,
                attempt=attempt.number,
            ),
        )

        def starting(obj: resources.LlamaInstance) -> None:
            status = obj.status
            status.phase = resources.Phase.STARTING
            status.message = f"starting llama-server (attempt {attempt.number} of {limit})"
            status.host, status.port, status.pid = attempt.host, attempt.port, attempt.pid
            status.spawn_attempts = attempt.number
            status.started_at = status.started_at or store.utcnow()
            status.llama_cpp_version = self._version

        await self._write(starting)

    async def _on_ready(self, sup: supervisor.Supervisor) -> None:
        if self._stop_reason is not None:
            return  # a stop came as it turned ready: never advertise a process that is being stopped
        restored = await self._restore_slots(sup)  # before READY: no request may take a slot being restored
        if self._stop_reason is not None:
            return
        early = sup.startup_params

        def ready(obj: resources.LlamaInstance) -> None:
            status = obj.status
            status.phase = resources.Phase.READY
            status.message = ""
            status.host, status.port, status.pid = sup.host, sup.port, sup.pid
            status.ready_at = store.utcnow()
            status.spawn_attempts = sup.attempts
            if early:
                status.parsed_model_params = dict(early)
                status.n_slots = early.get("n_slots")
            status.kv_cache_restored = restored.slots
            status.kv_cache_restored_from = restored.source

        await self._write(ready)
        if self.stage is plan.Stage.STARTING:
            self.stage = plan.Stage.READY  # only now: a drain note must not race the READY write
        async with aiohttp.ClientSession() as session:
            report = await introspect.ask(
                session, f"http://{sup.host}:{sup.port}", timeout_s=self._settings.introspect_timeout_s
            )
        params = introspect.merge(sup.startup_params, report.params)
        version = self._version or report.build_info
        if params:

            def parsed(obj: resources.LlamaInstance) -> None:
                obj.status.parsed_model_params = dict(params)
                obj.status.n_slots = params.get("n_slots")
                obj.status.llama_cpp_version = version

            await self._write(parsed)
            self._on_params(self, params)
        log.info(
            "instance %s: ready on %s:%s",
            self.name,
            sup.host,
            sup.port,
            extra=self._fields("instance_ready", host=sup.host, port=sup.port, pid=sup.pid, parsed_model_params=params),
        )

    async def _finish(self, sup: supervisor.Supervisor, state: supervisor.State) -> None:
        if state is supervisor.State.STOPPED:
            await self._finish_stopped()
        elif state is supervisor.State.EXITED:
            await self._finish_failed(sup.failure or "llama-server exited")
        else:
            lines = "\n".join(sup.tail(self._settings.process.message_lines))
            await self._finish_failed(
                f"llama-server failed to start after {sup.attempts} attempt(s): {sup.failure}; "
                f"last lines of {self._log_path}:\n{lines}"
            )

    async def _finish_stopped(self) -> None:
        reason = self._stop_reason or "stopped"
        self._log_terminate(logging.INFO, reason, cause=self._stop_cause)
        if not self._publish_stop:
            return

        def stopped(obj: resources.LlamaInstance) -> None:
            obj.status.phase = resources.Phase.STOPPED
            obj.status.message = reason
            obj.status.pid = None
            obj.status.stopped_at = store.utcnow()

        await self._write(stopped)

    async def _finish_failed(self, message: str) -> None:
        self._log_terminate(logging.WARNING, message, cause="error")
        if not self._publish_stop:
            return

        def failed(obj: resources.LlamaInstance) -> None:
            obj.status.phase = resources.Phase.FAILED
            obj.status.message = message
            obj.status.pid = None
            obj.status.stopped_at = store.utcnow()

        await self._write(failed)

    def _log_terminate(self, level: int, message: str, *, cause: str) -> None:
        sup = self._supervisor
        log.log(
            level,
            "instance %s %s: %s",
            self.name,
            "failed" if cause == "error" else "stopped",
            message,
            extra=self._fields(
                "instance_terminate",
                reason=cause,
                exit_code=sup.exit_code if sup is not None else None,
                freed_sysmem_mb=self._sysmem_mb,
                freed_vram_mb=self._vram_mb,
            ),
        )

    def _fields(self, event: str, **fields: object) -> dict[str, object]:
        """A log record's `extra`: the event and the instance it is about."""
        return {"event": event, "instance_id": self.name, "model": self._model, "profile": self._profile_id, **fields}

    async def _write(self, mutate: Callable[[resources.LlamaInstance], None]) -> None:
        await writes.update_status(self._store, resources.LlamaInstance, self.name, mutate, uid=self.uid)


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)

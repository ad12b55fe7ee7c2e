"""`llamesh operator`: the Kubernetes operator — kopf handlers for LlamaModel, the reconcile loop, one leader.

Thin on purpose; every decision stays in `planning` (through `controller.Controller`, the same loop as
`llamesh serve`, here on a `KubeStore`). What kopf adds:

- **Accepted**: a LlamaModel whose spec the API server admitted but the cookbook's rules refuse (two model
  sources, a `:` in a profile id) gets `Accepted=False` with the reason and `observedGeneration`, and a
  warning Event — never a crash loop; the store leaves it out of every role's view until it is fixed. A
  valid model's conditions (`Accepted`, `Ready`) are the reconcile loop's.
- **A finalizer** (`llamesh.dev/instances`): deleting a LlamaModel waits until its instances are gone. The
  planner treats a model being deleted as absent, so its instances drain and are deleted; the delete
  handler only checks and retries until none is left.
- **One leader**: the process first takes the `llamesh-operator` Lease (`leader`); only then kopf and the
  reconcile loop start. Losing the Lease ends the process (exit status 1), as client-go operators do.

kopf keeps its own bookkeeping in annotations (`kopf.llamesh.dev/...`), not in `status`: the CRD's schema
would prune it, and `status` has one writer, the operator's reconcile loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

import kopf
import pydantic

from llamesh_api import config, kube_client, kube_events, kube_store, resources, store
from llamesh_operator import controller, health, leader, serve

log = logging.getLogger(__name__)

FINALIZER = "llamesh.dev/instances"
MODELS = (resources.GROUP, resources.VERSION, resources.LlamaModel.plural)


def registry_for(resource_store: kube_store.KubeStore) -> kopf.OperatorRegistry:
    """The handlers, on a registry of their own (nothing registers at import time)."""
    registry = kopf.OperatorRegistry()
    connection = resource_store.client.connection

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=connection.server,
            ca_path=connection.ca_path,
            insecure=connection.insecure,
            token=connection.headers().get("Authorization", "").removeprefix("Bearer ") or None,
            certificate_path=connection.cert_path,
            private_key_path=connection.key_path,
            default_namespace=connection.namespace,
        )

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.llamesh.dev")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.llamesh.dev")
        # watches go silent without these (kopf #698, #204): the server ends each, kopf opens the next
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.posting.level = logging.WARNING  # Events for warnings and errors, not for every handler log

    @kopf.on.resume(*MODELS, registry=registry)
    @kopf.on.create(*MODELS, registry=registry)
    @kopf.on.update(*MODELS, field="spec", registry=registry)
    def accept(body: kopf.Body, meta: kopf.Meta, patch: kopf.Patch, **_: Any) -> None:
        problem = spec_problem(dict(body))
        if problem is None:
            return  # valid: the reconcile loop says Accepted=True with the rest of the status
        patch.status["observedGeneration"] = meta.get("generation")
        patch.status["conditions"] = [
            {
                "type": "Accepted",
                "status": "False",
                "reason": "InvalidSpec",
                "message": problem,
                "lastTransitionTime": store.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
            {"type": "Ready", "status": "False", "reason": "NotAccepted", "message": "the spec is invalid"},
        ]
        kopf.warn(body, reason="InvalidSpec", message=problem)

    @kopf.on.delete(*MODELS, registry=registry)
    async def release_instances(name: str | None, **_: Any) -> None:
        remaining = [
            instance.name
            for instance in (await resource_store.list(resources.LlamaInstance)).items
            if instance.spec.model == name
        ]
        if remaining:
            raise kopf.TemporaryError(f"waiting for {len(remaining)} instance(s) to stop: {remaining}", delay=1)

    return registry


def spec_problem(body: dict[str, Any]) -> str | None:
    """Why the cookbook's rules refuse this LlamaModel, or None if they accept it."""
    try:
        store.from_wire(resources.LlamaModel, body)
    except pydantic.ValidationError as exc:
        return "; ".join(
            f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', '')}" for error in exc.errors()
        )
    return None


async def operator(
    node_config: config.NodeConfig,
    *,
    kubeconfig: str | None,
    namespace: str | None,
    lease_s: float = 15.0,
    health_port: int | None = None,
) -> None:
    try:
        connection = kube_client.load(kubeconfig=kubeconfig, namespace=namespace)
    except kube_client.KubeConfigError as exc:
        raise serve.ServeError(str(exc)) from exc
    resource_store = kube_store.KubeStore(kube_client.Client(connection))
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    election = leader.LeaderElection(
        resource_store.client, namespace=connection.namespace, identity=identity, lease_s=lease_s,
        renew_s=max(lease_s / 3, 0.5),
    )  # fmt: skip
    signals = serve.Signals()
    stopping = asyncio.ensure_future(signals.first())
    leading: set[asyncio.Task[None]] = set()  # the leader's tasks; a follower is alive and ready as it is

    def check() -> health.Verdict:
        stopped = [task.get_name() for task in leading if task.done()]
        if stopped:
            return health.Verdict(False, False, f"stopped: {', '.join(stopped)}")
        return health.Verdict(True, True, "leader" if leading else "follower, waiting for the Lease")

    probes = await health.serve(check, host="0.0.0.0", port=health_port) if health_port else None
    try:
        acquiring = asyncio.ensure_future(election.acquire())
        await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not acquiring.done():
            acquiring.cancel()
            return
        acquiring.result()
        print(f"llamesh operator: {identity} is the leader", flush=True)
        loop = controller.Controller(
            resource_store=resource_store,
            defaults=lambda: node_config.model_defaults,
            record=kube_events.Recorder(resource_store.client, component="llamesh-operator", instance=identity),
        )
        stop_flag = asyncio.Event()
        tasks = {
            asyncio.create_task(election.keep(), name="lease"),
            asyncio.create_task(loop.run(), name="reconcile"),
            asyncio.create_task(
                kopf.operator(
                    registry=registry_for(resource_store),
                    standalone=True,  # the Lease decides who acts
                    namespaces=[connection.namespace],
                    stop_flag=stop_flag,
                ),
                name="kopf",
            ),
        }
        leading.update(tasks)
        try:
            done, _ = await asyncio.wait({*tasks, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in done & tasks:
                if task.exception() is not None:
                    raise serve.ServeError(f"operator stopped: {task.exception()}")
        finally:
            stop_flag.set()
            for task in tasks:
                if task.get_name() != "kopf":
                    task.cancel()
            kopf_task = next(task for task in tasks if task.get_name() == "kopf")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await asyncio.gather(kopf_task, return_exceptions=True)
            kopf_task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await election.release()
    finally:
        stopping.cancel()
        signals.close()
        if probes is not None:
            await probes.cleanup()
        await resource_store.close()
        log.info("llamesh operator stopped", extra={"event": "stopped"})

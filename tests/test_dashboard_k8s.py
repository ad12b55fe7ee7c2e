"""The dashboard through the Kubernetes gateway: `llamesh operator`, `agent` and `gateway` as child processes on a
real kube-apiserver (the rig of tests/test_k8s_lifecycle.py), the real llama-server on a tiny model.

Covers: /ui and /ui/state served by `llamesh gateway` (the same app as `llamesh serve`), showing the agent's
node and the instance a request started; the drain button's `POST /admin/drain` written through the
KubeStore (a merge patch of `spec.drain`), after which the agent stops llama-server and the operator removes
the instance. The chart grants the gateway that patch (tests/test_chart.py checks the RBAC).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from llamesh_api import resources
from rig import apiserver, waiting
from test_k8s_lifecycle import agent_llama_servers, chat_once, cluster, model_yaml

pytestmark = [pytest.mark.real, pytest.mark.asyncio(loop_scope="session")]


async def get_state(base_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(base_url + "/ui/state") as response:
        assert response.status == 200, await response.text()
        state: dict[str, Any] = await response.json()
        return state


async def test_the_dashboard_through_the_kubernetes_gateway_drains_an_instance(
    real_apiserver: apiserver.ApiServer, tmp_path: Path, llama_server_binary: Path, chat_model: Path
) -> None:
    async with cluster(real_apiserver, tmp_path, llama_server_binary, "dashboard") as c:
        c.role("operator", "operator")
        agent = c.role("agent", "agent", env={"NODE_NAME": "node-a", "POD_IP": "127.0.0.1"})
        gateway = c.role("gateway", "gateway", env={"POD_NAME": "gateway-0"})
        base_url = f"http://{yaml.safe_load(c.config_path.read_text())['listen_addr']}"
        await waiting.eventually(lambda: "serving on" in gateway.log_text(), within_s=90, what="the gateway")
        await c.kubectl("apply", "-f", "-", stdin=model_yaml("tiny", chat_model, idle_s=600))
        async with aiohttp.ClientSession() as session, session.get(base_url + "/ui") as page:
            assert page.status == 200 and "/ui/dashboard.js" in await page.text()

        async def listed() -> bool:
            state = await get_state(base_url)
            return [m["name"] for m in state["models"]] == ["tiny"] and [n["name"] for n in state["nodes"]] == [
                "node-a"
            ]

        await waiting.eventually(listed, within_s=60, what="the model and the agent's node on the dashboard")
        await chat_once(base_url)
        (served,) = await c.instances()
        state = await get_state(base_url)
        (shown,) = state["instances"]
        assert (shown["name"], shown["phase"], shown["node"], shown["port"]) == (
            served.name, "Ready", "node-a", served.status.port)  # fmt: skip
        assert state["gateway"]["id"] == "gateway-0" and state["totals"]["requests_total"] == 1

        async with (
            aiohttp.ClientSession() as session,
            session.post(base_url + "/admin/drain", json={"instance": served.name}) as answer,
        ):
            assert answer.status == 202, await answer.text()
        drained = await c.store.get(resources.LlamaInstance, served.name)
        assert drained is None or drained.spec.drain

        async def gone() -> bool:
            return not await c.instances()

        await waiting.eventually(gone, within_s=90, what="the drained instance to be removed")
        await waiting.eventually(lambda: not agent_llama_servers(agent), within_s=30, what="llama-server to exit")
        await waiting.eventually(lambda: _no_instances(base_url), within_s=30, what="the dashboard to follow")
        for name, child in c.children.items():
            assert child.process.poll() is None, f"{name} exited:\n{c.logs()}"


async def _no_instances(base_url: str) -> bool:
    return (await get_state(base_url))["instances"] == []

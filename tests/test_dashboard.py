"""The web dashboard (/ui): its state document, its auth, the drain action, and the page in a real browser.

Covers: rates from neighbouring counter samples (bounded, a reset counter counts from zero); the log tail
(bounded, numbered, `extra` fields and tracebacks shown, build events picked out); the state document built from plain
resources (node capacity, memory and build state, profiles with queue and instance counts, instances with
phase, in flight, slots, memory, age, last request); with auth on, the page and its assets are open and
carry no data while /ui/state is 401 without an accepted key, like /v1/models; /admin/drain's errors
(envelope) and a drain carried out by the real agent (the instance stops and leaves); the log tail and the
rates following real requests through the gateway; a rebuild shown pending, then its progress lines.
In headless Chromium (Debian's, driven by selenium) against `llamesh serve` with the real llama-server, on
a phone-sized screen: the page loads with no console errors, shows an instance going Starting → Ready after
a request, the queue rising under load, and the drain button draining the instance; with auth on, the page
asks for a key, refuses a wrong one, and keeps the right one for the tab; `/ui/` serves the same page, whose
stylesheet and script load from there too. README.md's screenshot
is taken there: DASHBOARD_SCREENSHOT=docs/dashboard.png (not LLAMESH_*: `llamesh serve` reads those).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import shlex
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

import gateway_support as gs
from llamesh_api import cookbook, resources
from llamesh_proxy import catalog, dashboard, history, overview, queueing
from rig import processes

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
KEY = "dashboard-test-key"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


# --- the rings --------------------------------------------------------------------------------


def sample(at: float, requests: int, tokens: int = 0, *, queue: int = 0) -> history.Sample:
    return history.Sample(
        at=at, requests_total=requests, errors_total=0, tokens_total=tokens, queue_length=queue, in_flight=0
    )


def test_rate_history_turns_neighbouring_samples_into_rates() -> None:
    rates = history.RateHistory(capacity=4)
    assert rates.points() == []
    rates.add(sample(10.0, 0))
    rates.add(sample(12.0, 10, 400, queue=3))
    rates.add(sample(12.0, 99))  # no time passed: ignored, there is nothing to divide by
    rates.add(sample(16.0, 12, 400))
    points = rates.points()
    assert [(p.at, p.requests_per_s, p.tokens_per_s, p.queue_length) for p in points] == [
        (12.0, 5.0, 200.0, 3),
        (16.0, 0.5, 0.0, 0),
    ]
    rates.add(sample(18.0, 2))  # the counters were reset (a restart): count from zero, never negative
    assert rates.points()[-1].requests_per_s == 1.0
    rates.add(sample(20.0, 4))
    assert len(rates.points()) == 3  # four samples kept: three intervals
    with pytest.raises(ValueError, match="at least 2"):
        history.RateHistory(capacity=1)


def record(message: str, *, level: int = logging.INFO, **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord("llamesh.test", level, __file__, 1, message, None, None)
    made.__dict__.update(extra)
    return made


def test_log_tail_is_bounded_numbered_and_shows_extra_fields() -> None:
    tail = history.LogTail(capacity=3)
    for number in range(5):
        tail.add(record(f"line {number}", event="request_complete", status=200, path=Path("/x")))
    tail.add(record("compiling", level=logging.WARNING, event="llama_build_progress"))
    assert tail.next_seq == 6
    kept = tail.since(0, limit=10)
    assert [r["seq"] for r in kept] == [3, 4, 5]  # the oldest fell out
    assert kept[0]["message"] == "line 3" and kept[0]["status"] == 200 and kept[0]["path"] == "/x"
    assert kept[0]["event"] == "request_complete" and kept[0]["level"] == "info"
    assert kept[2]["level"] == "warning" and kept[2]["logger"] == "llamesh.test"
    assert [r["seq"] for r in tail.since(5, limit=10)] == [5]
    assert tail.since(6, limit=10) == [] and tail.since(0, limit=0) == []
    assert [r["seq"] for r in tail.since(0, limit=2)] == [4, 5]  # the newest when there are more
    assert [r["message"] for r in tail.latest(events=("llama_build",), limit=5)] == ["compiling"]
    plain = record("no event")
    assert history.record_fields(7, plain)["event"] == "llamesh.test"  # as the JSON log: the logger's name
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failed = logging.LogRecord("llamesh.test", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    assert "RuntimeError: boom" in history.record_fields(8, failed)["exception"]
    failed.exc_text, failed.exc_info = "rendered earlier", None  # what the JSON log's queue handler leaves
    assert history.record_fields(8, failed)["exception"] == "rendered earlier"


# --- the state document -----------------------------------------------------------------------


def target(model: str, profile: cookbook.Profile, *, max_queue: int = 10) -> catalog.Target:
    return catalog.Target(
        model=model,
        model_description="a test model",
        model_uid=None,
        profile=profile,
        pool=catalog.pool_key(model, profile.id),
        display=cookbook.display_name(model, profile.id),
        capability=catalog.capability(profile),
        args_hash=profile.args_hash(),
        policy=queueing.Policy(max_concurrent=1, max_queue=max_queue, max_instances=2),
        max_wait_ms=1000,
        startup_timeout_s=30.0,
        max_request_duration_ms=0,
        upstream_api_key=None,
    )


def instance(name: str, profile: str, phase: resources.Phase, **status: Any) -> resources.LlamaInstance:
    return resources.LlamaInstance(
        metadata=resources.ObjectMeta(name=name, creation_timestamp=NOW - datetime.timedelta(seconds=90)),
        spec=resources.InstanceSpec(model="m", profile=profile, args_hash="h", node_name=gs.NODE),
        status=resources.InstanceStatus(phase=phase, **status),
    )


def view(**changes: Any) -> overview.View:
    node = resources.LlamaNode(
        metadata=resources.ObjectMeta(name=gs.NODE),
        spec=resources.NodeSpec(max_vram_mb=8000, max_sysmem_mb=16000, max_instances=4, rebuild_requests=2),
        status=resources.NodeStatus(
            ready=True,
            binary_path="/bin/llama-server",
            llama_cpp_version="b123",
            gpu_telemetry_available=True,
            device_vram_used_mb=3000,
            device_vram_total_mb=24000,
            llamesh_vram_mb=2500,
            llamesh_sysmem_mb=700,
            active_instances=2,
            rebuilds_handled=1,
            heartbeat_at=NOW - datetime.timedelta(seconds=3),
        ),
    )
    ready = instance(
        "m-default-1",
        "default",
        resources.Phase.READY,
        host="127.0.0.1",
        port=4001,
        n_slots=2,
        peak_sysmem_mb=350,
        started_at=NOW - datetime.timedelta(seconds=60),
        usage={
            "gw-a": resources.GatewayUsage(in_flight=1, last_request_at=NOW - datetime.timedelta(seconds=20)),
            "gw-b": resources.GatewayUsage(in_flight=1, last_request_at=NOW - datetime.timedelta(seconds=5)),
        },
    )
    starting = instance("m-fast-1", "fast", resources.Phase.STARTING)
    gone = instance("m-default-0", "default", resources.Phase.STOPPED)
    fields: dict[str, Any] = {
        "now": NOW,
        "gateway_id": "gw-a",
        "node_name": gs.NODE,
        "version": "0.1.0",
        "draining": False,
        "auth_enabled": True,
        "nodes": [node],
        "targets": [target("m", gs.profile("default", idle_timeout_seconds=300)), target("m", gs.profile("fast"))],
        "instances": [starting, ready, gone],
        "queue_lengths": {"m:fast": 3},
        "in_flight": {"m-default-1": 1},
        "totals": overview.Totals(requests_total=10, errors_total=1, current_requests=2, tokens_total=80),
        "history": [
            history.Point(at=1.0, requests_per_s=2.0, errors_per_s=0, tokens_per_s=30, queue_length=3, in_flight=2)
        ],
        "log": [{"seq": 4, "message": "x"}],
        "log_next": 5,
        "build_log": [],
    }
    fields.update(changes)
    return overview.View(**fields)


def test_the_state_document_shows_nodes_profiles_instances_and_queues() -> None:
    state = overview.build(view())
    assert state["generated_at"] == "2026-01-02T03:04:05+00:00"
    assert state["totals"] == {
        "requests_total": 10,
        "errors_total": 1,
        "current_requests": 2,
        "tokens_total": 80,
        "queue_length": 3,
    }
    (node,) = state["nodes"]
    assert node["memory"] == {"vram_used_mb": 2500, "vram_max_mb": 8000, "sysmem_used_mb": 700, "sysmem_max_mb": 16000}
    assert node["gpu"] == {"available": True, "vram_used_mb": 3000, "vram_total_mb": 24000}
    assert (node["active_instances"], node["max_instances"], node["heartbeat_age_s"]) == (2, 4, 3.0)
    assert node["llama_cpp"]["version"] == "b123" and node["llama_cpp"]["rebuild_pending"]  # 2 asked, 1 done
    (model,) = state["models"]
    default, fast = model["profiles"]
    assert (default["display"], default["instances"], default["ready_instances"], default["queued"]) == ("m", 1, 1, 0)
    assert (fast["display"], fast["instances"], fast["ready_instances"], fast["queued"]) == ("m:fast", 1, 0, 3)
    assert default["idle_timeout_seconds"] == 300 and fast["max_queue"] == 10
    by_name = {i["name"]: i for i in state["instances"]}
    ready = by_name["m-default-1"]
    assert (ready["phase"], ready["model"], ready["port"], ready["slots"]) == ("Ready", "m", 4001, 2)
    assert ready["in_flight"] == 2  # both replicas' reports; this gateway's own count (1) is not more
    assert (ready["age_s"], ready["last_request_age_s"], ready["memory"]["sysmem_mb"]) == (60.0, 5.0, 350)
    starting = by_name["m-fast-1"]
    assert (starting["phase"], starting["model"], starting["age_s"]) == ("Starting", "m:fast", 90.0)
    assert starting["last_request_age_s"] is None and starting["node"] == gs.NODE
    assert by_name["m-default-0"]["phase"] == "Stopped"
    assert state["queues"] == [
        {"pool": "m:default", "model": "m", "queued": 0},
        {"pool": "m:fast", "model": "m:fast", "queued": 3},
    ]
    gone = overview.build(view(targets=[], queue_lengths={"m:fast": 2, "m:default": 0}))["queues"]
    assert gone == [{"pool": "m:fast", "model": "m:fast", "queued": 2}]  # its profile went away; requests wait on
    assert state["history"][0]["requests_per_s"] == 2.0
    assert state["log"] == {"next": 5, "records": [{"seq": 4, "message": "x"}]}


def test_this_gateways_own_in_flight_count_wins_when_its_report_is_behind() -> None:
    state = overview.build(view(in_flight={"m-default-1": 5}))
    assert {i["name"]: i["in_flight"] for i in state["instances"]}["m-default-1"] == 5


# --- through the gateway ----------------------------------------------------------------------


@contextlib.contextmanager
def logging_at_info() -> Iterator[None]:
    """The CLI logs at INFO; a test's root logger defaults to WARNING, which would hide request lines."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.setLevel(before)


async def fetch(harness: gs.Harness, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, harness.base_url + path, **kwargs) as r:
        body = await r.read()
        return r.status, (await r.json() if r.content_type == "application/json" else body.decode())


async def test_with_auth_on_the_page_is_open_and_empty_and_the_state_needs_a_key(tmp_path: Path) -> None:
    settings = gs.node_config(auth={"enabled": True, "allowed_keys": [KEY]})
    models = [gs.model("secret-model")]
    async with gs.running_gateway(tmp_path, models=models, settings=settings, agent=False) as h:
        for path in dashboard.ASSETS:
            status, body = await fetch(h, "GET", path)
            assert status == 200 and "secret-model" not in body and gs.NODE not in body, path
        async with aiohttp.ClientSession() as session, session.get(h.base_url + "/ui") as response:
            assert response.headers["Content-Security-Policy"].startswith("default-src 'self'")
            assert response.headers["X-Frame-Options"] == "DENY"
        page = (await fetch(h, "GET", "/ui"))[1]
        assert "/ui/dashboard.js" in page and "sessionStorage" in (await fetch(h, "GET", "/ui/dashboard.js"))[1]
        unauthorized = {"error": {"message": "Unauthorized", "type": "authentication_error", "param": None,
                                  "code": None}}  # fmt: skip
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert await fetch(h, "GET", "/v1/models", headers=headers) == (401, unauthorized)
            assert await fetch(h, "GET", "/ui/state", headers=headers) == (401, unauthorized)
            assert await fetch(h, "POST", "/admin/drain", headers=headers, json={"instance": "x"}) == (
                401,
                unauthorized,
            )
        status, state = await fetch(h, "GET", "/ui/state", headers={"Authorization": f"Bearer {KEY}"})
        assert status == 200 and state["models"][0]["name"] == "secret-model"
        assert state["gateway"]["auth_enabled"] is True
        assert (await fetch(h, "GET", "/ui/state", headers={"x-api-key": KEY}))[0] == 200
        status, bad = await fetch(h, "GET", "/ui/state?since=-1", headers={"x-api-key": KEY})
        assert status == 400 and bad["error"]["type"] == "invalid_request_error"


async def test_drain_is_carried_out_by_the_real_agent_and_bad_asks_get_the_envelope(tmp_path: Path) -> None:
    async with gs.running_gateway(tmp_path, models=[gs.model("m")]) as h:
        status, answer = await fetch(h, "POST", "/v1/chat/completions", json={"model": "m", "messages": []})
        assert status == 200, answer
        (served,) = h.instances()
        assert served.phase is resources.Phase.READY and served.status.pid is not None

        assert (await fetch(h, "POST", "/admin/drain", data=b"{"))[1]["error"]["message"] == "Invalid JSON"
        status, missing = await fetch(h, "POST", "/admin/drain", json={})
        assert (status, missing["error"]["param"]) == (400, "instance")
        status, unknown = await fetch(h, "POST", "/admin/drain", json={"instance": "nope"})
        assert (status, unknown["error"]) == (404, {"message": "Instance 'nope' not found",
                "type": "invalid_request_error", "param": "instance", "code": "instance_not_found"})  # fmt: skip

        status, accepted = await fetch(h, "POST", "/admin/drain", json={"instance": served.name})
        assert (status, accepted["status"], accepted["instance"]) == (202, "accepted", served.name)
        stored = await h.store.get(resources.LlamaInstance, served.name)
        assert stored is not None and stored.spec.drain and stored.spec.drain_reason == dashboard.DRAIN_REASON

        async def left() -> bool:  # stopped by its agent, then removed by the operator
            current = await h.store.get(resources.LlamaInstance, served.name)
            return current is None or current.phase in (resources.Phase.STOPPED, resources.Phase.FAILED)

        await gs.eventually(left, within_s=60, what="the drained instance to stop")
        await gs.eventually(lambda: not processes.is_alive(served.status.pid or 0), what="its process to exit")
        status, answer = await fetch(h, "POST", "/admin/drain", json={"instance": served.name})
        assert status in (404, 409), answer  # gone, or still listed as Stopped: nothing to drain either way


async def test_the_log_tail_and_rates_follow_requests(tmp_path: Path) -> None:
    with logging_at_info():
        async with gs.running_gateway(tmp_path, models=[gs.model("m")]) as h:
            board = h.app[dashboard.DASHBOARD]
            board.sample_interval_s = 0.2
            for _ in range(3):
                status, _ = await fetch(h, "POST", "/v1/chat/completions", json={"model": "m", "messages": []})
                assert status == 200

            async def busy_interval() -> dict[str, Any] | None:
                state = (await fetch(h, "GET", "/ui/state"))[1]
                return (
                    state if any(p["requests_per_s"] > 0 and p["tokens_per_s"] > 0 for p in state["history"]) else None
                )

            state = await gs.eventually(busy_interval, what="an interval with requests and tokens")
            lines = [r for r in state["log"]["records"] if r["event"] == "request_complete"]
            assert len(lines) == 3 and {(r["model"], r["status"]) for r in lines} == {("m", 200)}
            assert state["totals"]["requests_total"] == 3 and state["totals"]["tokens_total"] == 24
            later = (await fetch(h, "GET", f"/ui/state?since={state['log']['next']}"))[1]
            assert all(r["seq"] >= state["log"]["next"] for r in later["log"]["records"])
        assert not any(isinstance(x, history.TailHandler) for x in logging.getLogger().handlers)  # removed at cleanup


async def test_a_rebuild_shows_as_pending_then_its_progress_lines(tmp_path: Path) -> None:
    with logging_at_info():
        async with gs.running_gateway(tmp_path, models=[gs.model("m")], agent=False) as h:
            (node,) = (await fetch(h, "GET", "/ui/state"))[1]["nodes"]
            assert (
                node["llama_cpp"]["rebuild_pending"] is False and node["llama_cpp"]["version"] == gs.LLAMA_CPP_VERSION
            )
            assert (await fetch(h, "POST", "/admin/rebuild-llama"))[0] == 202

            async def pending() -> bool:
                state = (await fetch(h, "GET", "/ui/state"))[1]
                return bool(state["nodes"][0]["llama_cpp"]["rebuild_pending"])

            await gs.eventually(pending, what="the rebuild request to show")
            # what `llamesh serve` hands the build manager as its progress callback: one event per step
            logging.getLogger("llamesh_operator.serve").info(
                "llama.cpp: building llama-server [ 42%]", extra={"event": "llama_build_progress"}
            )
            state = (await fetch(h, "GET", "/ui/state"))[1]
            assert [r["message"] for r in state["build_log"]] == ["llama.cpp: building llama-server [ 42%]"]


# --- in a real browser ------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
STARTUP_DELAY_S = 3  # the wrapper's pause before llama-server starts: a 1.5 s poll must see Starting


def slow_starting_llama_server(folder: Path, real: Path) -> Path:
    """The real llama-server behind a wrapper that waits before a server start (not `--version`).

    A tiny model starts in well under a second, faster than the page polls; the dashboard has to show an
    instance that starts, so the start is made to last."""
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "llama-server"
    wrapper.write_text(
        f'#!/bin/sh\ncase " $* " in *" --port "*) sleep {STARTUP_DELAY_S} ;; esac\nexec {shlex.quote(str(real))} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


@contextlib.asynccontextmanager
async def llamesh_serve(
    tmp_path: Path, binary: Path, chat_model: Path, *, llama_cpp: dict[str, object] | None = None
) -> AsyncIterator[tuple[str, processes.Child]]:
    """`llamesh serve` as a child process: one profile, one slot, one instance at most; `binary` served as it
    is, or the `llama_cpp` section given (test_dashboard_rebuild.py builds one)."""
    port = processes.free_port()
    settings = {
        "node_id": "dash",
        "listen_addr": f"127.0.0.1:{port}",
        "metrics_path": str(tmp_path / "node-metrics.json"),
        "shutdown_grace_period_seconds": 5,
        "model_defaults": {"max_concurrent_requests_per_instance": 1, "max_instances_per_model": 1},
        "llama_cpp": {"enabled": False, "binary_path": str(binary), "cache_dir": str(tmp_path / "cache")}
        | (llama_cpp or {}),
    }
    cookbook_text = {
        "models": [
            {
                "name": "tiny",
                "description": "tiny llama for tests",
                "profiles": [{"id": "default", "model_path": str(chat_model), "llama_server_args": "-c 512 -np 1"}],
            }
        ]
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    (tmp_path / "cookbook.yaml").write_text(yaml.safe_dump(cookbook_text))
    argv = [str(Path(sys.executable).parent / "llamesh"), "serve", "--config", str(tmp_path / "config.yaml"),
            "--cookbook", str(tmp_path / "cookbook.yaml")]  # fmt: skip
    child = processes.start(argv, log_path=tmp_path / "serve.log")
    base_url = f"http://127.0.0.1:{port}"
    try:
        await processes.wait_healthy(child, base_url, deadline_s=60)
        yield base_url, child
    finally:
        await processes.stop(child, grace_s=15)


class Browser:
    """Headless Chromium through chromedriver; every call runs in a thread, the test's loop stays free."""

    def __init__(self, driver: webdriver.Chrome) -> None:
        self.driver = driver

    async def run(self, script: str, *args: Any) -> Any:
        return await asyncio.to_thread(self.driver.execute_script, script, *args)

    async def text(self, selector: str) -> str | None:
        found = await self.run(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", selector
        )
        return None if found is None else str(found)

    async def wait_text(self, selector: str, wanted: Callable[[str], bool], *, what: str, within_s: float = 60) -> str:
        async def matching() -> str | None:
            found = await self.text(selector)
            return found if found is not None and wanted(found) else None

        return await gs.eventually(matching, within_s=within_s, interval_s=0.1, what=what)

    async def console_errors(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = await asyncio.to_thread(self.driver.get_log, "browser")
        return [entry for entry in entries if entry["level"] == "SEVERE"]


@contextlib.asynccontextmanager
async def browser(*, width: int, height: int, phone: bool = False) -> AsyncIterator[Browser]:
    """Chromium at `width` x `height` CSS pixels; `phone`: emulated as a touch screen of that size (a
    headless window is never narrower than 500 pixels, an emulated screen is)."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}"):  # fmt: skip
        options.add_argument(argument)
    if phone:
        metrics = {"width": width, "height": height, "pixelRatio": 1, "touch": True, "mobile": True}
        options.add_experimental_option("mobileEmulation", {"deviceMetrics": metrics})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    driver = await asyncio.to_thread(webdriver.Chrome, service=service, options=options)
    try:
        yield Browser(driver)
    finally:
        await asyncio.to_thread(driver.quit)


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()), reason="needs Debian's chromium and chromium-driver"
)
async def test_the_dashboard_in_a_real_browser(tmp_path: Path, llama_server_binary: Path, chat_model: Path) -> None:
    binary = slow_starting_llama_server(tmp_path / "bin", llama_server_binary)
    async with (
        llamesh_serve(tmp_path, binary, chat_model) as (base_url, child),
        browser(width=390, height=844, phone=True) as page,
        openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120) as client,
    ):
        await asyncio.to_thread(page.driver.get, base_url + "/ui")
        await page.wait_text("#connection", lambda t: t == "live", what="the page to load its first state")
        await page.wait_text('#models tr[data-profile="tiny"]', lambda t: "0 ready / 0" in t, what="the profile")
        assert await page.text("#instances td.empty") is not None  # nothing runs before the first request
        assert await page.run("return [window.innerWidth, document.documentElement.scrollWidth]") == [390, 390]

        # Five requests at once on a cold, one-slot profile: they queue while its instance starts.
        load = [
            asyncio.create_task(client.chat.completions.create(model="tiny", messages=HI, max_tokens=64))
            for _ in range(5)
        ]
        await page.wait_text('#queues tr[data-queue="tiny"] .queued', lambda t: int(t) >= 2, what="the queue to rise")
        phases: list[str] = []

        async def ready() -> bool:
            phase = await page.text("#instances tr[data-instance] .phase")
            if phase and (not phases or phases[-1] != phase):
                phases.append(phase)
            return phase == "Ready"

        await gs.eventually(ready, within_s=90, interval_s=0.1, what="the instance to show Ready")
        assert "Starting" in phases and phases.index("Starting") < phases.index("Ready"), phases
        answers = await asyncio.gather(*load)
        assert all(answer.usage is not None and answer.usage.completion_tokens == 64 for answer in answers)
        await page.wait_text('#queues tr[data-queue="tiny"] .queued', lambda t: t == "0", what="the queue to empty")
        await page.wait_text("#log", lambda t: t.count('"request_complete"') >= 5, what="the request lines")
        await page.wait_text("#rate-now", lambda t: bool(t), what="a rate point")
        if shot := os.environ.get("DASHBOARD_SCREENSHOT"):  # README.md's picture, on a desktop screen
            async with browser(width=1000, height=1180) as desktop:
                await asyncio.to_thread(desktop.driver.get, base_url + "/ui")
                await desktop.wait_text("#log", lambda t: "request_complete" in t, what="the desktop page")
                await asyncio.to_thread(desktop.driver.save_screenshot, shot)

        (llama,) = processes.descendants(child.pid, matching="llama-server")
        name = await page.run("return document.querySelector('#instances tr[data-instance]').dataset.instance")
        await page.run("document.querySelector(arguments[0]).click()", f'button[data-drain="{name}"]')
        await page.wait_text("#action-result", lambda t: "Drain requested" in t, what="the drain to be accepted")
        await page.wait_text(
            f'#instances tr[data-instance="{name}"] .phase',
            lambda t: "draining" in t.lower() or t == "Stopped",
            what="the instance to show it drains",
        )
        await gs.eventually(lambda: not processes.is_alive(llama.process), within_s=60, what="llama-server to stop")
        await page.wait_text(
            "#instances tbody", lambda t: name not in t or "Stopped" in t, what="the instance to leave"
        )
        assert await page.console_errors() == []


@pytest.mark.slow
@pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()), reason="needs Debian's chromium and chromium-driver"
)
async def test_in_a_real_browser_the_page_asks_for_the_key_and_keeps_it_for_the_tab(tmp_path: Path) -> None:
    settings = gs.node_config(auth={"enabled": True, "allowed_keys": [KEY]})
    async with (
        gs.running_gateway(tmp_path, models=[gs.model("secret-model")], settings=settings, agent=False) as h,
        browser(width=390, height=844, phone=True) as page,
    ):
        await asyncio.to_thread(page.driver.get, h.base_url + "/ui")
        await page.wait_text("#connection", lambda t: t == "key needed", what="the key prompt")
        assert await page.run("return document.getElementById('dashboard').hidden") is True
        assert "secret-model" not in await page.run("return document.body.innerText")

        async def submit(key: str) -> None:
            field = await asyncio.to_thread(page.driver.find_element, By.ID, "key-input")
            await asyncio.to_thread(field.clear)
            await asyncio.to_thread(field.send_keys, key, Keys.ENTER)

        await submit("wrong")
        await page.wait_text("#key-error", lambda t: "not accepted" in t, what="the wrong key to be refused")
        await submit(KEY)
        await page.wait_text('#models tr[data-profile="secret-model"]', bool, what="the models, with the key")
        assert await page.run("return sessionStorage.getItem('llamesh-api-key')") == KEY
        await asyncio.to_thread(page.driver.refresh)  # the tab keeps the key: no prompt after a reload
        await page.wait_text("#connection", lambda t: t == "live", what="the page to load with the kept key")
        errors = await page.console_errors()
        assert errors and all("401" in entry["message"] for entry in errors), errors  # only the refused loads
        # /ui/ is the same page: its stylesheet and script load from there too (a missing one is a console error)
        await asyncio.to_thread(page.driver.get, h.base_url + "/ui/")
        await page.wait_text("#connection", lambda t: t == "live", what="the page under /ui/ to run its script")
        await page.wait_text('#models tr[data-profile="secret-model"]', bool, what="the models under /ui/")
        # dashboard.css sets the body's margin to 0; a browser's own default is 8px
        assert await page.run("return getComputedStyle(document.body).marginTop") == "0px"
        assert await page.console_errors() == []

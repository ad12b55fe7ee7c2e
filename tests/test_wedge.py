"""The wedge watchdog: its judge (`wedge.Judge`) fed sweeps by hand, then the real agent, operator and gateway.

The judge, no processes, no clock. Covers:
flat CPU with cpu_only is wedged after the window and not before; CPU activity (and activity just
above the idle allowance) is never wedged; the window must be continuous (one busy interval restarts it);
releasing the slot, a missing or unreadable sample, or a new pid restarts it; a verdict is given once; no
NVML means GPU unknown (never wedged without cpu_only); with NVML a per-process reading decides (busy is
never wedged, even with cpu_only; a present ~0 reading on a complete sweep is idle); an absent reading is
trusted only after some process was seen busy on the node, and only on a complete sweep; a sweep that
answered for no device counts as no NVML; each instance is judged on its own; bad windows are refused.

In the node agent (cpu_only, a short window), behind the real gateway and operator, with the fake
llama-server: a stream stalled after its headers is killed (instance_wedged warning, instance_terminate
reason wedged, Stopped with the reason), the client's stream ends with the gateway's upstream error, the
next request is served by a fresh instance, and proxy_wedged_instances_killed_total and the LlamaNode
count 1; a stalled request that got no byte is retried by the gateway on a fresh instance after the kill;
a slow stream that computes every token, watched holding its slot for longer than the window, is never
stopped.

`llamesh serve` with the real llama-server (cpu_only, a 1.5 s window): a slow generation of thousands of
tokens on one thread, several windows long, is never stopped; the same llama-server frozen with SIGSTOP
mid-stream is killed, the stream ends with the upstream error, the metric counts 1 and the next request
gets a fresh llama-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from pathlib import Path

import aiohttp
import openai
import psutil  # type: ignore[import-untyped]
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client import parser as prometheus_parser

import gateway_support as gs
import test_e2e_serve
from llamesh_agent import sampling, wedge
from llamesh_api import resources
from rig import waiting

NO_GPU = sampling.GpuUtilization()
STEP = 1.0  # seconds between sweeps in these tests
IDLE_CPU = 0.001  # CPU seconds per sweep an idle process uses here


def gpu(sm_util: Mapping[int, int] | None = None, *, complete: bool = True) -> sampling.GpuUtilization:
    return sampling.GpuUtilization(available=True, complete=complete, sm_util=dict(sm_util or {}))


def sample(cpu_s: float | None, *, pid: int = 100, holding: bool = True, name: str = "i-1") -> wedge.Sample:
    return wedge.Sample(instance=name, pid=pid, cpu_s=cpu_s, holding_slot=holding)


def run(
    judge: wedge.Judge,
    sweeps: Iterable[Iterable[wedge.Sample]],
    *,
    gpus: Iterable[sampling.GpuUtilization] | None = None,
    start: float = 100.0,
) -> list[list[str]]:
    """Feed one sweep per STEP; the wedged instance names of each sweep."""
    gpu_list = list(gpus) if gpus is not None else None
    verdicts = []
    for index, samples in enumerate(sweeps):
        sweep_gpu = gpu_list[index] if gpu_list is not None else NO_GPU
        found = judge.observe(now=start + index * STEP, samples=list(samples), gpu=sweep_gpu)
        verdicts.append([item.instance for item in found])
    return verdicts


def idle(count: int, *, pid: int = 100, start_cpu: float = 5.0) -> list[list[wedge.Sample]]:
    return [[sample(start_cpu + i * IDLE_CPU, pid=pid)] for i in range(count)]


# --- CPU ------------------------------------------------------------------------------------------


def test_flat_cpu_with_cpu_only_is_wedged_once_the_window_is_full() -> None:
    judge = wedge.Judge(window_s=3.0, cpu_only=True)
    # sweep 0 is the baseline; sweeps 1..3 each close a flat interval; the third reaches 3 s
    assert run(judge, idle(4)) == [[], [], [], ["i-1"]]


def test_the_verdict_says_what_it_rests_on() -> None:
    judge = wedge.Judge(window_s=2.0, cpu_only=True)
    for index in range(2):
        assert judge.observe(now=float(index), samples=[sample(1.0 + index * 0.004)], gpu=NO_GPU) == []
    [verdict] = judge.observe(now=2.0, samples=[sample(1.008)], gpu=NO_GPU)
    assert (verdict.instance, verdict.pid, verdict.flat_for_s, verdict.gpu_sm_util) == ("i-1", 100, 2.0, None)
    assert verdict.cpu_used_s == pytest.approx(0.008)


def test_a_verdict_is_given_once_then_the_instance_starts_from_scratch() -> None:
    judge = wedge.Judge(window_s=2.0, cpu_only=True)
    verdicts = run(judge, idle(6))
    assert verdicts == [[], [], ["i-1"], [], [], ["i-1"]]


def test_an_active_process_is_never_wedged() -> None:
    judge = wedge.Judge(window_s=2.0, cpu_only=True)
    busy = [[sample(5.0 + i * 0.5)] for i in range(20)]  # half a core
    assert run(judge, busy) == [[]] * 20


def test_a_slow_process_just_above_the_idle_allowance_is_not_flat() -> None:
    allowance = wedge.CPU_IDLE_FRACTION * STEP + wedge.CPU_TICK_SLACK_S
    judge = wedge.Judge(window_s=2.0, cpu_only=True)
    slow = [[sample(5.0 + i * allowance * 1.5)] for i in range(10)]
    assert run(judge, slow) == [[]] * 10
    at_the_allowance = wedge.Judge(window_s=2.0, cpu_only=True)
    assert run(at_the_allowance, [[sample(5.0 + i * allowance * 0.9)] for i in range(3)]) == [[], [], ["i-1"]]


def test_one_busy_interval_restarts_the_window() -> None:
    judge = wedge.Judge(window_s=3.0, cpu_only=True)
    cpu = [5.0, 5.0, 5.0, 6.0, 6.0, 6.0, 6.0]  # busy between sweeps 2 and 3
    assert run(judge, [[sample(value)] for value in cpu]) == [[], [], [], [], [], [], ["i-1"]]


def test_the_allowance_grows_with_a_longer_interval() -> None:
    judge = wedge.Judge(window_s=10.0, cpu_only=True)
    assert judge.observe(now=0.0, samples=[sample(1.0)], gpu=NO_GPU) == []
    # 0.1 s of CPU over 10 s is 1 %: flat
    assert [item.instance for item in judge.observe(now=10.0, samples=[sample(1.1)], gpu=NO_GPU)] == ["i-1"]


# --- slot and process continuity ------------------------------------------------------------------


def test_releasing_the_slot_restarts_the_window() -> None:
    judge = wedge.Judge(window_s=3.0, cpu_only=True)
    sweeps = idle(8)
    sweeps[3] = [sample(5.0, holding=False)]
    assert run(judge, sweeps) == [[], [], [], [], [], [], [], ["i-1"]]


def test_an_instance_missing_from_a_sweep_restarts_the_window() -> None:
    judge = wedge.Judge(window_s=3.0, cpu_only=True)
    sweeps = idle(8)
    sweeps[3] = []  # not Ready at that sweep
    assert run(judge, sweeps) == [[], [], [], [], [], [], [], ["i-1"]]
    assert judge.tracked() == frozenset()


def test_an_unreadable_cpu_time_restarts_the_window() -> None:
    judge = wedge.Judge(window_s=3.0, cpu_only=True)
    sweeps = idle(8)
    sweeps[2] = [sample(None)]
    assert run(judge, sweeps) == [[], [], [], [], [], [], ["i-1"], []]


def test_a_new_process_for_the_same_instance_starts_from_scratch() -> None:
    judge = wedge.Judge(window_s=3.0, cpu_only=True)
    sweeps = idle(3) + idle(4, pid=200, start_cpu=0.0)
    assert run(judge, sweeps) == [[], [], [], [], [], [], ["i-1"]]


def test_a_sweep_at_the_same_moment_changes_nothing() -> None:
    judge = wedge.Judge(window_s=2.0, cpu_only=True)
    assert judge.observe(now=0.0, samples=[sample(1.0)], gpu=NO_GPU) == []
    assert judge.observe(now=0.0, samples=[sample(9.0)], gpu=NO_GPU) == []  # ignored: no time passed
    assert judge.observe(now=1.0, samples=[sample(1.0)], gpu=NO_GPU) == []
    assert [item.instance for item in judge.observe(now=2.0, samples=[sample(1.0)], gpu=NO_GPU)] == ["i-1"]


def test_instances_are_judged_each_on_its_own() -> None:
    judge = wedge.Judge(window_s=2.0, cpu_only=True)
    sweeps = [
        [
            sample(1.0, name="stuck", pid=1),
            sample(1.0 + i, name="working", pid=2),
            sample(1.0, name="free", pid=3, holding=False),
        ]
        for i in range(3)
    ]
    assert run(judge, sweeps) == [[], [], ["stuck"]]
    assert judge.tracked() == frozenset({"working"})


def test_a_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window_s"):
        wedge.Judge(window_s=0, cpu_only=True)


# --- GPU ------------------------------------------------------------------------------------------


def test_without_nvml_gpu_activity_is_unknown_and_idle_cpu_is_not_enough() -> None:
    judge = wedge.Judge(window_s=2.0, cpu_only=False)
    assert run(judge, idle(10)) == [[]] * 10
    assert judge.gpu_activity(100, NO_GPU) is wedge.GpuActivity.UNKNOWN


def test_a_sweep_no_device_answered_counts_as_no_nvml() -> None:
    judge = wedge.Judge(window_s=2.0, cpu_only=False)
    nothing = sampling.GpuUtilization(available=False, complete=False, sm_util={100: 0})
    assert judge.gpu_activity(100, nothing) is wedge.GpuActivity.UNKNOWN
    assert run(judge, idle(5), gpus=[nothing] * 5) == [[]] * 5


def test_a_busy_gpu_reading_is_never_wedged_even_with_cpu_only() -> None:
    for cpu_only in (False, True):
        judge = wedge.Judge(window_s=2.0, cpu_only=cpu_only)
        busy_gpu = gpu({100: 40})
        assert run(judge, idle(10), gpus=[busy_gpu] * 10) == [[]] * 10
        assert judge.seen_busy_gpu


def test_a_gpu_reading_of_about_zero_on_a_complete_sweep_is_idle() -> None:
    judge = wedge.Judge(window_s=2.0, cpu_only=False)
    quiet = gpu({100: wedge.GPU_IDLE_PERCENT})
    assert run(judge, idle(3), gpus=[quiet] * 3) == [[], [], ["i-1"]]
    assert not judge.seen_busy_gpu


def test_an_absent_reading_is_not_trusted_before_a_busy_process_was_seen() -> None:
    judge = wedge.Judge(window_s=2.0, cpu_only=False)
    assert run(judge, idle(6), gpus=[gpu()] * 6) == [[]] * 6
    assert judge.gpu_activity(100, gpu()) is wedge.GpuActivity.UNKNOWN


def test_an_absent_reading_is_trusted_after_any_process_was_seen_busy() -> None:
    judge = wedge.Judge(window_s=2.0, cpu_only=False)
    other_busy = gpu({4242: 90})  # another process (say, another instance) proved per-process readings work
    assert run(judge, idle(4), gpus=[other_busy, gpu(), gpu(), gpu()]) == [[], [], ["i-1"], []]


def test_an_absent_reading_on_an_incomplete_sweep_is_not_trusted() -> None:
    judge = wedge.Judge(window_s=2.0, cpu_only=False)
    partial = gpu(complete=False)
    gpus = [gpu({4242: 90}), gpu(), partial, gpu(), gpu(), gpu()]
    # the incomplete sweep (index 2) breaks the streak; it restarts at sweep 2's sample
    assert run(judge, idle(6), gpus=gpus) == [[], [], [], [], ["i-1"], []]


def test_a_present_idle_reading_on_an_incomplete_sweep_is_not_trusted_either() -> None:
    judge = wedge.Judge(window_s=1.0, cpu_only=False)
    assert judge.gpu_activity(100, gpu({100: 0}, complete=False)) is wedge.GpuActivity.UNKNOWN
    assert judge.gpu_activity(100, gpu({100: 50}, complete=False)) is wedge.GpuActivity.BUSY


def test_cpu_only_reads_an_absent_or_incomplete_gpu_as_idle() -> None:
    judge = wedge.Judge(window_s=2.0, cpu_only=True)
    assert judge.gpu_activity(100, gpu(complete=False)) is wedge.GpuActivity.IDLE
    assert judge.gpu_activity(100, gpu()) is wedge.GpuActivity.IDLE
    assert run(judge, idle(3), gpus=[gpu(complete=False)] * 3) == [[], [], ["i-1"]]


def test_gpu_activity_without_cpu_activity_keeps_a_real_decode_alive() -> None:
    judge = wedge.Judge(window_s=2.0, cpu_only=False)
    gpus = [gpu({100: 0}), gpu({100: 0}), gpu({100: 70}), gpu({100: 0}), gpu({100: 0})]
    # the decode burst at sweep 2 breaks the streak the idle readings had begun
    assert run(judge, idle(5), gpus=gpus) == [[], [], [], [], ["i-1"]]


# --- the watchdog in the agent, behind the gateway (fake llama-server) -----------------------------

WATCHDOG = {"enabled": True, "window_ms": 2500, "sample_interval_ms": 250, "cpu_only": True}
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@contextlib.asynccontextmanager
async def watched(tmp_path: Path, fault: dict[str, str]) -> AsyncIterator[tuple[gs.Harness, openai.AsyncOpenAI]]:
    """One model `m` behind the gateway, the node agent's watchdog on, the profile's fake given `fault`."""
    settings = gs.node_config(wedge_detector=WATCHDOG)
    async with (
        gs.running_gateway(tmp_path, models=[gs.model("m")], settings=settings, env={"default": fault}) as harness,
        openai.AsyncOpenAI(base_url=harness.base_url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        yield harness, client


def stall_once(tmp_path: Path) -> dict[str, str]:
    """The first completion on any of the profile's fakes stalls for good; the rest are served."""
    return {"FAKE_LLAMA_FAULT": "stall", "FAKE_LLAMA_STALL_ONCE": str(tmp_path / "stalled-once")}


async def killed_metric(harness: gs.Harness) -> float:
    response = await harness.client.get("/metrics")
    assert response.status == 200
    for family in prometheus_parser.text_string_to_metric_families(await response.text()):
        for each in family.samples:
            if each.name == "proxy_wedged_instances_killed_total":
                return each.value
    raise AssertionError("no proxy_wedged_instances_killed_total in /metrics")


async def ready_instances(harness: gs.Harness) -> list[resources.LlamaInstance]:
    listing = await harness.store.list(resources.LlamaInstance)
    return [instance for instance in listing.items if instance.status.phase is resources.Phase.READY]


async def gone(harness: gs.Harness, name: str) -> bool:
    return await harness.store.get(resources.LlamaInstance, name) is None


def events(caplog: pytest.LogCaptureFixture, event: str, instance: str) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if getattr(record, "event", None) == event and getattr(record, "instance_id", None) == instance
    ]


@pytest.mark.slow
async def test_a_stalled_stream_is_killed_and_the_next_request_gets_a_fresh_instance(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llamesh_agent")
    async with watched(tmp_path, stall_once(tmp_path)) as (h, client):
        assert await killed_metric(h) == 0
        stream = await client.chat.completions.create(model="m", messages=HI, stream=True)  # headers, then silence
        [stalled] = gs.instance_names(h.gw)
        first = await h.store.get(resources.LlamaInstance, stalled)
        assert first is not None
        with pytest.raises(openai.APIError, match="Upstream error"):  # the gateway's SSE error event
            async for _chunk in stream:
                pass
        [terminated] = await gs.eventually(lambda: events(caplog, "instance_terminate", stalled), what="the kill")
        assert terminated.reason == "wedged"  # type: ignore[attr-defined]
        assert "stopped: wedged: held a slot for " in terminated.getMessage()
        await gs.eventually(lambda: gone(h, stalled), what="the operator to delete the stopped instance")

        answer = await client.chat.completions.create(model="m", messages=HI)
        assert answer.choices[0].message.content == "the quick brown fox jumps over a lazy "
        [fresh] = await ready_instances(h)
        assert fresh.metadata.uid != first.metadata.uid and fresh.status.pid != first.status.pid
        await gs.eventually(lambda: _equals(killed_metric(h), 1), what="the gateway to count the kill")
        node = await h.store.get(resources.LlamaNode, gs.NODE)
        assert node is not None and node.status.wedged_instances_killed == 1
    [wedged] = events(caplog, "instance_wedged", stalled)
    assert wedged.levelno == logging.WARNING


@pytest.mark.slow
async def test_a_stalled_request_without_a_byte_answered_ends_with_the_seeds_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The kill makes the stuck upstream call fail: the client gets the seed's 502 upstream_error (the request
    is not sent again, since a request that wedged one instance may wedge the next), the next gets a fresh one."""
    caplog.set_level(logging.INFO, logger="llamesh_agent")
    async with watched(tmp_path, stall_once(tmp_path)) as (h, client):
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(model="m", messages=HI)
        assert failed.value.status_code == 502
        assert failed.value.body["type"] == "upstream_error"  # type: ignore[index]
        wedged = [record for record in caplog.records if getattr(record, "event", None) == "instance_wedged"]
        assert len(wedged) == 1
        killed_pid = wedged[0].pid  # type: ignore[attr-defined]
        answer = await client.chat.completions.create(model="m", messages=HI)
        assert answer.choices[0].message.content == "the quick brown fox jumps over a lazy "
        [fresh] = await ready_instances(h)
        assert fresh.status.pid != killed_pid
        await gs.eventually(lambda: _equals(killed_metric(h), 1), what="the gateway to count the kill")


@pytest.mark.slow
async def test_an_active_slow_stream_is_never_stopped(tmp_path: Path) -> None:
    # about 40 ms a token, 15 of them computing (as a CPU decode does): 120 tokens take twice the window
    fault = {"FAKE_LLAMA_FAULT": "slow_stream", "FAKE_LLAMA_TOKEN_DELAY_MS": "25", "FAKE_LLAMA_TOKEN_CPU_MS": "15"}
    window_s = WATCHDOG["window_ms"] / 1000
    async with watched(tmp_path, fault) as (h, client):
        assert h.node is not None
        judge = h.node.agent.wedge_judge
        assert judge is not None
        stream = await client.chat.completions.create(model="m", messages=HI, stream=True, max_tokens=120)
        [name] = gs.instance_names(h.gw)
        watched_since: list[float] = []

        async def note_watching() -> None:  # when the watchdog first sampled it holding its slot
            await gs.eventually(lambda: name in judge.tracked(), what="the watchdog to watch the stream")
            watched_since.append(time.monotonic())

        watching = asyncio.create_task(note_watching())
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        finished = time.monotonic()
        await watching
        assert len("".join(pieces).split()) == 120
        assert finished - watched_since[0] > window_s  # watched, holding its slot, for longer than the window
        instance = await h.store.get(resources.LlamaInstance, name)
        assert instance is not None and instance.status.phase is resources.Phase.READY
        assert await killed_metric(h) == 0


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


# --- `llamesh serve` with the real llama-server -------------------------------------------------

REAL_WINDOW_S = 1.5


def real_cookbook(chat_model: Path) -> str:
    # one thread and context shift: a tiny model generating thousands of tokens for several seconds
    return f"""
models:
  - name: tiny
    profiles:
      - id: default
        model_path: {chat_model}
        llama_server_args: "-c 1024 -np 1 -t 1 --context-shift"
"""


async def real_killed_metric(node: test_e2e_serve.Node) -> float:
    async with aiohttp.ClientSession() as session, session.get(node.base_url + "/metrics") as response:
        text = await response.text()
    for family in prometheus_parser.text_string_to_metric_families(text):
        for each in family.samples:
            if each.name == "proxy_wedged_instances_killed_total":
                return each.value
    raise AssertionError("no proxy_wedged_instances_killed_total in /metrics")


@pytest.mark.real
@pytest.mark.slow
async def test_a_slow_real_generation_is_never_stopped_and_a_frozen_one_is(
    tmp_path: Path, llama_server_binary: Path, chat_model: Path
) -> None:
    watchdog = {**WATCHDOG, "window_ms": int(REAL_WINDOW_S * 1000)}
    async with test_e2e_serve.serving(
        tmp_path, llama_server_binary, real_cookbook(chat_model), wedge_detector=watchdog
    ) as node:
        # How fast this machine generates, so the long generation lasts well past the window however fast it is
        started = time.monotonic()
        probe = await node.client.completions.create(
            model="tiny", prompt="once upon a time", max_tokens=1000, extra_body={"ignore_eos": True}
        )
        tokens_per_s = 1000 / (time.monotonic() - started)
        assert probe.usage is not None and probe.usage.completion_tokens == 1000
        wanted = max(6000, int(tokens_per_s * (REAL_WINDOW_S + 3) * 2))

        started = time.monotonic()
        answer = await node.client.completions.create(
            model="tiny", prompt="once upon a time", max_tokens=wanted, extra_body={"ignore_eos": True}
        )
        took = time.monotonic() - started
        assert answer.usage is not None and answer.usage.completion_tokens == wanted
        # slot usage reaches the agent within about a second: the watchdog watched it for over a window
        assert took > REAL_WINDOW_S + 3, f"the generation took {took:.1f} s, too short to show anything"
        [server] = node.llama_servers()
        assert await real_killed_metric(node) == 0

        # the positive control: the same llama-server frozen (SIGSTOP) mid-stream is flat and gets killed
        stream = await node.client.completions.create(
            model="tiny", prompt="once upon a time", max_tokens=6000, stream=True, extra_body={"ignore_eos": True}
        )
        with pytest.raises(openai.APIError, match="Upstream error"):
            async for chunk in stream:
                if server.is_alive() and server.process.status() != psutil.STATUS_STOPPED and chunk.choices:
                    os.kill(server.pid, signal.SIGSTOP)
        await waiting.eventually(lambda: not server.is_alive(), what="the frozen llama-server to be killed")
        await waiting.eventually(lambda: _equals(real_killed_metric(node), 1), what="the gateway to count it")
        again = await node.client.completions.create(model="tiny", prompt="hi", max_tokens=4)
        assert again.choices[0].text
        [fresh] = node.llama_servers()
        assert fresh.pid != server.pid

"""Resource guardrails end to end: the real gateway, operator loop and node agent over a MemoryStore, with
fake llama-server children (`gateway_support.running_gateway`) and the unmodified OpenAI SDK as client.

Eviction tenure (`max_sysmem_mb`, each fake holding a known resident size, FAKE_LLAMA_RSS_MB): a spawn that
would not fit drains the least recently used idle instance of another model, and not the more recent one;
a busy instance inside its tenure is protected (the new model's request waits in the queue, a second one
gets 503 queue_timeout) until it goes idle and yields; a busy one past its tenure is drained while its
stream still finishes.

Cold-start OOM recovery (FAKE_LLAMA_FAULT=oom_when_crowded: the start fails while another fake runs): an
idle neighbour is evicted at stage 1 and the retry succeeds; a busy neighbour survives stage 1, is drained
at stage 2 (its stream finishes) and the retry succeeds; a start that always fails goes through stages 1
and 2 in order and the client gets 503 spawn_failures_exhausted with Retry-After 30. The seed's cold_oom_*
events, the drains' cold_oom_stage reasons (instance_terminate too) and the profile status counter show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import openai
import pytest

import gateway_support as gs
from llamesh_api import resources

pytestmark = pytest.mark.slow

STARTUP = {"startup_timeout_seconds": 60}


def events(caplog: pytest.LogCaptureFixture, *names: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if getattr(record, "event", None) in names]


def drained(caplog: pytest.LogCaptureFixture) -> dict[str, str]:
    """Instance → the reason the operator drained it for."""
    return {str(getattr(r, "instance_id", "")): str(getattr(r, "reason", "")) for r in events(caplog, "instance_drain")}


@contextlib.asynccontextmanager
async def client(harness: gs.Harness) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=harness.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


async def ask(sdk: openai.AsyncOpenAI, model: str, *, tokens: int | None = None) -> str:
    """A chat completion, streamed; its text."""
    stream = await sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=tokens
    )
    text = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
    return "".join(text)


async def instance_of(harness: gs.Harness, model: str) -> resources.LlamaInstance | None:
    """The live, undrained instance of `model`, if there is one."""
    for instance in (await harness.store.list(resources.LlamaInstance)).items:
        if instance.spec.model == model and not instance.phase.is_terminal and not instance.spec.drain:
            return instance
    return None


async def ready_instance(harness: gs.Harness, model: str) -> resources.LlamaInstance:
    async def ready() -> resources.LlamaInstance | None:
        found = await instance_of(harness, model)
        return found if found is not None and found.phase is resources.Phase.READY else None

    return await gs.eventually(ready, what=f"a READY instance of {model}")


async def published_busy(harness: gs.Harness, name: str) -> bool:
    """The gateway's usage report in the store (what the operator reads) shows a request in flight on `name`."""
    found = await harness.store.get(resources.LlamaInstance, name)
    return found is not None and found.status.in_flight > 0


async def gone(harness: gs.Harness, name: str) -> bool:
    found = await harness.store.get(resources.LlamaInstance, name)
    return found is None or found.phase.is_terminal


def models_with(**sizes: Mapping[str, Any]) -> list[resources.LlamaModel]:
    """One model per keyword, its only profile named after it (`<name>1`) with its own model file."""
    return [
        gs.model(name, gs.profile(f"{name}1", model_path=f"/models/{name}.gguf", **STARTUP, **fields))
        for name, fields in sizes.items()
    ]


# --- eviction tenure ----------------------------------------------------------------------------------

# Each fake holds ~150 MB beyond its ~50 MB of Python: two fit under 500 MB, a third (estimated at 200 MB
# before it ever ran) does not, and one plus the third does.
SIZED = {"FAKE_LLAMA_RSS_MB": "150"}
LIMIT = {"max_sysmem_mb": 500}


async def test_a_spawn_that_does_not_fit_evicts_the_least_recently_used_idle_instance(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    models = models_with(a={"estimated_sysmem_mb": 200}, b={"estimated_sysmem_mb": 200}, c={"estimated_sysmem_mb": 200})
    env = {"a1": SIZED, "b1": SIZED, "c1": SIZED}
    async with gs.running_gateway(tmp_path, models=models, settings=gs.node_config(**LIMIT), env=env) as h:
        async with client(h) as sdk:
            assert await ask(sdk, "a:a1")
            assert await ask(sdk, "b:b1")  # b is used after a: a is the least recently used
            first, second = await ready_instance(h, "a"), await ready_instance(h, "b")
            await gs.eventually(lambda: first.name in {i.name for i in h.instances() if i.status.last_request_at})
            assert await ask(sdk, "c:c1")
        assert drained(caplog) == {first.name: "capacity: making room for c:c1"}
        assert await gone(h, first.name)
        still = await h.store.get(resources.LlamaInstance, second.name)
        assert still is not None and still.phase is resources.Phase.READY and not still.spec.drain


async def test_a_busy_instance_inside_its_tenure_is_protected_and_the_newcomer_queues(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    big = {"FAKE_LLAMA_RSS_MB": "250", "FAKE_LLAMA_TOKEN_DELAY_MS": "150"}
    models = models_with(
        a={"estimated_sysmem_mb": 300, "min_eviction_tenure_secs": 600},
        c={"estimated_sysmem_mb": 300, "max_wait_in_queue_ms": 1500},
    )
    async with gs.running_gateway(tmp_path, models=models, settings=gs.node_config(**LIMIT),
                                  env={"a1": big, "c1": SIZED}) as h:  # fmt: skip
        async with client(h) as sdk:
            assert await ask(sdk, "a:a1", tokens=1)
            busy = await ready_instance(h, "a")
            long_stream = asyncio.create_task(ask(sdk, "a:a1", tokens=60))  # about 9 s
            await gs.eventually(lambda: published_busy(h, busy.name))
            waiting = asyncio.create_task(ask(sdk, "c:c1"))  # asks for c's instance, waits for it
            newcomer = await gs.eventually(lambda: instance_of(h, "c"), what="c's instance to be asked for")
            # a later request for c waits its queue limit and is turned away (the instance is not placed)
            with pytest.raises(openai.APIStatusError) as refused:
                await ask(sdk, "c:c1")
            assert refused.value.status_code == 503
            assert refused.value.response.headers["Retry-After"] == "5"
            assert (refused.value.body or {})["type"] == "queue_timeout"  # type: ignore[index]
            assert not long_stream.done() and not waiting.done()
            pending = await h.store.get(resources.LlamaInstance, newcomer.name)
            assert pending is not None and pending.phase is resources.Phase.PENDING  # unschedulable
            assert busy.name not in drained(caplog)  # busy, inside its tenure
            assert len((await long_stream).split()) == 60
            # idle now, it yields at once whatever its tenure; the queued request is served
            assert await asyncio.wait_for(waiting, 120)
        assert drained(caplog)[busy.name] == "capacity: making room for c:c1"


async def test_a_busy_instance_past_its_tenure_is_drained_and_finishes_its_stream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    big = {"FAKE_LLAMA_RSS_MB": "250", "FAKE_LLAMA_TOKEN_DELAY_MS": "150"}
    models = models_with(a={"estimated_sysmem_mb": 300, "min_eviction_tenure_secs": 1}, c={"estimated_sysmem_mb": 300})
    settings = gs.node_config(**LIMIT)
    env = {"a1": big, "c1": SIZED}
    async with gs.running_gateway(tmp_path, models=models, settings=settings, env=env) as h, client(h) as sdk:
        assert await ask(sdk, "a:a1", tokens=1)
        busy = await ready_instance(h, "a")
        long_stream = asyncio.create_task(ask(sdk, "a:a1", tokens=40))  # about 6 s
        await gs.eventually(lambda: published_busy(h, busy.name))
        await asyncio.sleep(1.5)  # what is tested is its tenure (1 s) running out while it serves
        waiting = asyncio.create_task(ask(sdk, "c:c1"))
        await gs.eventually(lambda: busy.name in drained(caplog), what="the busy instance to be drained")
        assert "busy, past its eviction tenure" in drained(caplog)[busy.name]
        assert not long_stream.done()
        assert len((await long_stream).split()) == 40  # drained: its in-flight stream finished
        assert await asyncio.wait_for(waiting, 120)


# --- cold-start OOM recovery ----------------------------------------------------------------------------


def crowded(peers: Path) -> dict[str, dict[str, str]]:
    """`big` fails to start while any other fake runs; `small` registers so that big can count it."""
    return {
        "big1": {"FAKE_LLAMA_FAULT": "oom_when_crowded", "FAKE_LLAMA_PEERS_DIR": str(peers)},
        "small1": {"FAKE_LLAMA_PEERS_DIR": str(peers), "FAKE_LLAMA_TOKEN_DELAY_MS": "150"},
    }


def stage_events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, object]]:
    names = ("cold_oom_evict_stage1", "cold_oom_evict_stage2_start", "cold_oom_evict_stage2_drain_complete")
    return [(str(getattr(r, "event", "")), getattr(r, "count", None)) for r in events(caplog, *names)]


def terminated_for(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [str(getattr(r, "reason", "")) for r in events(caplog, "instance_terminate") if r.instance_id == name]  # type: ignore[attr-defined]


async def cold_oom_evictions(harness: gs.Harness) -> int:
    model = await harness.store.get(resources.LlamaModel, "big")
    assert model is not None
    return model.status.profiles["big1"].cold_oom_evictions


async def test_cold_start_stage_1_evicts_an_idle_neighbour_and_the_retry_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    peers = tmp_path / "peers"
    peers.mkdir()
    async with gs.running_gateway(tmp_path, models=models_with(big={}, small={}), env=crowded(peers)) as h:
        async with client(h) as sdk:
            assert await ask(sdk, "small:small1", tokens=1)
            idle = await ready_instance(h, "small")
            assert await ask(sdk, "big:big1")  # fails next to small, then small is evicted and it starts
        assert stage_events(caplog) == [("cold_oom_evict_stage1", 1)]
        assert drained(caplog)[idle.name].startswith("cold_oom_stage1:")
        await gs.eventually(lambda: terminated_for(caplog, idle.name) == ["cold_oom_stage1"])
        assert await cold_oom_evictions(h) == 1
        retries = [getattr(r, "stage", None) for r in events(caplog, "cold_start_retry")]
        assert retries == [1]


async def test_cold_start_stage_2_drains_a_busy_neighbour_which_finishes_its_stream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    peers = tmp_path / "peers"
    peers.mkdir()
    models = models_with(big={}, small={"min_eviction_tenure_secs": 600})
    async with gs.running_gateway(tmp_path, models=models, env=crowded(peers)) as h:
        async with client(h) as sdk:
            assert await ask(sdk, "small:small1", tokens=1)
            busy = await ready_instance(h, "small")
            long_stream = asyncio.create_task(ask(sdk, "small:small1", tokens=100))  # about 15 s
            await gs.eventually(lambda: published_busy(h, busy.name))
            assert await ask(sdk, "big:big1")
            assert len((await long_stream).split()) == 100  # drained at stage 2, it finished first
        assert stage_events(caplog) == [
            ("cold_oom_evict_stage1", 0),
            ("cold_oom_evict_stage2_start", 1),
            ("cold_oom_evict_stage2_drain_complete", None),
        ]
        assert drained(caplog)[busy.name].startswith("cold_oom_stage2:")
        await gs.eventually(lambda: terminated_for(caplog, busy.name) == ["cold_oom_stage2"])
        assert await cold_oom_evictions(h) == 1


async def test_a_cold_start_that_keeps_failing_runs_the_stages_then_answers_spawn_failures_exhausted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    env = {"big1": {"FAKE_LLAMA_FAULT": "exit_on_start"}}
    async with gs.running_gateway(tmp_path, models=models_with(big={}), env=env) as h:
        async with client(h) as sdk:
            with pytest.raises(openai.APIStatusError) as failed:
                await ask(sdk, "big:big1")
        assert failed.value.status_code == 503
        assert failed.value.response.headers["Retry-After"] == "30"
        assert (failed.value.body or {})["type"] == "spawn_failures_exhausted"  # type: ignore[index]
        assert stage_events(caplog) == [
            ("cold_oom_evict_stage1", 0),
            ("cold_oom_evict_stage2_start", 0),
            ("cold_oom_evict_stage2_drain_complete", None),
        ]
        assert [getattr(r, "stage", None) for r in events(caplog, "cold_start_retry")] == [1, 2]
        failures = [i for i in h.instances() if i.status.phase is resources.Phase.FAILED]
        assert len(failures) == 3  # the first start and both retries, each after its spawn attempts

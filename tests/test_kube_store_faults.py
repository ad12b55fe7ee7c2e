"""The Kubernetes store under faults a real API server cannot be made to produce on cue (kmock emulator):
a 409 conflict storm is ridden out by `writes.update` (and an endless one ends in Conflict); 429 with
Retry-After and 5xx are retried by the one retry policy, then surface; a 404/422/403 is never retried; the
informer lists again after a 410 delivered in the stream and as an HTTP status, resumes after a clean or an
abrupt disconnect and after a 5xx on the watch, and never dies — its cache always converges.

Also the pure parts: JSON merge patches and diffs, and the policy's delays.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

import store_backends
from llamesh_api import informer, kube_client, resources, retrying, store, writes
from rig import kmock_kube, waiting

FAST = retrying.Policy(attempts=4, first_delay_s=0.01, max_delay_s=2.0, deadline_s=10)


@pytest_asyncio.fixture
async def kube() -> AsyncIterator[tuple[store_backends.Backend, kmock_kube.KubeEmulator]]:
    async with store_backends.kmock_backend(policy=FAST) as pair:
        yield pair


def instance(name: str = "i-1") -> resources.LlamaInstance:
    return resources.LlamaInstance(
        metadata=resources.ObjectMeta(name=name),
        spec=resources.InstanceSpec(model="m", profile="default", args_hash="abc"),
    )


def drain(obj: resources.LlamaInstance) -> None:
    obj.spec.drain = True


# --- writes under faults ----------------------------------------------------------------------------


async def test_a_conflict_storm_is_ridden_out(kube: tuple[store_backends.Backend, kmock_kube.KubeEmulator]) -> None:
    backend, emulator = kube
    await backend.store.create(instance())
    emulator.fail_next(409, 5, method="PATCH")
    written = await writes.update(backend.store, resources.LlamaInstance, "i-1", drain)
    assert written is not None and written.spec.drain


async def test_an_endless_conflict_gives_up_with_conflict(
    kube: tuple[store_backends.Backend, kmock_kube.KubeEmulator],
) -> None:
    backend, emulator = kube
    await backend.store.create(instance())
    emulator.fail_next(409, 1000, method="PATCH")
    with pytest.raises(store.Conflict):
        await writes.update(backend.store, resources.LlamaInstance, "i-1", drain)


async def test_429_waits_for_retry_after_then_succeeds(
    kube: tuple[store_backends.Backend, kmock_kube.KubeEmulator],
) -> None:
    backend, emulator = kube
    await backend.store.create(instance())
    emulator.fail_next(429, 1, method="GET", retry_after=1)
    started = time.monotonic()
    assert await backend.store.get(resources.LlamaInstance, "i-1") is not None
    assert time.monotonic() - started >= 0.9  # Retry-After honoured


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors_are_retried_then_surface(
    kube: tuple[store_backends.Backend, kmock_kube.KubeEmulator], status: int
) -> None:
    backend, emulator = kube
    await backend.store.create(instance())
    emulator.fail_next(status, 2, method="PATCH", subresource="status", retry_after=0)
    updated = await backend.store.patch_status(resources.LlamaInstance, "i-1", {"port": 8080})
    assert updated.status.port == 8080
    emulator.fail_next(status, FAST.attempts, method="PATCH", subresource="status", retry_after=0)
    with pytest.raises(store.ServerError):
        await backend.store.patch_status(resources.LlamaInstance, "i-1", {"port": 8081})


@pytest.mark.parametrize(("status", "error"), [(404, store.NotFound), (422, store.Invalid), (403, store.Forbidden)])
async def test_final_answers_are_not_retried(
    kube: tuple[store_backends.Backend, kmock_kube.KubeEmulator], status: int, error: type[Exception]
) -> None:
    backend, emulator = kube
    await backend.store.create(instance())
    emulator.fail_next(status, 1, method="PATCH")
    emulator.fail_next(500, 1, method="PATCH")  # would be hit by a (wrong) retry
    with pytest.raises(error):
        await backend.store.patch(resources.LlamaInstance, "i-1", {"spec": {"drain": True}})


async def test_an_unreachable_server_is_unavailable() -> None:
    connection = kube_client.Connection(server="http://127.0.0.1:9", namespace="default", ssl_context=False)
    client = kube_client.Client(connection, policy=retrying.Policy(attempts=2, first_delay_s=0.01))
    try:
        with pytest.raises(store.Unavailable):
            await client.request("GET", "/version")
    finally:
        await client.close()


# --- the informer under faults ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_informer(
    backend: store_backends.Backend,
) -> AsyncIterator[informer.Informer[resources.LlamaInstance]]:
    watcher = informer.Informer(backend.store, resources.LlamaInstance, first_backoff_s=0.05, max_backoff_s=0.5)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(watcher.listed.wait(), 10)
        yield watcher
        assert not task.done(), "the informer stopped"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("in_stream", [True, False], ids=["410-in-stream", "410-http"])
async def test_informer_lists_again_after_410(
    kube: tuple[store_backends.Backend, kmock_kube.KubeEmulator], in_stream: bool
) -> None:
    backend, emulator = kube
    await backend.store.create(instance("a"))
    async with running_informer(backend) as watcher:
        await waiting.eventually(lambda: emulator.open_watches("llamainstances") == 1, what="the watch to open")
        emulator.fail_next_watches(1, status=410, in_stream=in_stream, plural="llamainstances")
        emulator.disconnect_watches("llamainstances")
        await waiting.eventually(lambda: watcher.lists >= 2, within_s=10, what="a re-list after 410")
        await backend.store.create(instance("b"))
        await waiting.eventually(lambda: set(watcher.cache) == {"a", "b"}, within_s=10, what="the cache to converge")


@pytest.mark.parametrize("abrupt", [False, True], ids=["clean", "abrupt"])
async def test_informer_resumes_after_a_disconnect_without_listing(
    kube: tuple[store_backends.Backend, kmock_kube.KubeEmulator], abrupt: bool
) -> None:
    backend, emulator = kube
    async with running_informer(backend) as watcher:
        await waiting.eventually(lambda: emulator.open_watches("llamainstances") == 1, what="the watch to open")
        emulator.disconnect_watches("llamainstances", abrupt=abrupt)
        await backend.store.create(instance("while-away"))
        await waiting.eventually(lambda: "while-away" in watcher.cache, within_s=10, what="the missed create")
        assert watcher.lists == 1  # resumed from its version: nothing was lost, nothing re-listed


async def test_informer_backs_off_on_server_errors_and_recovers(
    kube: tuple[store_backends.Backend, kmock_kube.KubeEmulator],
) -> None:
    backend, emulator = kube
    async with running_informer(backend) as watcher:
        await waiting.eventually(lambda: emulator.open_watches("llamainstances") == 1, what="the watch to open")
        emulator.fail_next_watches(50, status=500, in_stream=False, plural="llamainstances")
        emulator.disconnect_watches("llamainstances")
        await waiting.eventually(lambda: watcher.failures >= 1, within_s=30, what="a counted failure")
        emulator.clear_faults()
        await backend.store.create(instance("later"))
        await waiting.eventually(lambda: "later" in watcher.cache, within_s=30, what="recovery after 5xx")


# --- pure parts ------------------------------------------------------------------------------------


def test_merge_patch_and_diff_round_trip() -> None:
    before = {"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2], "gone": True}
    after = {"a": 1, "b": {"c": 5, "d": 3, "new": {"x": 1}}, "e": [2]}
    patch = store.merge_diff(before, after)
    assert patch == {"gone": None, "b": {"c": 5, "new": {"x": 1}}, "e": [2]}
    assert store.merge_patch(before, patch) == after
    assert store.merge_diff(after, after) == {}
    assert store.merge_patch({"a": {"b": 1}}, {"a": None}) == {}
    assert store.merge_patch({"a": 1}, {"a": {"b": None, "c": 1}}) == {"a": {"c": 1}}


def test_policy_delays_grow_are_capped_and_honour_retry_after() -> None:
    policy = retrying.Policy(first_delay_s=0.1, max_delay_s=1.0)
    assert 0.05 <= policy.delay(1) <= 0.1
    assert 0.4 <= policy.delay(4) <= 0.8
    assert policy.delay(20) <= 1.0
    assert policy.delay(1, retry_after_s=0.7) == 0.7
    assert policy.delay(1, retry_after_s=99) == 1.0

"""Admission with waiting, over a MemoryStore, without HTTP or child processes (`dispatch`, `following`).

Covers: a request with no instance creates a Pending LlamaInstance (name, spec, owner, reason) and is
served once it is READY; the catalog follows instance phases; a queue wait past `max_wait_in_queue_ms`
is a queue_timeout (counted, queue left); a waiter cancelled (client gone) leaves at once and leaks no
slot; a failed start fails every waiter with spawn_failures_exhausted, while a crash after READY asks
for a replacement; draining and a removed model turn waiters away; max_instances 0 is no_capacity;
prewarm; usage is published only when it changes (a newer stamp alone, while busy, at the refresh interval),
and at once when an instance we use is drained;
instance names are DNS-1123 safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
from collections.abc import AsyncIterator

import pytest

import gateway_support as gs
from llamesh_api import resources, store, writes
from llamesh_proxy import catalog, dispatch, errors, following, gateway, sharing
from rig import waiting

DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@contextlib.asynccontextmanager
async def running(*models: resources.LlamaModel, **settings: object) -> AsyncIterator[gateway.Gateway]:
    memory = store.MemoryStore()
    for item in models or (gs.model("m", gs.profile(max_instances=1)),):
        await memory.create(item)
    async with running_on(memory, **settings) as gw:
        yield gw


@contextlib.asynccontextmanager
async def running_on(memory: store.MemoryStore, **settings: object) -> AsyncIterator[gateway.Gateway]:
    node_config = gs.node_config(model_defaults={"max_concurrent_requests_per_instance": 1}, **settings)
    gw = gateway.Gateway(node_config, store=memory, gateway_id="gw-1", node_name=gs.NODE)
    tasks = await following.follow(gw)
    try:
        yield gw
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await gw.dispatcher.close()


def target(gw: gateway.Gateway, key: str = "m") -> catalog.Target:
    found = gw.catalog.resolve(key)
    assert found is not None
    return found


async def test_no_instance_asks_for_one_and_the_request_is_served_once_it_is_ready() -> None:
    async with running() as gw:
        waiting = asyncio.create_task(gw.dispatcher.acquire(target(gw)))
        (name,) = await gs.eventually(lambda: gs.instance_names(gw))
        created = await gw.store.get(resources.LlamaInstance, name)
        assert created is not None
        assert created.spec.model == "m" and created.spec.profile == "default"
        assert created.spec.args_hash == target(gw).args_hash
        assert created.spec.reason is resources.Reason.DEMAND
        assert created.status.phase is resources.Phase.PENDING
        assert created.metadata.annotations[dispatch.REQUESTED_BY] == "gw-1"
        model = await gw.store.get(resources.LlamaModel, "m")
        assert model is not None
        assert [(o.kind, o.name, o.uid) for o in created.metadata.owner_references] == [
            ("LlamaModel", "m", model.metadata.uid)
        ]
        assert name.startswith("m-default-") and DNS_1123.match(name)

        await gs.set_phase(gw.store, name, resources.Phase.STARTING, port=18001)
        await gs.eventually(lambda: gw.catalog.instance(name).phase is resources.Phase.STARTING)  # type: ignore[union-attr]
        assert not waiting.done()  # the gateway saw it starting, and still waits
        await gs.set_phase(gw.store, name, resources.Phase.READY, port=18001)
        lease = await asyncio.wait_for(waiting, 10)
        assert (lease.instance, lease.url) == (name, "http://127.0.0.1:18001")
        assert lease.queued_ms > 0
        assert gw.board.in_flight(name) == 1
        gw.dispatcher.release(lease)
        assert gw.board.in_flight(name) == 0
        assert gw.metrics.queue_wait_count == 1


async def test_queue_wait_past_the_limit_is_a_queue_timeout() -> None:
    async with running(gs.model("m", gs.profile(max_instances=1, max_wait_in_queue_ms=150))) as gw:
        starter = asyncio.create_task(gw.dispatcher.acquire(target(gw)))  # asks for the only instance
        await gs.eventually(lambda: gs.instance_names(gw))
        with pytest.raises(errors.QueueTimeout):
            await gw.dispatcher.acquire(target(gw))  # queues behind it, asks for nothing, times out
        assert gw.board.queue_length() == 1
        assert gw.metrics.queue_drops["timeout"] == 1
        starter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starter


async def test_the_request_that_starts_an_instance_waits_for_it_past_the_queue_limit() -> None:
    """A cold start slower than max_wait_in_queue_ms still serves the request that caused it (the seed's
    behaviour); the startup budget bounds that wait instead."""
    async with running(gs.model("m", gs.profile(max_instances=1, max_wait_in_queue_ms=150))) as gw:
        starter = asyncio.create_task(gw.dispatcher.acquire(target(gw)))
        (name,) = await gs.eventually(lambda: gs.instance_names(gw))
        # the cold start takes longer than the queue limit: what is tested is time, so it is waited out
        await waiting.stays_true_for(lambda: not starter.done(), seconds=0.5, what="the starter to keep waiting")
        await gs.set_phase(gw.store, name, resources.Phase.READY, port=18009)
        lease = await asyncio.wait_for(starter, 10)
        assert lease.instance == name and lease.queued_ms >= 500
        gw.dispatcher.release(lease)


async def test_a_cancelled_waiter_leaves_the_queue_and_leaks_no_slot() -> None:
    async with running() as gw:
        waiting = asyncio.create_task(gw.dispatcher.acquire(target(gw)))
        (name,) = await gs.eventually(lambda: gs.instance_names(gw))
        assert gw.board.queue_length() == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert gw.board.queue_length() == 0
        await gs.set_phase(gw.store, name, resources.Phase.READY, port=18002)
        await gs.eventually(lambda: gw.catalog.url(name))
        assert gw.board.in_flight_by_instance() == {}
        lease = await gw.dispatcher.acquire(target(gw))  # the slot is free for the next request
        assert lease.instance == name and lease.queued_ms == 0


async def test_a_failed_start_fails_every_waiter() -> None:
    """A cold start (no node learned its memory) is retried at recovery stages 1 and 2 (annotated for the
    operator) while the waiters wait; the third failure in a row fails them all."""
    async with running(gs.model("m", gs.profile(max_instances=1))) as gw:
        waiters = [asyncio.create_task(gw.dispatcher.acquire(target(gw))) for _ in range(3)]
        failed: list[str] = []
        for stage in (0, 1, 2):
            name = await gs.eventually(lambda: next((n for n in gs.instance_names(gw) if n not in failed), None))
            instance = await gw.store.get(resources.LlamaInstance, name)
            assert instance is not None
            assert instance.metadata.annotations.get(resources.COLD_START_STAGE) == (str(stage) if stage else None)
            assert not any(waiter.done() for waiter in waiters)
            await gs.set_phase(gw.store, name, resources.Phase.FAILED)
            failed.append(name)
        for waiter in waiters:
            with pytest.raises(errors.SpawnFailuresExhausted):
                await asyncio.wait_for(waiter, 10)
        assert gw.board.queue_length() == 0


async def test_a_crash_after_ready_asks_for_a_replacement_for_the_waiters() -> None:
    async with running() as gw:
        waiting = asyncio.create_task(gw.dispatcher.acquire(target(gw)))
        (first,) = await gs.eventually(lambda: gs.instance_names(gw))
        await gs.set_phase(gw.store, first, resources.Phase.READY, port=18003)
        lease = await asyncio.wait_for(waiting, 10)
        second_waiter = asyncio.create_task(gw.dispatcher.acquire(target(gw)))
        await gs.eventually(lambda: gw.board.queue_length() == 1)
        await gs.set_phase(gw.store, first, resources.Phase.FAILED)  # crashed while serving
        names = await gs.eventually(lambda: len(gs.instance_names(gw)) == 2 and gs.instance_names(gw))
        replacement = next(n for n in names if n != first)
        await gs.set_phase(gw.store, replacement, resources.Phase.READY, port=18004)
        assert (await asyncio.wait_for(second_waiter, 10)).instance == replacement
        gw.dispatcher.release(lease)


async def test_draining_turns_waiters_and_newcomers_away() -> None:
    async with running() as gw:
        waiters = [asyncio.create_task(gw.dispatcher.acquire(target(gw))) for _ in range(2)]
        await gs.eventually(lambda: gw.board.queue_length() == 2)
        gw.start_draining()
        for waiter in waiters:
            with pytest.raises(errors.Draining):
                await asyncio.wait_for(waiter, 10)
        with pytest.raises(errors.Draining):
            await gw.dispatcher.acquire(target(gw))


async def test_a_removed_model_turns_its_waiters_away() -> None:
    async with running() as gw:
        waiting = asyncio.create_task(gw.dispatcher.acquire(target(gw)))
        await gs.eventually(lambda: gw.board.queue_length() == 1)
        await gw.store.delete(resources.LlamaModel, "m")
        with pytest.raises(errors.ModelNotFound):
            await asyncio.wait_for(waiting, 10)
        assert gw.catalog.resolve("m") is None


async def test_no_instances_allowed_is_no_capacity() -> None:
    async with running(gs.model("m", gs.profile(max_instances=0))) as gw:
        with pytest.raises(errors.NoCapacity):
            await gw.dispatcher.acquire(target(gw))
        assert gs.instance_names(gw) == []


async def test_prewarm_asks_for_one_instance_only() -> None:
    async with running() as gw:
        name = gw.dispatcher.prewarm(target(gw))
        assert name is not None
        await gs.eventually(lambda: gs.instance_names(gw) == [name])
        created = await gw.store.get(resources.LlamaInstance, name)
        assert created is not None and created.spec.reason is resources.Reason.PREWARM
        assert gw.dispatcher.prewarm(target(gw)) is None


async def one_leased_instance(gw: gateway.Gateway) -> tuple[str, dispatch.Lease]:
    """A READY instance that one request asked for, and that request's lease on it."""
    waiting = asyncio.create_task(gw.dispatcher.acquire(target(gw)))
    (name,) = await gs.eventually(lambda: gs.instance_names(gw))
    await gs.set_phase(gw.store, name, resources.Phase.READY, port=18005)
    return name, await asyncio.wait_for(waiting, 10)


async def stored(gw: gateway.Gateway, name: str) -> resources.LlamaInstance:
    found = await gw.store.get(resources.LlamaInstance, name)
    assert found is not None
    return found


async def test_usage_is_published_when_it_changes_and_only_then() -> None:
    async with running() as gw:
        name, lease = await one_leased_instance(gw)
        published: dict[str, following.Usage] = {}

        await following.publish_once(gw, published)
        first = (await stored(gw, name)).status.usage["gw-1"]
        assert first.in_flight == 1 and first.last_request_at is not None
        version = (await stored(gw, name)).metadata.resource_version
        await following.publish_once(gw, published)
        assert (await stored(gw, name)).metadata.resource_version == version  # nothing changed, nothing written
        gw.dispatcher.release(lease)
        await following.publish_once(gw, published)
        last = (await stored(gw, name)).status.usage["gw-1"]
        assert last.in_flight == 0 and last.last_request_at is not None
        assert last.last_request_at >= first.last_request_at


async def test_under_steady_traffic_a_newer_stamp_alone_waits_for_the_refresh_interval() -> None:
    """One request after another keeps in_flight at 1: the stamp alone is not written every tick (each write
    wakes every watcher), but at the refresh interval, and at once when the instance goes idle."""
    async with running() as gw:
        name, lease = await one_leased_instance(gw)
        published: dict[str, following.Usage] = {}

        await following.publish_once(gw, published)
        first = (await stored(gw, name)).status.usage["gw-1"]
        version = (await stored(gw, name)).metadata.resource_version
        gw.dispatcher.release(lease)  # the next request follows at once: still one in flight at the tick
        lease = await asyncio.wait_for(gw.dispatcher.acquire(target(gw)), 10)
        assert gw.dispatcher.last_request_at[name] > first.last_request_at.timestamp()
        await following.publish_once(gw, published)
        assert (await stored(gw, name)).metadata.resource_version == version
        await following.publish_once(gw, published, refresh_s=0.0)  # the interval has passed
        refreshed = (await stored(gw, name)).status.usage["gw-1"]
        assert refreshed.in_flight == 1 and refreshed.last_request_at > first.last_request_at
        gw.dispatcher.release(lease)
        await following.publish_once(gw, published)  # idle: written at once, whatever the interval
        idle = (await stored(gw, name)).status.usage["gw-1"]
        assert idle.in_flight == 0 and idle.last_request_at >= refreshed.last_request_at


@pytest.mark.parametrize(
    ("published", "current", "expected"),
    [
        (None, following.Usage(1, 100.0), True),  # nothing written yet
        (following.Usage(1, 100.0), following.Usage(1, 100.0), False),  # nothing changed
        (following.Usage(1, 100.0), following.Usage(2, 100.5), True),  # the count changed
        (following.Usage(1, 100.0), following.Usage(0, 100.5), True),  # went idle: the stamp starts its timeout
        (following.Usage(0, 100.0), following.Usage(0, 101.0), True),  # idle, a request came and went
        (following.Usage(1, 100.0), following.Usage(1, 105.0), False),  # busy: the stamp alone waits...
        (following.Usage(1, 100.0), following.Usage(1, 110.0), True),  # ...for the refresh interval
        (following.Usage(1, None), following.Usage(1, 100.0), True),  # a first stamp
    ],
)
def test_worth_publishing(published: following.Usage | None, current: following.Usage, expected: bool) -> None:
    assert following.worth_publishing(published, current, refresh_s=10.0) is expected


def test_instance_names_are_dns_safe() -> None:
    odd = gs.model("Org/Model_V2.5", gs.profile("Q4"))
    found = catalog.Catalog(defaults=gs.node_config().model_defaults)
    found.replace_models([odd])
    (only,) = found.targets()
    name = dispatch.instance_name(only)
    assert DNS_1123.match(name) and len(name) <= 63
    assert name.startswith("org-model-v2-5-q4-")
    long = gs.model("x" * 200)
    found.replace_models([long])
    assert len(dispatch.instance_name(found.targets()[0])) <= 63


async def test_a_drained_instance_hears_about_our_requests_at_once() -> None:
    async with running() as gw:
        publisher = asyncio.create_task(following.publish_usage(gw, interval_s=3600))
        try:
            waiting = asyncio.create_task(gw.dispatcher.acquire(target(gw)))
            (name,) = await gs.eventually(lambda: gs.instance_names(gw))
            await gs.set_phase(gw.store, name, resources.Phase.READY, port=18006)
            lease = await asyncio.wait_for(waiting, 10)

            def drain(instance: resources.LlamaInstance) -> None:
                instance.spec.drain = True

            await writes.update(gw.store, resources.LlamaInstance, name, drain)

            async def reported() -> bool:
                current = await gw.store.get(resources.LlamaInstance, name)
                return current is not None and current.status.in_flight == 1

            await gs.eventually(reported, within_s=5)  # long before the hourly tick
            assert gw.catalog.url(name) is None  # and nothing new is sent to it
            gw.dispatcher.release(lease)
        finally:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher


@contextlib.asynccontextmanager
async def two_gateways(
    memory: store.MemoryStore, *, slots: int = 0
) -> AsyncIterator[tuple[gateway.Gateway, gateway.Gateway]]:
    node_config = gs.node_config(model_defaults={"max_concurrent_requests_per_instance": slots})
    pair = [
        gateway.Gateway(node_config, store=memory, gateway_id=f"gw-{n}", node_name=gs.NODE, shared_slots=bool(slots))
        for n in (1, 2)
    ]
    tasks = [task for gw in pair for task in await following.follow(gw)]
    tasks += [asyncio.create_task(gw.sharing.run()) for gw in pair if gw.sharing is not None]
    try:
        yield pair[0], pair[1]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for gw in pair:
            await gw.dispatcher.close()
            if gw.sharing is not None:
                await gw.sharing.close()


async def test_replicas_racing_on_a_cold_model_create_one_instance(caplog: pytest.LogCaptureFixture) -> None:
    memory = store.MemoryStore()
    await memory.create(gs.model("m", gs.profile(max_instances=3)))
    caplog.set_level(logging.INFO, logger=dispatch.__name__)
    async with two_gateways(memory) as (first, second):
        # both ask before either can see the other's instance: the same cold name makes one of them
        asks = [asyncio.create_task(gw.dispatcher.acquire(target(gw))) for gw in (first, second)]
        await gs.eventually(lambda: gs.instance_names(first) and gs.instance_names(second))

        def shared() -> bool:  # the `instance_shared` log event (in the record's `event` field or its text)
            return any("instance_shared" in f"{getattr(r, 'event', '')} {r.getMessage()}" for r in caplog.records)

        # the loser's create has come back (AlreadyExists) and it chose to wait for the winner's instance
        await gs.eventually(shared, what="the second create to be answered")
        listed = (await memory.list(resources.LlamaInstance)).items
        assert len(listed) == 1, [i.name for i in listed]
        (only,) = listed
        assert DNS_1123.match(only.name)
        await gs.set_phase(memory, only.name, resources.Phase.READY, port=18011)
        leases = await asyncio.wait_for(asyncio.gather(*asks), 10)
        assert {lease.instance for lease in leases} == {only.name}
        first.dispatcher.release(leases[0])
        second.dispatcher.release(leases[1])


async def test_a_cold_name_held_by_a_finished_instance_is_not_reused() -> None:
    memory = store.MemoryStore()
    await memory.create(gs.model("m", gs.profile(max_instances=1)))
    async with running_on(memory) as gw:
        cold = resources.instance_name("m", "default", target(gw).args_hash[:10])
        leftover = resources.new_instance(
            name=cold, model="m", model_uid=None, profile="default", args_hash=target(gw).args_hash,
            reason=resources.Reason.DEMAND, requested_by="gw-old",
        )  # fmt: skip
        # created behind the gateway's back (its watch has not delivered it yet) and already stopped
        await memory.create(leftover)
        await memory.patch_status(resources.LlamaInstance, cold, {"phase": "Stopped"})
        asking = asyncio.create_task(gw.dispatcher.acquire(target(gw)))
        fresh = await gs.eventually(lambda: [n for n in gs.instance_names(gw) if n != cold])
        await gs.set_phase(memory, fresh[0], resources.Phase.READY, port=18012)
        lease = await asyncio.wait_for(asking, 10)
        assert lease.instance == fresh[0]
        gw.dispatcher.release(lease)


async def test_an_unreachable_mark_outlives_usage_writes_but_not_a_new_process() -> None:
    async with running(gs.model("m", gs.profile(max_instances=1))) as gw:
        asking = asyncio.create_task(gw.dispatcher.acquire(target(gw)))
        (name,) = await gs.eventually(lambda: gs.instance_names(gw))
        await gs.set_phase(gw.store, name, resources.Phase.READY, port=18013)
        gw.dispatcher.release(await asyncio.wait_for(asking, 10))
        pool = target(gw).pool
        gw.catalog.mark_unreachable(name)
        assert gw.catalog.pool_view(pool).routable == []
        # another gateway's usage report: a new version of the object, the same dead process
        await gw.store.patch_status(resources.LlamaInstance, name, {"usage": {"gw-2": {"inFlight": 1}}})
        await gs.eventually(lambda: gw.catalog.instance(name).status.usage, what="the usage report")  # type: ignore[union-attr]
        assert gw.catalog.pool_view(pool).routable == []
        # its agent restarted it on another port: routable again
        await gs.set_phase(gw.store, name, resources.Phase.READY, port=18014)
        await gs.eventually(lambda: gw.catalog.pool_view(pool).routable == [name], what="the new process")


async def test_replicas_never_put_more_than_the_slot_limit_on_an_instance_together() -> None:
    memory = store.MemoryStore()
    await memory.create(gs.model("m", gs.profile(max_instances=1, max_wait_in_queue_ms=0)))
    async with two_gateways(memory, slots=2) as (first, second):
        starter = asyncio.create_task(first.dispatcher.acquire(target(first)))
        (name,) = await gs.eventually(lambda: gs.instance_names(first))
        await gs.set_phase(memory, name, resources.Phase.READY, port=18015)
        first.dispatcher.release(await asyncio.wait_for(starter, 10))
        await gs.eventually(lambda: second.catalog.pool_view(target(second).pool).routable, what="both see it")

        most = 0
        served = {"gw-1": 0, "gw-2": 0}

        async def one(gw: gateway.Gateway) -> None:
            nonlocal most
            lease = await gw.dispatcher.acquire(target(gw))
            together = first.board.in_flight(name) + second.board.in_flight(name)
            most = max(most, together)
            await asyncio.sleep(0.02)  # holds the slot a moment, so the requests overlap (pacing, not waiting)
            served[gw.gateway_id] += 1
            gw.dispatcher.release(lease)

        await asyncio.wait_for(asyncio.gather(*(one(gw) for gw in [first, second] * 8)), 60)
        assert served == {"gw-1": 8, "gw-2": 8}
        assert most == 2  # used to the limit, never past it
        final = await memory.get(resources.LlamaInstance, name)
        assert final is not None
        claims = {replica: usage.claimed for replica, usage in final.status.usage.items()}
        assert sum(claims.values()) <= 2, claims


def test_claim_arithmetic() -> None:
    """The pure decisions: a claim grows to use plus queue within what others left, and keeps what it uses."""
    assert sharing.grow_to(limit=4, others=3, current=0, in_flight=0, queued=5) == 1
    assert sharing.grow_to(limit=4, others=0, current=1, in_flight=1, queued=1) == 2
    assert sharing.grow_to(limit=4, others=4, current=0, in_flight=0, queued=1) == 0
    assert sharing.grow_to(limit=2, others=3, current=1, in_flight=1, queued=0) == 1  # never below what it has
    assert sharing.surplus_wanted(current=3, in_flight=1, queued=0) == 1
    now = store.utcnow()
    instance = resources.LlamaInstance(
        metadata=resources.ObjectMeta(name="i"),
        spec=resources.InstanceSpec(model="m", profile="p", args_hash="h"),
        status=resources.InstanceStatus(
            usage={
                "me": resources.GatewayUsage(claimed=2, claimed_at=now),
                "live": resources.GatewayUsage(claimed=1, claimed_at=now, waiting=1),
                "expired": resources.GatewayUsage(claimed=5, claimed_at=now - datetime.timedelta(seconds=60)),
            }
        ),
    )
    assert sharing.others_claimed(instance, me="me", now=now) == 1
    assert sharing.others_waiting(instance, me="me", now=now)
    assert not sharing.others_waiting(instance, me="live", now=now)


async def test_a_replica_holding_idle_slots_gives_them_to_one_that_waits() -> None:
    memory = store.MemoryStore()
    await memory.create(gs.model("m", gs.profile(max_instances=1, max_wait_in_queue_ms=0)))
    async with two_gateways(memory, slots=2) as (first, second):
        starter = asyncio.create_task(first.dispatcher.acquire(target(first)))
        (name,) = await gs.eventually(lambda: gs.instance_names(first))
        await gs.set_phase(memory, name, resources.Phase.READY, port=18016)
        held = [await asyncio.wait_for(starter, 10), await first.dispatcher.acquire(target(first))]
        for lease in held:
            first.dispatcher.release(lease)
        assert first.board.allowance(name) == 2  # both slots claimed by the first, now idle
        await gs.eventually(lambda: second.catalog.pool_view(target(second).pool).routable, what="both see it")
        lease = await asyncio.wait_for(second.dispatcher.acquire(target(second)), 10)  # not after 60 s
        assert lease.instance == name and first.board.allowance(name) < 2
        second.dispatcher.release(lease)

"""The gateway's pure admission board (`llamesh_proxy.queueing`).

Covers: choosing the free instance with the fewest in flight (and unlimited concurrency); FIFO queueing
with no bypass (freed slots and newly READY instances go to the head of the queue, newcomers queue behind);
per-pool and global queue limits; leaving the queue (timeout or disconnect) and giving back a slot that was
granted too late; when an instance is asked for (coming capacity vs queue, max_instances, prewarm, asked-for
names forgotten once seen); failed starts failing the queue, other losses asking for a replacement;
max_instances 0; draining; a removed profile; a failed store create.
"""

from __future__ import annotations

import itertools

import pytest

from llamesh_proxy import queueing
from llamesh_proxy.queueing import Admitted, FailReason, Grant, Queued, Rejected, RejectReason

POOL = "m:default"


def policy(*, concurrent: int = 1, queue: int = 0, instances: int = 1) -> queueing.Policy:
    return queueing.Policy(max_concurrent=concurrent, max_queue=queue, max_instances=instances)


class Names:
    """A name factory that records what it made."""

    def __init__(self) -> None:
        self._count = itertools.count(1)
        self.made: list[str] = []

    def __call__(self) -> str:
        name = f"i{next(self._count)}"
        self.made.append(name)
        return name


@pytest.fixture
def names() -> Names:
    return Names()


def ready(
    board: queueing.Board,
    names: Names,
    *routable: str,
    starting: tuple[str, ...] = (),
    pol: queueing.Policy | None = None,
    failed: bool = False,
    known: tuple[str, ...] = (),
) -> queueing.Changes:
    return board.set_instances(
        POOL,
        pol or policy(),
        routable=list(routable),
        starting=starting,
        known=set(routable) | set(starting) | set(known),
        failed_unready=failed,
        name_factory=names,
    )


def admit(board: queueing.Board, names: Names, pol: queueing.Policy | None = None) -> queueing.Decision:
    return board.admit(POOL, pol or policy(), name_factory=names)


# --- choosing an instance ---------------------------------------------------------------------


def test_free_instance_with_fewest_in_flight_wins(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    pol = policy(concurrent=2, instances=2)
    ready(board, names, "a", "b", pol=pol)
    first, second, third = (admit(board, names, pol) for _ in range(3))
    assert [d.instance for d in (first, second, third) if isinstance(d, Admitted)] == ["a", "b", "a"]
    assert board.in_flight_by_instance() == {"a": 2, "b": 1}


def test_unlimited_concurrency_never_queues(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    pol = policy(concurrent=0)
    ready(board, names, "a", pol=pol)
    decisions = [admit(board, names, pol) for _ in range(50)]
    assert all(isinstance(d, Admitted) and d.instance == "a" for d in decisions)
    assert board.in_flight("a") == 50
    assert names.made == []


def test_release_frees_the_slot_for_the_next_newcomer(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    ready(board, names, "a")
    first = admit(board, names)
    assert isinstance(first, Admitted)
    assert board.release(first.ticket) == queueing.Changes()
    assert board.in_flight("a") == 0
    assert isinstance(admit(board, names), Admitted)


# --- FIFO, no bypass --------------------------------------------------------------------------


def test_waiters_are_served_in_arrival_order_and_newcomers_queue_behind(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    w1, w2 = admit(board, names), admit(board, names)
    assert isinstance(w1, Queued) and isinstance(w2, Queued)
    assert ready(board, names, "a").grants == [Grant(w1.ticket, "a")]  # one slot: only the head
    newcomer = admit(board, names)
    assert isinstance(newcomer, Queued)  # w2 waits, so the newcomer does too
    assert board.release(w1.ticket).grants == [Grant(w2.ticket, "a")]
    assert board.release(w2.ticket).grants == [Grant(newcomer.ticket, "a")]
    assert board.queue_length() == 0


def test_newcomer_never_takes_a_slot_while_someone_waits(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    ready(board, names, "a")
    serving = admit(board, names)
    waiting = admit(board, names)
    assert isinstance(serving, Admitted) and isinstance(waiting, Queued)
    granted = board.release(serving.ticket)
    assert granted.grants == [Grant(waiting.ticket, "a")]  # the freed slot went to the waiter at once
    assert isinstance(admit(board, names), Queued)


def test_a_newly_ready_instance_serves_as_many_waiters_as_it_has_slots(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    pol = policy(concurrent=2, instances=1)
    waiters = [admit(board, names, pol) for _ in range(3)]
    assert all(isinstance(w, Queued) for w in waiters)
    changes = ready(board, names, "a", pol=pol)
    assert [g.ticket for g in changes.grants] == [w.ticket for w in waiters[:2] if isinstance(w, Queued)]
    assert board.queue_length(POOL) == 1


# --- limits -----------------------------------------------------------------------------------


def test_full_pool_queue_is_rejected(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    pol = policy(queue=2)
    ready(board, names, "a", pol=pol)
    assert isinstance(admit(board, names, pol), Admitted)
    assert isinstance(admit(board, names, pol), Queued)
    assert isinstance(admit(board, names, pol), Queued)
    assert admit(board, names, pol) == Rejected(RejectReason.QUEUE_FULL)


def test_global_queue_limit_spans_pools(names: Names) -> None:
    board = queueing.Board(max_total_queue=2)
    assert isinstance(board.admit("a:default", policy(), name_factory=names), Queued)
    assert isinstance(board.admit("b:default", policy(), name_factory=names), Queued)
    assert board.admit("c:default", policy(), name_factory=names) == Rejected(RejectReason.GLOBAL_LIMIT)
    assert board.queue_length() == 2


def test_zero_limits_mean_unlimited(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    pol = policy(queue=0, instances=1)
    decisions = [admit(board, names, pol) for _ in range(500)]
    assert all(isinstance(d, Queued) for d in decisions)
    assert board.queue_length() == 500


def test_no_instances_allowed_and_none_running_is_no_capacity(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    assert admit(board, names, policy(instances=0)) == Rejected(RejectReason.NO_CAPACITY)
    assert names.made == []


# --- leaving the queue ------------------------------------------------------------------------


def test_withdrawn_waiter_leaves_the_queue_and_is_skipped(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    w1, w2 = admit(board, names), admit(board, names)
    assert isinstance(w1, Queued) and isinstance(w2, Queued)
    assert board.withdraw(w1.ticket) == queueing.Changes()
    assert board.queue_length(POOL) == 1 and not board.is_waiting(w1.ticket)
    assert ready(board, names, "a").grants == [Grant(w2.ticket, "a")]


def test_withdrawing_a_slot_granted_too_late_passes_it_on(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    w1, w2 = admit(board, names), admit(board, names)
    assert isinstance(w1, Queued) and isinstance(w2, Queued)
    ready(board, names, "a")
    assert board.holds(w1.ticket) == "a"
    # w1 timed out (or its client left) just as the slot came: giving it back serves w2
    assert board.withdraw(w1.ticket).grants == [Grant(w2.ticket, "a")]
    assert board.in_flight("a") == 1


def test_withdrawing_twice_or_releasing_unknown_tickets_is_harmless(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    ready(board, names, "a")
    served = admit(board, names)
    assert isinstance(served, Admitted)
    board.release(served.ticket)
    assert board.withdraw(served.ticket) == queueing.Changes()
    assert board.release(12345) == queueing.Changes()
    assert board.in_flight("a") == 0


# --- asking for instances ---------------------------------------------------------------------


def test_first_request_asks_for_an_instance_and_later_ones_wait_for_it(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    pol = policy(concurrent=0, instances=4)
    first = admit(board, names, pol)
    assert isinstance(first, Queued) and first.spawn == "i1"
    later = [admit(board, names, pol) for _ in range(5)]
    assert all(isinstance(d, Queued) and d.spawn is None for d in later)  # unlimited slots: one is enough
    assert board.requested(POOL) == {"i1"}


def test_busy_instances_scale_out_up_to_max_instances(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    pol = policy(concurrent=1, instances=3)
    ready(board, names, "a", pol=pol)
    assert isinstance(admit(board, names, pol), Admitted)
    spawns = [d.spawn for d in (admit(board, names, pol) for _ in range(4)) if isinstance(d, Queued)]
    assert spawns == ["i1", "i2", None, None]  # a, i1, i2 = max_instances 3


def test_starting_instances_count_as_coming_capacity(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    pol = policy(concurrent=2, instances=3)
    ready(board, names, starting=("s",), pol=pol)
    decisions = [admit(board, names, pol) for _ in range(3)]
    assert [d.spawn for d in decisions if isinstance(d, Queued)] == [None, None, "i1"]


def test_asked_for_names_are_forgotten_once_the_catalog_holds_them(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    decision = admit(board, names)
    assert isinstance(decision, Queued) and decision.spawn == "i1"
    ready(board, names, starting=("i1",))
    assert board.requested(POOL) == frozenset()
    assert ready(board, names, "i1").grants == [Grant(decision.ticket, "i1")]


def test_prewarm_asks_only_when_nothing_is_live(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    assert board.want_instance(POOL, policy(), name_factory=names) == "i1"
    assert board.want_instance(POOL, policy(), name_factory=names) is None  # i1 is coming
    assert board.want_instance("x:default", policy(instances=0), name_factory=names) is None


# --- losing instances -------------------------------------------------------------------------


def test_a_failed_start_with_nothing_else_live_fails_the_whole_queue(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    waiters = [admit(board, names) for _ in range(3)]
    changes = ready(board, names, failed=True, known=("i1",))
    assert [(f.ticket, f.reason) for f in changes.failures] == [
        (w.ticket, FailReason.SPAWN_FAILED) for w in waiters if isinstance(w, Queued)
    ]
    assert board.queue_length() == 0


def test_a_failed_start_while_another_instance_is_coming_keeps_the_queue(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    pol = policy(concurrent=1, instances=2)
    admit(board, names, pol), admit(board, names, pol)
    assert names.made == ["i1", "i2"]
    changes = ready(board, names, starting=("i2",), failed=True, known=("i1",), pol=pol)
    assert not changes.failures and board.queue_length() == 2


def test_losing_the_last_instance_otherwise_asks_for_a_replacement(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    waiting = admit(board, names)
    assert isinstance(waiting, Queued) and waiting.spawn == "i1"
    ready(board, names, starting=("i1",))
    changes = ready(board, names)  # i1 deleted (drained or removed) before it became READY
    assert changes.spawns == [queueing.Spawn(POOL, "i2")] and not changes.failures


def test_draining_instances_keep_their_counts_but_take_nothing_new(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    ready(board, names, "a", "b")
    on_a = admit(board, names)
    assert isinstance(on_a, Admitted) and on_a.instance == "a"
    ready(board, names, "b")  # a is draining
    on_b = admit(board, names)
    assert isinstance(on_b, Admitted) and on_b.instance == "b"
    waiting = admit(board, names)
    assert isinstance(waiting, Queued)
    assert board.release(on_a.ticket).grants == []  # a's slot is not reused
    assert board.in_flight("a") == 0
    assert board.release(on_b.ticket).grants == [Grant(waiting.ticket, "b")]


def test_store_create_failure_fails_waiters_when_nothing_else_comes(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    waiting = admit(board, names)
    assert isinstance(waiting, Queued)
    changes = board.create_failed(POOL, "i1")
    assert [(f.ticket, f.reason) for f in changes.failures] == [(waiting.ticket, FailReason.CREATE_FAILED)]


def test_a_removed_profile_fails_its_waiters(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    waiting = admit(board, names)
    assert isinstance(waiting, Queued)
    assert [f.reason for f in board.forget(POOL).failures] == [FailReason.PROFILE_GONE]
    assert board.forget(POOL) == queueing.Changes()


# --- draining ---------------------------------------------------------------------------------


def test_draining_turns_away_waiters_and_newcomers_but_lets_the_served_finish(names: Names) -> None:
    board = queueing.Board(max_total_queue=0)
    ready(board, names, "a")
    serving = admit(board, names)
    waiting = [admit(board, names) for _ in range(2)]
    assert isinstance(serving, Admitted)
    changes = board.drain()
    assert [f.reason for f in changes.failures] == [FailReason.DRAINING] * 2
    assert {f.ticket for f in changes.failures} == {w.ticket for w in waiting if isinstance(w, Queued)}
    assert admit(board, names) == Rejected(RejectReason.DRAINING)
    assert board.release(serving.ticket) == queueing.Changes()
    assert board.in_flight_by_instance() == {}


# --- shared slots (several gateway replicas) ---------------------------------------------------------


def test_shared_slots_admit_only_up_to_what_was_claimed(names: Names) -> None:
    board = queueing.Board(max_total_queue=0, shared=True)
    pol = policy(concurrent=2)
    ready(board, names, "a", pol=pol)
    waiting = admit(board, names, pol)
    assert isinstance(waiting, Queued) and waiting.spawn is None  # a READY instance, no claim yet
    changes = board.set_allowance(POOL, "a", 1)
    assert changes.grants == [Grant(waiting.ticket, "a")]
    assert isinstance(admit(board, names, pol), Queued)  # the claim is used up; the limit (2) is not
    board.set_allowance(POOL, "a", 5)  # a claim never lets it past the limit
    assert board.in_flight("a") == 2 and board.allowance("a") == 5
    assert isinstance(admit(board, names, pol), Queued)


def test_shared_slots_with_unlimited_concurrency_need_no_claim(names: Names) -> None:
    board = queueing.Board(max_total_queue=0, shared=True)
    ready(board, names, "a", pol=policy(concurrent=0))
    assert isinstance(admit(board, names, policy(concurrent=0)), Admitted)

"""KV-cache-affine routing (`llamesh_proxy.affinity`) and its use by the admission board.

Covers: the key of a request (explicit session header, then `user`; the chat prefix up to the first user
message, stable across turns and distinct between conversations; completions' leading characters and token
ids; None for short or shapeless prompts); the choice (a remembered instance is a hit, a new key goes to its
rendezvous home, keys spread over instances, a full or over-bound home falls back to a free instance and
never queues, no key is least loaded, an evicted instance's keys re-home with no error); the bounded table
(LRU bound, re-homing to an instance that restored the caches); through `queueing.Board`: a conversation
sticks to its instance, waiters granted a slot re-home their key, `routing: least_loaded` ignores keys; the
prompt tokens llama-server reused, read from the end of its answer.
"""

from __future__ import annotations

import collections

from llamesh_proxy import affinity, forwarder, queueing
from llamesh_proxy.affinity import Result

SYSTEM = {"role": "system", "content": "You are a careful assistant who answers in full sentences. " * 4}


def conversation(first: str, turns: int) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = [SYSTEM, {"role": "user", "content": first}]
    for turn in range(1, turns):
        messages += [
            {"role": "assistant", "content": f"answer {turn} " * 20},
            {"role": "user", "content": f"follow-up {turn}"},
        ]
    return messages


# --- keys ---------------------------------------------------------------------------------------


def test_chat_key_is_the_same_every_turn_and_differs_between_conversations() -> None:
    first = "tell me about the rivers of Europe, their sources, and the cities along them"
    keys = {affinity.request_key({"messages": conversation(first, n)}, session=None) for n in (1, 3, 6)}
    assert len(keys) == 1 and None not in keys
    other = affinity.request_key({"messages": conversation(first.replace("rivers", "mountains"), 3)}, session=None)
    assert other is not None and other not in keys


def test_explicit_session_wins_over_user_and_prompt() -> None:
    body = {"messages": conversation("a", 2), "user": "alice"}
    assert affinity.request_key(body, session="conv-7") == "s:conv-7"
    assert affinity.request_key(body, session=None) == "u:alice"
    assert affinity.request_key({**body, "user": ""}, session="") == affinity.request_key(
        {"messages": body["messages"]}, session=None
    )


def test_short_or_shapeless_prompts_have_no_key() -> None:
    assert affinity.request_key({"messages": [{"role": "user", "content": "hi"}]}, session=None) is None
    assert affinity.request_key({"messages": [{"role": "system", "content": "x" * 500}]}, session=None) is None
    assert affinity.request_key({"messages": ["not an object"]}, session=None) is None
    assert affinity.request_key({"prompt": "short"}, session=None) is None
    assert affinity.request_key({"prompt": 42}, session=None) is None
    assert affinity.request_key({"input": "embed me"}, session=None) is None


def test_completion_key_is_its_leading_text_or_tokens() -> None:
    base = "Once upon a time " * 30
    first = affinity.request_key({"prompt": base}, session=None)
    assert first is not None and first == affinity.request_key({"prompt": base + " and then more"}, session=None)
    assert first != affinity.request_key({"prompt": "Long ago " + base}, session=None)
    tokens = list(range(100))
    assert affinity.request_key({"prompt": tokens}, session=None) == affinity.request_key(
        {"prompt": [*tokens, 7, 8]}, session=None
    )
    assert affinity.request_key({"prompt": tokens[:10]}, session=None) is None


def test_multimodal_content_parts_are_hashed_not_refused() -> None:
    parts = [{"type": "text", "text": "describe this picture in great detail " * 10}]
    assert affinity.request_key({"messages": [{"role": "user", "content": parts}]}, session=None) is not None


# --- the choice -----------------------------------------------------------------------------------


def choose(key: str | None, loads: dict[str, int], *, remembered: str | None = None, cap: int = 0) -> affinity.Choice:
    choice = affinity.choose(
        key,
        instances=list(loads),
        load=loads.__getitem__,
        has_room=lambda _instance, load: cap == 0 or load < cap,
        remembered=remembered,
    )
    assert choice is not None
    return choice


def test_new_key_goes_to_its_rendezvous_home_every_time() -> None:
    loads = {"a": 0, "b": 0, "c": 0}
    first = choose("c:k1", loads)
    assert first.result is Result.MISS
    assert all(choose("c:k1", loads).instance == first.instance for _ in range(5))


def test_keys_spread_over_instances() -> None:
    homes = collections.Counter(choose(f"c:{n}", {"a": 0, "b": 0, "c": 0}).instance for n in range(300))
    assert set(homes) == {"a", "b", "c"} and min(homes.values()) > 60


def test_remembered_instance_is_a_hit_even_when_not_the_hash_home() -> None:
    loads = {"a": 0, "b": 0}
    home = choose("c:k", loads).instance
    other = "b" if home == "a" else "a"
    assert choose("c:k", loads, remembered=other) == affinity.Choice(other, Result.HIT)


def test_a_full_home_falls_back_to_a_free_instance_instead_of_queueing() -> None:
    home = choose("c:k", {"a": 0, "b": 0}).instance
    other = "b" if home == "a" else "a"
    full = {home: 2, other: 0}
    assert choose("c:k", full, remembered=home, cap=2) == affinity.Choice(other, Result.FALLBACK)


def test_a_home_over_the_load_bound_is_passed_over() -> None:
    home = choose("c:k", {"a": 0, "b": 0}).instance
    other = "b" if home == "a" else "a"
    # bound = ceil(1.25 x (4 + 0 + 1) / 2) = 4: a fifth request on the home would pass it
    assert choose("c:k", {home: 4, other: 0}, remembered=home) == affinity.Choice(other, Result.FALLBACK)
    assert choose("c:k", {home: 2, other: 1}, remembered=home) == affinity.Choice(home, Result.HIT)


def test_no_key_is_least_loaded_and_all_full_is_none() -> None:
    assert choose(None, {"a": 2, "b": 1, "c": 1}) == affinity.Choice("b", Result.NONE)
    assert (
        affinity.choose("c:k", instances=["a"], load=lambda _i: 1, has_room=lambda _i, _l: False, remembered=None)
        is None
    )
    assert affinity.choose(None, instances=[], load=lambda _i: 0, has_room=lambda _i, _l: True, remembered=None) is None


def test_an_evicted_instance_leaves_its_keys_to_re_home_without_error() -> None:
    choice = choose("c:k", {"b": 0, "c": 0}, remembered="gone")
    assert choice.result is Result.MISS and choice.instance in {"b", "c"}


# --- the table ------------------------------------------------------------------------------------


def test_table_is_bounded_least_recently_used_first_out() -> None:
    table = affinity.Table(size=3)
    for key in ("k1", "k2", "k3"):
        table.remember(key, "a")
    table.remember("k1", "b")  # used again: now the most recent
    table.remember("k4", "a")
    assert len(table) == 3
    assert table.get("k2") is None and table.get("k1") == "b" and table.get("k4") == "a"


def test_rehome_moves_only_the_old_instances_keys() -> None:
    table = affinity.Table()
    table.remember("k1", "old")
    table.remember("k2", "other")
    table.remember("k3", "old")
    assert table.rehome("old", "new") == 2
    assert [table.get(k) for k in ("k1", "k2", "k3")] == ["new", "other", "new"]


# --- through the board ----------------------------------------------------------------------------

POOL = "m:default"


def board_with(
    *instances: str, concurrent: int = 0, routing_affinity: bool = True
) -> tuple[queueing.Board, queueing.Policy]:
    board = queueing.Board(max_total_queue=0)
    policy = queueing.Policy(
        max_concurrent=concurrent, max_queue=0, max_instances=len(instances), affinity=routing_affinity
    )
    board.set_instances(
        POOL,
        policy,
        routable=list(instances),
        starting=(),
        known=set(instances),
        failed_unready=False,
        name_factory=lambda: "unused",
    )
    return board, policy


def admit(board: queueing.Board, policy: queueing.Policy, key: str | None) -> queueing.Decision:
    return board.admit(POOL, policy, name_factory=lambda: "unused", key=key)


def test_a_conversation_sticks_to_its_instance_while_others_spread() -> None:
    board, policy = board_with("a", "b")
    first = admit(board, policy, "c:conv")
    assert isinstance(first, queueing.Admitted) and first.affinity is Result.MISS
    board.release(first.ticket)
    for _ in range(5):
        again = admit(board, policy, "c:conv")
        assert isinstance(again, queueing.Admitted)
        assert (again.instance, again.affinity) == (first.instance, Result.HIT)
        board.release(again.ticket)
    assert board.affinity_keys(POOL) == 1


def test_a_waiter_granted_elsewhere_re_homes_its_key() -> None:
    board, policy = board_with("a", "b", concurrent=1)
    home = admit(board, policy, "c:conv")
    assert isinstance(home, queueing.Admitted)
    other = admit(board, policy, None)  # the other instance is now full too
    assert isinstance(other, queueing.Admitted) and other.instance != home.instance
    waiter = admit(board, policy, "c:conv")
    assert isinstance(waiter, queueing.Queued)
    changes = board.release(other.ticket)  # the other instance frees first: the waiter takes it
    assert changes.grants == [queueing.Grant(waiter.ticket, other.instance, Result.FALLBACK)]
    board.release(waiter.ticket)
    board.release(home.ticket)
    again = admit(board, policy, "c:conv")
    assert isinstance(again, queueing.Admitted) and (again.instance, again.affinity) == (other.instance, Result.HIT)


def test_rehome_after_a_restore_sends_the_conversation_to_the_new_instance() -> None:
    board, policy = board_with("old", "x")
    homes = {}
    for n in range(20):  # some conversations live on "old", some on "x"
        decision = admit(board, policy, f"c:{n}")
        assert isinstance(decision, queueing.Admitted)
        homes[f"c:{n}"] = decision.instance
        board.release(decision.ticket)
    assert set(homes.values()) == {"old", "x"}
    board.set_instances(
        POOL,
        policy,
        routable=["x", "new"],
        starting=(),
        known={"x", "new"},
        failed_unready=False,
        name_factory=lambda: "unused",
    )
    assert board.rehome(POOL, "old", "new") == sum(1 for home in homes.values() if home == "old")
    for key, home in homes.items():
        again = admit(board, policy, key)
        assert isinstance(again, queueing.Admitted)
        assert (again.instance, again.affinity) == ("new" if home == "old" else "x", Result.HIT)
        board.release(again.ticket)


def test_least_loaded_routing_ignores_keys() -> None:
    board, policy = board_with("a", "b", routing_affinity=False)
    first = admit(board, policy, "c:conv")
    second = admit(board, policy, "c:conv")
    assert isinstance(first, queueing.Admitted) and isinstance(second, queueing.Admitted)
    assert first.instance != second.instance and second.affinity is Result.NONE
    assert board.affinity_keys(POOL) == 0


def test_the_reused_prompt_tokens_are_read_from_the_answer_s_timings() -> None:
    whole = b'{"choices":[],"timings":{"cache_n":1131,"prompt_n":75,"predicted_n":24}}'
    assert forwarder.cached_tokens(whole) == 1131
    stream = b'data: {"choices":[]}\n\ndata: {"choices":[],"timings":{"cache_n":0,"prompt_n":900}}\n\ndata: [DONE]\n\n'
    assert forwarder.cached_tokens(stream) == 0
    assert forwarder.cached_tokens(b'{"choices":[],"usage":{"completion_tokens":3}}') is None

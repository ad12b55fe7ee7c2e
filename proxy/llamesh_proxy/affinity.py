"""KV-cache-affine routing: send a conversation's next turn to the instance whose KV cache holds its history.

llama-server keeps each slot's prompt in its KV cache (`cache_prompt`) and, with `--cache-ram`, older
prompts in host memory; a request whose prompt starts with a cached prefix re-reads only the new tail.
Least-loaded routing scatters a conversation's turns over the instances and throws that away. Here:

- `request_key` names what a request's cache is about, from the parsed body and headers (no second parse):
  an explicit session (`X-Session-Id`, else the OpenAI `user` field), else a hash of the prompt's leading
  part — for chat, the messages up to and including the first user message (the prefix every later turn of
  the conversation repeats, so the key stays the same turn after turn; hashing all messages before the last
  user turn would give a new key each turn), for completions the first `PREFIX_CHARS` characters. None when
  the prompt is too short for a cache to matter, or the body has no prompt shape we know.
- `choose` picks an instance for a key: the one the key was last served by if it is still routable
  (`Table`), else its rendezvous-hash home among the routable instances — with bounded load: an instance with
  no free slot, or whose load would pass `balance` x the pool's average, is passed over for the next in that
  order, so affinity never queues a request another instance could take now.
- `Table` remembers key → instance for the keys seen, least recently used first out, so its memory is
  bounded; an instance that went away leaves its keys pointing nowhere (they re-home on their next
  request, no error), and `rehome` moves them to the instance that restored its saved KV caches.

Pure: no I/O, no clock; `queueing.Board` holds one `Table` per pool and calls `choose`.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

SESSION_HEADER = "X-Session-Id"
PREFIX_CHARS = 256  # completions: the leading characters that name the prompt; also the least prompt worth a key
TOKEN_PREFIX = 64  # completions given as token ids: the leading ids that name the prompt
BALANCE = 1.25  # bounded load: no instance takes more than this x the average load of the pool
TABLE_SIZE = 10_000  # keys remembered per pool (a few hundred bytes each)


class Result(enum.StrEnum):
    """How a request was routed, for the `route_decision` line and `proxy_affinity_total`."""

    HIT = "hit"  # to the instance that served its key before (its cache is likely there)
    MISS = "miss"  # a key not seen (or whose instance went away): to its hash's home
    FALLBACK = "fallback"  # its instance was busy or over the load bound: to another one
    NONE = "none"  # no key (or affinity off): least loaded


def request_key(document: Mapping[str, Any], *, session: str | None) -> str | None:
    """The affinity key of a parsed request body, or None (see the module docstring)."""
    if session:
        return "s:" + session
    user = document.get("user")
    if isinstance(user, str) and user:
        return "u:" + user
    messages = document.get("messages")
    if isinstance(messages, list):
        return _chat_key(messages)
    prompt = document.get("prompt")
    if isinstance(prompt, str):
        return "p:" + _digest(prompt[:PREFIX_CHARS]) if len(prompt) >= PREFIX_CHARS else None
    if isinstance(prompt, list) and len(prompt) >= TOKEN_PREFIX and all(type(t) is int for t in prompt[:TOKEN_PREFIX]):
        return "t:" + _digest(json.dumps(prompt[:TOKEN_PREFIX]))
    return None


def _chat_key(messages: list[Any]) -> str | None:
    leading: list[Any] = []
    total = 0
    first_user_seen = False
    for message in messages:
        if not isinstance(message, dict):
            return None
        content = message.get("content")
        text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
        total += len(text)
        if not first_user_seen:
            leading.append([message.get("role"), text])
            first_user_seen = message.get("role") == "user"
    if not first_user_seen or total < PREFIX_CHARS:
        return None
    return "c:" + _digest(json.dumps(leading))


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(errors="surrogatepass"), digest_size=12).hexdigest()


def _weight(key: str, instance: str) -> bytes:
    """Rendezvous (highest random weight) score of `instance` for `key`."""
    return hashlib.blake2b(f"{key}\0{instance}".encode(), digest_size=8).digest()


class Table:
    """key → the instance that last served it, bounded to `size` keys (least recently used dropped)."""

    def __init__(self, size: int = TABLE_SIZE) -> None:
        self.size = size
        self._homes: collections.OrderedDict[str, str] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._homes)

    def get(self, key: str) -> str | None:
        return self._homes.get(key)

    def remember(self, key: str, instance: str) -> None:
        self._homes[key] = instance
        self._homes.move_to_end(key)
        while len(self._homes) > self.size:
            self._homes.popitem(last=False)

    def rehome(self, old: str, new: str) -> int:
        """The caches `old` held now live on `new` (it restored them): its keys follow. How many moved."""
        moved = 0
        for key, instance in self._homes.items():
            if instance == old:
                self._homes[key] = new
                moved += 1
        return moved


@dataclasses.dataclass(frozen=True)
class Choice:
    instance: str
    result: Result


def choose(
    key: str | None,
    *,
    instances: Sequence[str],
    load: Callable[[str], int],
    has_room: Callable[[str, int], bool],
    remembered: str | None,
    balance: float = BALANCE,
) -> Choice | None:
    """The instance for a request with `key` among the routable `instances` (None: all are full).

    `load(instance)` is the requests in flight there, `has_room(instance, load)` whether it takes one more.
    Without a key: the least loaded with room (the first of equals, in `instances` order).
    """
    if key is None:  # the common case, on every request: one pass, nothing built
        best: str | None = None
        best_load = 0
        for instance in instances:
            current = load(instance)
            if has_room(instance, current) and (best is None or current < best_load):
                best, best_load = instance, current
        return Choice(best, Result.NONE) if best is not None else None
    loads = {instance: load(instance) for instance in instances}
    open_ = [instance for instance in instances if has_room(instance, loads[instance])]
    if not open_:
        return None
    least = min(open_, key=loads.__getitem__)
    # Bounded loads (Mirrokni et al.): with this request counted, no instance above ceil(balance x average).
    bound = math.ceil(balance * (sum(loads.values()) + 1) / len(instances))
    order = sorted(instances, key=lambda instance: _weight(key, instance), reverse=True)
    home = remembered if remembered in loads else None
    if home is not None:
        order.remove(home)
        order.insert(0, home)
    for instance in order:
        if instance in open_ and loads[instance] + 1 <= bound:
            if instance == order[0]:
                return Choice(instance, Result.HIT if home is not None else Result.MISS)
            return Choice(instance, Result.FALLBACK)
    return Choice(least, Result.FALLBACK)

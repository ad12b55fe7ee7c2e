"""Slot KV caches that survive eviction (`llamesh_agent.kv_cache`), against the real llama-server.

Covers: which slots are worth saving (enough cached tokens, idle, well-formed); pruning to the disk budget
least recently written first; newest files restored first, one per slot; the folder per args hash and its
manifest (files saved by another llama.cpp build are deleted unread and counted; a file another instance
is restoring is not offered); and with the real
llama-server: a slot saved from one process and restored into a new one makes the next turn of the
conversation read only its new tokens (timings `cache_n` / `prompt_n`), while a corrupt or foreign file is
refused by llama-server, counted as failed, deleted, and the request still served from a cold prompt.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llamesh_agent import kv_cache
from rig import processes


def saved(name: str, size: int, mtime: float) -> kv_cache.SavedFile:
    return kv_cache.SavedFile(path=Path("/kv/h") / name, size=size, mtime=mtime)


def test_only_idle_slots_with_enough_cached_tokens_are_worth_saving() -> None:
    slots: list[dict[str, Any]] = [
        {"id": 0, "is_processing": False},  # never used: no task, no tokens
        {"id": 1, "n_prompt_tokens": 1581, "is_processing": False},
        {"id": 2, "n_prompt_tokens": 40, "is_processing": False},
        {"id": 3, "n_prompt_tokens": 900, "is_processing": True},
        {"id": "4", "n_prompt_tokens": 900},
    ]
    assert kv_cache.slots_worth_saving(slots, min_tokens=256) == [1]
    assert kv_cache.slots_worth_saving(slots, min_tokens=10) == [1, 2]


def test_pruning_deletes_least_recently_written_until_the_rest_fit() -> None:
    files = [saved("a", 400, 3.0), saved("b", 400, 1.0), saved("c", 400, 2.0)]
    assert kv_cache.to_prune(files, budget_bytes=1200) == []
    assert [f.path.name for f in kv_cache.to_prune(files, budget_bytes=900)] == ["b"]
    assert [f.path.name for f in kv_cache.to_prune(files, budget_bytes=100)] == ["b", "c", "a"]


def test_newest_files_are_restored_first_one_per_slot() -> None:
    files = [saved("i1.slot0.bin", 1, 1.0), saved("i2.slot3.bin", 1, 5.0), saved("i2.slot1.bin", 1, 3.0)]
    chosen = kv_cache.to_restore(files, slot_ids=[0, 1])
    assert [(slot, f.path.name) for slot, f in chosen] == [(0, "i2.slot3.bin"), (1, "i2.slot1.bin")]
    assert chosen[0][1].saved_by == "i2"
    assert kv_cache.to_restore(files, slot_ids=[]) == []


def test_prepare_keeps_files_of_the_same_build_and_deletes_another_builds(tmp_path: Path) -> None:
    cache = kv_cache.SlotCache(tmp_path, budget_bytes=1 << 20, min_tokens=1)
    assert cache.prepare("h1", llama_cpp_version="v1") == 0
    (cache.directory("h1") / "x.slot0.bin").write_bytes(b"1" * 10)
    assert cache.prepare("h1", llama_cpp_version="v1") == 0
    assert [f.path.name for f in cache.files("h1")] == ["x.slot0.bin"]
    assert cache.prepare("h1", llama_cpp_version="v2") == 1  # saved by another build: never loaded
    assert cache.files("h1") == []
    assert cache.files("h2") == []  # another args hash has its own folder
    (cache.directory("h2")).mkdir()
    (cache.directory("h2") / "x.slot0.claimed-other.bin").write_bytes(b"1")
    assert cache.files("h2") == []  # being restored by another instance: not offered again


def test_prune_holds_the_budget_across_args_hashes(tmp_path: Path) -> None:
    cache = kv_cache.SlotCache(tmp_path, budget_bytes=250, min_tokens=1)
    for number, folder in enumerate(("h1", "h2", "h1")):
        path = tmp_path / folder / f"i{number}.slot0.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 100)
        os.utime(path, (1000 + number, 1000 + number))
    assert cache.prune() == 1
    assert sorted(p.name for p in tmp_path.glob("*/*.bin")) == ["i1.slot0.bin", "i2.slot0.bin"]


# --- the real llama-server ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def llama_server(binary: Path, model: Path, save_dir: Path, log: Path) -> AsyncIterator[str]:
    port = processes.free_port()
    argv = [str(binary), "-m", str(model), "-c", "4096", "--host", "127.0.0.1", "--port", str(port)]
    child = processes.start([*argv, "--slot-save-path", str(save_dir)], log_path=log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        await processes.wait_healthy(child, base_url, deadline_s=60)
        yield base_url
    finally:
        await processes.stop(child, grace_s=10)


async def chat(base_url: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base_url}/v1/chat/completions", json={"messages": messages, "max_tokens": 8}) as response,
    ):
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


@pytest.mark.real
async def test_a_saved_slot_restored_into_a_new_server_serves_the_next_turn_from_cache(
    tmp_path: Path, llama_server_binary: Path, chat_model: Path
) -> None:
    cache = kv_cache.SlotCache(tmp_path / "kv", budget_bytes=1 << 30, min_tokens=256)
    cache.prepare("hash", llama_cpp_version="test")
    folder = cache.directory("hash")
    messages = [{"role": "user", "content": "Tell me everything about the sea and its tides. " * 20}]
    async with llama_server(llama_server_binary, chat_model, folder, tmp_path / "first.log") as first:
        one = await chat(first, messages)
        assert one["timings"]["prompt_n"] > 256  # read cold
        messages += [
            {"role": "assistant", "content": one["choices"][0]["message"]["content"]},
            {"role": "user", "content": "And the moon?"},
        ]
        two = await chat(first, messages)
        assert two["timings"]["cache_n"] > 256  # the same process: its slot had the history
        assert await cache.save(first, args_hash="hash", instance="first-instance") == 1
    assert [f.saved_by for f in cache.files("hash")] == ["first-instance"]

    async with llama_server(llama_server_binary, chat_model, folder, tmp_path / "second.log") as second:
        restored = await cache.restore(second, args_hash="hash", instance="second-instance")
        assert restored == kv_cache.Restored(slots=1, failed=0, source="first-instance")
        assert cache.files("hash") == []  # moved into the instance
        three = await chat(second, messages)  # the same turn again, now on a fresh process
        timings = three["timings"]
        assert timings["cache_n"] > 256 and timings["prompt_n"] < 32, timings

    # a file llama-server cannot load: refused, counted, deleted; the next request reads its prompt cold
    (folder / "broken.slot0.bin").write_bytes(b"not a llama.cpp state file" * 50)
    async with llama_server(llama_server_binary, chat_model, folder, tmp_path / "third.log") as third:
        refused = await cache.restore(third, args_hash="hash", instance="third-instance")
        assert refused == kv_cache.Restored(slots=0, failed=1, source=None)
        assert cache.files("hash") == []
        cold = await chat(third, messages)
        assert cold["timings"]["cache_n"] == 0 and cold["timings"]["prompt_n"] > 256


async def test_saving_a_server_that_does_not_answer_saves_nothing(tmp_path: Path) -> None:
    cache = kv_cache.SlotCache(tmp_path, budget_bytes=1 << 20, min_tokens=1, timeout_s=2)
    port = processes.free_port()
    assert await cache.save(f"http://127.0.0.1:{port}", args_hash="h", instance="i") == 0
    assert cache.files("h") == []

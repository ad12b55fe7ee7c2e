"""Slot KV caches that outlive their instance: saved before an idle or evicted instance stops, restored into
the next instance of the same args hash.

llama-server started with `--slot-save-path DIR` writes a slot's prompt and its KV cache to a file on
`POST /slots/{id}?action=save` and loads one into a slot on `?action=restore` (it checks the tokens and the
context size, and answers 400 when the file does not fit). The agent gives each args hash its own folder
under `kv_cache.directory`, so a changed profile (a new hash) never loads a foreign cache, and notes there
the llama.cpp version that saved the files (`manifest.json`): files of another build are deleted unread.

- Save: before a drained instance stops (idle, evicted for capacity; not a crash, not a removed or changed
  profile), every slot whose prompt holds at least `min_cached_tokens` tokens is saved as
  `<instance>.slot<id>.bin`. Then the folder tree is pruned to `max_disk_mb`, least recently written first
  (files an agent died while restoring included).
- Restore: when an instance of that hash has answered /health and before it is reported READY, the newest
  files (at most one per slot) are claimed (renamed, so two instances starting at once never load the same
  file), loaded into its slots and deleted: they now live in the instance and are
  saved again when it stops. llama-server then picks the restored slot for a returning conversation by
  prompt similarity, and the gateway routes the conversations of the instance that saved them there
  (`status.kvCacheRestoredFrom`). A file refused, or that restored no tokens, is counted and deleted; its
  conversation just reads its prompt again, as without this feature.

The pure decisions (`slots_worth_saving`, `to_prune`, `to_restore`) are separate from the HTTP and file work.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SUFFIX = ".bin"
CLAIMED = ".claimed-"  # a file being restored, renamed first so two starting instances never load the same one
_FILE = re.compile(r"(?P<instance>.+)\.slot(?P<slot>[0-9]+)\.bin")


class KvCacheError(Exception):
    """A slot could not be saved or restored (the instance goes on without it)."""


@dataclasses.dataclass(frozen=True)
class SavedFile:
    path: Path
    size: int
    mtime: float

    @property
    def saved_by(self) -> str | None:
        """The instance that saved it (from its name)."""
        match = _FILE.fullmatch(self.path.name)
        return match["instance"] if match else None


@dataclasses.dataclass(frozen=True)
class Restored:
    slots: int = 0  # slots that got a cache back
    failed: int = 0  # files refused, empty, or of another llama.cpp build
    source: str | None = None  # the instance that saved the newest restored file


def file_name(instance: str, slot: int) -> str:
    return f"{instance}.slot{slot}{SUFFIX}"


def slots_worth_saving(slots: Iterable[Mapping[str, Any]], *, min_tokens: int) -> list[int]:
    """Ids of the idle slots (as `GET /slots` lists them) whose cached prompt has at least `min_tokens`."""
    worth = []
    for slot in slots:
        tokens = slot.get("n_prompt_tokens")
        slot_id = slot.get("id")
        if type(slot_id) is int and type(tokens) is int and tokens >= min_tokens and not slot.get("is_processing"):
            worth.append(slot_id)
    return worth


def to_prune(files: Sequence[SavedFile], *, budget_bytes: int) -> list[SavedFile]:
    """The files to delete so the rest fit in `budget_bytes`: least recently written first."""
    total = sum(file.size for file in files)
    doomed = []
    for file in sorted(files, key=lambda f: f.mtime):
        if total <= budget_bytes:
            break
        doomed.append(file)
        total -= file.size
    return doomed


def to_restore(files: Sequence[SavedFile], *, slot_ids: Sequence[int]) -> list[tuple[int, SavedFile]]:
    """Newest files first, one per slot."""
    newest = sorted(files, key=lambda f: f.mtime, reverse=True)
    return list(zip(slot_ids, newest, strict=False))


class SlotCache:
    """The node's folder of saved slot caches, one subfolder per args hash."""

    def __init__(self, root: Path, *, budget_bytes: int, min_tokens: int, timeout_s: float = 30.0) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self.min_tokens = min_tokens
        self.timeout_s = timeout_s

    def directory(self, args_hash: str) -> Path:
        return self.root / args_hash

    def prepare(self, args_hash: str, *, llama_cpp_version: str | None) -> int:
        """Make the hash's folder (llama-server refuses a missing one); delete files another build saved.

        Blocking: call it in a thread. Returns how many files were deleted for that."""
        folder = self.directory(args_hash)
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / MANIFEST
        try:
            saved_with = json.loads(manifest.read_text()).get("llama_cpp_version")
        except (OSError, ValueError, AttributeError):
            saved_with = None
        stale = 0
        if saved_with != llama_cpp_version:
            for file in self.files(args_hash):
                with contextlib.suppress(OSError):
                    file.path.unlink()
                    stale += 1
            manifest.write_text(json.dumps({"llama_cpp_version": llama_cpp_version}))
        return stale

    def files(self, args_hash: str) -> list[SavedFile]:
        """The saved files of an args hash that no instance is restoring (blocking)."""
        return [f for f in _listing(self.directory(args_hash).glob(f"*{SUFFIX}")) if CLAIMED not in f.path.name]

    def prune(self) -> int:
        """Delete least recently written files over the budget, across every args hash (blocking)."""
        doomed = to_prune(_listing(self.root.glob(f"*/*{SUFFIX}")), budget_bytes=self.budget_bytes)
        for file in doomed:
            with contextlib.suppress(OSError):
                file.path.unlink()
        return len(doomed)

    async def save(self, base_url: str, *, args_hash: str, instance: str) -> int:
        """Save the slots worth keeping of a running instance; how many were saved."""
        saved = 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as session:
            try:
                async with session.get(f"{base_url}/slots") as response:
                    slots = await response.json() if response.status == 200 else []
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning(
                    "instance %s: cannot list its slots to save their KV caches: %r",
                    instance,
                    exc,
                    extra={"event": "kv_cache_save_failed", "instance_id": instance},
                )
                return 0
            for slot_id in slots_worth_saving(slots if isinstance(slots, list) else [], min_tokens=self.min_tokens):
                name = file_name(instance, slot_id)
                try:
                    answer = await _slot_action(session, base_url, slot_id, "save", name)
                except KvCacheError as exc:
                    log.warning(
                        "instance %s: slot %d not saved: %s",
                        instance,
                        slot_id,
                        exc,
                        extra={"event": "kv_cache_save_failed", "instance_id": instance, "slot": slot_id},
                    )
                    continue
                saved += 1
                log.info(
                    "instance %s: slot %d saved (%s tokens)",
                    instance,
                    slot_id,
                    answer.get("n_saved"),
                    extra={
                        "event": "kv_cache_saved",
                        "instance_id": instance,
                        "slot": slot_id,
                        "tokens": answer.get("n_saved"),
                        "bytes": answer.get("n_written"),
                        "args_hash": args_hash,
                    },
                )
        await asyncio.to_thread(self.prune)
        return saved

    async def restore(self, base_url: str, *, args_hash: str, instance: str) -> Restored:
        """Load the newest saved caches of `args_hash` into a fresh instance's slots (files deleted after)."""
        files = await asyncio.to_thread(self.files, args_hash)
        if not files:
            return Restored()
        restored = failed = 0
        source: str | None = None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as session:
            try:
                async with session.get(f"{base_url}/slots") as response:
                    slots = await response.json() if response.status == 200 else []
            except (aiohttp.ClientError, TimeoutError, ValueError):
                slots = []
            slot_ids = [slot["id"] for slot in slots if isinstance(slot, dict) and type(slot.get("id")) is int]
            for slot_id, file in to_restore(files, slot_ids=slot_ids):
                claimed = file.path.with_name(f"{file.path.stem}{CLAIMED}{instance}{SUFFIX}")
                try:
                    await asyncio.to_thread(file.path.rename, claimed)
                except OSError:
                    continue  # another instance starting at the same time took it
                try:
                    answer = await _slot_action(session, base_url, slot_id, "restore", claimed.name)
                    tokens = answer.get("n_restored")
                    if type(tokens) is not int or tokens <= 0:
                        raise KvCacheError(f"it restored no tokens ({answer})")
                except KvCacheError as exc:
                    failed += 1
                    log.warning(
                        "instance %s: saved cache %s not restored (a cold prompt instead): %s",
                        instance,
                        file.path.name,
                        exc,
                        extra={"event": "kv_cache_restore_failed", "instance_id": instance, "slot": slot_id},
                    )
                else:
                    restored += 1
                    source = source or file.saved_by
                    log.info(
                        "instance %s: slot %d restored from %s (%d tokens)",
                        instance,
                        slot_id,
                        file.path.name,
                        tokens,
                        extra={
                            "event": "kv_cache_restored",
                            "instance_id": instance,
                            "slot": slot_id,
                            "tokens": tokens,
                            "saved_by": file.saved_by,
                        },
                    )
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(claimed.unlink)
        return Restored(slots=restored, failed=failed, source=source)


async def _slot_action(
    session: aiohttp.ClientSession, base_url: str, slot_id: int, action: str, filename: str
) -> dict[str, Any]:
    url = f"{base_url}/slots/{slot_id}?action={action}"
    try:
        async with session.post(url, json={"filename": filename}) as response:
            text = await response.text()
            if response.status != 200:
                raise KvCacheError(f"llama-server answered {response.status}: {text[:300]}")
            answer = json.loads(text)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise KvCacheError(f"{action} of slot {slot_id} failed: {exc!r}") from exc
    if not isinstance(answer, dict):
        raise KvCacheError(f"{action} of slot {slot_id}: unexpected answer {text[:300]}")
    return answer


def _listing(paths: Iterable[Path]) -> list[SavedFile]:
    files = []
    for path in paths:
        with contextlib.suppress(OSError):  # deleted meanwhile
            stat = path.stat()
            files.append(SavedFile(path=path, size=stat.st_size, mtime=stat.st_mtime))
    return files

"""The node's metrics file (`metrics_path`): one JSON document with several writers, none of them clobbered.

In `llamesh serve` the agent (what it learned per args hash) and the gateway (its request counters) write the
same file. `update(path, change)` is the only way to write it: it reads the current document, lets `change`
return the new one, and writes that, all under a lock for `path` — a `threading.Lock` per path inside the
process, and `fcntl.flock` on a sidecar `.<name>.lock` file across processes (advisory: only writers that use
this module are held back). `merge(current, part, owned=...)` is how a writer replaces only its own keys.

Invariant: the file is always a whole document, the old one or the new one. The new one goes to a temporary
file in the same folder (flushed and fsynced), is renamed over the old one, and then the folder is fsynced
so the rename itself survives a crash. A writer killed midway leaves at most a stray temporary file, which
the next `update` removes (under the lock no other writer can be midway).

Blocking file I/O: async callers run these functions with `asyncio.to_thread`. What the keys mean, and which
writer owns which, is up to the writers (`llamesh_agent.learned`, the gateway's metrics); the shape shared
by all is the seed's: top-level keys, and `"hashes": {args_hash: {key: value}}`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HASHES = "hashes"

Document = dict[str, Any]


class SnapshotError(Exception):
    """The file exists but is not a JSON object (truncated by hand, another program's file, unreadable)."""


@dataclasses.dataclass(frozen=True)
class Owned:
    """The keys one writer owns: at the top level, and inside every `hashes` entry.

    `union` keys are shared lists of strings (display names): a writer adds to them and never removes.
    """

    top: frozenset[str]
    per_hash: frozenset[str]
    union: frozenset[str] = frozenset()


_process_locks: dict[Path, threading.Lock] = {}
_process_locks_guard = threading.Lock()


def read(path: Path) -> Document | None:
    """The document at `path`; None when there is no file. Raises SnapshotError when it cannot be used."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"cannot read {path}: {exc}") from exc
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise SnapshotError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise SnapshotError(f"{path} holds a JSON {type(document).__name__}, not an object")
    return document


def update(path: Path, change: Callable[[Document], Document]) -> Document:
    """Read-modify-write `path` under its lock: `change` gets the current document ({} when missing or
    unusable) and returns the one to write. Returns what was written."""
    with _locked(path):
        _remove_stray_temporaries(path)
        try:
            current = read(path) or {}
        except SnapshotError as exc:
            log.info("%s; writing it afresh", exc)  # its readers have warned when they loaded it
            current = {}
        document = change(current)
        _write_atomic(path, document)
        return document


def merge(current: Document, part: Document, *, owned: Owned) -> Document:
    """`current` with the keys `owned` names taken from `part`: replaced when `part` has them, removed when
    it does not; `union` keys are joined instead. Every other key of `current` stays as it is. A hash entry
    is kept while `part` names it or other writers' keys remain in it."""
    merged = {key: value for key, value in current.items() if key not in owned.top and key != HASHES}
    merged.update({key: value for key, value in part.items() if key in owned.top})
    old_hashes = current.get(HASHES)
    old_hashes = old_hashes if isinstance(old_hashes, dict) else {}
    new_hashes = part.get(HASHES)
    new_hashes = new_hashes if isinstance(new_hashes, dict) else {}
    hashes: Document = {}
    for args_hash in [*old_hashes, *(h for h in new_hashes if h not in old_hashes)]:
        old = old_hashes.get(args_hash)
        old = old if isinstance(old, dict) else {}
        new = new_hashes.get(args_hash)
        new = new if isinstance(new, dict) else {}
        entry = {key: value for key, value in old.items() if key not in owned.per_hash}
        entry.update({key: value for key, value in new.items() if key in owned.per_hash})
        for key in owned.union:
            names = _strings(old.get(key)) | _strings(new.get(key))
            if names:
                entry[key] = sorted(names)
        if entry or args_hash in new_hashes:
            hashes[args_hash] = entry
    merged[HASHES] = hashes
    return merged


def lock_path(path: Path) -> Path:
    """The sidecar file whose flock guards `path` (kept: removing a lock file races with its next user)."""
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _process_lock(path), open(lock_path(path), "a+b") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _process_lock(path: Path) -> threading.Lock:
    key = Path(os.path.abspath(path))
    with _process_locks_guard:
        return _process_locks.setdefault(key, threading.Lock())


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def _remove_stray_temporaries(path: Path) -> None:
    """Temporary files of writers killed mid-write; only called under the lock, so none is in use."""
    prefix = _temporary_prefix(path)
    for stray in path.parent.glob(f"{prefix}*.tmp"):
        with contextlib.suppress(OSError):
            stray.unlink()


def _write_atomic(path: Path, document: Document) -> None:
    handle, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(document, stream, indent=2)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)  # the rename is in the folder's entries: without this a crash can undo it
    finally:
        os.close(folder)


def _strings(value: object) -> set[str]:
    return {str(item) for item in value} if isinstance(value, list) else set()

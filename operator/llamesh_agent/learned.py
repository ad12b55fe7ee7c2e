"""What this node learned per launch-args hash, kept in its metrics JSON file across evictions and restarts.

Per args hash: the `model:profile` names that used it, the parsed model parameters of the latest instance
that became ready (with the llama.cpp version that produced them), and peak system memory and VRAM. The
file has the seed's snapshot shape,

    {"node_id", "version", "llama_cpp_version",
     "hashes": {"<hash>": {"display_names": [...], "peak_vram_mb", "peak_sysmem_mb", "sample_count",
                           "parsed_model_params": {"params": {...}, "llama_cpp_version": "..."}}},
     "updated_at"}

The gateway writes its request counters into the same file (in `llamesh serve` both share it), so a write
replaces only the agent's keys (`OWNED`: the ones above; `display_names` are joined, not replaced) and
keeps every other key in the file as the file has it then — `llamesh_api.snapshot` does the locked,
atomic read-modify-write. A file that cannot be read starts the node with nothing learned rather than
stopping it; a malformed `parsed_model_params` loses only itself.

Parameters learned under another llama.cpp version than the live binary are withheld when published: the
same args can resolve to other values on another build (the seed's rule; unknown versions are served).
Deciding whether an instance fits a node from these numbers is the operator's job, not this module's.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.metadata
import logging
from pathlib import Path
from typing import Any

from llamesh_api import resources, snapshot

log = logging.getLogger(__name__)

_KNOWN_HASH_KEYS = frozenset({"display_names", "parsed_model_params", "peak_sysmem_mb", "peak_vram_mb", "sample_count"})
_KNOWN_TOP_KEYS = frozenset({"node_id", "version", "llama_cpp_version", "hashes", "updated_at"})
OWNED = snapshot.Owned(
    top=_KNOWN_TOP_KEYS - {snapshot.HASHES},
    per_hash=_KNOWN_HASH_KEYS - {"display_names"},
    union=frozenset({"display_names"}),
)


@dataclasses.dataclass
class HashRecord:
    display_names: set[str] = dataclasses.field(default_factory=set)
    params: dict[str, Any] | None = None
    params_version: str | None = None  # the llama.cpp version `params` were parsed under
    peak_sysmem_mb: int = 0
    peak_vram_mb: int = 0
    sample_count: int = 0
    other: dict[str, Any] = dataclasses.field(default_factory=dict)  # keys of the file we do not own


class LearnedStore:
    """The learned records of one node, and the file they live in."""

    def __init__(self, path: Path, *, node_id: str) -> None:
        self.path = path
        self._node_id = node_id
        self._records: dict[str, HashRecord] = {}
        self._other_top: dict[str, Any] = {}

    @property
    def hashes(self) -> frozenset[str]:
        return frozenset(self._records)

    def record(self, args_hash: str) -> HashRecord | None:
        found = self._records.get(args_hash)
        return dataclasses.replace(found, display_names=set(found.display_names)) if found else None

    def load(self) -> None:
        """Read the file; a missing or unreadable file leaves nothing learned (and says why in the log)."""
        self._records, self._other_top = {}, {}
        try:
            document = snapshot.read(self.path)
        except snapshot.SnapshotError as exc:
            log.warning("%s; starting with nothing learned", exc)
            return
        if document is None:
            return
        self._other_top = {key: value for key, value in document.items() if key not in _KNOWN_TOP_KEYS}
        hashes = document.get("hashes")
        for args_hash, entry in (hashes if isinstance(hashes, dict) else {}).items():
            if isinstance(entry, dict):
                self._records[str(args_hash)] = _record_from_json(entry)

    def learn_params(
        self, args_hash: str, *, display_name: str, params: dict[str, Any], llama_cpp_version: str | None
    ) -> bool:
        """Keep the latest parsed params for `args_hash`; whether anything changed."""
        record = self._records.setdefault(args_hash, HashRecord())
        before = (set(record.display_names), record.params, record.params_version)
        record.display_names.add(display_name)
        record.params, record.params_version = dict(params), llama_cpp_version
        return before != (record.display_names, record.params, record.params_version)

    def learn_peaks(self, args_hash: str, *, display_name: str, sysmem_mb: int, vram_mb: int) -> bool:
        """Raise the peaks for `args_hash` to these samples; whether a peak grew (peaks never shrink)."""
        record = self._records.setdefault(args_hash, HashRecord())
        record.display_names.add(display_name)
        first = record.sample_count == 0
        record.sample_count += 1
        grew = sysmem_mb > record.peak_sysmem_mb or vram_mb > record.peak_vram_mb
        record.peak_sysmem_mb = max(record.peak_sysmem_mb, sysmem_mb)
        record.peak_vram_mb = max(record.peak_vram_mb, vram_mb)
        return grew or first

    def published(self, live_version: str | None) -> dict[str, resources.Learned]:
        """`LlamaNode.status.learned`: params withheld where they came from another llama.cpp version."""
        published: dict[str, resources.Learned] = {}
        for args_hash, record in self._records.items():
            stale = record.params_version is not None and live_version is not None
            stale = stale and record.params_version != live_version
            sampled = record.sample_count > 0
            published[args_hash] = resources.Learned(
                parsed_model_params=None if stale or record.params is None else dict(record.params),
                llama_cpp_version=record.params_version,
                peak_sysmem_mb=record.peak_sysmem_mb if sampled else None,
                peak_vram_mb=record.peak_vram_mb if sampled else None,
            )
        return published

    def document(self, *, llama_cpp_version: str | None) -> dict[str, Any]:
        """The file's JSON content now."""
        hashes: dict[str, Any] = {}
        for args_hash, record in sorted(self._records.items()):
            entry: dict[str, Any] = {
                **record.other,
                "display_names": sorted(record.display_names),
                "peak_sysmem_mb": record.peak_sysmem_mb,
                "peak_vram_mb": record.peak_vram_mb,
                "sample_count": record.sample_count,
            }
            if record.params is not None:
                entry["parsed_model_params"] = {"params": record.params, "llama_cpp_version": record.params_version}
            hashes[args_hash] = entry
        return {
            **self._other_top,
            "node_id": self._node_id,
            "version": _llamesh_version(),
            "llama_cpp_version": llama_cpp_version or "unknown",
            "hashes": hashes,
            "updated_at": datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z"),
        }


def write_atomic(path: Path, document: dict[str, Any]) -> None:
    """Put the agent's keys of `document` into the file at `path`, keeping everyone else's (see the module).

    Atomic: the file is the old document or the new one whatever happens, and a failed write (an
    unserializable value, a full disk) raises and leaves the old one."""
    snapshot.update(path, lambda current: snapshot.merge(current, document, owned=OWNED))


def _record_from_json(entry: dict[str, Any]) -> HashRecord:
    record = HashRecord(other={key: value for key, value in entry.items() if key not in _KNOWN_HASH_KEYS})
    names = entry.get("display_names")
    if isinstance(names, list):
        record.display_names = {str(name) for name in names}
    record.peak_sysmem_mb = _count(entry.get("peak_sysmem_mb"))
    record.peak_vram_mb = _count(entry.get("peak_vram_mb"))
    record.sample_count = _count(entry.get("sample_count"))
    persisted = entry.get("parsed_model_params")
    if isinstance(persisted, dict) and isinstance(persisted.get("params"), dict):
        version = persisted.get("llama_cpp_version")
        record.params = dict(persisted["params"])
        record.params_version = version if isinstance(version, str) else None
    elif persisted is not None:
        log.warning("dropping a malformed parsed_model_params entry from the learned data")
    return record


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


@functools.cache  # the installed package does not change under a running process; reading it parses METADATA
def _llamesh_version() -> str:
    try:
        return importlib.metadata.version("llamesh")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"

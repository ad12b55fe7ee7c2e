"""Learned data per args hash and the node's metrics JSON file.

Covers: learning params and peaks (peaks only grow); the seed's file shape; a round trip through the file;
params withheld when learned under another llama.cpp version (served when either version is unknown);
keys of the file this module does not own kept; a malformed `parsed_model_params` dropped alone; an
unreadable file starting from nothing; atomic writes (no temporary file left beside the file and its lock,
the agent's old keys replaced whole). Sharing the file with the gateway: tests/test_metrics_snapshot.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamesh_agent import learned

PARAMS = {"n_ctx": 4096, "n_ctx_train": 131072, "n_slots": 4}


def fresh(tmp_path: Path) -> learned.LearnedStore:
    return learned.LearnedStore(tmp_path / "node-metrics.json", node_id="node-a")


def test_learn_and_round_trip(tmp_path: Path) -> None:
    store = fresh(tmp_path)
    assert store.learn_params("h1", display_name="gpt", params=PARAMS, llama_cpp_version="7099-abc")
    assert not store.learn_params("h1", display_name="gpt", params=PARAMS, llama_cpp_version="7099-abc")
    assert store.learn_peaks("h1", display_name="gpt:fast", sysmem_mb=100, vram_mb=0)  # the first sample
    assert store.learn_peaks("h1", display_name="gpt:fast", sysmem_mb=300, vram_mb=50)
    assert not store.learn_peaks("h1", display_name="gpt:fast", sysmem_mb=200, vram_mb=10)
    learned.write_atomic(store.path, store.document(llama_cpp_version="7099-abc"))

    document = json.loads(store.path.read_text())
    assert document["node_id"] == "node-a" and document["llama_cpp_version"] == "7099-abc"
    assert set(document) >= {"version", "hashes", "updated_at"}
    assert document["hashes"]["h1"] == {
        "display_names": ["gpt", "gpt:fast"],
        "peak_sysmem_mb": 300,
        "peak_vram_mb": 50,
        "sample_count": 3,
        "parsed_model_params": {"params": PARAMS, "llama_cpp_version": "7099-abc"},
    }

    reloaded = fresh(tmp_path)
    reloaded.load()
    published = reloaded.published("7099-abc")["h1"]
    assert published.parsed_model_params == PARAMS
    assert (published.peak_sysmem_mb, published.peak_vram_mb, published.llama_cpp_version) == (300, 50, "7099-abc")


@pytest.mark.parametrize(
    ("learned_under", "live", "served"),
    [("b1000-old", "b1000-old", True), ("b1000-old", "b2000-new", False), ("b1000-old", None, True), (None, "x", True)],
)
def test_params_from_another_llama_cpp_are_withheld(learned_under: str | None, live: str | None, served: bool) -> None:
    store = learned.LearnedStore(Path("unused.json"), node_id="n")
    store.learn_params("h", display_name="m", params=PARAMS, llama_cpp_version=learned_under)
    store.learn_peaks("h", display_name="m", sysmem_mb=10, vram_mb=0)
    published = store.published(live)["h"]
    assert (published.parsed_model_params is not None) is served
    assert published.peak_sysmem_mb == 10 and published.peak_vram_mb == 0  # peaks are never withheld


def test_unsampled_hash_publishes_no_peaks() -> None:
    store = learned.LearnedStore(Path("unused.json"), node_id="n")
    store.learn_params("h", display_name="m", params=PARAMS, llama_cpp_version=None)
    published = store.published(None)["h"]
    assert published.peak_sysmem_mb is None and published.peak_vram_mb is None


def test_foreign_keys_are_kept_and_bad_params_dropped(tmp_path: Path) -> None:
    seed_file = {
        "node_id": "node-a",
        "version": "1.4.0",
        "llama_cpp_version": "7099-d23355afc",
        "requests_total": 1234,
        "hashes": {
            "good": {"display_names": ["a"], "requests_total": 500, "peak_vram_mb": 28672, "peak_sysmem_mb": 13312,
                     "sample_count": 100, "parsed_model_params": {"params": {"n_ctx": 8}, "llama_cpp_version": None}},
            "drifted": {"display_names": ["b"], "requests_total": 7, "peak_vram_mb": 1, "peak_sysmem_mb": 2,
                        "sample_count": 1, "parsed_model_params": {"n_ctx": 4096, "n_slots": 4}},
            "not-an-object": 5,
        },
        "updated_at": "2025-11-20T19:00:00Z",
    }  # fmt: skip
    path = tmp_path / "node-metrics.json"
    path.write_text(json.dumps(seed_file))
    store = learned.LearnedStore(path, node_id="node-a")
    store.load()
    assert store.hashes == {"good", "drifted"}
    published = store.published("7099-d23355afc")
    assert published["good"].parsed_model_params == {"n_ctx": 8}
    assert published["drifted"].parsed_model_params is None and published["drifted"].peak_sysmem_mb == 2
    document = store.document(llama_cpp_version="7099-d23355afc")
    assert document["requests_total"] == 1234
    assert document["hashes"]["good"]["requests_total"] == 500
    assert "parsed_model_params" not in document["hashes"]["drifted"]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_unreadable_file_starts_with_nothing(tmp_path: Path, content: str) -> None:
    path = tmp_path / "node-metrics.json"
    path.write_text(content)
    store = learned.LearnedStore(path, node_id="n")
    store.load()
    assert store.hashes == frozenset()


def test_missing_file_starts_with_nothing(tmp_path: Path) -> None:
    store = fresh(tmp_path)
    store.load()
    assert store.published(None) == {}


def test_writes_are_atomic(tmp_path: Path) -> None:
    path = tmp_path / "state" / "node-metrics.json"
    learned.write_atomic(path, {"hashes": {"a": {}}})
    learned.write_atomic(path, {"hashes": {}})
    assert json.loads(path.read_text()) == {"hashes": {}}
    assert sorted(p.name for p in path.parent.iterdir()) == [".node-metrics.json.lock", "node-metrics.json"]


def test_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "node-metrics.json"
    learned.write_atomic(path, {"hashes": {"kept": {}}})
    with pytest.raises(TypeError):
        learned.write_atomic(path, {"hashes": {"bad": {"sample_count": object()}}})
    assert json.loads(path.read_text()) == {"hashes": {"kept": {}}}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".node-metrics.json.lock", "node-metrics.json"]

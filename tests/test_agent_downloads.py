"""Hugging Face downloads by the agent, against a local server with the hub's URL layout (HF_ENDPOINT).

Covers:
- choosing a file like llama-server does (tag, default Q4_K_M, split parts and projector files skipped);
- a tiny GGUF downloaded into the cache with progress reports, and a second fetch served from the cache
  without asking the server;
- without hf_file: the repo tree is listed and the tagged file fetched;
- a server that stalls mid-file: a clear timeout error, and the download child is gone;
- a missing file and a missing repository: errors that name the profile field to fix.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_support import REPO, FakeHub, serve_hub
from llamesh_agent import downloads
from rig import tiny_models


@pytest.fixture
def model_bytes(tmp_path: Path) -> bytes:
    return tiny_models.write_chat_model(tmp_path / "source.gguf").read_bytes()


@pytest.fixture
async def hub(model_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeHub]:
    files = {"tiny-chat-Q4_K_M.gguf": model_bytes, "tiny-chat-Q8_0.gguf": model_bytes[::-1], "README.md": b"hi"}
    async with serve_hub(FakeHub(files), monkeypatch) as served:
        yield served


@pytest.fixture
async def stalling_hub(model_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeHub]:
    async with serve_hub(FakeHub({"tiny.gguf": model_bytes * 40}, stall=True), monkeypatch) as served:
        yield served


# --- choosing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "tag", "chosen"),
    [
        (["a-Q8_0.gguf", "a-Q4_K_M.gguf", "README.md"], None, "a-Q4_K_M.gguf"),
        (["a-Q8_0.gguf", "a-Q4_K_M.gguf"], "q8_0", "a-Q8_0.gguf"),
        (["b-F16.gguf", "a-Q8_0.gguf"], None, "a-Q8_0.gguf"),
        (["a-Q8_0.gguf"], "Q2_K", None),
        (["mmproj-Q4_K_M.gguf", "m-Q4_K_M-00002-of-00002.gguf", "m-Q4_K_M-00001-of-00002.gguf"], None,
         "m-Q4_K_M-00001-of-00002.gguf"),
        (["README.md"], None, None),
    ],
)  # fmt: skip
def test_choose_gguf(files: list[str], tag: str | None, chosen: str | None) -> None:
    assert downloads.choose_gguf(files, tag) == chosen


def test_split_tag() -> None:
    assert downloads.split_tag("org/name:Q8_0") == ("org/name", "Q8_0")
    assert downloads.split_tag("org/name") == ("org/name", None)


# --- against the fake hub ------------------------------------------------------------------------


async def test_download_then_cache_hit(tmp_path: Path, hub: FakeHub, model_bytes: bytes) -> None:
    reports: list[downloads.Progress] = []
    cache = tmp_path / "hf"
    path = await downloads.fetch(
        REPO, "tiny-chat-Q4_K_M.gguf", cache_dir=cache, timeout_s=60, on_progress=reports.append,
        progress_interval_s=0.05,
    )  # fmt: skip
    assert path.read_bytes() == model_bytes
    assert path.is_relative_to(cache)
    assert any(request.startswith("GET ") for request in hub.requests)
    asked = len(hub.requests)
    again = await downloads.fetch(REPO, "tiny-chat-Q4_K_M.gguf", cache_dir=cache, timeout_s=60)
    assert again == path
    assert len(hub.requests) == asked  # served from the cache
    assert all(report.filename in (None, "tiny-chat-Q4_K_M.gguf") for report in reports)


async def test_without_a_file_the_tagged_gguf_is_chosen(tmp_path: Path, hub: FakeHub, model_bytes: bytes) -> None:
    path = await downloads.fetch(f"{REPO}:Q8_0", None, cache_dir=tmp_path / "hf", timeout_s=60)
    assert path.name == "tiny-chat-Q8_0.gguf"
    assert path.read_bytes() == model_bytes[::-1]
    assert any("/tree/" in request for request in hub.requests)


async def test_a_stalled_download_times_out(tmp_path: Path, stalling_hub: FakeHub) -> None:
    with pytest.raises(downloads.DownloadTimeout, match=r"took longer than 3 s .* download_timeout_seconds"):
        await downloads.fetch(REPO, "tiny.gguf", cache_dir=tmp_path / "hf", timeout_s=3, progress_interval_s=0.1)


async def test_missing_file(tmp_path: Path, hub: FakeHub) -> None:
    with pytest.raises(downloads.DownloadError, match=r"has no file nope\.gguf; check hf_file"):
        await downloads.fetch(REPO, "nope.gguf", cache_dir=tmp_path / "hf", timeout_s=60)


async def test_missing_repository(tmp_path: Path, hub: FakeHub) -> None:
    with pytest.raises(downloads.DownloadError, match="repository nobody/nothing not found; check hf_repo"):
        await downloads.fetch("nobody/nothing", "x.gguf", cache_dir=tmp_path / "hf", timeout_s=60)

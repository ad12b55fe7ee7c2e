"""cookbook.yaml → LlamaModel resources: the first load, the pure diff, hot reload on in-place writes and
on rename-over saves (a real file watcher), and a broken file that changes nothing (last good cookbook
keeps serving, the error names the file and field)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from llamesh_api import cookbook, resources, store
from llamesh_operator import cookbook_sync
from rig import waiting

TWO_MODELS = """
models:
  - name: a
    profiles: [{id: default, model_path: /a.gguf}]
  - name: b
    profiles: [{id: default, model_path: /b.gguf}]
"""


async def names(memory: store.MemoryStore) -> set[str]:
    return {model.name for model in (await memory.list(resources.LlamaModel)).items}


def test_diff_models_is_exact() -> None:
    book = cookbook.Cookbook.model_validate(
        {"models": [{"name": "same", "profiles": [{"id": "d", "model_path": "/x"}]},
                    {"name": "new", "profiles": [{"id": "d", "model_path": "/x"}]},
                    {"name": "changed", "profiles": [{"id": "d", "model_path": "/y"}]}]}
    )  # fmt: skip
    existing = [
        resources.LlamaModel.from_cookbook(
            cookbook.Model(name=name, profiles=[cookbook.Profile(id="d", model_path="/x")])
        )
        for name in ("same", "changed", "gone")
    ]
    changes = cookbook_sync.diff_models(book, existing)
    assert [m.name for m in changes.create] == ["new"]
    assert [m.name for m in changes.update] == ["changed"]
    assert changes.delete == ["gone"]


async def test_load_then_hot_reload_in_place_rename_over_and_broken(tmp_path: Path) -> None:
    path = tmp_path / "cookbook.yaml"
    path.write_text(TWO_MODELS)
    memory = store.MemoryStore()
    source = cookbook_sync.CookbookFile(path=path, resource_store=memory)
    assert await source.load()
    assert await names(memory) == {"a", "b"}

    watcher = asyncio.create_task(source.watch(debounce_ms=50))
    try:
        # in-place write: b removed, a changed. The watcher may not be watching yet when the test first
        # writes (nothing says when it is), so the edit is saved again until it is seen, as a person would.
        edited = "models:\n  - name: a\n    profiles: [{id: default, model_path: /a2.gguf}]\n"

        async def a_changed() -> bool:
            path.write_text(edited)
            a = await memory.get(resources.LlamaModel, "a")
            return await names(memory) == {"a"} and a is not None and a.spec.profiles[0].model_path == "/a2.gguf"

        await waiting.eventually(a_changed, interval_s=0.35)  # not in step with the watcher's 200 ms

        # a broken file is refused; the store keeps the last good cookbook
        path.write_text("models:\n  - name: a\n    profiles: [\n")

        async def refused() -> bool:
            return source.last_error is not None

        await waiting.eventually(refused)
        assert str(path) in str(source.last_error)
        assert await names(memory) == {"a"}

        # an editor's save: write a temp file, rename it over the cookbook
        temp = tmp_path / ".cookbook.yaml.swp"
        temp.write_text(TWO_MODELS)
        os.replace(temp, path)

        async def both_back() -> bool:
            return await names(memory) == {"a", "b"} and source.last_error is None

        await waiting.eventually(both_back)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def test_unreadable_file_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "cookbook.yaml"
    path.write_text(TWO_MODELS)
    memory = store.MemoryStore()
    source = cookbook_sync.CookbookFile(path=path, resource_store=memory)
    assert await source.load()
    path.unlink()
    assert not await source.load()
    assert await names(memory) == {"a", "b"}

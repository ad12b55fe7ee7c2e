"""Bare-metal desired state: cookbook.yaml mirrored into LlamaModel resources, re-read when it changes.

The file's folder is watched (watchfiles), so both in-place writes and editors' rename-over saves are
seen. A file that fails to load is reported and changes nothing: the last good cookbook keeps serving.
What happens to running instances of a changed or removed profile is the operator planner's business
(it drains them); this module only keeps the LlamaModel objects equal to the file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import watchfiles

from llamesh_api import cookbook, loading, resources, store, writes

log = logging.getLogger(__name__)

# How often watchfiles' thread wakes to look for changes (and its stop event, which takes the GIL): a change
# is reloaded one to two steps after the last write. Its default, 50 ms, was 13% of `llamesh serve`'s CPU
# while it relayed one stream from a real llama-server (bench/README.md, "Sixth pass").
WATCH_STEP_MS = 200


@dataclasses.dataclass(frozen=True)
class ModelChanges:
    create: list[cookbook.Model]
    update: list[cookbook.Model]
    delete: list[str]


def diff_models(book: cookbook.Cookbook, existing: Sequence[resources.LlamaModel]) -> ModelChanges:
    """What to create, update and delete so the LlamaModel objects equal the cookbook (pure)."""
    current = {model.name: model for model in existing}
    wanted = {model.name: model for model in book.models}
    return ModelChanges(
        create=[model for name, model in wanted.items() if name not in current],
        update=[model for name, model in wanted.items() if name in current and current[name].spec != model.spec()],
        delete=[name for name in current if name not in wanted],
    )


class CookbookFile:
    """One cookbook.yaml kept in sync with a Store."""

    def __init__(self, *, path: Path, resource_store: store.Store) -> None:
        self.path = path
        self._store = resource_store
        self._digest: str | None = None
        self.last_error: loading.ConfigError | None = None

    async def load(self) -> bool:
        """Apply the file if it changed and is valid. False (and `last_error` set) if it was refused."""
        try:
            digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError as exc:
            self.last_error = loading.ConfigError(
                [loading.Problem(str(self.path), "", f"cannot read the file ({exc.strerror})", "restore the file")]
            )
            log.error(
                "cookbook not reloaded, last good one keeps serving: %s",
                self.last_error,
                extra={"event": "cookbook_reload_failed"},
            )
            return False
        if digest == self._digest:
            return True
        try:
            book = await asyncio.to_thread(loading.load_cookbook, self.path)
        except loading.ConfigError as exc:
            self.last_error = exc
            log.error(
                "cookbook not reloaded, last good one keeps serving:\n%s",
                exc,
                extra={"event": "cookbook_reload_failed"},
            )
            return False
        await self._apply(book)
        self._digest = digest
        self.last_error = None
        return True

    async def watch(self, *, debounce_ms: int = 100) -> None:
        """Reload on every change to the file (until cancelled)."""
        name = self.path.name

        def is_cookbook(_change: watchfiles.Change, changed: str) -> bool:
            return Path(changed).name == name

        # The folder, not the file: an editor's rename-over save replaces the file the watch would hold.
        async for _changes in watchfiles.awatch(
            self.path.parent, watch_filter=is_cookbook, debounce=debounce_ms, step=WATCH_STEP_MS, recursive=False
        ):
            await self.load()

    async def _apply(self, book: cookbook.Cookbook) -> None:
        changes = diff_models(book, (await self._store.list(resources.LlamaModel)).items)
        for model in changes.create:
            await self._store.create(resources.LlamaModel.from_cookbook(model))
            log.info(
                "cookbook: model %s added", model.name, extra={"event": "cookbook_model_added", "model": model.name}
            )
        for model in changes.update:
            await writes.update(self._store, resources.LlamaModel, model.name, _set_spec(model.spec()))
            log.info(
                "cookbook: model %s changed", model.name, extra={"event": "cookbook_model_changed", "model": model.name}
            )
        for name in changes.delete:
            await self._store.delete(resources.LlamaModel, name)
            log.info("cookbook: model %s removed", name, extra={"event": "cookbook_model_removed", "model": name})


def _set_spec(spec: cookbook.ModelSpec) -> Callable[[resources.LlamaModel], None]:
    def mutate(obj: resources.LlamaModel) -> None:
        obj.spec = spec

    return mutate

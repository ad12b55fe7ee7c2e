"""Model parameters asked of a healthy llama-server: `GET /props` and `GET /v1/models`.

These answers are steadier than log lines (DESIGN.md): `/props` gives `total_slots`, the per-slot context
(`default_generation_settings.n_ctx`) and `build_info`; the `meta` of `/v1/models` gives the trained context
and model size. What they leave out, the startup log fills in (`startup_log`); `merge` puts them together with
the HTTP answers winning.

It asks once, with a short timeout, and never raises for a server that answers oddly or not at all: parsed
parameters are a nicety, not a reason to fail an instance that is serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import aiohttp

# Fields of /v1/models `data[0].meta` kept, under the same names (llama-server's).
_META_INT_KEYS = ("n_ctx_train", "n_vocab", "n_embd", "n_params")


@dataclasses.dataclass(frozen=True)
class ServerReport:
    params: dict[str, Any]
    build_info: str | None = None


def params_from_props(props: object) -> dict[str, Any]:
    """`n_slots` and per-slot `n_ctx` from a `/props` document."""
    found: dict[str, Any] = {}
    if not isinstance(props, Mapping):
        return found
    if _is_count(slots := props.get("total_slots")):
        found["n_slots"] = slots
    settings = props.get("default_generation_settings")
    if isinstance(settings, Mapping) and _is_count(n_ctx := settings.get("n_ctx")):
        found["n_ctx"] = n_ctx
    return found


def build_info_from_props(props: object) -> str | None:
    if isinstance(props, Mapping) and isinstance(info := props.get("build_info"), str) and info:
        return info
    return None


def params_from_models(models: object) -> dict[str, Any]:
    """Model metadata from the first model of a `/v1/models` document."""
    found: dict[str, Any] = {}
    if not isinstance(models, Mapping) or not isinstance(data := models.get("data"), list) or not data:
        return found
    first = data[0]
    meta = first.get("meta") if isinstance(first, Mapping) else None
    if isinstance(meta, Mapping):
        for key in _META_INT_KEYS:
            if _is_count(value := meta.get(key)):
                found[key] = value
    return found


def merge(*sources: Mapping[str, Any]) -> dict[str, Any]:
    """Later sources win."""
    merged: dict[str, Any] = {}
    for source in sources:
        merged.update(source)
    return merged


async def ask(session: aiohttp.ClientSession, base_url: str, *, timeout_s: float = 2.0) -> ServerReport:
    """What `/props` and `/v1/models` say; empty where they say nothing usable."""
    props, models = await asyncio.gather(
        _get_json(session, f"{base_url}/props", timeout_s=timeout_s),
        _get_json(session, f"{base_url}/v1/models", timeout_s=timeout_s),
    )
    return ServerReport(
        params=merge(params_from_models(models), params_from_props(props)),
        build_info=build_info_from_props(props),
    )


async def _get_json(session: aiohttp.ClientSession, url: str, *, timeout_s: float) -> object:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            if response.status != 200:
                return None
            return json.loads(await response.read())
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError):
        return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0

"""Everything but the request path: probes, /version, /v1/models, /metrics, and the admin endpoints.

Probes and model listings answer from the in-memory catalog. The admin endpoints write the store:
/admin/prewarm asks for an instance (reason `prewarm`) when the profile has none live; /admin/rebuild-llama
bumps this node's `spec.rebuild_requests` for its agent, refusing (409) while a build runs or a request is
still pending. Probe bodies follow the seed (`{"status": ...}`), not the error envelope.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from prometheus_client import exposition

from llamesh_api import resources, writes
from llamesh_proxy import catalog, errors, gateway


def _gateway(request: web.Request) -> gateway.Gateway:
    return request.app[gateway.GATEWAY]


async def healthz(request: web.Request) -> web.Response:
    gw = _gateway(request)
    if gw.catalog.model_count == 0:
        return web.json_response({"status": "error", "message": "No models configured"}, status=503)
    if not gw.catalog.binary_present():
        return web.json_response({"status": "error", "message": "Binary missing"}, status=503)
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gw = _gateway(request)
    if gw.draining:
        return web.json_response({"status": "draining", "message": "Node is draining"}, status=503)
    if not gw.catalog.binary_present():
        return web.json_response({"status": "not_ready", "message": "Binary missing"}, status=503)
    if gw.catalog.model_count == 0:
        return web.json_response({"status": "not_ready", "message": "No models configured"}, status=503)
    return web.json_response({"status": "ready", "can_spawn": gw.can_spawn()})


async def version(request: web.Request) -> web.Response:
    """Always the gateway's version; the llama.cpp build only to authorized callers (as in the seed)."""
    gw = _gateway(request)
    payload = {"version": gateway.VERSION}
    if gw.authenticator.is_authorized(request.headers):
        payload["llama_cpp_version"] = gw.llama_cpp_version()
    return web.json_response(payload)


# --- models -----------------------------------------------------------------------------------


def model_object(gw: gateway.Gateway, target: catalog.Target) -> dict[str, Any]:
    """One entry of /v1/models, in the seed's shape."""
    stats = gw.metrics.hashes.get(target.args_hash)
    return {
        "id": target.display,
        "object": "model",
        "created": gw.started_at,
        "owned_by": gw.config.node_id,
        "permission": [],
        "root": target.model,
        "parent": None,
        "metadata": {
            "model": target.model,
            "model_description": target.model_description,
            "profile_id": target.profile.id,
            "profile_description": target.profile.description,
            "idle_timeout_seconds": target.profile.idle_timeout_seconds,
            "estimated_tokens_per_second": stats.tokens_per_second() if stats is not None else 0.0,
            "parsed_model_params": gw.catalog.parsed_model_params(target, node_name=gw.node_name),
        },
    }


def all_models(gw: gateway.Gateway) -> list[dict[str, Any]]:
    """This node's models, then (in a cluster) the ones only peers serve: the cluster's union."""
    local = [model_object(gw, t) for t in gw.catalog.targets()]
    return local + (gw.mesh.peer_models() if gw.mesh is not None else [])


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": all_models(_gateway(request))})


async def get_model(request: web.Request) -> web.Response:
    """Exactly by a listed id: the bare name for the default profile, `model:profile` for any other.

    Unlike the request path's `model` field, no alias is resolved here (no case folding, no `name:default`):
    the seed's contract is "the model object whose `id` matches", so every id this answers is in /v1/models."""
    gw = _gateway(request)
    wanted = request.match_info["model"]
    target = next((t for t in gw.catalog.targets() if t.display == wanted), None)
    if target is not None:
        return web.json_response(model_object(gw, target))
    remote = next((m for m in (gw.mesh.peer_models() if gw.mesh is not None else []) if m["id"] == wanted), None)
    if remote is None:
        raise errors.ModelNotFound(f"Model '{wanted}' not found in local cookbook or any peer", param="model")
    return web.json_response(remote)


# --- metrics ----------------------------------------------------------------------------------


async def metrics_text(request: web.Request) -> web.Response:
    body = exposition.generate_latest(_gateway(request).registry)
    return web.Response(body=body, headers={"Content-Type": exposition.CONTENT_TYPE_LATEST})


async def metrics_json(request: web.Request) -> web.Response:
    gw = _gateway(request)
    return web.json_response(gw.metrics.snapshot(gw.live()))


# --- admin ------------------------------------------------------------------------------------


async def prewarm(request: web.Request) -> web.Response:
    gw = _gateway(request)
    if gw.draining:
        raise errors.Draining()
    try:
        document = json.loads(await request.read())
    except ValueError:
        raise errors.InvalidRequest("Invalid JSON") from None
    except RecursionError:  # e.g. 100,000 nested arrays: the decoder recurses once per level
        raise errors.InvalidRequest("Invalid JSON: nested too deeply") from None
    requested = document.get("model") if isinstance(document, dict) else None
    if not isinstance(requested, str) or not requested:
        raise errors.InvalidRequest("Missing model field", param="model")
    target = gw.catalog.resolve(requested)
    if target is None:
        raise errors.ModelNotFound(f"Model '{requested}' not found in local cookbook or any peer", param="model")
    name = gw.dispatcher.prewarm(target)
    if name is None:
        return web.json_response(
            {"status": "ok", "message": "Model already has a live instance", "model": target.display}
        )
    return web.json_response(
        {"status": "accepted", "message": "Prewarm requested", "model": target.display, "instance": name}, status=202
    )


async def rebuild_llama(request: web.Request) -> web.Response:
    gw = _gateway(request)
    node = gw.catalog.node(gw.node_name)
    if node is None:
        raise errors.Conflict(f"Node '{gw.node_name}' has not registered yet; retry once its agent reports")
    if node.status.is_building or node.spec.rebuild_requests > node.status.rebuilds_handled:
        raise errors.Conflict("Rebuild already in progress")

    def bump(current: resources.LlamaNode) -> None:
        if current.status.is_building or current.spec.rebuild_requests > current.status.rebuilds_handled:
            raise errors.Conflict("Rebuild already in progress")
        current.spec.rebuild_requests += 1

    await writes.update(gw.store, resources.LlamaNode, gw.node_name, bump)
    return web.json_response({"status": "accepted", "message": "Rebuild triggered in background"}, status=202)

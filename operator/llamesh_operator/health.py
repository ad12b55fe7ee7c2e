"""Health endpoints for the roles that serve no HTTP of their own (operator, agent), for Kubernetes probes.

`GET /healthz` (liveness) and `GET /readyz` (readiness) answer 200 or 503 with a JSON body saying why, from
a check the role gives. Off unless a port is given (`--health-port`): several roles run side by side on a
developer's host and in the tests, where a fixed default port would clash.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from aiohttp import web


@dataclasses.dataclass(frozen=True)
class Verdict:
    alive: bool
    ready: bool
    message: str


async def serve(check: Callable[[], Verdict], *, host: str, port: int) -> web.AppRunner:
    """Start answering probes on `host:port`; the caller cleans the runner up."""

    async def healthz(_request: web.Request) -> web.Response:
        verdict = check()
        return web.json_response({"status": "ok" if verdict.alive else "error", "message": verdict.message},
                                 status=200 if verdict.alive else 503)  # fmt: skip

    async def readyz(_request: web.Request) -> web.Response:
        verdict = check()
        return web.json_response({"status": "ok" if verdict.ready else "error", "message": verdict.message},
                                 status=200 if verdict.ready else 503)  # fmt: skip

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner

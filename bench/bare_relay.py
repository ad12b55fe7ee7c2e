"""The benchmark's baseline: the least a Python relay in front of llama-server can do.

    python bench/bare_relay.py --port P --upstream http://127.0.0.1:A

One shared ClientSession (keep-alive, no connection cap; `--force-close`: a new upstream connection per
request, for llama-server, which closes a connection after a stream, so that a kept one fails the next
request on it); POST /v1/chat/completions is forwarded as bytes
and the answer relayed as it comes (`iter_any`). Nothing else: no auth, routing, queue, metrics or error
envelope. DESIGN.md's budget asks the gateway for at least 0.67x this relay's non-streaming throughput.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM_URL = web.AppKey("upstream_url", str)


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    async with request.app[SESSION].post(request.app[UPSTREAM_URL], data=body, headers=headers) as upstream:
        response = web.StreamResponse(status=upstream.status, headers={"Content-Type": upstream.content_type})
        response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def create_app(upstream: str, *, force_close: bool = False) -> web.Application:
    app = web.Application()
    app[UPSTREAM_URL] = upstream.rstrip("/") + "/v1/chat/completions"

    async def session(app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        connector = aiohttp.TCPConnector(limit=0, force_close=force_close)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
            app[SESSION] = client
            yield

    app.cleanup_ctx.append(session)
    app.router.add_post("/v1/chat/completions", relay)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL of the upstream, e.g. http://127.0.0.1:8081")
    parser.add_argument("--force-close", action="store_true", help="a new upstream connection per request")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        loop = None
    else:
        loop = uvloop.new_event_loop()
    app = create_app(args.upstream, force_close=args.force_close)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, shutdown_timeout=0.1, loop=loop)


if __name__ == "__main__":
    main()

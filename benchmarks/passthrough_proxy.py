"""A bare pass-through proxy: the floor of a Python data path, for ``router_overhead.py``.

aiohttp's server and pooled client on uvloop; each ``POST`` goes round robin to one of the upstream URLs and its
answer is relayed chunk by chunk, with no parsing, no policy, no metrics. Usage:
    python benchmarks/passthrough_proxy.py PORT UPSTREAM_URL [UPSTREAM_URL ...]
"""

from __future__ import annotations

import itertools
import sys

import aiohttp
import uvloop
from aiohttp import web


def main() -> None:
    port, upstreams = int(sys.argv[1]), itertools.cycle(sys.argv[2:])
    session: aiohttp.ClientSession | None = None

    async def start(app: web.Application) -> None:
        nonlocal session
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def stop(app: web.Application) -> None:
        assert session is not None
        await session.close()

    async def relay(request: web.Request) -> web.StreamResponse:
        assert session is not None
        body = await request.read()
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        async with session.post(next(upstreams) + request.path, data=body, headers=headers) as upstream:
            response = web.StreamResponse(
                status=upstream.status, headers={"content-type": upstream.headers.get("content-type", "")}
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{path:.*}", relay)
    app.router.add_get("/health", health)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()

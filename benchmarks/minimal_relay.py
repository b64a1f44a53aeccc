"""The floor: the least an aiohttp relay can do, to compare edgeproxy's one worker with.

``python benchmarks/minimal_relay.py --port P --key SECRET --route bench-json=URL ...``

Per request: compare the Bearer key with one fixed secret, parse the body with orjson to
find the model, forward the same bytes with one shared ``aiohttp.ClientSession`` to that
model's base URL, and send the answer back: a JSON body whole, a stream chunk by chunk as
it arrives (``iter_any``). No metering, no metrics, no retries, no logging; uvloop.

It must not: grow features. Every line here is cost edgeproxy pays too; anything more
would raise the floor the 1.2x target is measured against.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac

import aiohttp
import orjson
import uvloop
from aiohttp import web

ROUTES = web.AppKey("routes", dict)
SECRET = web.AppKey("secret", bytes)
SESSION = web.AppKey("session", aiohttp.ClientSession)
UNAUTHORIZED = orjson.dumps({"error": {"message": "bad key", "type": "invalid_request_error"}})


async def chat(request: web.Request) -> web.StreamResponse:
    app = request.app
    auth = request.headers.get("Authorization", "")
    if not hmac.compare_digest(auth.encode(), app[SECRET]):
        return web.Response(status=401, body=UNAUTHORIZED, content_type="application/json")
    raw = await request.read()
    body = orjson.loads(raw)
    base = app[ROUTES].get(body.get("model"))
    if base is None:
        return web.Response(status=404, body=b'{"error":{"message":"no such model"}}')
    headers = {"Content-Type": "application/json", "Authorization": "Bearer upstream-key"}
    async with app[SESSION].post(base + "/chat/completions", data=raw, headers=headers) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/json")
        if not body.get("stream"):
            return web.Response(
                status=upstream.status,
                body=await upstream.read(),
                headers={"Content-Type": content_type},
            )
        response = web.StreamResponse(
            status=upstream.status, headers={"Content-Type": content_type}
        )
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def serve(port: int, key: str, routes: dict[str, str]) -> None:
    app = web.Application()
    app[ROUTES] = routes
    app[SECRET] = f"Bearer {key}".encode()
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),  # the default of 100 would queue at 64+ streams
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=False,
    )
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    try:
        await asyncio.Event().wait()  # until SIGTERM (handle_signals turns it into an exit)
    finally:
        await app[SESSION].close()
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--route", action="append", default=[], help="MODEL=BASE_URL (repeatable)")
    args = parser.parse_args()
    routes = dict(item.split("=", 1) for item in args.route)
    uvloop.run(serve(args.port, args.key, routes))


if __name__ == "__main__":
    main()

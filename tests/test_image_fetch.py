"""Image fetching for Gemini: address vetting (pure), then a tiny image server on 127.0.0.1
that only ``allow_private=True`` may reach."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from edgeproxy.image_fetch import ImageFetchError, fetch_image, is_public_address

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("64:ff9b::808:808", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped
        ("::ffff:169.254.169.254", False),
        ("2002:7f00:1::", False),  # 6to4 around 127.0.0.1
        ("64:ff9b::a00:1", False),  # NAT64 around 10.0.0.1
        ("not-an-ip", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(address) is public


@pytest.fixture
async def session() -> AsyncIterator[tuple[aiohttp.ClientSession, list[str]]]:
    """A client session that records every request it starts."""
    started: list[str] = []

    async def on_start(
        _: object, __: SimpleNamespace, params: aiohttp.TraceRequestStartParams
    ) -> None:
        started.append(str(params.url))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    async with aiohttp.ClientSession(trace_configs=[trace]) as client:
        yield client, started


@pytest.fixture
async def server() -> AsyncIterator[str]:
    """Base URL (with the name ``localhost``) of an image server on 127.0.0.1."""

    async def image(request: web.Request) -> web.Response:
        return web.Response(
            body=PNG, content_type="image/png", headers={"X-Seen-Host": request.host}
        )

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query.get("to", "/image.png"))

    async def loop(_: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def html(_: web.Request) -> web.Response:
        return web.Response(text="<html></html>", content_type="text/html")

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        await response.prepare(request)  # chunked: no Content-Length to check up front
        for _ in range(4):
            await response.write(b"\0" * 1024)
        return response

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(body=PNG, content_type="image/png")

    app = web.Application()
    app.router.add_get("/image.png", image)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/loop", loop)
    app.router.add_get("/page", html)
    app.router.add_get("/big", big)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://localhost:{port}"
    await runner.cleanup()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.png",
        "http://[::1]/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:10.0.0.1]/a.png",
        "http://0.0.0.0:8080/a.png",
    ],
)
async def test_private_literal_addresses_refused_before_connecting(
    session: tuple[aiohttp.ClientSession, list[str]], url: str
) -> None:
    client, started = session
    with pytest.raises(ImageFetchError, match="private or reserved address"):
        await fetch_image(client, url)
    assert started == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/a.png", "must be http or https"),
        ("file:///etc/passwd", "must be http or https"),
        ("http://user:secret@example.com/a.png", "must not carry credentials"),
        ("not a url", "must be http or https"),
    ],
)
async def test_bad_urls_refused(
    session: tuple[aiohttp.ClientSession, list[str]], url: str, message: str
) -> None:
    client, started = session
    with pytest.raises(ImageFetchError, match=message):
        await fetch_image(client, url)
    assert started == []


async def test_localhost_refused_unless_private_allowed(
    session: tuple[aiohttp.ClientSession, list[str]], server: str
) -> None:
    client, started = session
    with pytest.raises(ImageFetchError, match="private or reserved address"):
        await fetch_image(client, f"{server}/image.png")
    assert started == []
    assert await fetch_image(client, f"{server}/image.png", allow_private=True) == (
        "image/png",
        PNG,
    )
    # the connection went to the vetted IP, with the client's host name kept as Host
    assert started == [f"{server.replace('localhost', '127.0.0.1')}/image.png"]


async def test_redirects_are_followed_and_vetted(
    session: tuple[aiohttp.ClientSession, list[str]], server: str
) -> None:
    client, started = session
    assert await fetch_image(client, f"{server}/redirect", allow_private=True) == ("image/png", PNG)
    assert len(started) == 2
    with pytest.raises(ImageFetchError, match="redirected too many times"):
        await fetch_image(client, f"{server}/loop", allow_private=True)
    # every hop goes through the same resolve-and-vet step: this one cannot resolve
    started.clear()
    with pytest.raises(ImageFetchError, match="could not be resolved"):
        await fetch_image(client, f"{server}/redirect?to=http://host.invalid/", allow_private=True)
    assert len(started) == 1
    with pytest.raises(ImageFetchError, match="must be http or https"):
        await fetch_image(client, f"{server}/redirect?to=file:///etc/passwd", allow_private=True)


@pytest.mark.parametrize(
    ("path", "limit", "message"),
    [
        ("/page", 10_000, "did not return an image"),
        ("/missing", 10_000, "answered HTTP 404"),
        ("/image.png", 10, "larger than 10 bytes"),  # Content-Length says so up front
        ("/big", 2000, "larger than 2000 bytes"),  # chunked: stopped while reading
    ],
)
async def test_refusals_from_the_server(
    session: tuple[aiohttp.ClientSession, list[str]],
    server: str,
    path: str,
    limit: int,
    message: str,
) -> None:
    client, _ = session
    with pytest.raises(ImageFetchError, match=message):
        await fetch_image(client, f"{server}{path}", max_bytes=limit, allow_private=True)


async def test_slow_server_times_out(
    session: tuple[aiohttp.ClientSession, list[str]], server: str
) -> None:
    client, _ = session
    with pytest.raises(ImageFetchError, match="took too long"):
        await fetch_image(client, f"{server}/slow", timeout_s=0.2, allow_private=True)

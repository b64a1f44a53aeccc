"""upstream_client against raw asyncio servers on 127.0.0.1, so every response byte is scripted."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from edgeproxy.upstream_client import UpstreamClient, UpstreamConnectionError, _parse_url

pytestmark = pytest.mark.timeout(20)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A scripted upstream: ``handler`` runs once per accepted connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []  # each request's head, as received
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request (head + Content-Length body), or None at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        self.requests.append(head)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return head + await reader.readexactly(length)

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.append(writer)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serve(
    handler: Handler, ssl_ctx: ssl.SSLContext | None = None
) -> AsyncIterator[RawServer]:
    raw = RawServer(handler)
    server = await asyncio.start_server(raw._on_connection, "127.0.0.1", 0, ssl=ssl_ctx)
    raw.port = server.sockets[0].getsockname()[1]
    try:
        yield raw
    finally:
        server.close()
        # End handlers by EOF, not cancel: Python 3.11's start_server logs an error for
        # every cancelled handler task.
        for writer in raw.writers:
            writer.transport.abort()
        if raw.tasks:
            _, pending = await asyncio.wait(raw.tasks, timeout=2.0)
            assert not pending, "a scripted handler did not finish"
        await server.wait_closed()


def ok(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def keepalive_handler(srv_ref: list[RawServer], body: bytes = b"hello") -> Handler:
    """Answer every request on the connection with ``body``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await srv_ref[0].read_request(reader) is not None:
            writer.write(ok(body))
            await writer.drain()

    return handler


@contextlib.asynccontextmanager
async def keepalive_server(body: bytes = b"hello") -> AsyncIterator[RawServer]:
    ref: list[RawServer] = []
    async with serve(keepalive_handler(ref, body)) as srv:
        ref.append(srv)
        yield srv


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient(user_agent="edgeproxy-test/1")
    yield c
    await c.close()


async def get_body(client: UpstreamClient, url: str, **kw: object) -> tuple[int, bytes]:
    async with client.post(url, body=b"{}", headers={}, connect_timeout=2.0, **kw) as resp:  # type: ignore[arg-type]
        return resp.status, await resp.read()


# Bodies: Content-Length, chunked, close-delimited, HEAD, 1xx


async def test_content_length_body(client: UpstreamClient) -> None:
    async with keepalive_server(b'{"ok":true}') as srv:
        assert await get_body(client, f"http://127.0.0.1:{srv.port}/v1/x") == (200, b'{"ok":true}')


async def test_chunked_body_yields_chunks_as_they_arrive(client: UpstreamClient) -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for i in range(20):
            data = f"data: {i}\n\n".encode()
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            if i == 0:
                await release.wait()  # the client must get event 0 before the rest is sent
            await asyncio.sleep(0.001)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with serve(handler) as srv:
        got: list[bytes] = []
        async with client.post(
            f"http://127.0.0.1:{srv.port}/", body=b"x", headers={}, connect_timeout=2.0
        ) as resp:
            assert resp.content_type == "text/event-stream"
            async for chunk in resp.iter_any():
                got.append(chunk)
                release.set()
        assert got[0] == b"data: 0\n\n"
        assert len(got) > 1
        assert b"".join(got) == b"".join(f"data: {i}\n\n".encode() for i in range(20))


async def test_close_delimited_body(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"world")
        await writer.drain()
        writer.close()  # EOF ends the body

    async with serve(handler) as srv:
        assert await get_body(client, f"http://127.0.0.1:{srv.port}/") == (200, b"hello world")
        assert not client._pools.get(("http", "127.0.0.1", srv.port))  # never pooled


async def test_head_response_has_no_body(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        await reader.read()

    async with serve(handler) as srv:
        async with client.request(
            "HEAD", f"http://127.0.0.1:{srv.port}/", headers={}, connect_timeout=2.0
        ) as resp:
            assert resp.headers.get("content-length") == "1000"
            assert await asyncio.wait_for(resp.read(), 1.0) == b""
        assert srv.requests[0].startswith(b"HEAD / HTTP/1.1\r\n")


async def test_interim_100_continue_is_skipped(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(ok(b"final", "X-Final: 1\r\n"))
        await reader.read()

    async with serve(handler) as srv:
        async with client.post(
            f"http://127.0.0.1:{srv.port}/", body=b"", headers={}, connect_timeout=2.0
        ) as resp:
            assert resp.status == 200
            assert "x-final" in resp.headers
            assert "x-interim" not in resp.headers
            assert await resp.read() == b"final"


# Request bytes and response headers


async def test_request_headers_sent_as_specified(client: UpstreamClient) -> None:
    async with keepalive_server() as srv:
        base = f"http://127.0.0.1:{srv.port}"
        await get_body(client, f"{base}/v1/chat?x=1&y=%20")
        async with client.request(
            "GET",
            f"{base}/p",
            headers={"user-agent": "mine/2", "ACCEPT-ENCODING": "br", "X-Key": "v a:l"},
            connect_timeout=2.0,
        ) as resp:
            await resp.read()
    first, second = (head.decode().split("\r\n") for head in srv.requests)
    assert first[0] == "POST /v1/chat?x=1&y=%20 HTTP/1.1"
    assert f"Host: 127.0.0.1:{srv.port}" in first
    assert "Content-Length: 2" in first
    assert "User-Agent: edgeproxy-test/1" in first
    assert "Accept-Encoding: identity" in first
    assert second[0] == "GET /p HTTP/1.1"
    assert "Content-Length: 0" in second
    assert "user-agent: mine/2" in second
    assert "ACCEPT-ENCODING: br" in second
    assert "X-Key: v a:l" in second
    assert not any(line.startswith(("User-Agent", "Accept-Encoding")) for line in second)


def test_host_header_and_target_from_url() -> None:
    assert _parse_url("https://api.example.com/v1/x?a=b").request_line_host == (
        " /v1/x?a=b HTTP/1.1\r\nHost: api.example.com"
    )
    assert (
        _parse_url("http://Example.com:80").request_line_host == " / HTTP/1.1\r\nHost: example.com"
    )
    v6 = _parse_url("https://[::1]:8443/a")
    assert (v6.host, v6.port, v6.tls) == ("::1", 8443, True)
    assert v6.request_line_host.endswith("Host: [::1]:8443")
    assert _parse_url("http://h/").key == ("http", "h", 80)


@pytest.mark.parametrize("url", ["ftp://h/x", "h/x", "http:///x", "http://h:99999/"])
def test_bad_url_rejected(client: UpstreamClient, url: str) -> None:
    with pytest.raises(ValueError):
        client.post(url, body=b"", headers={}, connect_timeout=1.0)


@pytest.mark.parametrize(
    "headers",
    [
        {"X-A": "v\r\nX-Injected: 1"},
        {"X-A": "v\nX-Injected: 1"},
        {"X-A\r\nX-Injected": "1"},
        {"X A": "1"},
    ],
)
def test_header_injection_rejected(client: UpstreamClient, headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        client.post("http://127.0.0.1:1/", body=b"", headers=headers, connect_timeout=1.0)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Content-Type: Text/Event-Stream; charset=utf-8\r\n", "text/event-stream"),
        ("content-type: application/json\r\n", "application/json"),
        ("", "application/octet-stream"),
    ],
)
async def test_headers_case_insensitive_and_content_type(
    client: UpstreamClient, header: str, expected: str
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(ok(b"", header + "X-Request-Id: abc\r\nx-request-id: second\r\n"))
        await reader.read()

    async with serve(handler) as srv:
        async with client.post(
            f"http://127.0.0.1:{srv.port}/", body=b"", headers={}, connect_timeout=2.0
        ) as resp:
            assert resp.content_type == expected
            assert resp.headers.get("X-REQUEST-ID") == "abc"  # first value wins
            assert resp.headers.get("missing") is None
            assert resp.headers.get("missing", "d") == "d"
            assert "x-Request-id" in resp.headers


async def test_malformed_response_is_connection_error(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await reader.read()

    async with serve(handler) as srv:
        with pytest.raises(UpstreamConnectionError):
            await get_body(client, f"http://127.0.0.1:{srv.port}/")


# Keep-alive pool


async def test_keepalive_reuses_one_connection(client: UpstreamClient) -> None:
    async with keepalive_server() as srv:
        url = f"http://127.0.0.1:{srv.port}/"
        assert await get_body(client, url) == (200, b"hello")
        assert await get_body(client, url) == (200, b"hello")
        async with client.post(url, body=b"", headers={}, connect_timeout=2.0) as resp:
            assert await resp.read(5) == b"hello"  # limit == body: still read to the end
        assert await get_body(client, url) == (200, b"hello")
    assert srv.connections == 1
    assert len(srv.requests) == 4


async def test_early_exit_and_read_limit_do_not_reuse(client: UpstreamClient) -> None:
    async with keepalive_server(b"x" * 1000) as srv:
        url = f"http://127.0.0.1:{srv.port}/"
        async with client.post(url, body=b"", headers={}, connect_timeout=2.0) as resp:
            assert resp.status == 200  # leave without reading the body
        async with client.post(url, body=b"", headers={}, connect_timeout=2.0) as resp:
            assert await resp.read(10) == b"x" * 10
        with pytest.raises(KeyError):
            async with client.post(url, body=b"", headers={}, connect_timeout=2.0) as resp:
                await resp.read()
                raise KeyError  # an exception in the block: not pooled either
        assert await get_body(client, url) == (200, b"x" * 1000)
    assert srv.connections == 4


@pytest.mark.parametrize("status_line", ["HTTP/1.1 200 OK\r\nConnection: close", "HTTP/1.0 200 OK"])
async def test_no_reuse_when_server_does_not_keep_alive(
    client: UpstreamClient, status_line: str
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await srv.read_request(reader) is not None:  # keeps the socket open anyway
            writer.write(f"{status_line}\r\nContent-Length: 2\r\n\r\nok".encode())

    async with serve(handler) as srv:
        url = f"http://127.0.0.1:{srv.port}/"
        assert await get_body(client, url) == (200, b"ok")
        assert await get_body(client, url) == (200, b"ok")
        assert srv.connections == 2


async def test_pool_is_lifo() -> None:
    client = UpstreamClient(user_agent="t")
    both = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id = srv.connections
        if conn_id == 2:
            both.set()
        await both.wait()  # two requests in flight at once: two connections
        while await srv.read_request(reader) is not None:
            writer.write(ok(b"conn%d" % conn_id))

    async with serve(handler) as srv:
        url = f"http://127.0.0.1:{srv.port}/"
        first = client.post(url, body=b"", headers={}, connect_timeout=2.0)
        second = client.post(url, body=b"", headers={}, connect_timeout=2.0)
        resp1, resp2 = await asyncio.gather(first.__aenter__(), second.__aenter__())
        body1, body2 = await resp1.read(), await resp2.read()
        await first.__aexit__(None, None, None)
        await second.__aexit__(None, None, None)  # released last: taken first
        assert await get_body(client, url) == (200, body2)
        assert await get_body(client, url) == (200, body2)
        assert {body1, body2} == {b"conn1", b"conn2"}
        assert srv.connections == 2
        await client.close()


async def test_expired_idle_connection_is_not_taken() -> None:
    # keepalive_s=0: the next request comes before the sweep runs, so only the check on
    # take can refuse the idle connection
    client = UpstreamClient(user_agent="t", keepalive_s=0)
    async with keepalive_server() as srv:
        url = f"http://127.0.0.1:{srv.port}/"
        assert await get_body(client, url) == (200, b"hello")
        assert await get_body(client, url) == (200, b"hello")
        assert srv.connections == 2
    await client.close()


async def test_connection_closed_by_server_while_idle_leaves_pool(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(ok(b"one"))
        await writer.drain()
        # returning closes the connection while the client holds it idle

    async with serve(handler) as srv:
        url = f"http://127.0.0.1:{srv.port}/"
        assert await get_body(client, url) == (200, b"one")
        key = ("http", "127.0.0.1", srv.port)
        for _ in range(100):
            if not client._pools[key]:
                break
            await asyncio.sleep(0.01)
        assert client._pools[key] == []
        assert await get_body(client, url) == (200, b"one")
        assert srv.connections == 2


async def test_a_pooled_connection_closed_unanswered_is_not_replayed(
    client: UpstreamClient,
) -> None:
    """The race a keep-alive timeout causes: the request arrived and the server closed.
    The caller gets the error (the relay's retry loop counts every try); the request is
    never sent a second time behind its back."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(ok(b"first"))
        await writer.drain()
        await srv.read_request(reader)  # then close without answering

    async with serve(handler) as srv:
        url = f"http://127.0.0.1:{srv.port}/"
        assert await get_body(client, url) == (200, b"first")
        with pytest.raises(UpstreamConnectionError):
            await get_body(client, url)
        assert srv.connections == 1
        assert len(srv.requests) == 2
        assert await get_body(client, url) == (200, b"first")  # the next one connects anew
        assert srv.connections == 2


async def test_no_reuse_once_a_partial_response_broke(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(ok(b"first"))
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 O")  # a partial status line, then close

    async with serve(handler) as srv:
        url = f"http://127.0.0.1:{srv.port}/"
        assert await get_body(client, url) == (200, b"first")
        with pytest.raises(UpstreamConnectionError):
            await get_body(client, url)
        assert srv.connections == 1


async def test_idle_connection_expires_after_keepalive() -> None:
    client = UpstreamClient(user_agent="t", keepalive_s=0.05)
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await srv.read_request(reader) is not None:
            writer.write(ok(b"x"))
        closed.set()  # the client closed this connection

    try:
        async with serve(handler) as srv:
            url = f"http://127.0.0.1:{srv.port}/"
            await get_body(client, url)
            await asyncio.wait_for(closed.wait(), 2.0)  # the sweep closed it, unprompted
            await get_body(client, url)
            assert srv.connections == 2
    finally:
        await client.close()


async def test_close_closes_pooled_connections() -> None:
    client = UpstreamClient(user_agent="t")
    eof = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await srv.read_request(reader) is not None:
            writer.write(ok(b"x"))
        eof.set()

    async with serve(handler) as srv:
        await get_body(client, f"http://127.0.0.1:{srv.port}/")
        assert not eof.is_set()
        await client.close()
        await asyncio.wait_for(eof.wait(), 2.0)


# Failures


async def test_connection_refused() -> None:
    client = UpstreamClient(user_agent="t")
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(UpstreamConnectionError) as info:
        await get_body(client, f"http://127.0.0.1:{port}/")
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    await client.close()


async def test_connect_timeout_covers_tls_handshake() -> None:
    client = UpstreamClient(user_agent="t")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept TCP, never answer the ClientHello

    async with serve(handler) as srv:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            async with client.post(
                f"https://127.0.0.1:{srv.port}/", body=b"", headers={}, connect_timeout=0.2
            ):
                pass
        assert loop.time() - started < 1.5
    await client.close()


async def test_body_broken_midway(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        if srv.connections == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\npartial\r\n")
        await writer.drain()

    async with serve(handler) as srv:
        url = f"http://127.0.0.1:{srv.port}/"
        async with client.post(url, body=b"", headers={}, connect_timeout=2.0) as resp:
            with pytest.raises(UpstreamConnectionError):
                await resp.read()
        got: list[bytes] = []
        async with client.post(url, body=b"", headers={}, connect_timeout=2.0) as resp:
            with pytest.raises(UpstreamConnectionError):
                async for chunk in resp.iter_any():
                    got.append(chunk)
        assert b"".join(got) == b"partial"


async def test_cancel_mid_body_closes_connection_and_leaves_no_task(client: UpstreamClient) -> None:
    eof = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await reader.read()  # wait for the client to go
        eof.set()

    async with serve(handler) as srv:
        before = asyncio.all_tasks()
        got: list[bytes] = []
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                async with client.post(
                    f"http://127.0.0.1:{srv.port}/", body=b"", headers={}, connect_timeout=2.0
                ) as resp:
                    async for chunk in resp.iter_any():
                        got.append(chunk)
        assert got == [b"first"]
        await asyncio.wait_for(eof.wait(), 2.0)
        assert not client._pools.get(("http", "127.0.0.1", srv.port))
        assert resp._waiter is None
        assert asyncio.all_tasks() - before - srv.tasks == set()


async def test_cancel_while_waiting_for_headers_closes_connection(client: UpstreamClient) -> None:
    eof = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        await reader.read()
        eof.set()

    async with serve(handler) as srv:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await get_body(client, f"http://127.0.0.1:{srv.port}/")
        await asyncio.wait_for(eof.wait(), 2.0)
        assert not client._pools.get(("http", "127.0.0.1", srv.port))


# Flow control


async def slow_big_body(client: UpstreamClient, size: int) -> int:
    """Read a ``size``-byte body slowly; returns the client's buffered high-water mark."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        block = bytes(range(256)) * 256
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        await reader.read()

    async with serve(handler) as srv:
        async with client.post(
            f"http://127.0.0.1:{srv.port}/", body=b"", headers={}, connect_timeout=2.0
        ) as resp:
            got = bytearray()
            await asyncio.sleep(0.1)  # let the server fill whatever it is allowed to
            async for chunk in resp.iter_any():
                got += chunk
                await asyncio.sleep(0.005)
            assert got == bytes(range(256)) * (size // 256)
            return resp.high_water


async def test_flow_control_pauses_reading(client: UpstreamClient) -> None:
    size = 5 * 1024 * 1024
    high_water = await slow_big_body(client, size)
    # the socket reads up to 256 KiB at a time on top of the 256 KiB mark
    assert 256 * 1024 < high_water < 1024 * 1024


# TLS and uvloop


@pytest.fixture
def tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    return server_ctx, ssl.create_default_context(cafile=str(cert))


async def test_tls_with_self_signed_cert(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = tls_contexts
    ref: list[RawServer] = []
    async with serve(keepalive_handler(ref, b"secure"), ssl_ctx=server_ctx) as srv:
        ref.append(srv)
        client = UpstreamClient(user_agent="t", ssl_context=client_ctx)
        url = f"https://127.0.0.1:{srv.port}/v1"
        assert await get_body(client, url) == (200, b"secure")
        assert await get_body(client, url) == (200, b"secure")
        assert srv.connections == 1  # kept alive over TLS too
        await client.close()
        untrusting = UpstreamClient(user_agent="t")  # system CAs do not trust the test cert
        with pytest.raises(UpstreamConnectionError) as info:
            await get_body(untrusting, url)
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
        await untrusting.close()


async def test_tls_close_delimited_body(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = tls_contexts

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
        await writer.drain()  # returning closes the connection with a TLS close_notify

    async with serve(handler, ssl_ctx=server_ctx) as srv:
        client = UpstreamClient(user_agent="t", ssl_context=client_ctx)
        assert await get_body(client, f"https://127.0.0.1:{srv.port}/") == (200, b"until close")
        await client.close()


def test_under_uvloop() -> None:
    """Production runs uvloop: its transports must pause, pool and end bodies the same way."""

    async def scenario() -> None:
        client = UpstreamClient(user_agent="t")
        try:
            high_water = await slow_big_body(client, 2 * 1024 * 1024)
            assert high_water < 1024 * 1024
            await test_keepalive_reuses_one_connection(client)
            await test_close_delimited_body(client)
            await test_a_pooled_connection_closed_unanswered_is_not_replayed(client)
            await test_cancel_mid_body_closes_connection_and_leaves_no_task(client)
        finally:
            await client.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


def test_tls_under_uvloop(tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    async def scenario() -> None:
        await test_tls_with_self_signed_cert(tls_contexts)
        await test_tls_close_delimited_body(tls_contexts)
        await test_connect_timeout_covers_tls_handshake()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())

"""Issue 8, secrets: canaries planted where secrets live never come out anywhere else.

Canaries: the upstreams' API keys, a configured upstream header, a marker in every
upstream ``base_url`` (so a leaked URL is recognisable), the admin token, the client's
real key and a client key the relay does not know. Traffic then walks every error path:
upstream 400/401/429/500 bodies that echo the key and the URL (JSON-escaped too),
mid-stream error events, streams cut by a reset, an unreachable upstream, timeouts,
malformed requests and bad auth. Then none of the canaries may appear in a response
body or header, in the relay's logs (a subprocess's stdout and stderr; ``caplog`` for a
relay in the test's loop), in ``/metrics``, or in the database file (client secrets
are stored as hashes only).

Last, no request field or header (Host, X-Forwarded-Host, a ``base_url`` field in the
body, a URL as the model name) can change where the relay connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from edgeproxy import db
from tests.conftest import start_relay, write_config
from tests.fakes import FakeUpstream, Hang, Json, Reset, Sse, anthropic_event, openai_chunk

REPO = Path(__file__).resolve().parent.parent
KEYS = {
    "openai": "sk-upstream-openai-CANARY-9f8e7d6c5b4a",
    "anthropic": "sk-ant-upstream-CANARY-1a2b3c4d5e6f",
    "gemini": "AIza-upstream-CANARY-0z9y8x7w6v5u",
    "refusing": "sk-upstream-refused-CANARY-abcdef012345",
    "down": "sk-upstream-down-CANARY-543210fedcba",
}
HEADER_SECRET = "org-header-CANARY-77aa88bb99cc"
URL_MARK = "url-CANARY-path"  # in every upstream base_url
ADMIN_TOKEN = "admin-token-CANARY-000111222333"
STRANGER = "sk-" + "stranger-CANARY-" + "q" * 30  # a well-formed key the relay does not know
HI = [{"role": "user", "content": "hi"}]


def relay_config(fake: FakeUpstream, **extra: Any) -> dict[str, Any]:
    base = f"{fake.url}/{URL_MARK}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens there once the socket closes

    def upstream(name: str, kind: str, models: list[str], url: str, **more: Any) -> dict[str, Any]:
        return {"name": name, "kind": kind, "base_url": url, "api_keys": [KEYS[name]],
                "models": models, **more}  # fmt: skip

    return {
        "listen": "127.0.0.1:1",
        "metrics_listen": "off",
        "database": "relay.db",
        "admin_token": ADMIN_TOKEN,
        "shutdown_grace": "1s",
        "retry": {"attempts": 2, "backoff": "1ms", "max_backoff": "2ms"},
        "timeouts": {"first_byte": "1s", "connect": "1s"},
        "health": {"eject_after": 1000},
        "upstreams": [
            upstream(
                "openai",
                "openai",
                ["gpt-4o-mini"],
                f"{base}/v1",
                headers={"OpenAI-Organization": HEADER_SECRET},
            ),
            upstream("anthropic", "anthropic", ["claude-*"], base),
            upstream("gemini", "gemini", ["gemini-*"], base),
            upstream("refusing", "openai", ["gpt-refused"], f"{base}/v1"),
            upstream(
                "down", "openai", ["gpt-down"], f"http://127.0.0.1:{closed_port}/{URL_MARK}/v1"
            ),
        ],
        "models": {"gpt-4o-mini": {"price": {"input": 1, "output": 2}}},
        **extra,
    }


def canaries(fake: FakeUpstream) -> list[str]:
    return [*KEYS.values(), HEADER_SECRET, URL_MARK, ADMIN_TOKEN, STRANGER, fake.url]


def leak(key: str, fake: FakeUpstream) -> str:
    """An upstream error message that names everything it should not."""
    return f"invalid key {key} (org {HEADER_SECRET}) for {fake.url}/{URL_MARK}/v1"


def openai_error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": "x"}}


async def provoke(url: str, client_key: str, fake: FakeUpstream) -> list[bytes]:
    """Every error path once; returns everything the client received (status lines,
    headers, bodies)."""
    seen: list[bytes] = []
    k = KEYS["openai"]

    async def call(method: str, path: str, *, body: Any = None, data: bytes | None = None,
                   headers: dict[str, str] | None = None) -> int:  # fmt: skip
        headers = {"Authorization": f"Bearer {client_key}", **(headers or {})}
        kwargs: dict[str, Any] = {"headers": headers}
        if data is not None:
            kwargs["data"] = data
        elif body is not None:
            kwargs["json"] = body
        try:
            async with aiohttp.ClientSession() as http:
                async with http.request(method, url + path, **kwargs) as r:
                    seen.append(f"{r.status} {r.reason}\n{dict(r.headers)}".encode())
                    seen.append(await r.read())
                    return r.status
        finally:
            fake.script.clear()  # what a scenario did not consume must not leak into the next

    chat = {"model": "gpt-4o-mini", "messages": HI}
    stream = {**chat, "stream": True}
    # upstream 4xx passed on, scrubbed
    fake.push(Json(openai_error(leak(k, fake)), status=400))
    assert await call("POST", "/v1/chat/completions", body=chat) == 400
    fake.push(Json(openai_error(leak(k, fake)), status=422))
    assert await call("POST", "/v1/chat/completions", body=chat) == 422
    # 5xx and 429 are retried, then summarised
    fake.push(*[Json(openai_error(leak(k, fake)), status=500)] * 2)
    assert await call("POST", "/v1/chat/completions", body=chat) == 502
    fake.push(Json(openai_error(leak(k, fake)), status=429, headers={"Retry-After": "1"}))
    assert await call("POST", "/v1/chat/completions", body=chat) == 429
    await asyncio.sleep(1.1)  # the 429 cooled the upstream for its Retry-After
    # a refused upstream key: dropped from the rotation, never shown
    fake.push(*[Json(openai_error(leak(KEYS["refusing"], fake)), status=401)] * 2)
    assert await call("POST", "/v1/chat/completions", body={**chat, "model": "gpt-refused"}) >= 500
    # unreachable upstream, and one that never answers
    assert await call("POST", "/v1/chat/completions", body={**chat, "model": "gpt-down"}) == 502
    fake.push(Hang(), Hang())
    assert await call("POST", "/v1/chat/completions", body=chat) == 504
    # mid-stream: an error event naming the key, a reset, for each dialect
    content = [openai_chunk({"role": "assistant", "content": ""}), openai_chunk({"content": "Hi"})]
    error_event = b"data: " + orjson.dumps(openai_error(leak(k, fake))) + b"\n\n"
    fake.push(Sse([*content, error_event]))
    assert await call("POST", "/v1/chat/completions", body=stream) == 200
    fake.push(Sse(content, then="reset"))
    assert await call("POST", "/v1/chat/completions", body=stream) == 200
    ka = KEYS["anthropic"]
    anthropic_start = [
        anthropic_event("message_start", {"type": "message_start", "message": {
            "id": "m", "type": "message", "role": "assistant", "model": "c", "content": [],
            "usage": {"input_tokens": 1, "output_tokens": 1}}}),
        anthropic_event("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "text", "text": ""}}),
        anthropic_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": "Hi"}}),
    ]  # fmt: skip
    anthropic_error = anthropic_event(
        "error", {"type": "error", "error": {"type": "overloaded_error", "message": leak(ka, fake)}}
    )
    fake.push(Sse([*anthropic_start, anthropic_error]))  # translated for an OpenAI client
    assert await call("POST", "/v1/chat/completions", body={**stream, "model": "claude-x"}) == 200
    fake.push(Sse([*anthropic_start, anthropic_error]))  # passed through for an Anthropic one
    messages = {"model": "claude-x", "max_tokens": 8, "messages": HI, "stream": True}
    assert (
        await call("POST", "/v1/messages", body=messages, headers={"x-api-key": client_key}) == 200
    )
    fake.push(Json({"type": "error", "error": {"type": "invalid_request_error",
                                               "message": leak(ka, fake)}}, status=400))  # fmt: skip
    assert await call("POST", "/v1/messages", body={**messages, "stream": False}) == 400
    kg = KEYS["gemini"]
    fake.push(
        Json({"error": {"code": 400, "message": leak(kg, fake), "status": "INVALID"}}, status=400)
    )
    assert await call("POST", "/v1/chat/completions", body={**chat, "model": "gemini-x"}) == 400
    fake.push(Reset(), Reset())
    assert await call("POST", "/v1/chat/completions", body={**chat, "model": "gemini-x"}) == 502
    # malformed requests and bad auth
    assert await call("POST", "/v1/chat/completions", data=b"{not json") == 400
    assert await call("POST", "/v1/chat/completions", body={"model": 5}) == 400
    assert await call("POST", "/v1/chat/completions", body={**chat, "messages": [5]}) == 400
    for headers in ({"Authorization": f"Bearer {STRANGER}"}, {"Authorization": STRANGER},
                    {"Authorization": "", "x-api-key": STRANGER}):  # fmt: skip
        assert await call("POST", "/v1/chat/completions", body=chat, headers=headers) == 401
        assert await call("GET", "/v1/models", headers=headers) == 401
    bad_admin = {"Authorization": f"Bearer {ADMIN_TOKEN}x"}
    assert await call("GET", "/admin/keys", headers=bad_admin) == 401
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert await call("GET", "/admin/keys", headers=admin) == 200
    assert await call("POST", "/admin/keys", body={"name": "made"}, headers=admin) == 201
    raw = b"GET /healthz HTTP/1.1\r\nAuthorization: Bearer " + STRANGER.encode() + b"\x01\r\n\r\n"
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)
    seen.append(await asyncio.wait_for(reader.read(), 3))
    writer.close()
    return seen


def assert_clean(where: str, blob: bytes | str, fake: FakeUpstream) -> None:
    text = blob.decode("utf-8", "replace") if isinstance(blob, bytes) else blob
    found = [c for c in canaries(fake) if c in text]
    assert not found, f"{where} leaks {found}: {text[:400]}"
    assert "Traceback" not in text, where


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    upstream = await FakeUpstream().start()
    yield upstream
    await upstream.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_no_secret_reaches_a_response_a_log_the_metrics_or_the_database(
    tmp_path: Path, fake: FakeUpstream
):
    port, metrics_port = free_port(), free_port()
    config = relay_config(
        fake, listen=f"127.0.0.1:{port}", metrics_listen=f"127.0.0.1:{metrics_port}"
    )
    path = write_config(tmp_path / "relay.yaml", config)
    db_path = tmp_path / "relay.db"
    db.init_db(str(db_path))
    _, client_key = db.create_key(str(db_path), "alice")
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeproxy", "-c", str(path), "serve"],
            stdout=stdout, stderr=stderr, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, proc, err)
        seen = await provoke(url, client_key, fake)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                metrics = await r.read()
        assert b"edgeproxy_requests_total" in metrics
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0
    for i, blob in enumerate(seen):
        assert_clean(f"response {i}", blob, fake)
    assert_clean("stdout", out.read_bytes(), fake)
    assert_clean("stderr", err.read_bytes(), fake)
    assert_clean("/metrics", metrics, fake)
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("relay.db*"))
    assert_clean("the database", stored, fake)
    assert client_key.encode() not in stored
    assert hashlib.sha256(client_key.encode()).hexdigest().encode() in stored  # looked there
    assert out.read_text().count('"key":"alice"') >= 15  # the access log named the key


async def test_no_secret_reaches_caplog(
    tmp_path: Path, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    path = write_config(tmp_path / "relay.yaml", relay_config(fake))
    db_path = tmp_path / "relay.db"
    db.init_db(str(db_path))
    _, client_key = db.create_key(str(db_path), "alice")
    worker, port = await start_relay(path)
    try:
        seen = await provoke(f"http://127.0.0.1:{port}", client_key, fake)
    finally:
        await worker.stop()
    for i, blob in enumerate(seen):
        assert_clean(f"response {i}", blob, fake)
    assert caplog.records
    assert_clean("caplog", caplog.text, fake)
    assert client_key not in caplog.text


async def wait_healthy(url: str, proc: subprocess.Popen[bytes], err: Path) -> None:
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as http:
        while True:
            assert proc.poll() is None, err.read_text()
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url + "/healthz") as r:
                    if r.status == 200:
                        return
            assert time.monotonic() - t0 < 15, "the relay did not come up"
            await asyncio.sleep(0.05)


async def test_an_upstream_error_with_escaped_slashes_names_no_upstream_url(
    tmp_path: Path, fake: FakeUpstream
):
    path = write_config(tmp_path / "relay.yaml", relay_config(fake))
    db.init_db(str(tmp_path / "relay.db"))
    _, client_key = db.create_key(str(tmp_path / "relay.db"), "alice")
    worker, port = await start_relay(path)
    escaped = leak(KEYS["openai"], fake).replace("/", "\\/")
    fake.push(Json(openai_error(escaped), status=400))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": HI},
                headers={"Authorization": f"Bearer {client_key}"},
            ) as r:
                assert r.status == 400
                body = await r.read()
    finally:
        await worker.stop()
    assert KEYS["openai"].encode() not in body  # the key itself is redacted
    assert_clean("a 400 with escaped slashes", body, fake)


# --- where the relay connects ----------------------------------------------------------


async def test_no_request_field_or_header_changes_where_the_relay_connects(
    tmp_path: Path, fake: FakeUpstream
):
    trap = await FakeUpstream().start()  # a server the relay must never reach
    path = write_config(tmp_path / "relay.yaml", relay_config(fake))
    db_path = tmp_path / "relay.db"
    db.init_db(str(db_path))
    _, client_key = db.create_key(str(db_path), "alice")
    worker, port = await start_relay(path)
    url = f"http://127.0.0.1:{port}"
    trap_host = trap.url.removeprefix("http://")
    try:
        headers = {
            "Authorization": f"Bearer {client_key}",
            "Host": trap_host,
            "X-Forwarded-Host": trap_host,
            "X-Forwarded-Proto": "http",
            "Forwarded": f"host={trap_host}",
            "X-Original-URL": trap.url + "/v1/chat/completions",
            "X-Upstream-Url": trap.url,
            "OpenAI-Base-URL": trap.url,
            "anthropic-base-url": trap.url,
        }
        body = {
            "messages": HI,
            "base_url": trap.url + "/v1",
            "api_base": trap.url + "/v1",
            "baseURL": trap.url,
            "endpoint": trap.url,
            "url": trap.url,
            "upstream": trap.url,
        }
        models = ["gpt-4o-mini", "claude-x", "gemini-x"]
        bad_models = [trap.url + "/v1/chat/completions", f"//{trap_host}/x", "gemini-x/../../..",
                      f"gemini-x@{trap_host}", f"gemini-x?alt=sse&host={trap_host}",
                      f"gemini-x#{trap_host}", "gemini-x/%2e%2e/%2e%2e"]  # fmt: skip
        async with aiohttp.ClientSession() as http:
            for model in models + bad_models:
                for stream in (False, True):
                    async with http.post(
                        url + f"/v1/chat/completions?base_url={trap.url}",
                        json={**body, "model": model, "stream": stream},
                        headers=headers,
                    ) as r:
                        await r.read()
                        assert r.status < 500
            async with http.post(url + "/v1/messages", headers=headers,
                                 json={**body, "model": "claude-x", "max_tokens": 8}) as r:  # fmt: skip
                assert r.status == 200
        assert trap.requests == []
        assert fake.requests, "the configured upstream was used"
        for sent in fake.requests:
            assert sent.path.startswith(f"/{URL_MARK}/")
            assert trap_host not in sent.headers.get("Host", "")
        gemini = [r.path for r in fake.requests if "/v1beta/" in r.path]
        # the model is percent-encoded into one path segment (the fake sees it decoded)
        assert all(p.startswith(f"/{URL_MARK}/v1beta/models/gemini-x") for p in gemini), gemini
    finally:
        await worker.stop()
        await trap.close()

"""Issue 8, hostile input: every bad request gets a clear error, never a 5xx, a hang or a
leak. Bodies and keys that ``test_proxy.py`` already covers are not repeated here.

Most tests talk raw HTTP over a socket, since the point is what a client that does not
follow the rules can do: malformed header lines, slow headers, bodies that never end,
readers that stop reading. The relay runs in the test's loop (``server.Worker``) unless a
test needs a process of its own (file-descriptor exhaustion).
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
import resource
import socket
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from edgeproxy import db
from tests.conftest import Relay, relay_dict, start_relay, write_config
from tests.fakes import FakeUpstream, Hang, Json, openai_chunk

HI = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
# A client secret planted in malformed requests: it must come back in no answer or log.
CANARY = "sk-CANARY" + "c" * 40
ERROR_FIELDS = {"message", "type", "param", "code"}
REPO = Path(__file__).resolve().parent.parent

MakeRelay = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def make_relay(tmp_path: Path, fake: FakeUpstream) -> AsyncIterator[MakeRelay]:
    """A relay in this loop with ``overrides`` on top of the shared test config."""
    workers = []

    async def make(**overrides: Any) -> Relay:
        config = relay_dict(fake.url)
        config["shutdown_grace"] = "1s"
        config.update(overrides)
        path = write_config(tmp_path / f"relay{len(workers)}.yaml", config)
        db_path = str(tmp_path / "relay.db")
        db.init_db(db_path)
        _, secret = db.create_key(db_path, f"key{len(workers)}")
        worker, port = await start_relay(path)
        workers.append(worker)
        return Relay(worker, port, secret, db_path, path)

    yield make
    for worker in workers:
        await worker.stop()


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


async def exchange(port: int, data: bytes, *, within_s: float = 3.0) -> bytes:
    """Send ``data`` as is and read until the relay closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), within_s)
    finally:
        writer.close()


def assert_error(body: bytes, code: str) -> dict[str, Any]:
    error = orjson.loads(body)["error"]
    assert set(error) == ERROR_FIELDS and error["code"] == code, error
    return error


# --- the HTTP layer: malformed requests ------------------------------------------------

AUTH = b"Authorization: Bearer " + CANARY.encode()
MALFORMED = {
    "header_line_over_8190_bytes": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\n" + AUTH + b"A" * 9000 + b"\r\n\r\n",
        431,
    ),
    "request_line_over_8190_bytes": (
        b"GET /healthz?k=" + CANARY.encode() + b"x" * 9000 + b" HTTP/1.1\r\nHost: r\r\n\r\n",
        431,
    ),
    "more_than_128_headers": (
        b"GET /healthz HTTP/1.1\r\nHost: r\r\n"
        + AUTH
        + b"\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
        + b"\r\n",
        400,
    ),
    "nul_in_a_header_value": (b"GET /healthz HTTP/1.1\r\n" + AUTH + b"\x00\x01\r\n\r\n", 400),
    "cr_without_lf_smuggling_a_header": (
        b"GET /healthz HTTP/1.1\r\n" + AUTH + b"\rX-Injected: 1\r\n\r\n",
        400,
    ),
    "obsolete_line_folding": (b"GET /healthz HTTP/1.1\r\n" + AUTH + b"\r\n more\r\n\r\n", 400),
    "space_before_the_colon": (
        b"GET /healthz HTTP/1.1\r\nAuthorization : Bearer " + CANARY.encode() + b"\r\n\r\n",
        400,
    ),
    "content_length_not_a_number": (
        b"POST /v1/chat/completions HTTP/1.1\r\n" + AUTH + b"\r\nContent-Length: 1x\r\n\r\n",
        400,
    ),
    "content_length_and_chunked": (
        b"POST /v1/chat/completions HTTP/1.1\r\n" + AUTH + b"\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "bad_chunk_size": (
        b"POST /v1/chat/completions HTTP/1.1\r\n" + AUTH + b"\r\nTransfer-Encoding: chunked"
        b"\r\n\r\nzz\r\n" + CANARY.encode() + b"\r\n",
        400,
    ),
    "nul_in_the_method": (b"G\x00T /healthz HTTP/1.1\r\n" + AUTH + b"\r\n\r\n", 400),
    "tls_client_hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, 400),
    "http2_preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", MALFORMED)
async def test_malformed_requests_get_a_json_error_that_echoes_and_logs_nothing(
    relay: Relay, fake: FakeUpstream, caplog: pytest.LogCaptureFixture, name: str
):
    caplog.set_level(logging.DEBUG)
    data, status = MALFORMED[name]
    raw = await exchange(relay.port, data)
    got, headers, body = split_response(raw)
    assert got == status
    assert headers["content-type"] == "application/json"
    code = "request_header_too_large" if status == 431 else "invalid_request"
    assert_error(body, code)
    assert CANARY.encode() not in raw and b"Injected" not in raw
    assert CANARY not in caplog.text and "Traceback" not in caplog.text
    assert fake.requests == []


async def test_the_relay_serves_on_after_malformed_requests(relay: Relay, http):
    for data, _ in MALFORMED.values():
        await exchange(relay.port, data)
    async with http.post(
        relay.url + CHAT,
        json={"model": "gpt-4o-mini", "messages": HI},
        headers={"Authorization": f"Bearer {relay.key}"},
    ) as r:
        assert r.status == 200


async def test_an_authorization_header_of_8_kib_is_refused_by_the_http_layer(relay: Relay, http):
    """A header past the line limit never reaches admission (431); one under it with SQL
    in it is just an unknown key (401, in test_proxy)."""
    headers = {"Authorization": f"Bearer {CANARY}' OR '1'='1" + "x" * 8200}
    async with http.post(relay.url + CHAT, json={"model": "gpt-4o-mini"}, headers=headers) as r:
        assert r.status == 431
        text = await r.text()
    assert CANARY not in text


async def test_an_unknown_expectation_gets_417_without_the_echo(relay: Relay):
    data = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\nExpect: "
        + CANARY.encode()
        + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    status, _, body = split_response(await exchange(relay.port, data))
    assert status == 417
    assert_error(body, "invalid_request")
    assert CANARY.encode() not in body


async def test_expect_100_continue_still_works(relay: Relay, http):
    async with http.post(
        relay.url + CHAT,
        json={"model": "gpt-4o-mini", "messages": HI},
        headers={"Authorization": f"Bearer {relay.key}"},
        expect100=True,
    ) as r:
        assert r.status == 200


# --- odd paths and methods -------------------------------------------------------------

ODD_PATHS = {
    b"//v1/chat/completions": 404,
    b"/v1/chat/completions/": 404,
    b"/v1//chat/completions": 404,
    b"/v1/chat%2Fcompletions": 200,  # %2F decodes to "/" like any other escape
    b"/v1/../v1/chat/completions": 404,
    b"/v1/./chat/completions": 404,
    b"/V1/CHAT/COMPLETIONS": 404,
    b"/v1/chat/completions%00": 404,
    b"/%2e%2e/admin/keys": 404,
    b"/v1/chat/completions;x=1": 404,
    b"/v1/%63hat/completions": 200,  # percent-decoded to the real path: served
    b"http://169.254.169.254/v1/chat/completions": 200,  # absolute form: only the path counts
}


@pytest.mark.parametrize("target", ODD_PATHS, ids=lambda t: t.decode())
async def test_odd_paths_are_the_path_they_decode_to_or_404(
    relay: Relay, fake: FakeUpstream, target: bytes
):
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": HI})
    data = (
        b"POST " + target + b" HTTP/1.1\r\nHost: evil.example\r\nX-Forwarded-Host: evil.example"
        b"\r\nAuthorization: Bearer " + relay.key.encode() + b"\r\nContent-Type: application/json"
        b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    status, _, answer = split_response(await exchange(relay.port, data))
    assert status == ODD_PATHS[target]
    if status == 404:
        assert_error(answer, "unknown_endpoint")
        assert fake.requests == []
    else:
        assert [r.path for r in fake.requests] == ["/v1/chat/completions"]


@pytest.mark.parametrize(
    ("request_line", "status", "allow"),
    [
        (b"TRACE /v1/chat/completions", 405, "POST"),
        (b"OPTIONS /v1/chat/completions", 405, "POST"),
        (b"PUT /v1/chat/completions", 405, "POST"),
        (b"DELETE /v1/messages", 405, "POST"),  # in Anthropic's shape
        (b"TRACE /healthz", 405, "GET, HEAD"),
        (b"POST /v1/models", 405, "GET, HEAD"),
        (b"CONNECT 127.0.0.1:22", 404, None),
        (b"CONNECT /v1/chat/completions", 404, None),  # a CONNECT target is a host, never a path
        (b"OPTIONS *", 404, None),
        (b"BREW /healthz", 400, None),  # not a method the HTTP parser knows
    ],
)
async def test_odd_methods_get_405_or_404_and_trace_echoes_nothing(
    relay: Relay, request_line: bytes, status: int, allow: str | None
):
    data = request_line + b" HTTP/1.1\r\nHost: r\r\n" + AUTH + b"\r\nConnection: close\r\n\r\n"
    got, headers, body = split_response(await exchange(relay.port, data))
    assert got == status
    assert headers.get("allow") == allow
    code = {405: "method_not_allowed", 404: "unknown_endpoint", 400: "invalid_request"}[status]
    if b"/v1/messages" in request_line:
        assert orjson.loads(body)["error"]["code"] == code
    else:
        assert_error(body, code)
    assert CANARY.encode() not in body


# --- bodies: nesting and types ---------------------------------------------------------


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    ("model", "stream", "depth", "status"),
    [
        ("gpt-4o-mini", False, 254, 200),  # passed through untouched
        ("gpt-4o-mini", True, 254, 200),  # re-serialised (include_usage injected)
        ("gpt-5-alias", False, 254, 200),  # re-serialised (model_map)
        ("claude-x", False, 254, 200),  # translated
        ("gpt-4o-mini", False, 255, 400),  # one level deeper than orjson can re-serialise
        ("gpt-4o-mini", True, 600, 400),
        ("claude-x", True, 1000, 400),
        ("gpt-4o-mini", False, 5000, 400),  # past orjson's own parse limit (1024)
        ("gpt-4o-mini", False, 200_000, 400),
    ],
)
async def test_deeply_nested_json_is_invalid_json_never_a_500(
    relay: Relay, http, model: str, stream: bool, depth: int, status: int
):
    """orjson reads 1024 levels but writes only 254: a body between the two used to pass
    the parser and fail as a 500 wherever the relay re-serialises it."""
    raw = b'{"model":"%s","stream":%s,"messages":[{"role":"user","content":"hi"}],"x":%s}' % (
        model.encode(),
        b"true" if stream else b"false",
        nested(depth - 1),  # the body object is the first level
    )
    async with http.post(
        relay.url + CHAT, data=raw, headers={"Authorization": f"Bearer {relay.key}"}
    ) as r:
        assert r.status == status
        if status == 400:
            assert_error(await r.read(), "invalid_json")


async def test_a_deep_tool_schema_translates_for_gemini(relay: Relay, http, fake: FakeUpstream):
    """250 levels of JSON schema go through the Gemini schema cleaner (recursive) intact."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(120):  # two levels each: {"type": "object", "properties": {"a": ...}}
        schema = {"type": "object", "properties": {"a": schema}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    body = {"model": "gemini-x", "messages": HI, "tools": tools}
    async with http.post(
        relay.url + CHAT, json=body, headers={"Authorization": f"Bearer {relay.key}"}
    ) as r:
        assert r.status == 200, await r.text()
    assert len(fake.requests[-1].body) > 2000


WRONG_MESSAGES = [
    [5],
    ["hi"],
    [None],
    [[{"role": "user", "content": "hi"}]],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": {"type": "text", "text": "hi"}}],
    [{"role": "user", "content": True}],
    [{"role": "assistant", "content": None, "tool_calls": 5}],
    [{"role": "assistant", "content": None, "tool_calls": {"id": "c"}}],
    [{"role": "assistant", "content": None, "tool_calls": [5]}],
    [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": "f"}]}],
    [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": None}]}],
]


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-x", "gemini-x"])
@pytest.mark.parametrize(
    "messages", WRONG_MESSAGES, ids=[str(i) for i in range(len(WRONG_MESSAGES))]
)
async def test_wrongly_typed_messages_are_400_for_every_upstream_kind(
    relay: Relay, http, fake: FakeUpstream, model: str, messages: list[Any]
):
    """The translators walk messages, so their shape is checked first (a message content
    of 5 used to be a 500 on the way to Anthropic)."""
    async with http.post(
        relay.url + CHAT,
        json={"model": model, "messages": messages},
        headers={"Authorization": f"Bearer {relay.key}"},
    ) as r:
        assert r.status == 400
        error = assert_error(await r.read(), "invalid_request")
    assert error["param"] == "messages"
    assert fake.requests == []


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-x", "gemini-x"])
@pytest.mark.parametrize(
    "extra",
    [
        {"tools": 5},
        {"tools": [5, "x", None]},
        {"tools": [{"type": "function", "function": 5}]},
        {"tools": [{"type": "function", "function": {"name": 5, "parameters": 5}}]},
        {"tool_choice": 5},
        {"tool_choice": {"type": "function", "function": 5}},
        {"stop": 5},
        {"stop": [5, None]},
        {"temperature": "hot"},
        {"top_p": [1]},
        {"response_format": 5},
        {"response_format": {"type": "json_schema", "json_schema": 5}},
        {"reasoning_effort": 5},
        {"reasoning_effort": "extreme"},
        {"stream_options": {"include_usage": "yes"}},
        {"user": {"id": 1}},
        {"seed": "x"},
        {"parallel_tool_calls": "no"},
        {"messages": [{"role": 5, "content": "hi"}]},
        {"messages": [{"role": "user", "content": [5, None, "x", {"type": 5}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]},
        {"messages": [{"role": "tool", "content": "x", "tool_call_id": 5}]},
    ],
    ids=lambda e: orjson.dumps(e).decode()[:40],
)
async def test_other_wrongly_typed_fields_never_get_a_5xx(
    relay: Relay, http, model: str, extra: dict[str, Any]
):
    """Fields the relay does not act on pass through for the upstream to judge (the fake
    accepts anything); translated, they are dropped or mapped, but never crash the relay."""
    body = {"model": model, "messages": HI, **extra}
    async with http.post(
        relay.url + CHAT, json=body, headers={"Authorization": f"Bearer {relay.key}"}
    ) as r:
        assert r.status < 500, await r.text()


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-x", "gemini-x"])
@pytest.mark.parametrize(
    "extra",
    [
        {"messages": [5]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": [5, {"type": "image", "source": 5}]}]},
        {"system": 5},
        {"system": [5, {"type": "text", "text": 5}]},
        {"tools": [5]},
        {"tool_choice": 5},
        {"thinking": {"type": "enabled", "budget_tokens": "lots"}},
        {"stop_sequences": 5},
        {"max_tokens": "many"},
        {"metadata": 5},
    ],
    ids=lambda e: orjson.dumps(e).decode()[:40],
)
async def test_anthropic_clients_wrong_types_never_get_a_5xx(
    relay: Relay, http, model: str, extra: dict[str, Any]
):
    body = {"model": model, "max_tokens": 16, "messages": HI, **extra}
    async with http.post(
        relay.url + "/v1/messages", json=body, headers={"x-api-key": relay.key}
    ) as r:
        assert r.status < 500, await r.text()
        if r.status >= 400:
            assert (await r.json())["type"] == "error"


# --- bodies: size, encodings -----------------------------------------------------------


async def test_a_chunked_body_is_stopped_at_the_limit_while_the_client_still_sends(
    make_relay: MakeRelay, fake: FakeUpstream
):
    """No Content-Length: the relay counts while reading and answers 413 long before the
    client is done (it would send 8 MiB against a 64 KiB limit)."""
    relay = await make_relay(max_request_body="64KiB")
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer "
        + relay.key.encode()
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"  # 16 KiB chunks
    total = 8 * 1024 * 1024
    sent = 0

    async def send() -> None:
        nonlocal sent
        while sent < total:
            writer.write(piece)
            await writer.drain()
            sent += 0x4000
            await asyncio.sleep(0.002)

    sender = asyncio.create_task(send())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        sent_at_answer = sent
    finally:
        sender.cancel()
        writer.close()
    assert head.startswith(b"HTTP/1.1 413")
    assert sent_at_answer < total / 4, sent_at_answer
    assert fake.requests == []


async def test_a_content_length_over_the_limit_is_refused_before_the_body(make_relay: MakeRelay):
    relay = await make_relay(max_request_body="64KiB")
    data = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer "
        + relay.key.encode()
        + b"\r\nContent-Length: 10000000000\r\n\r\n"  # and not one byte of it
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    try:
        writer.write(data)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 413")


def gzip_bomb(decoded_mb: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = b"0" * (1024 * 1024)
    out = [compressor.compress(b'{"model": "gpt-4o-mini", "pad": "')]
    out += [compressor.compress(chunk) for _ in range(decoded_mb)]
    return b"".join(out) + compressor.compress(b'"}') + compressor.flush()


def zlib_bomb(decoded_mb: int, *, raw: bool) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
    chunk = b"0" * (1024 * 1024)
    return b"".join(compressor.compress(chunk) for _ in range(decoded_mb)) + compressor.flush()


async def test_a_gzip_bomb_is_stopped_while_decoding_with_bounded_memory(
    make_relay: MakeRelay, http
):
    """200 MiB of zeros in 200 KiB of gzip, against a 1 MiB limit: the relay decodes at
    most a step past the limit, so its allocations stay a few MiB."""
    relay = await make_relay(max_request_body="1MiB")
    bomb = gzip_bomb(200)
    assert len(bomb) < 300_000
    headers = {"Authorization": f"Bearer {relay.key}", "Content-Encoding": "gzip"}
    tracemalloc.start()
    try:
        async with http.post(relay.url + CHAT, data=bomb, headers=headers) as r:
            assert r.status == 413
            assert_error(await r.read(), "request_too_large")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, peak


@pytest.mark.parametrize(
    ("encoding", "body", "status", "code"),
    [
        ("deflate", zlib_bomb(64, raw=False), 413, "request_too_large"),
        ("deflate", zlib_bomb(64, raw=True), 413, "request_too_large"),  # raw deflate, as some send
        ("gzip, gzip", gzip.compress(gzip.compress(b"{}")), 415, "unsupported_media_type"),
        ("gzip", gzip.compress(gzip_bomb(64)), 400, "invalid_json"),  # decoded once, never twice
        ("gzip", gzip.compress(b'{"model": "gpt-4o-mini"}')[:-6], 400, "invalid_request"),
        ("deflate", b"\x78\x9c" + b"\xff" * 64, 400, "invalid_request"),
        ("identity", b'{"model": "gpt-4o-mini", "messages": []}', 200, None),
        ("x-gzip", gzip.compress(b'{"model": "gpt-4o-mini", "messages": []}'), 200, None),
    ],
    ids=[
        "zlib-bomb",
        "raw-deflate-bomb",
        "nested-encodings",
        "gzip-of-a-bomb",
        "truncated",
        "corrupt-deflate",
        "identity",
        "x-gzip",
    ],
)
async def test_compressed_bodies(
    make_relay: MakeRelay, http, encoding: str, body: bytes, status: int, code: str | None
):
    relay = await make_relay(max_request_body="1MiB")
    headers = {"Authorization": f"Bearer {relay.key}", "Content-Encoding": encoding}
    async with http.post(relay.url + CHAT, data=body, headers=headers) as r:
        assert r.status == status, await r.text()
        if code:
            assert_error(await r.read(), code)


# --- slow clients ----------------------------------------------------------------------


async def closed_after(reader: asyncio.StreamReader, within_s: float) -> float:
    """Seconds until the relay closed the connection (EOF), failing past ``within_s``."""
    t0 = time.monotonic()
    while await asyncio.wait_for(reader.read(65536), within_s):
        pass
    return time.monotonic() - t0


async def test_slow_headers_are_cut_at_client_read(make_relay: MakeRelay):
    """Slowloris: one header byte every 100 ms never completes a request; the connection
    is closed when client_read (1 s) has passed since its first byte."""
    relay = await make_relay(timeouts={"client_read": "1s"})
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    t0 = time.monotonic()

    async def drip() -> None:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\n")
        for byte in b"X-Slow: " + b"z" * 100:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)

    dripping = asyncio.create_task(drip())
    try:
        await closed_after(reader, 3.0)
    finally:
        dripping.cancel()
        writer.close()
    assert 0.9 < time.monotonic() - t0 < 1.8


async def test_a_connection_that_sends_nothing_is_closed_at_client_read(make_relay: MakeRelay):
    relay = await make_relay(timeouts={"client_read": "500ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    try:
        elapsed = await closed_after(reader, 3.0)
    finally:
        writer.close()
    assert 0.4 < elapsed < 1.3


async def test_an_idle_kept_alive_connection_is_governed_by_client_keepalive(
    make_relay: MakeRelay, http
):
    """client_read starts with a request's first byte: between requests the connection
    may idle for client_keepalive."""
    relay = await make_relay(timeouts={"client_read": "300ms", "client_keepalive": "5s"})
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    request = b"GET /healthz HTTP/1.1\r\nHost: r\r\n\r\n"
    try:
        for _ in range(2):
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert head.startswith(b"HTTP/1.1 200")
            await reader.readexactly(int(split_response(head)[1]["content-length"]))
            await asyncio.sleep(0.8)  # idle longer than client_read, shorter than keep-alive
    finally:
        writer.close()


async def test_keepalive_counts_from_the_last_answer_not_the_first(make_relay: MakeRelay):
    """The connection's timer is armed lazily and only moved on when it fires: requests
    every 0.6 s keep a 1 s keep-alive connection open past its first second, and once
    idle it is closed about 1 s after its last answer."""
    relay = await make_relay(timeouts={"client_read": "1s", "client_keepalive": "1s"})
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    request = b"GET /healthz HTTP/1.1\r\nHost: r\r\n\r\n"
    try:
        for _ in range(4):  # 2.4 s in all: past the 1 s a first timer would have ended
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert head.startswith(b"HTTP/1.1 200")
            await reader.readexactly(int(split_response(head)[1]["content-length"]))
            await asyncio.sleep(0.6)
        elapsed = await closed_after(reader, 3.0)  # 0.6 s of the 1 s went by already
    finally:
        writer.close()
    assert 0.2 < elapsed < 1.0


async def test_a_big_body_does_not_leave_a_header_deadline_behind(make_relay: MakeRelay):
    """A body big enough to arrive in several reads may come before its handler starts;
    the header timer those bytes arm must not close the connection once it idles between
    requests (client_keepalive governs that, not client_read)."""
    relay = await make_relay(timeouts={"client_read": "300ms", "client_keepalive": "5s"})
    body = orjson.dumps(
        {"model": "gpt-4o-mini", "messages": HI, "pad": "x" * 900_000}
    )  # under aiohttp's 1 MiB ResourceWarning
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer "
        + relay.key.encode()
        + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    try:
        for _ in range(3):
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            await reader.readexactly(int(split_response(head)[1]["content-length"]))
            await asyncio.sleep(0.6)  # idle: twice client_read
    finally:
        writer.close()


async def test_headers_and_body_share_one_client_read_deadline(
    make_relay: MakeRelay, fake: FakeUpstream
):
    """Headers that take 0.6 s leave the body 0.4 s of a 1 s client_read, not a new 1 s:
    a slow body gets 400 about 1 s after the request's first byte."""
    relay = await make_relay(timeouts={"client_read": "1s"})
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    t0 = time.monotonic()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer "
        + relay.key.encode()
        + b"\r\nContent-Length: 1000\r\n"
    )

    async def drip() -> None:
        for i in range(0, len(head), 20):
            writer.write(head[i : i + 20])
            await asyncio.sleep(0.6 / (len(head) / 20))
        writer.write(b"\r\n")
        while True:
            writer.write(b"{")
            await asyncio.sleep(0.05)

    dripping = asyncio.create_task(drip())
    try:
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        elapsed = time.monotonic() - t0
    finally:
        dripping.cancel()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400")
    assert 0.9 < elapsed < 1.4, elapsed
    assert fake.requests == []


class Firehose:
    """An upstream that streams ``total`` bytes of SSE content as fast as the relay takes
    them, counting what it managed to write and noting when its handler ended."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.written = 0
        self.ended = asyncio.Event()
        self.url = ""

    async def start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return runner

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event = openai_chunk({"content": "x" * 60_000})
        try:
            while self.written < self.total:
                await response.write(event)
                self.written += len(event)
        finally:
            self.ended.set()
        return response


async def test_a_client_that_stops_reading_holds_a_bounded_buffer_and_is_cut_after_idle(
    tmp_path: Path,
):
    """The client reads the status line and then nothing. The relay stops reading the
    upstream when its write buffer is full (aiohttp drains at a high-water mark), so the
    upstream gets only as far as the socket buffers allow; after idle (1 s) of a stalled
    write the relay ends the stream, its upstream request and the client connection."""
    firehose = Firehose(total=256 * 1024 * 1024)
    runner = await firehose.start()
    config = relay_dict(firehose.url)
    config["upstreams"] = config["upstreams"][:1]
    config["timeouts"] = {"idle": "1s"}
    config["shutdown_grace"] = "1s"
    path = write_config(tmp_path / "relay.yaml", config)
    db_path = str(tmp_path / "relay.db")
    db.init_db(db_path)
    _, secret = db.create_key(db_path, "slow-reader")
    worker, port = await start_relay(path)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        body = orjson.dumps({"model": "gpt-4o-mini", "messages": HI, "stream": True})
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer "
            + secret.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        t_stall = time.monotonic()
        await asyncio.sleep(0.5)  # the pipe fills up
        stalled_at = firehose.written
        await asyncio.sleep(0.3)
        assert firehose.written - stalled_at < 1024 * 1024  # not moving: backpressure
        assert stalled_at < 32 * 1024 * 1024, stalled_at  # socket buffers, not 256 MiB
        await asyncio.wait_for(firehose.ended.wait(), 4)
        assert time.monotonic() - t_stall < 3.5
        for _ in range(100):  # the relay's handler finishes too, releasing the request
            if worker.svc.inflight == 0:
                break
            await asyncio.sleep(0.02)
        assert worker.svc.inflight == 0
        writer.close()
    finally:
        await worker.stop()
        await runner.cleanup()


# --- load shedding ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_inflight", "workers"),
    [(2, 1), (4, 2)],  # per node: each of 2 workers admits half
)
async def test_max_inflight_answers_503_server_overloaded_at_once(
    make_relay: MakeRelay, fake: FakeUpstream, http, max_inflight: int, workers: int
):
    relay = await make_relay(max_inflight=max_inflight, workers=workers)
    fake.push(Hang(), Hang())
    auth = {"Authorization": f"Bearer {relay.key}"}
    body = {"model": "gpt-4o-mini", "messages": HI}

    async def hold() -> None:
        async with http.post(relay.url + CHAT, json=body, headers=auth) as r:
            await r.read()

    held = [asyncio.create_task(hold()) for _ in range(2)]
    try:
        while relay.worker.svc.inflight < 2:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        async with http.post(relay.url + CHAT, json=body, headers=auth) as r:
            assert r.status == 503
            assert_error(await r.read(), "server_overloaded")
        assert time.monotonic() - t0 < 0.5
    finally:
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
    while relay.worker.svc.inflight:
        await asyncio.sleep(0.01)
    async with http.post(relay.url + CHAT, json=body, headers=auth) as r:
        assert r.status == 200


async def test_beyond_max_connections_new_connections_wait_in_the_backlog(make_relay: MakeRelay):
    relay = await make_relay(max_connections=3)
    held = [await asyncio.open_connection("127.0.0.1", relay.port) for _ in range(3)]
    request = b"GET /healthz HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n"
    while relay.worker.site.open_connections < 3:
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)  # the backlog
    try:
        writer.write(request)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
        assert relay.worker.site.open_connections == 3
        held[0][1].close()  # one closes: the waiting one is accepted and answered
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
        for _, w in held:
            w.close()


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_running_out_of_file_descriptors_pauses_accepting_and_recovers(
    tmp_path: Path, fake: FakeUpstream
):
    """A relay process limited to 96 descriptors is sent 300 connections: accepting
    pauses (EMFILE) instead of crashing or closing the listener, and once the
    connections close it serves again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = relay_dict(fake.url)
    config["listen"] = f"127.0.0.1:{port}"
    config["shutdown_grace"] = "1s"
    path = write_config(tmp_path / "relay.yaml", config)
    db_path = str(tmp_path / "relay.db")
    db.init_db(db_path)
    _, secret = db.create_key(db_path, "fd")
    limit = 96

    def lower_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    err = tmp_path / "stderr.log"
    with err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeproxy", "-c", str(path), "serve"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            preexec_fn=lower_nofile,
        )
    url = f"http://127.0.0.1:{port}"
    conns: list[socket.socket] = []
    try:
        async with aiohttp.ClientSession() as http:
            await _wait_healthy(http, url, proc)
            for _ in range(300):
                c = socket.socket()
                c.setblocking(False)
                try:
                    await asyncio.wait_for(
                        asyncio.get_running_loop().sock_connect(c, ("127.0.0.1", port)), 1
                    )
                except (OSError, TimeoutError):
                    c.close()
                    continue
                c.send(b"GET /healthz HTTP/1.1\r\nHost: r\r\n")  # never finished
                conns.append(c)
            await asyncio.sleep(1.5)
            assert proc.poll() is None, err.read_text()
            assert _fd_count(proc.pid) <= limit
            assert "accept_paused" in err.read_text()
            assert len(conns) == 300  # all wait: accepted or in the backlog
            assert not any(_closed_by_peer(c) for c in conns)  # and none was dropped
            for c in conns:
                c.close()
            conns.clear()
            await _wait_healthy(http, url, proc, within_s=5)
            body = {"model": "gpt-4o-mini", "messages": HI, "stream": True}
            async with http.post(
                url + CHAT, json=body, headers={"Authorization": f"Bearer {secret}"}
            ) as r:
                assert r.status == 200
                assert (await r.read()).endswith(b"data: [DONE]\n\n")
    finally:
        for c in conns:
            c.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _closed_by_peer(conn: socket.socket) -> bool:
    try:
        return conn.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def _wait_healthy(
    http: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes], within_s: float = 15
) -> None:
    t0 = time.monotonic()
    while True:
        assert proc.poll() is None, "the relay exited"
        try:
            async with http.get(url + "/healthz", timeout=aiohttp.ClientTimeout(total=1)) as r:
                if r.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        assert time.monotonic() - t0 < within_s, "the relay did not answer /healthz"
        await asyncio.sleep(0.1)


# --- upstream answers -------------------------------------------------------------------


async def test_a_malformed_upstream_answer_is_a_502_not_a_500(
    relay: Relay, fake: FakeUpstream, http
):
    # malformed on every try (a malformed answer is retried like any upstream failure)
    fake.push(*[Json({"type": "message", "content": 5, "usage": 1})] * 3)
    async with http.post(
        relay.url + CHAT,
        json={"model": "claude-x", "messages": HI},
        headers={"Authorization": f"Bearer {relay.key}"},
    ) as r:
        assert r.status == 502

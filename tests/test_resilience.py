"""Issue 4, resilience: every upstream failure, scripted on real 127.0.0.1 sockets.

Each test starts a relay (``server.Worker``, as in production: ``handler_cancellation`` on)
in front of one to three scripted fakes, breaks an upstream in one way, and asserts what
the client sees and what it must not: retries happen only before the commit point and
stay within ``retry.attempts``, after it a stream ends with an SSE error event and no
``[DONE]``, each request writes exactly one usage record, and no upstream key or address
reaches a response or a log line (checked after every test).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from edgeproxy import db
from edgeproxy.config import load_config
from tests.conftest import UPSTREAM_KEY, Relay, relay_dict, start_relay, write_config
from tests.fakes import (
    FakeUpstream,
    Hang,
    Json,
    Recorded,
    Reset,
    Sse,
    openai_chunk,
    openai_completion,
    openai_stream,
)

MODEL = "gpt-4o-mini"
ROLE = openai_chunk({"role": "assistant", "content": ""})
CONTENT = openai_chunk({"content": "Hel"})
DONE = b"data: [DONE]\n\n"


@dataclass
class Try:
    """One request a fake received, as its plan decided it; ``delivered`` once it handed
    the relay content (a whole JSON body, or a stream's first content event)."""

    t: float
    fake: str
    kind: str
    delivered: bool = False


# The Try a plan created, for the handler task that runs it (each task has its own copy).
CURRENT_TRY: ContextVar[Try | None] = ContextVar("current_try", default=None)


@dataclass
class Paced:
    """An SSE answer with ``delay`` between events (not after the last, which the relay
    may answer by hanging up); chunk ``content_at`` is the first carrying content."""

    chunks: list[bytes]
    delay: float
    content_at: int = 1


class Scripted(FakeUpstream):
    """The shared fake, plus what these tests need on top: refuse chosen keys (401/403
    with the key in the body), choose a behaviour per request (``plan``), and count the
    handlers cancelled because the relay closed the connection."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.refuse: dict[str, int] = {}  # api key -> status
        self.plan: Callable[[Recorded], Any] | None = None
        self.cancelled = 0
        self.keys_seen: list[str] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.keys_seen.append(key)
        if key in self.refuse:
            body = await request.read()
            self.requests.append(
                Recorded(request.method, request.path, "", dict(request.headers), body)
            )
            error = {
                "error": {
                    "message": f"Incorrect API key provided: {key}",
                    "code": "invalid_api_key",
                }
            }
            return web.json_response(error, status=self.refuse[key])
        try:
            response = await super()._handle(request)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if (played := CURRENT_TRY.get()) is not None and played.kind == "ok":
            played.delivered = True
        return response

    async def _play(self, request: web.Request, b: Any) -> web.StreamResponse:
        if not isinstance(b, Paced):
            return await super()._play(request, b)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, chunk in enumerate(b.chunks):
            if i:
                await asyncio.sleep(b.delay)
            await response.write(chunk)
            if i == b.content_at and (played := CURRENT_TRY.get()) is not None:
                played.delivered = True
        await response.write_eof()
        return response

    def _default(self, path: str, body: bytes) -> Any:
        if self.plan is not None:
            chosen = self.plan(Recorded("POST", path, "", {}, body))
            if chosen is not None:
                return chosen
        return super()._default(path, body)


def key_of(fake: FakeUpstream) -> str:
    return f"{UPSTREAM_KEY}-{fake.name}"  # type: ignore[attr-defined]


def leaky_error(fake: FakeUpstream, status: int = 500) -> Json:
    """An upstream error whose body names the upstream's key and address."""
    message = f"internal error for {key_of(fake)} at {fake.url}/v1/chat/completions"
    return Json({"error": {"message": message, "type": "server_error"}}, status=status)


def pool_config(*fakes: Scripted, **overrides: Any) -> dict[str, Any]:
    """One upstream per fake, all serving MODEL; the first fake in the lowest tier."""
    config = relay_dict(fakes[0].url)
    config["upstreams"] = [
        {
            "name": fake.name,
            "kind": "openai",
            "base_url": f"{fake.url}/v1",
            "api_keys": [key_of(fake)],
            "models": [MODEL],
            "priority": i,
        }
        for i, fake in enumerate(fakes)
    ]
    config["shutdown_grace"] = "1s"
    config.update(overrides)
    return config


def upstream(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(u for u in config["upstreams"] if u["name"] == name)


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture
def made_fakes() -> list[Scripted]:
    return []


@pytest.fixture(autouse=True)
def no_secret_is_logged(caplog: pytest.LogCaptureFixture, made_fakes: list[Scripted]) -> Any:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="edgeproxy")
    yield
    assert_clean(caplog.text, made_fakes)


@pytest.fixture
async def fakes(
    made_fakes: list[Scripted],
) -> AsyncIterator[Callable[..., Awaitable[list[Scripted]]]]:
    async def make(*names: str) -> list[Scripted]:
        started = [await Scripted(name).start() for name in names]
        made_fakes.extend(started)
        return started

    yield make
    for fake in made_fakes:
        await fake.close()


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[Relay]]]:
    workers = []

    async def start_with(config: dict[str, Any]) -> Relay:
        path = write_config(tmp_path / "relay.yaml", config)
        database = load_config(str(path)).database
        db.init_db(database)
        _, secret = db.create_key(database, f"client{len(workers)}")
        worker, port = await start_relay(path)
        workers.append(worker)
        return Relay(worker, port, secret, database, path)

    yield start_with
    for worker in workers:
        await worker.stop()


# --- helpers --------------------------------------------------------------------------


def assert_clean(text: str | bytes, fakes: list[Scripted]) -> None:
    """No upstream key and no upstream address in what a client or an operator sees."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    assert UPSTREAM_KEY not in text
    assert "CANARY" not in text
    for fake in fakes:
        assert f"127.0.0.1:{fake.port}" not in text


async def chat(
    http: aiohttp.ClientSession, relay: Relay, *, stream: bool = False, tag: str = "hi",
    path: str = "/v1/chat/completions",
) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    body: dict[str, Any] = {"model": MODEL, "stream": stream}
    if path == "/v1/messages":
        body["max_tokens"] = 64
    body["messages"] = [{"role": "user", "content": tag}]
    headers = {"Authorization": f"Bearer {relay.key}", "x-request-id": tag}
    async with http.post(relay.url + path, json=body, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


def content_of(body: bytes) -> str:
    return orjson.loads(body)["choices"][0]["message"]["content"]


async def usage_rows(relay: Relay) -> list[dict[str, Any]]:
    await relay.settle()
    conn = sqlite3.connect(relay.db_path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY ts")]
    finally:
        conn.close()


async def eventually(check: Callable[[], bool], within_s: float = 2.0) -> float:
    """Seconds until ``check()`` held; fails after ``within_s``."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < within_s, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def row_for(relay: Relay, request_id: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    async def look() -> bool:
        found[:] = [r for r in await usage_rows(relay) if r["request_id"] == request_id]
        return bool(found)

    t0 = time.monotonic()
    while not await look():
        assert time.monotonic() - t0 < 3.0, f"no usage record for {request_id}"
        await asyncio.sleep(0.02)
    assert len(found) == 1
    return found[0]


def error_event(body: bytes) -> dict[str, Any]:
    """The last SSE event of a stream the relay ended with an error."""
    last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: "), last
    return orjson.loads(last[len(b"data: ") :])["error"]


# --- before the commit point: retried invisibly ----------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_5xx_before_the_commit_point_is_retried_invisibly(
    status, stream, fakes, start, http
):
    primary, backup = await fakes("primary", "backup")
    relay = await start(pool_config(primary, backup))
    primary.push(leaky_error(primary, status))
    code, headers, body = await chat(http, relay, stream=stream, tag="r1")
    assert code == 200
    if stream:
        assert body == b"".join(c for c in openai_stream(["Hello", " from", " the", " fake!"], with_usage=True)
                                if b'"choices":[]' not in c)  # fmt: skip
    else:
        assert content_of(body) == "Hello from the fake!"
    assert (len(primary.requests), len(backup.requests)) == (1, 1)
    row = await row_for(relay, "r1")
    assert (row["status"], row["attempts"], row["upstream"], row["estimated"]) == (
        200,
        2,
        "backup",
        0,
    )
    assert_clean(body + str(headers).encode(), [primary, backup])


async def test_attempts_are_bounded_and_the_last_error_is_scrubbed(fakes, start, http):
    primary, backup = await fakes("primary", "backup")
    relay = await start(pool_config(primary, backup))
    primary.push(*[leaky_error(primary, 503)] * 5)
    backup.push(*[leaky_error(backup, 500)] * 5)
    code, _, body = await chat(http, relay, tag="r1")
    assert code == 502
    error = orjson.loads(body)["error"]
    assert error["code"] == "upstream_error" and error["type"] == "server_error"
    assert error["message"].startswith("upstream returned HTTP 503: internal error for [redacted]")
    assert len(primary.requests) + len(backup.requests) == 3  # retry.attempts
    assert (await row_for(relay, "r1"))["attempts"] == 3
    assert_clean(body, [primary, backup])


async def test_attempts_one_means_no_retry(fakes, start, http):
    primary, backup = await fakes("primary", "backup")
    config = pool_config(
        primary, backup, retry={"attempts": 1, "backoff": "1ms", "max_backoff": "5ms"}
    )
    relay = await start(config)
    primary.push(leaky_error(primary, 503))
    code, _, _ = await chat(http, relay)
    assert code == 502
    assert (len(primary.requests), len(backup.requests)) == (1, 0)


async def test_a_client_error_passes_through_scrubbed_and_is_not_retried(fakes, start, http):
    primary, backup = await fakes("primary", "backup")
    relay = await start(pool_config(primary, backup))
    message = f"max_tokens is too large for {UPSTREAM_KEY}-primary via {primary.url}/v1"
    primary.push(Json({"error": {"message": message, "type": "invalid_request_error",
                                 "param": "max_tokens", "code": None}}, status=400))  # fmt: skip
    code, _, body = await chat(http, relay, tag="r1")
    assert code == 400
    assert (
        orjson.loads(body)["error"]["message"]
        == "max_tokens is too large for [redacted] via [redacted]"
    )
    assert (len(primary.requests), len(backup.requests)) == (1, 0)
    assert (await row_for(relay, "r1"))["status"] == 400


@pytest.mark.parametrize(
    "failure", [Reset(), Sse([ROLE], then="reset")], ids=["before-headers", "after-role-chunk"]
)
async def test_a_reset_before_the_first_content_event_is_retried(failure, fakes, start, http):
    primary, backup = await fakes("primary", "backup")
    relay = await start(pool_config(primary, backup))
    primary.push(failure)
    code, _, body = await chat(http, relay, stream=True)
    assert code == 200 and body.endswith(DONE) and b'"error"' not in body
    assert (len(primary.requests), len(backup.requests)) == (1, 1)


async def test_an_error_event_before_content_is_retried(fakes, start, http):
    primary, backup = await fakes("primary", "backup")
    relay = await start(pool_config(primary, backup))
    leak = orjson.dumps(
        {"error": {"message": f"overloaded ({UPSTREAM_KEY})", "type": "server_error"}}
    )
    primary.push(Sse([ROLE, b"data: " + leak + b"\n\n"]))
    code, _, body = await chat(http, relay, stream=True)
    assert code == 200 and body.endswith(DONE) and b"overloaded" not in body
    assert (len(primary.requests), len(backup.requests)) == (1, 1)


@pytest.mark.parametrize("stream", [False, True])
async def test_an_empty_completion_is_retried(stream, fakes, start, http):
    primary, backup = await fakes("primary", "backup")
    relay = await start(pool_config(primary, backup))
    empty = Sse([ROLE, openai_chunk({}, "stop"), DONE]) if stream else Json(openai_completion(""))
    primary.push(empty)
    code, _, body = await chat(http, relay, stream=stream)
    assert code == 200
    assert (b"Hello" in body) and (len(primary.requests), len(backup.requests)) == (1, 1)


async def test_the_last_try_delivers_an_empty_completion_rather_than_an_error(fakes, start, http):
    (only,) = await fakes("only")
    relay = await start(pool_config(only))
    only.push(*[Json(openai_completion(""))] * 3)
    code, _, body = await chat(http, relay)
    assert code == 200 and content_of(body) == ""
    assert len(only.requests) == 3


async def test_a_hang_before_the_first_byte_times_out_and_is_retried(fakes, start, http):
    primary, backup = await fakes("primary", "backup")
    config = pool_config(primary, backup)
    upstream(config, "primary")["timeouts"] = {"first_byte": "300ms"}
    relay = await start(config)
    primary.push(Hang())
    t0 = time.monotonic()
    code, _, body = await chat(http, relay, stream=True)
    assert code == 200 and body.endswith(DONE)
    assert 0.3 <= time.monotonic() - t0 < 2.0
    assert (len(primary.requests), len(backup.requests)) == (1, 1)
    await eventually(lambda: primary.cancelled == 1)  # the relay hung up on it


async def test_a_stall_before_the_first_content_event_is_retried(fakes, start, http):
    primary, backup = await fakes("primary", "backup")
    config = pool_config(primary, backup)
    upstream(config, "primary")["timeouts"] = {"first_byte": "300ms", "idle": "10s"}
    relay = await start(config)
    primary.push(Sse([ROLE, b": ping\n\n"], then="hang"))  # status 200 and a chunk, no content
    code, _, body = await chat(http, relay, stream=True)
    assert code == 200 and body.endswith(DONE) and body.count(b'"role"') == 1
    await eventually(lambda: primary.open_streams == 0)


async def test_every_try_timing_out_is_a_504(fakes, start, http):
    (only,) = await fakes("only")
    config = pool_config(only, timeouts={"first_byte": "150ms"})
    relay = await start(config)
    only.push(Hang(), Hang(), Hang())
    code, _, body = await chat(http, relay, tag="r1")
    assert code == 504
    assert orjson.loads(body)["error"]["code"] == "upstream_timeout"
    assert len(only.requests) == 3
    assert (await row_for(relay, "r1"))["status"] == 504


async def test_one_overall_deadline_bounds_tries_and_backoff(fakes, start, http):
    (only,) = await fakes("only")
    # deadline = attempts x (connect + first_byte) = 3 x 0.5 s; backoff alone could be 20 s
    config = pool_config(only, timeouts={"connect": "300ms", "first_byte": "200ms"},
                         retry={"attempts": 3, "backoff": "20s", "max_backoff": "20s"})  # fmt: skip
    relay = await start(config)
    only.push(Hang(), Hang(), Hang())
    t0 = time.monotonic()
    code, _, _ = await chat(http, relay)
    assert code == 504
    assert time.monotonic() - t0 < 1.5 + 0.3


async def test_a_connect_error_is_retried_without_naming_the_address(fakes, start, http):
    (backup,) = await fakes("backup")
    dead = Scripted("dead")  # never started: nothing listens on its port
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    dead.port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    relay = await start(pool_config(dead, backup))
    code, _, body = await chat(http, relay, tag="r1")
    assert code == 200 and (await row_for(relay, "r1"))["attempts"] == 2
    assert_clean(body, [dead, backup])


async def test_a_connect_timeout_is_retried(fakes, start, http):
    (backup,) = await fakes("backup")
    # a listener whose accept queue is full: the kernel drops further SYNs, connect() hangs
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    filler = socket.create_connection(blackhole.getsockname())
    try:
        dead = Scripted("blackhole")
        dead.port = blackhole.getsockname()[1]
        config = pool_config(dead, backup)
        upstream(config, "blackhole")["timeouts"] = {"connect": "200ms"}
        relay = await start(config)
        t0 = time.monotonic()
        code, _, _ = await chat(http, relay, tag="r1")
        assert code == 200 and 0.2 <= time.monotonic() - t0 < 1.5
        row = await row_for(relay, "r1")
        assert (row["attempts"], row["upstream"]) == (2, "backup")
    finally:
        filler.close()
        blackhole.close()


async def test_the_retry_budget_stops_a_failing_upstream_multiplying_load(fakes, start, http):
    primary, backup = await fakes("primary", "backup")
    # never ejected, so every request tries primary first and wants a retry
    relay = await start(
        pool_config(primary, backup, health={"eject_after": 1000, "eject_for": "1s"})
    )
    primary.push(*[leaky_error(primary, 503)] * 40)
    codes = Counter([(await chat(http, relay))[0] for _ in range(40)])
    # retries allowed while retries + 1 <= 20% of the requests of the last 10 s + 10
    assert len(primary.requests) == 40
    assert len(backup.requests) == codes[200] == 18
    assert codes[502] == 22


# --- 429 and cooling ------------------------------------------------------------------


async def test_retry_after_cools_the_upstream_instead_of_waiting(fakes, start, http):
    primary, backup = await fakes("primary", "backup")
    # a backoff this long would show: a cooled upstream is retried elsewhere at once
    config = pool_config(
        primary, backup, retry={"attempts": 3, "backoff": "3s", "max_backoff": "5s"}
    )
    relay = await start(config)
    primary.push(
        Json({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "30"})
    )
    t0 = time.monotonic()
    code, _, _ = await chat(http, relay)
    assert code == 200 and time.monotonic() - t0 < 1.0
    for _ in range(3):  # primary is cooling: the lower tier serves
        assert (await chat(http, relay))[0] == 200
    assert (len(primary.requests), len(backup.requests)) == (1, 4)


async def test_every_try_rate_limited_is_a_429_with_the_shortest_retry_after(fakes, start, http):
    primary, backup = await fakes("primary", "backup")
    relay = await start(pool_config(primary, backup))
    primary.push(Json({"error": {"message": "rpm"}}, status=429, headers={"Retry-After": "30"}))
    backup.push(Json({"error": {"message": "tpm"}}, status=429, headers={"Retry-After": "5"}))
    code, headers, body = await chat(http, relay, tag="r1")
    assert code == 429 and headers["Retry-After"] == "5"
    assert orjson.loads(body) == {"error": {
        "message": "every upstream for this model is rate limited; retry later",
        "type": "rate_limit_error", "param": None, "code": "upstream_rate_limited"}}  # fmt: skip
    # every upstream is cooling now: the next request is answered at once, unsent
    t0 = time.monotonic()
    code, headers, _ = await chat(http, relay, tag="r2")
    assert code == 429 and headers["Retry-After"] in ("4", "5")
    assert time.monotonic() - t0 < 0.5
    assert (len(primary.requests), len(backup.requests)) == (1, 1)
    assert [(await row_for(relay, r))["status"] for r in ("r1", "r2")] == [429, 429]


async def test_429_without_retry_after_is_retried_then_reported(fakes, start, http):
    (only,) = await fakes("only")
    relay = await start(pool_config(only))
    only.push(*[Json({"error": {"message": "busy"}}, status=429)] * 3)
    code, headers, body = await chat(http, relay)
    assert code == 429 and headers["Retry-After"] == "1"
    assert orjson.loads(body)["error"]["code"] == "upstream_rate_limited"
    assert len(only.requests) == 3


# --- upstream 401/403 -----------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_key_leaves_the_rotation_then_the_upstream(status, fakes, start, http):
    primary, backup = await fakes("primary", "backup")
    config = pool_config(primary, backup)
    bad, good = f"{UPSTREAM_KEY}-bad", f"{UPSTREAM_KEY}-good"
    upstream(config, "primary")["api_keys"] = [bad, good]
    relay = await start(config)
    primary.refuse[bad] = status
    code, _, body = await chat(http, relay, tag="r1")
    assert code == 200 and content_of(body) == "Hello from the fake!"
    assert (len(primary.requests), len(backup.requests)) == (1, 1)  # retried elsewhere
    for i in range(4):
        assert (await chat(http, relay, tag=f"ok{i}"))[0] == 200
    assert primary.keys_seen == [bad, good, good, good, good]  # out of the rotation
    primary.refuse[good] = status
    assert (await chat(http, relay))[0] == 200  # refused, retried on backup
    assert (await chat(http, relay))[0] == 200
    assert primary.keys_seen[-1] == good and len(primary.keys_seen) == 6  # no key left: out
    async with http.get(relay.url + "/readyz") as r:
        assert r.status == 200  # backup is healthy
    assert (await row_for(relay, "r1"))["attempts"] == 2


async def test_a_refused_key_on_the_last_try_is_never_shown(fakes, start, http):
    (only,) = await fakes("only")
    config = pool_config(only, retry={"attempts": 1, "backoff": "1ms", "max_backoff": "5ms"})
    relay = await start(config)
    only.refuse[f"{UPSTREAM_KEY}-only"] = 401
    code, _, body = await chat(http, relay)
    assert code == 502
    assert orjson.loads(body)["error"]["message"] == "upstream refused the relay's credentials"
    assert_clean(body, [only])


# --- health ---------------------------------------------------------------------------


async def test_consecutive_failures_eject_then_one_trial_restores(fakes, start, http):
    primary, backup = await fakes("primary", "backup")
    relay = await start(
        pool_config(primary, backup, health={"eject_after": 2, "eject_for": "500ms"})
    )
    primary.push(leaky_error(primary), leaky_error(primary))
    for _ in range(2):
        assert (await chat(http, relay))[0] == 200  # each: primary fails, backup serves
    ejected_at = time.monotonic()
    for _ in range(3):
        assert (await chat(http, relay))[0] == 200
    assert len(primary.requests) == 2  # ejected: not asked
    await asyncio.sleep(max(0.0, 0.55 - (time.monotonic() - ejected_at)))
    # the ejection is over: exactly one trial, however many requests arrive meanwhile
    primary.push(Json(openai_completion("trial"), delay=0.3))
    results = await asyncio.gather(*(chat(http, relay, tag=f"c{i}") for i in range(5)))
    assert all(code == 200 for code, _, _ in results)
    assert len(primary.requests) == 3
    assert sorted(content_of(b) for _, _, b in results).count("trial") == 1
    for _ in range(3):  # the trial succeeded: restored, the lower tier is idle again
        assert (await chat(http, relay))[0] == 200
    assert len(primary.requests) == 6
    assert len(backup.requests) == 2 + 3 + 4  # retries, while ejected, beside the trial


async def test_a_failed_trial_ejects_for_twice_as_long(fakes, start, http):
    primary, backup = await fakes("primary", "backup")
    relay = await start(
        pool_config(primary, backup, health={"eject_after": 1, "eject_for": "400ms"})
    )
    primary.push(leaky_error(primary))
    assert (await chat(http, relay))[0] == 200  # ejected for 0.4 s
    await asyncio.sleep(0.45)
    primary.push(leaky_error(primary))
    assert (await chat(http, relay))[0] == 200  # the trial fails: ejected for 0.8 s
    failed_trial = time.monotonic()
    assert len(primary.requests) == 2
    await asyncio.sleep(0.5)
    assert (await chat(http, relay))[0] == 200
    assert len(primary.requests) == 2  # 0.5 s later: still out (it would be back after 0.4 s)
    await asyncio.sleep(max(0.0, 0.85 - (time.monotonic() - failed_trial)))
    assert (await chat(http, relay))[0] == 200
    assert len(primary.requests) == 3  # the next trial, which succeeds


async def test_readyz_and_no_available_upstream_when_everything_is_ejected(fakes, start, http):
    primary, backup = await fakes("primary", "backup")
    relay = await start(pool_config(primary, backup, health={"eject_after": 1, "eject_for": "30s"}))
    primary.push(leaky_error(primary))
    backup.push(leaky_error(backup))
    code, _, _ = await chat(http, relay, tag="r1")
    assert code == 502  # both failed once: both ejected
    async with http.get(relay.url + "/readyz") as r:
        assert r.status == 503
        body = await r.read()
    reasons = orjson.loads(body)["reasons"]
    assert len(reasons) == 1 and reasons[0].startswith("no healthy upstream: primary: ejected for ")
    assert "backup: ejected for " in reasons[0]
    code, _, body = await chat(http, relay, tag="r2")
    assert code == 503
    assert orjson.loads(body) == {"error": {
        "message": f"no healthy upstream for model '{MODEL}'", "type": "server_error",
        "param": None, "code": "no_available_upstream"}}  # fmt: skip
    assert len(primary.requests) + len(backup.requests) == 2
    row = await row_for(relay, "r2")
    assert (row["status"], row["attempts"], row["upstream"], row["cost_usd"]) == (503, 0, "none", 0)


# --- after the commit point: never retried ----------------------------------------------


@pytest.mark.parametrize(
    ("then", "code"),
    [("hang", "upstream_timeout"), ("reset", "upstream_error")],
    ids=["stall", "reset"],
)
async def test_a_mid_stream_failure_ends_the_stream_with_an_error_event(
    then, code, fakes, start, http
):
    primary, backup = await fakes("primary", "backup")
    config = pool_config(primary, backup)
    upstream(config, "primary")["timeouts"] = {"idle": "300ms"}
    relay = await start(config)
    primary.push(Sse([ROLE, CONTENT], then=then))
    status, headers, body = await chat(http, relay, stream=True, tag="r1")
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert body.startswith(ROLE + CONTENT)
    assert DONE not in body
    assert error_event(body)["code"] == code
    assert (len(primary.requests), len(backup.requests)) == (1, 0)  # never retried
    await eventually(lambda: primary.open_streams == 0)
    row = await row_for(relay, "r1")
    assert (row["status"], row["attempts"], row["upstream"]) == (200, 1, "primary")
    assert_clean(body, [primary, backup])


async def test_a_mid_stream_failure_reaches_an_anthropic_client_as_an_error_event(
    fakes, start, http
):
    primary, backup = await fakes("primary", "backup")
    relay = await start(pool_config(primary, backup))
    primary.push(Sse([ROLE, CONTENT], then="reset"))
    status, _, body = await chat(http, relay, stream=True, path="/v1/messages")
    assert status == 200
    last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"event: error\ndata: ")
    event = orjson.loads(last.split(b"data: ", 1)[1])
    assert event["type"] == "error" and event["error"]["type"] == "api_error"
    assert b"message_stop" not in body
    assert (len(primary.requests), len(backup.requests)) == (1, 0)


async def test_keep_alive_comments_do_not_reset_the_idle_timeout(fakes, start, http):
    (only,) = await fakes("only")
    config = pool_config(only, timeouts={"idle": "500ms"})
    relay = await start(config)
    pings = [b": ping\n\n"] * 40  # 4 s of keep-alives, one every 0.1 s
    only.push(Sse([ROLE, CONTENT, *pings], delay=0.1))
    t0 = time.monotonic()
    status, _, body = await chat(http, relay, stream=True)
    elapsed = time.monotonic() - t0
    assert status == 200 and error_event(body)["code"] == "upstream_timeout"
    assert 0.5 <= elapsed < 1.5  # idle (+ a tenth), not the 4 s the pings last
    assert len(only.requests) == 1


async def test_a_stream_with_regular_events_outlives_first_byte_plus_idle(fakes, start, http):
    (only,) = await fakes("only")
    config = pool_config(only, timeouts={"first_byte": "400ms", "idle": "400ms"})
    relay = await start(config)
    chunks = openai_stream([f"w{i} " for i in range(30)], with_usage=True)
    only.push(Sse(chunks, delay=0.06))  # ~2 s in all, an event every 60 ms
    t0 = time.monotonic()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    async with http.post(relay.url + "/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {relay.key}"}) as r:  # fmt: skip
        received = await r.read()
    assert time.monotonic() - t0 > 1.5  # longer than first_byte + idle = 0.8 s
    assert received == b"".join(chunks)


# --- the client goes away -----------------------------------------------------------------


async def open_raw(
    relay: Relay, *, stream: bool, tag: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    body = orjson.dumps(
        {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": tag}]}
    )
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {relay.key}\r\nx-request-id: {tag}\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    return reader, writer


async def hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def test_a_client_leaving_before_the_first_byte_cancels_the_upstream_request(fakes, start):
    primary, backup = await fakes("primary", "backup")
    relay = await start(pool_config(primary, backup))
    primary.push(Hang())
    _, writer = await open_raw(relay, stream=True, tag="gone1")
    await eventually(lambda: len(primary.requests) == 1)
    await hang_up(writer)
    assert await eventually(lambda: primary.cancelled == 1, within_s=1.0) < 0.5
    row = await row_for(relay, "gone1")
    assert (row["status"], row["estimated"], row["attempts"], row["upstream"]) == (
        499,
        1,
        1,
        "primary",
    )
    assert len(backup.requests) == 0  # not retried either
    assert relay.worker.svc.inflight == 0


async def test_a_client_leaving_mid_stream_cancels_the_upstream_stream(fakes, start):
    primary, backup = await fakes("primary", "backup")
    relay = await start(pool_config(primary, backup))
    primary.push(Sse([ROLE, CONTENT], then="hang"))
    reader, writer = await open_raw(relay, stream=True, tag="gone2")
    received = b""
    while b'"Hel"' not in received:
        received += await asyncio.wait_for(reader.read(4096), 2.0)
    assert received.startswith(b"HTTP/1.1 200")
    assert primary.open_streams == 1
    await hang_up(writer)
    assert await eventually(lambda: primary.open_streams == 0, within_s=1.0) < 0.5
    row = await row_for(relay, "gone2")
    assert (row["status"], row["estimated"]) == (499, 1)
    assert row["completion_tokens"] >= 1  # estimated from what was relayed
    assert (len(primary.requests), len(backup.requests)) == (1, 0)


async def test_a_client_leaving_a_json_request_cancels_it(fakes, start):
    (only,) = await fakes("only")
    relay = await start(pool_config(only))
    only.push(Json(openai_completion(), delay=30))
    _, writer = await open_raw(relay, stream=False, tag="gone3")
    await eventually(lambda: len(only.requests) == 1)
    await hang_up(writer)
    await eventually(lambda: only.cancelled == 1, within_s=1.0)
    row = await row_for(relay, "gone3")
    assert (row["status"], row["estimated"]) == (499, 1)


# --- "done when": a pool with one upstream failing in every way, 1,000 requests ---------------

# What the bad upstream does before the commit point (mid-stream failures cannot end in a
# success, so they are tested above instead): each one must be retried invisibly.
FAILURES = ("500", "502", "503", "429", "hang", "stall", "reset", "reset_after_role",
            "empty", "error_event")  # fmt: skip


def failure_behaviour(kind: str, stream: bool, fake: FakeUpstream) -> Any:
    if kind in ("500", "502", "503"):
        return leaky_error(fake, int(kind))
    if kind == "429":
        return Json({"error": {"message": "rate limited"}}, status=429)
    if kind == "429_retry_after":  # once only: a second of cooling is a third of the run
        return Json({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "1"})
    if kind == "hang":
        return Hang()
    if kind == "stall":
        return Sse([ROLE], then="hang")
    if kind == "reset":
        return Reset()
    if kind == "reset_after_role":
        return Sse([ROLE], then="reset")
    if kind == "error_event":
        return Sse(
            [ROLE, b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n']
        )
    assert kind == "empty"
    return Sse([ROLE, openai_chunk({}, "stop"), DONE]) if stream else Json(openai_completion(""))


@pytest.mark.timeout(120)
async def test_done_when_1000_requests_through_a_pool_with_a_failing_upstream_all_succeed(
    fakes, start
):
    good1, good2, bad = await fakes("good1", "good2", "bad")
    rng = random.Random(20261123)
    tries: dict[str, list[Try]] = defaultdict(
        list
    )  # request tag -> its tries, as the fakes saw them

    # every way of failing at least once (in a seeded order), then at random
    first = [*FAILURES, "429_retry_after"]
    rng.shuffle(first)

    def planner(fake: Scripted, failure_rate: float) -> Callable[[Recorded], Any]:
        def plan(rec: Recorded) -> Any:
            body = orjson.loads(rec.body)
            tag, stream = body["messages"][0]["content"], body.get("stream") is True
            kind = "ok"
            if rng.random() < failure_rate:
                kind = first.pop() if first else rng.choice(FAILURES)
            played = Try(time.monotonic(), fake.name, kind)
            tries[tag].append(played)
            CURRENT_TRY.set(played)
            if kind != "ok":
                return failure_behaviour(kind, stream, fake)
            # an answer takes a little while, as a model's does
            if stream:
                return Paced(
                    openai_stream(["Hello", " from", " the", " fake!"], with_usage=True), 0.005
                )
            return Json(openai_completion(), delay=0.02)

        return plan

    good1.plan, good2.plan, bad.plan = planner(good1, 0.0), planner(good2, 0.0), planner(bad, 0.4)
    config = pool_config(good1, good2, bad, timeouts={"first_byte": "1s", "idle": "2s"},
                         health={"eject_after": 5, "eject_for": "500ms"})  # fmt: skip
    for u in config["upstreams"]:
        u["priority"] = 0  # one tier, equal weights
    # the bad upstream also holds a key its provider refuses (401 the first time it is used)
    refused = f"{UPSTREAM_KEY}-revoked"
    upstream(config, "bad")["api_keys"] = [f"{UPSTREAM_KEY}-bad", refused]
    bad.refuse[refused] = 401
    relay = await start(config)

    n, concurrency = 1000, 20
    outcomes: Counter[str] = Counter()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def client(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            stream = i % 2 == 1
            code, _, body = await chat(http, relay, stream=stream, tag=f"req-{i}")
            ok = code == 200 and (body.endswith(DONE) and b'"content":"Hello"' in body if stream
                                  else content_of(body) == "Hello from the fake!")  # fmt: skip
            outcomes["ok" if ok else f"{code}: {body[-200:]!r}"] += 1

    t0 = time.monotonic()
    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    elapsed = time.monotonic() - t0

    assert outcomes == Counter({"ok": n})
    rows = await usage_rows(relay)
    assert len(rows) == n and {r["request_id"] for r in rows} == {f"req-{i}" for i in range(n)}
    assert {r["status"] for r in rows} == {200}
    attempts = {r["request_id"]: r["attempts"] for r in rows}
    # the fakes' logs, per request: exactly one try delivered content to the relay (its
    # commit point) and it is the last one: nothing was tried after it. The tries before it
    # failed before their first content event (or were successes the relay gave up on
    # before their first byte, when the machine is loaded).
    refused_tries = bad.keys_seen.count(refused)
    assert 1 <= refused_tries <= concurrency  # only requests already under way used it
    abandoned = 0
    for tag, seen in tries.items():
        seen.sort(key=lambda x: x.t)
        assert [x for x in seen if x.delivered] == [seen[-1]], (tag, seen)
        assert seen[-1].kind == "ok"
        abandoned += sum(1 for x in seen[:-1] if x.kind == "ok")
        assert len(seen) <= attempts[tag] <= 3
    assert sum(attempts.values()) == sum(len(s) for s in tries.values()) + refused_tries
    failures = Counter(x.kind for seen in tries.values() for x in seen if x.kind != "ok")
    assert set(failures) == {*FAILURES, "429_retry_after"}  # every way of failing happened
    retries = sum(attempts.values()) - n
    print(  # the figures issue 4 asks for; shown with -s
        f"\n1000-request scenario: {n} requests, {retries} retries "
        f"({retries / n:.1%}), tries per upstream {[len(f.requests) for f in (good1, good2, bad)]}, "
        f"{sum(failures.values())} upstream failures {dict(failures)}, "
        f"{abandoned} slow successes abandoned before their first byte, "
        f"{elapsed:.2f}s, {n / elapsed:.0f} req/s"
    )
    assert elapsed < 30

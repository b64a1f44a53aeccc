"""Issue 4, the process: SIGTERM drains, SIGHUP reloads, a client that leaves cancels its
upstream request, with the relay as a real ``python -m edgeproxy serve`` subprocess.

The fake upstream runs in the test process; the relay listens on a free port picked here.
Every process started is stopped by its PID in a ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from edgeproxy import db
from tests.conftest import UPSTREAM_KEY, relay_dict, write_config
from tests.fakes import FakeUpstream, Sse, openai_chunk, openai_stream

MODEL = "gpt-4o-mini"
ROLE = openai_chunk({"role": "assistant", "content": ""})
CONTENT = openai_chunk({"content": "Hel"})
DONE = b"data: [DONE]\n\n"
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_for(fake: FakeUpstream, port: int, **overrides: Any) -> dict[str, Any]:
    config = relay_dict(fake.url)
    config["listen"] = f"127.0.0.1:{port}"
    config["upstreams"] = config["upstreams"][:1]  # fake-openai
    config["shutdown_grace"] = "2s"
    config.update(overrides)
    return config


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    key: str
    db_path: Path
    config_path: Path
    out: Path
    err: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def exit_code(self, within_s: float) -> int:
        t0 = time.monotonic()
        while self.proc.poll() is None:
            assert time.monotonic() - t0 < within_s, "the relay did not exit in time"
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def usage(self) -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.db_path)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY ts")]
        finally:
            conn.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    upstream = await FakeUpstream().start()
    yield upstream
    await upstream.close()


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[[dict[str, Any]], Any]]:
    """Start ``python -m edgeproxy -c relay.yaml serve``; wait until /healthz answers."""
    procs: list[subprocess.Popen[bytes]] = []

    async def start(config: dict[str, Any]) -> Served:
        path = write_config(tmp_path / "relay.yaml", config)
        db_path = tmp_path / "relay.db"
        db.init_db(str(db_path))
        _, secret = db.create_key(str(db_path), "alice")
        out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgeproxy", "-c", str(path), "serve"],
                stdout=stdout, stderr=stderr, cwd=tmp_path, env=env,
            )  # fmt: skip
        procs.append(proc)
        port = int(config["listen"].rsplit(":", 1)[1])
        served = Served(proc, port, secret, db_path, path, out, err)
        await wait_healthy(served)
        return served

    try:
        yield start
    finally:
        for proc in procs:  # by PID, whatever the test did
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


async def wait_healthy(served: Served, within_s: float = 15.0) -> None:
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as http:
        while True:
            assert served.proc.poll() is None, f"the relay exited: {served.logs()}"
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(served.url + "/healthz") as r:
                    if r.status == 200:
                        return
            assert time.monotonic() - t0 < within_s, "the relay did not come up"
            await asyncio.sleep(0.05)


async def until(check: Callable[[], bool], within_s: float = 3.0) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < within_s, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def chat(served: Served, *, stream: bool = True, tag: str = "hi") -> tuple[int, bytes]:
    body = {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": tag}],
            "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"Authorization": f"Bearer {served.key}", "x-request-id": tag}
    async with aiohttp.ClientSession() as http:
        async with http.post(served.url + "/v1/chat/completions", json=body, headers=headers) as r:
            return r.status, await r.read()


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


def assert_clean(text: str, fake: FakeUpstream) -> None:
    assert UPSTREAM_KEY not in text and "CANARY" not in text
    assert f"127.0.0.1:{fake.port}" not in text
    assert "Traceback" not in text


# --- SIGTERM ---------------------------------------------------------------------------


async def test_sigterm_drains_then_ends_what_is_left_flushes_and_exits_0(fake, serve):
    served = await serve(config_for(fake, free_port()))
    short = openai_stream([f"w{i} " for i in range(8)], with_usage=True)
    fake.push(Sse(short, delay=0.1))  # ~1 s: finishes inside shutdown_grace (2 s)
    fake.push(Sse([ROLE, CONTENT], then="hang"))  # never ends by itself
    finishing = asyncio.create_task(chat(served, tag="finishing"))
    await until(lambda: fake.open_streams == 1)
    endless = asyncio.create_task(chat(served, tag="endless"))
    await until(lambda: fake.open_streams == 2)

    served.signal(signal.SIGTERM)
    signalled = time.monotonic()
    await until(lambda: refused(served.port), within_s=1.0)  # the listener closes first
    assert not finishing.done() and not endless.done()  # while both are still streaming

    status, body = await finishing
    assert status == 200 and body == b"".join(short)  # let finish, untouched
    status, body = await endless
    ended_after = time.monotonic() - signalled
    assert status == 200 and body.startswith(ROLE + CONTENT) and DONE not in body
    last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert orjson.loads(last.removeprefix(b"data: "))["error"]["code"] == "server_overloaded"
    assert 1.8 < ended_after < 4.0  # at shutdown_grace, not before

    assert await served.exit_code(within_s=10.0) == 0
    rows = {r["request_id"]: r for r in served.usage()}  # flushed before exit
    assert set(rows) == {"finishing", "endless"}
    assert rows["finishing"]["status"] == 200 and rows["finishing"]["completion_tokens"] == 7
    assert rows["endless"]["status"] == 503
    await until(lambda: fake.open_streams == 0)
    assert_clean(served.logs(), fake)


async def test_sigterm_when_idle_exits_0_at_once(fake, serve):
    served = await serve(config_for(fake, free_port(), shutdown_grace="30s"))
    assert (await chat(served, stream=False))[0] == 200
    t0 = time.monotonic()
    served.signal(signal.SIGTERM)
    assert await served.exit_code(within_s=5.0) == 0
    assert time.monotonic() - t0 < 3.0  # nothing in flight: no waiting for the grace
    assert len(served.usage()) == 1


# --- SIGHUP ----------------------------------------------------------------------------


async def test_sighup_applies_a_valid_file_to_new_requests_only(fake, serve):
    other = await FakeUpstream().start()
    try:
        config = config_for(fake, free_port())
        served = await serve(config)
        slow = openai_stream([f"w{i} " for i in range(10)], with_usage=True)
        fake.push(Sse(slow, delay=0.1))
        in_flight = asyncio.create_task(chat(served, tag="old"))
        await until(lambda: fake.open_streams == 1)

        config["upstreams"][0]["base_url"] = f"{other.url}/v1"
        write_config(served.config_path, config)
        served.signal(signal.SIGHUP)
        await until(lambda: '"event":"reloaded"' in served.logs())
        assert (await chat(served, stream=False, tag="new"))[0] == 200
        assert (len(fake.requests), len(other.requests)) == (1, 1)  # the new config

        status, body = await in_flight
        assert status == 200 and body == b"".join(slow)  # the old config, to its end
        assert not in_flight.cancelled() and served.proc.poll() is None
        served.signal(signal.SIGTERM)
        assert await served.exit_code(within_s=10.0) == 0
        assert {r["request_id"] for r in served.usage()} == {"old", "new"}
        assert_clean(served.logs(), fake)
        assert_clean(served.logs(), other)
    finally:
        await other.close()


async def test_sighup_with_an_invalid_file_is_logged_and_ignored(fake, serve):
    config = config_for(fake, free_port())
    served = await serve(config)
    good = served.config_path.read_text()
    served.config_path.write_text(good + "bogus: 1\n")
    served.signal(signal.SIGHUP)
    await until(lambda: '"event":"reload_rejected"' in served.logs())
    line = next(x for x in served.err.read_text().splitlines() if "reload_rejected" in x)
    assert str(served.config_path) in line and "bogus" in line
    assert served.proc.poll() is None
    status, _ = await chat(served, stream=False)
    assert status == 200 and len(fake.requests) == 1  # the running config stays
    served.signal(signal.SIGTERM)
    assert await served.exit_code(within_s=10.0) == 0
    assert_clean(served.logs(), fake)


# --- a client that leaves, in the production server ---------------------------------------


async def raw_request(
    served: Served, tag: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    body = orjson.dumps(
        {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": tag}]}
    )
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {served.key}\r\nx-request-id: {tag}\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    return reader, writer


async def test_a_client_that_leaves_cancels_its_upstream_request_in_production(fake, serve):
    served = await serve(config_for(fake, free_port()))
    # before the first byte: the upstream sent its status line but no event yet
    fake.push(Sse([], then="hang"))
    _, writer = await raw_request(served, "before")
    await until(lambda: fake.open_streams == 1)
    writer.close()
    await writer.wait_closed()
    assert await until(lambda: fake.open_streams == 0, within_s=1.0) < 0.5
    # after it: content was relayed, then the client hangs up
    fake.push(Sse([ROLE, CONTENT], then="hang"))
    reader, writer = await raw_request(served, "after")
    received = b""
    while b'"Hel"' not in received:
        received += await asyncio.wait_for(reader.read(4096), 3.0)
    writer.close()
    await writer.wait_closed()
    assert await until(lambda: fake.open_streams == 0, within_s=1.0) < 0.5

    served.signal(signal.SIGTERM)
    assert await served.exit_code(within_s=10.0) == 0
    rows = {r["request_id"]: r for r in served.usage()}
    assert set(rows) == {"before", "after"}
    for row in rows.values():
        assert (row["status"], row["estimated"], row["attempts"]) == (499, 1, 1)
    assert len(fake.requests) == 2  # neither was retried
    assert_clean(served.logs(), fake)

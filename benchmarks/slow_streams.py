"""Many concurrent slow streams through edgeproxy: RSS per open stream, and none dropped.

Three parts, each its own process so their file descriptors and memory stay apart:

- ``upstream``: an OpenAI-shaped SSE server on raw asyncio protocols (uvloop). A request
  gets its first event at once, then one more per second from a shared ticker. A request
  with ``max_tokens: N`` gets N events and ends; one without is held open, one event a
  second, until the upstream gets SIGUSR1 (or ``--max-events`` is reached), then ends
  with a usage chunk and ``data: [DONE]``. Holding makes the plateau independent of how
  fast the relay accepts new streams. Every event carries its sequence number in ``id``.
- ``client``: opens ``--count`` streams through the relay (at most ``--opening`` being set
  up at once), prints ``PLATEAU {...}`` once every stream is open with its first event or
  has failed, and at the end one ``RESULT {...}`` line: a stream counts as completed when
  it got status 200, every event in order with none missing, and ``[DONE]``; a refusal is
  counted by its status and error code.
- ``run_test``: the orchestration ``run.py`` calls: edgeproxy on ``relay.bench.yaml``,
  warm-up, idle RSS of its process tree, the client, RSS at the plateau, release, result.

RSS per stream = (tree RSS at the plateau - tree RSS idle after warm-up) / open streams.
The count is capped by ``ulimit -n``: one edgeproxy worker holds two sockets per stream
(client and upstream side), so with a hard limit of 20,000 one worker tops out near 9,970.

It must not: run unbounded. Every wait has a deadline; the caller stops every process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import mock_bodies
import orjson
import targets

FD_RESERVE = 64  # descriptors a worker needs besides its streams: database, listeners, logs


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (ulimit -n); returns it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --- upstream -------------------------------------------------------------------------------

_MAX_TOKENS = re.compile(rb'"max_tokens"\s*:\s*(\d+)')


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(seq: int) -> bytes:
    chunk = {
        "id": f"slow-{seq}",
        "object": "chat.completion.chunk",
        "created": mock_bodies.CREATED,
        "model": "bench-slow-upstream",
        "choices": [{"index": 0, "delta": {"content": "tick "}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_END = _chunked(mock_bodies.usage_chunk() + mock_bodies.DONE) + b"0\r\n\r\n"


class Hub:
    """Every open stream and its next sequence number; one ticker writes to all."""

    def __init__(self, max_events: int) -> None:
        self.streams: dict[SlowProtocol, list[int]] = {}  # protocol -> [next seq, limit]
        self.max_events = max_events
        self.releasing = False
        self.started = self.finished = self.lost = 0

    def begin(self, proto: SlowProtocol, limit: int | None) -> None:
        self.started += 1
        if limit is not None and limit <= 1:  # warm-up requests: one event and done
            proto.transport.write(_HEAD + _chunked(_event(0)) + _END)
            self.finished += 1
            return
        proto.transport.write(_HEAD + _chunked(_event(0)))
        self.streams[proto] = [1, limit or self.max_events]

    def tick(self) -> None:
        for proto, state in list(self.streams.items()):
            seq, limit = state
            if seq >= limit or self.releasing:
                proto.transport.write(_END)
                del self.streams[proto]
                self.finished += 1
            else:
                proto.transport.write(_chunked(_event(seq)))
                state[0] = seq + 1

    def gone(self, proto: SlowProtocol) -> None:
        if self.streams.pop(proto, None) is not None:
            self.lost += 1


class SlowProtocol(asyncio.Protocol):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.buf = b""
        self.need: int | None = None  # body bytes still expected, once the head is read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.need is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.buf[:end].lower()
                self.buf = self.buf[end + 4 :]
                found = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
                self.need = int(found[1]) if found else 0
            if len(self.buf) < self.need:
                return
            body, self.buf, self.need = self.buf[: self.need], self.buf[self.need :], None
            found = _MAX_TOKENS.search(body)
            self.hub.begin(self, int(found[1]) if found else None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.hub.gone(self)


async def serve_upstream(port: int, max_events: int, interval_s: float) -> None:
    loop = asyncio.get_running_loop()
    hub = Hub(max_events)
    server = await loop.create_server(lambda: SlowProtocol(hub), targets.HOST, port, backlog=4096)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(hub, "releasing", True))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            hub.tick()
    server.close()
    stats = {"started": hub.started, "finished": hub.finished, "lost": hub.lost}
    print(json.dumps(stats), file=sys.stderr, flush=True)


# --- client ---------------------------------------------------------------------------------

_SEQ = re.compile(rb'"id":"slow-(\d+)"')


_CODE = re.compile(rb'"code"\s*:\s*"([^"]{1,64})"')


@dataclass
class Tally:
    count: int
    opened: int = 0  # got status 200 and the first event
    settled: int = 0  # opened, or failed before opening: the plateau is all of them settled
    completed: int = 0
    failed: int = 0
    events_min: int = 1 << 30
    events_max: int = 0
    errors: dict | None = None

    def fail(self, reason: str) -> None:
        self.failed += 1
        self.errors = self.errors or {}
        self.errors[reason] = self.errors.get(reason, 0) + 1


async def _refusal(reader: asyncio.StreamReader, status: int) -> str:
    """``status 503 server_overloaded``: the status and the error code of its body."""
    try:
        body = await asyncio.wait_for(reader.read(4096), 5.0)
    except (OSError, TimeoutError):
        body = b""
    found = _CODE.search(body)
    return f"status {status} {found[1].decode()}" if found else f"status {status}"


async def one_stream(
    request: bytes, port: int, opening: asyncio.Semaphore, tally: Tally, plateau: asyncio.Event
) -> None:
    writer = None
    settled = False

    def settle() -> None:
        nonlocal settled
        settled = True
        tally.settled += 1
        if tally.settled == tally.count:
            plateau.set()

    try:
        async with opening:
            reader, writer = await asyncio.open_connection(targets.HOST, port, limit=1 << 20)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                tally.fail(await _refusal(reader, status))
                return
            buf = b""
            while b"\n\n" not in buf:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("closed before the first event")
                buf += data
        tally.opened += 1
        settle()
        events, in_order = 0, True
        while True:
            # Events arrive whole or split across reads, inside chunked framing: keep the
            # undecided tail, check complete events by their sequence numbers.
            while (end := buf.find(b"\n\n")) >= 0:
                event, buf = buf[:end], buf[end + 2 :]
                if b"data: [DONE]" in event:
                    if in_order and events > 0:
                        tally.completed += 1
                        tally.events_min = min(tally.events_min, events)
                        tally.events_max = max(tally.events_max, events)
                    else:
                        tally.fail("events missing or out of order")
                    return
                if (found := _SEQ.search(event)) is not None:
                    in_order = in_order and int(found[1]) == events
                    events += 1
            data = await reader.read(65536)
            if not data:
                tally.fail("closed before [DONE]")
                return
            buf += data
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        tally.fail(type(exc).__name__)
    finally:
        if not settled:
            settle()
        if writer is not None:
            writer.close()


async def run_client(port: int, key: str, count: int, opening: int, deadline_s: float) -> dict:
    body = orjson.dumps({"model": "bench-slow", "messages": mock_bodies.PROMPT, "stream": True})
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {targets.HOST}:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    tally = Tally(count)
    plateau = asyncio.Event()
    gate = asyncio.Semaphore(opening)
    t0 = time.perf_counter()
    tasks = [
        asyncio.create_task(one_stream(request, port, gate, tally, plateau)) for _ in range(count)
    ]

    async def announce() -> None:
        await plateau.wait()
        ramp = {
            "opened": tally.opened,
            "failed": tally.failed,
            "ramp_s": round(time.perf_counter() - t0, 2),
        }
        print("PLATEAU " + json.dumps(ramp), flush=True)

    announcer = asyncio.create_task(announce())
    _, pending = await asyncio.wait(tasks, timeout=deadline_s)
    for task in pending:
        task.cancel()
        tally.fail("client deadline")
    announcer.cancel()
    result = {k: v for k, v in tally.__dict__.items()}
    result["events_min"] = result["events_min"] if tally.completed else 0
    result["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return result


# --- orchestration --------------------------------------------------------------------------


def run_test(
    mock: targets.Mock,
    workers: str,
    count: int,
    *,
    opening: int = 200,
    deadline_s: float = 300.0,
    log=print,
) -> dict:
    """One slow-stream run against a fresh edgeproxy; the result (see module docstring)."""
    hard = raise_nofile()
    n_workers = (os.cpu_count() or 1) if workers == "auto" else int(workers)
    per_worker_cap = (hard - FD_RESERVE) // 2
    asked = count
    if n_workers == 1 and count > per_worker_cap:
        count = per_worker_cap
    upstream_port = targets.free_port()
    upstream = targets.Process(
        "slow-upstream",
        [
            sys.executable,
            __file__,
            "upstream",
            "--port",
            str(upstream_port),
            "--max-events",
            str(int(deadline_s) + 60),
        ],
    )
    relay = targets.Edgeproxy(
        mock, workers, slow_port=upstream_port, name=f"edgeproxy-slow-{workers}w", access_log=True
    )
    client: subprocess.Popen | None = None
    result: dict = {"workers": workers, "asked": asked, "count": count, "nofile_hard": hard}
    if count < asked:
        result["capped_because"] = (
            f"ulimit -n hard limit {hard} (not raisable here: no CAP_SYS_RESOURCE); one worker "
            f"holds 2 sockets per stream, so at most ({hard} - {FD_RESERVE}) / 2 = {per_worker_cap}"
        )
    try:
        upstream.start()
        _wait_port(upstream_port, upstream)
        relay.create_key()
        relay.start()
        _warm_streams(relay)
        time.sleep(1.0)
        idle = relay.memory()
        result["rss_idle_kb"] = idle.total_kb
        log(
            f"  slow streams: {count} through {relay.name} (idle RSS {idle.total_kb / 1024:.1f} MB)"
        )
        client = subprocess.Popen(
            [sys.executable, __file__, "client", "--port", str(relay.port), "--key", relay.key,
             "--count", str(count), "--opening", str(opening), "--deadline", str(deadline_s)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        assert client.stdout is not None
        for line in client.stdout:
            if line.startswith("PLATEAU "):
                result["ramp"] = json.loads(line[8:])
                samples = []
                cpu0, t0 = targets.cpu_seconds(relay.proc.pid), time.perf_counter()  # type: ignore[union-attr]
                for _ in range(3):
                    time.sleep(1.0)
                    samples.append(relay.memory())
                busy = targets.cpu_seconds(relay.proc.pid) - cpu0  # type: ignore[union-attr]
                result["relay_cpu_cores_at_plateau"] = round(busy / (time.perf_counter() - t0), 2)
                peak = max(samples, key=lambda m: m.total_kb)
                result["rss_plateau_kb"] = peak.total_kb
                result["rss_plateau"] = peak.to_json()
                held = max(1, result["ramp"]["opened"])  # streams open at the plateau
                result["kb_per_stream"] = round((peak.total_kb - idle.total_kb) / held, 2)
                log(
                    f"  plateau after {result['ramp']['ramp_s']} s: {peak.total_kb / 1024:.1f} MB, "
                    f"relay using {result['relay_cpu_cores_at_plateau']} cores"
                )
                os.kill(upstream.pid, signal.SIGUSR1)  # end every stream at the next tick
            elif line.startswith("RESULT "):
                result["client"] = json.loads(line[7:])
        client.wait(timeout=30)
    finally:
        if client is not None and client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait(timeout=5)
        relay.stop()
        upstream.stop()
    outcome = result.get("client", {})
    result["dropped"] = count - outcome.get("completed", 0)
    return result


def _warm_streams(relay: targets.Edgeproxy) -> None:
    import loadgen

    short = orjson.dumps(
        {"model": "bench-slow", "messages": mock_bodies.PROMPT, "stream": True, "max_tokens": 1}
    )
    loadgen.first_event_latencies(
        targets.HOST, relay.port, "/v1/chat/completions", short, relay.key, count=10, warmup=0
    )


def _wait_port(port: int, proc: targets.Process, timeout_s: float = 10.0) -> None:
    import socket

    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        try:
            socket.create_connection((targets.HOST, port), timeout=0.5).close()
            return
        except OSError:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited: {proc.tail()}") from None
            time.sleep(0.02)
    raise RuntimeError(f"{proc.name} not listening after {timeout_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(description="slow-stream upstream and client (see run.py)")
    sub = parser.add_subparsers(dest="role", required=True)
    up = sub.add_parser("upstream")
    up.add_argument("--port", type=int, required=True)
    up.add_argument("--max-events", type=int, default=300)
    up.add_argument("--interval", type=float, default=1.0)
    cl = sub.add_parser("client")
    cl.add_argument("--port", type=int, required=True)
    cl.add_argument("--key", required=True)
    cl.add_argument("--count", type=int, required=True)
    cl.add_argument("--opening", type=int, default=200)
    cl.add_argument("--deadline", type=float, default=240.0)
    args = parser.parse_args()
    raise_nofile()
    import uvloop

    if args.role == "upstream":
        uvloop.run(serve_upstream(args.port, args.max_events, args.interval))
    else:
        result = uvloop.run(
            run_client(args.port, args.key, args.count, args.opening, args.deadline)
        )
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

"""A fault-injecting, OpenAI-shaped SSE upstream for the soak run, on raw asyncio protocols.

Run as ``python upstream.py --port P --seed S``; it prints ``READY`` once listening and
serves until SIGTERM. Cheap on purpose (uvloop, no framework): at 1,000 concurrent
streams the relay, not this process, must be what is measured.

A ``POST .../chat/completions`` whose body holds ``"max_tokens": N`` gets N content
events, ``interval`` seconds apart, a finish chunk, the usage chunk when the relay asked
for it (``include_usage``) and ``[DONE]``, chunked, on a kept-alive connection. Each
request first draws a fault (``FAULTS``, probabilities per request):

- ``error_500``, ``error_429``: a JSON error status (before the commit point: retried);
- ``stall_before``: no answer at all (the relay's ``first_byte`` timeout, then a retry);
- ``reset_before``: the connection is reset before any byte (a retry);
- ``stall_mid``: two content events, then silence (the relay's ``idle`` timeout ends the
  client's stream with an error event);
- ``reset_mid``: two content events, then a reset (an error event too).

It must not: parse more HTTP than the relay sends (one request at a time per connection,
Content-Length bodies), or run without a bound: stalls end when the relay hangs up.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import resource
import signal
import sys

import orjson

FAULTS = {
    "error_500": 0.03,
    "error_429": 0.02,
    "stall_before": 0.01,
    "reset_before": 0.02,
    "stall_mid": 0.01,
    "reset_mid": 0.02,
}
IDLE_CLOSE_S = 1.0
_MAX_TOKENS = re.compile(rb'"max_tokens"\s*:\s*(\d+)')
_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> bytes:
    body: dict = {"id": "chatcmpl-soak", "object": "chat.completion.chunk", "model": "soak",
                  "choices": [] if delta is None else [
                      {"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
    if usage is not None:
        body["usage"] = usage
    return chunk(b"data: " + orjson.dumps(body) + b"\n\n")


def json_response(status: int, body: dict) -> bytes:
    data = orjson.dumps(body)
    reason = {429: "Too Many Requests", 500: "Internal Server Error"}[status]
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status, reason.encode(), len(data), data,
    )  # fmt: skip


class Counters:
    def __init__(self) -> None:
        self.requests = 0
        self.faults: dict[str, int] = dict.fromkeys(FAULTS, 0)


class Upstream(asyncio.Protocol):
    def __init__(self, rng: random.Random, interval: float, counters: Counters) -> None:
        self.rng = rng
        self.interval = interval
        self.counters = counters
        self.buf = b""
        self.busy = False
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] | None = None
        self.idle: asyncio.TimerHandle | None = None
        self.task: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.idle is not None:
            self.idle.cancel()
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        self.buf += data
        self._next()

    def _next(self) -> None:
        if self.busy:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if not self.buf and self.transport is not None:  # idle kept-alive: close after 1 s,
                # so the relay's descriptors go back to baseline soon after the load
                self.idle = asyncio.get_running_loop().call_later(
                    IDLE_CLOSE_S, self.transport.close
                )
            return
        match = _LENGTH.search(self.buf, 0, end + 2)
        length = int(match[1]) if match else 0
        if len(self.buf) < end + 4 + length:
            return
        body = self.buf[end + 4 : end + 4 + length]
        self.buf = self.buf[end + 4 + length :]
        self.busy = True
        self.task = asyncio.ensure_future(self._respond(body))  # one at a time per connection

    def _draw(self) -> str:
        x = self.rng.random()
        for fault, p in FAULTS.items():
            if x < p:
                return fault
            x -= p
        return "ok"

    async def _respond(self, body: bytes) -> None:
        self.counters.requests += 1
        fault = self._draw()
        if fault != "ok":
            self.counters.faults[fault] += 1
        match = _MAX_TOKENS.search(body)
        n = int(match[1]) if match else 5
        wants_usage = b'"include_usage":true' in body.replace(b" ", b"")
        t = self.transport
        if t is None:
            return
        if fault == "error_500":
            t.write(json_response(500, {"error": {"message": "soak: injected 500"}}))
        elif fault == "error_429":
            t.write(json_response(429, {"error": {"message": "soak: injected 429"}}))
        elif fault == "reset_before":
            t.abort()
            return
        elif fault == "stall_before":
            await self.closed  # until the relay gives up and hangs up
            return
        else:
            if not await self._stream(n, fault, wants_usage):
                return
        self.busy = False
        self._next()

    async def _stream(self, n: int, fault: str, wants_usage: bool) -> bool:
        """The SSE answer; False when the connection is gone (or was cut on purpose)."""
        t = self.transport
        assert t is not None
        t.write(STREAM_HEAD + event({"role": "assistant", "content": ""}))
        for i in range(n):
            if fault in ("stall_mid", "reset_mid") and i == 2:
                if fault == "reset_mid":
                    t.abort()
                else:
                    await self.closed
                return False
            await asyncio.sleep(self.interval)
            if self.transport is None:
                return False
            t.write(event({"content": f"w{i} "}))
        t.write(event({}, "stop"))
        if wants_usage:
            t.write(event(None, usage=USAGE))
        t.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        return True


async def serve(port: int, seed: int, interval: float) -> None:
    loop = asyncio.get_running_loop()
    counters = Counters()
    rng = random.Random(seed)
    server = await loop.create_server(
        lambda: Upstream(rng, interval, counters), "127.0.0.1", port, backlog=4096
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)
    await stop.wait()
    server.close()
    print(orjson.dumps({"requests": counters.requests, "faults": counters.faults}).decode())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between events")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    with runner:
        runner.run(serve(args.port, args.seed, args.interval))
    sys.exit(0)


if __name__ == "__main__":
    main()

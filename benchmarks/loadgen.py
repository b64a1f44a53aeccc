"""Load generators: wrk for throughput and latency, a socket client for the first SSE event.

- ``run_wrk``: one bounded wrk run with ``wrk/chat.lua`` (POST, Bearer key, fixed body);
  returns req/s, latency percentiles and error counts parsed from the script's JSON line.
  For SSE, wrk's latency is the whole response (all 50 events).
- ``first_event_latencies``: N sequential requests on one keep-alive connection with plain
  blocking sockets (no event loop, no HTTP library: the least client overhead there is),
  timing request-sent to the first ``data:`` byte of the body. Each response is then read
  to its end (Content-Length or chunked), so the connection stays usable.
- ``http_get_status``: one tiny GET, for readiness polling.

It must not: start or stop targets (``targets.py``) or judge results (``report.py``).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
WRK_SCRIPT = os.path.join(HERE, "wrk", "chat.lua")


@dataclass
class WrkResult:
    connections: int
    duration_s: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: dict[str, int] = field(default_factory=dict)
    cpu_us_per_request: float | None = None  # the target's CPU time per request (run.py)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict:
        return asdict(self)


def run_wrk(
    url: str,
    body_file: str,
    key: str,
    *,
    connections: int,
    duration_s: float,
    threads: int = 1,
    timeout_s: float = 10.0,
) -> WrkResult:
    """One wrk run, bounded by ``duration_s`` plus a margin (then it is killed)."""
    threads = max(1, min(threads, connections))
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={int(timeout_s)}s",
        "-s",
        WRK_SCRIPT,
        url,
    ]
    env = {**os.environ, "BENCH_BODY_FILE": body_file, "BENCH_KEY": key}
    done = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=duration_s + timeout_s + 15,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            raw = json.loads(line[len("BENCH_RESULT ") :])
            break
    else:
        raise RuntimeError(
            f"wrk gave no result (exit {done.returncode}): {done.stderr.strip()[:300]}"
        )
    seconds = raw["duration_us"] / 1e6
    lat = raw["latency_us"]
    return WrkResult(
        connections=connections,
        duration_s=round(seconds, 3),
        requests=raw["requests"],
        rps=round(raw["requests"] / seconds, 1) if seconds else 0.0,
        p50_ms=lat["p50"] / 1000,
        p90_ms=lat["p90"] / 1000,
        p99_ms=lat["p99"] / 1000,
        mean_ms=round(lat["mean"] / 1000, 4),
        max_ms=lat["max"] / 1000,
        errors=raw["errors"],
    )


def _request(host: str, port: int, path: str, body: bytes, key: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Conn:
    """A keep-alive HTTP/1.1 connection read with blocking ``recv``."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buf += data

    def read_head(self) -> tuple[int, dict[str, str]]:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self.fill()
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        self.buf = self.buf[end + 4 :]
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def read_body(self, headers: dict[str, str]) -> None:
        """Consume the rest of the body (after ``read_head``), whatever is already buffered."""
        if "content-length" in headers:
            need = int(headers["content-length"])
            while len(self.buf) < need:
                self.fill()
            self.buf = self.buf[need:]
            return
        while True:  # chunked: size line, data, CRLF; a 0 size ends it (no trailers expected)
            while (eol := self.buf.find(b"\r\n")) < 0:
                self.fill()
            size = int(self.buf[:eol].split(b";")[0], 16)
            while len(self.buf) < eol + 2 + size + 2:
                self.fill()
            self.buf = self.buf[eol + 2 + size + 2 :]
            if size == 0:
                return

    def close(self) -> None:
        self.sock.close()


def first_event_latencies(
    host: str,
    port: int,
    path: str,
    body: bytes,
    key: str,
    *,
    count: int,
    warmup: int = 20,
    timeout_s: float = 10.0,
) -> list[float]:
    """Milliseconds from sending the request to the first ``data:`` event, ``count`` times."""
    request = _request(host, port, path, body, key)
    conn = _Conn(host, port, timeout_s)
    samples: list[float] = []
    try:
        for i in range(warmup + count):
            t0 = time.perf_counter_ns()
            conn.sock.sendall(request)
            status, headers = conn.read_head()
            if status != 200:
                raise RuntimeError(f"status {status} from {host}:{port}{path}")
            while b"data:" not in conn.buf:
                conn.fill()
            t1 = time.perf_counter_ns()
            conn.read_body(headers)
            if i >= warmup:
                samples.append((t1 - t0) / 1e6)
            if headers.get("connection", "").lower() == "close":
                conn.close()
                conn = _Conn(host, port, timeout_s)
    finally:
        conn.close()
    return samples


def http_get_status(host: str, port: int, path: str, timeout_s: float = 1.0) -> int | None:
    """The status of one GET, or None if nothing answers (yet)."""
    try:
        conn = _Conn(host, port, timeout_s)
    except OSError:
        return None
    try:
        conn.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        status, _ = conn.read_head()
        return status
    except (OSError, ValueError, IndexError):
        return None
    finally:
        conn.close()


def percentile(samples: list[float], pct: float) -> float:
    """Nearest-rank percentile (samples need not be sorted)."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), math.ceil(pct / 100 * len(ordered))))
    return ordered[rank - 1]

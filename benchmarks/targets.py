"""The processes a benchmark talks to, started and stopped by PID.

- ``Mock``: nginx serving the fixed JSON body at ``/json/v1/chat/completions`` and the
  fixed SSE body at ``/sse/v1/chat/completions`` (static files; nginx answers a POST to a
  static file with 405, which ``error_page 405 =200 $uri`` turns into the file).
- Targets, each an HTTP server with ``url(mode)`` and a process tree:
  ``direct`` (the mock itself), ``nginx-proxy`` (nginx as a reverse proxy in front of the
  mock, keep-alive upstream, ``proxy_buffering off`` for SSE, a Bearer check),
  ``minimal`` (``minimal_relay.py``), ``edgeproxy-1w`` / ``edgeproxy-auto`` (the product on
  ``relay.bench.yaml`` with ``workers: 1`` / ``auto``).

Every process is started in its own session, so stopping it means signalling its process
group, whose id is the PID we started: nothing else on the machine is touched.

It must not: generate load (``loadgen.py``) or judge results (``report.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import loadgen
import mock_bodies

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORK = os.path.join(HERE, ".work")  # scratch: configs, databases, logs (gitignored)
RESULTS = os.path.join(HERE, "results")  # what a run commits
VENV_BIN = os.path.dirname(sys.executable)
EDGEPROXY = os.path.join(VENV_BIN, "edgeproxy")
BENCH_CONFIG = os.path.join(HERE, "relay.bench.yaml")
HOST = "127.0.0.1"
MODELS = {"json": "bench-json", "sse": "bench-sse"}


def missing_tools(*tools: str) -> list[str]:
    """The programs a tool needs that are not on PATH."""
    return [tool for tool in tools if shutil.which(tool) is None]


def save_results(stem: str, text: str, data: dict) -> None:
    """results/<stem>.md (the report) and results/<stem>.json (every figure behind it)."""
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{stem}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(RESULTS, f"{stem}.json"), "w") as f:
        json.dump(data, f, indent=2)


def free_port() -> int:
    """A port nothing listens on now (others run tests on this machine too: no fixed ports)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Memory:
    """RSS of a process tree: the sum, and each process (the root first)."""

    total_kb: int
    per_process_kb: dict[int, int]
    root: int

    @property
    def worker_max_kb(self) -> int:
        """The largest process that serves traffic: the root alone, or its largest child."""
        children = [kb for pid, kb in self.per_process_kb.items() if pid != self.root]
        return max(children) if children else self.per_process_kb.get(self.root, 0)

    def to_json(self) -> dict:
        return {
            "total_kb": self.total_kb,
            "worker_max_kb": self.worker_max_kb,
            "per_process_kb": {str(pid): kb for pid, kb in self.per_process_kb.items()},
        }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants, from /proc/<pid>/stat."""
    ticks = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        except (OSError, IndexError, ValueError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> Memory:
    per = {p: rss_kb(p) for p in descendants(pid)}
    return Memory(total_kb=sum(per.values()), per_process_kb=per, root=pid)


@dataclass
class Process:
    """One started process (and its group)."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log: str = ""
    stdout_log: str | None = None  # where stdout goes; None = /dev/null
    popen: subprocess.Popen | None = None
    started_at: float = 0.0

    def start(self) -> None:
        os.makedirs(WORK, exist_ok=True)
        self.log = self.log or os.path.join(WORK, f"{self.name}.log")
        out_path = self.stdout_log or os.devnull  # edgeproxy's access log: a line per request
        with open(self.log, "wb") as err, open(out_path, "wb") as out:
            self.started_at = time.perf_counter()
            self.popen = subprocess.Popen(
                self.argv,
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group, id = its PID
                cwd=ROOT,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the group we started, then SIGKILL after ``grace_s``."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait(timeout=5)
        self._signal_group(signal.SIGKILL)  # stragglers of the group (workers), if any
        self.popen = None

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)  # type: ignore[union-attr]

    def tail(self, n: int = 5) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


def wait_ready(proc: Process, port: int, path: str, timeout_s: float = 20.0) -> float:
    """Seconds from the process's start to the first 200 on ``path``."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if loadgen.http_get_status(HOST, port, path, timeout_s=0.5) == 200:
            return time.perf_counter() - proc.started_at
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited during start: {proc.tail()}")
        time.sleep(0.002)
    raise RuntimeError(f"{proc.name} not ready after {timeout_s} s: {proc.tail()}")


NGINX_COMMON = """\
daemon off;
master_process on;
worker_processes {workers};
pid {work}/{name}.pid;
error_log {work}/{name}.err.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 16384; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 1000000;   # the default 1000 would make wrk reconnect
    keepalive_timeout 75s;
    client_body_temp_path {work}/{name}-tmp/body;
    proxy_temp_path {work}/{name}-tmp/proxy;
    fastcgi_temp_path {work}/{name}-tmp/fastcgi;
    uwsgi_temp_path {work}/{name}-tmp/uwsgi;
    scgi_temp_path {work}/{name}-tmp/scgi;
{server}
}}
"""

MOCK_SERVER = """\
    open_file_cache max=16 inactive=1h;
    etag off;
    server {{
        listen {host}:{port} backlog=4096;
        location = /json/v1/chat/completions {{
            default_type application/json;
            alias {work}/mock-json.body;
            error_page 405 =200 $uri;
        }}
        location = /sse/v1/chat/completions {{
            types {{ }}
            default_type text/event-stream;
            add_header Cache-Control no-cache;
            alias {work}/mock-sse.body;
            error_page 405 =200 $uri;
        }}
        location = /healthz {{ return 200 "ok"; }}
    }}
"""

PROXY_SERVER = """\
    upstream mock {{
        server {host}:{mock_port};
        keepalive 256;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Authorization "Bearer upstream-key";
        location /json/v1/ {{
            if ($http_authorization != "Bearer {key}") {{ return 401; }}
            proxy_pass http://mock;
        }}
        location /sse/v1/ {{
            if ($http_authorization != "Bearer {key}") {{ return 401; }}
            proxy_buffering off;
            proxy_pass http://mock;
        }}
        location = /healthz {{ return 200 "ok"; }}
    }}
"""


def nginx_process(name: str, server: str, workers: str) -> Process:
    os.makedirs(os.path.join(WORK, f"{name}-tmp"), exist_ok=True)
    conf = os.path.join(WORK, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(NGINX_COMMON.format(workers=workers, work=WORK, name=name, server=server))
    err = os.path.join(WORK, f"{name}.err.log")
    return Process(name, ["nginx", "-e", err, "-p", WORK, "-c", conf])


class Target:
    """A server under test. ``paths`` maps json/sse to the URL path it answers on."""

    name = ""
    ready_path = "/healthz"

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: Process | None = None
        self.ready_s: float | None = None

    def path(self, mode: str) -> str:
        return "/v1/chat/completions"

    def url(self, mode: str) -> str:
        return f"http://{HOST}:{self.port}{self.path(mode)}"

    def make_process(self) -> Process:
        raise NotImplementedError

    def start(self) -> None:
        self.proc = self.make_process()
        self.proc.start()
        self.ready_s = wait_ready(self.proc, self.port, self.ready_path)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def memory(self) -> Memory:
        assert self.proc is not None
        return memory(self.proc.pid)


class Mock(Target):
    """The fast upstream; also the ``direct`` target."""

    name = "direct"

    def __init__(self, workers: str = "auto") -> None:
        super().__init__()
        self.workers = workers

    def path(self, mode: str) -> str:
        return f"/{mode}/v1/chat/completions"

    def make_process(self) -> Process:
        os.makedirs(WORK, exist_ok=True)
        for mode, body in (("json", mock_bodies.json_body()), ("sse", mock_bodies.sse_body())):
            with open(os.path.join(WORK, f"mock-{mode}.body"), "wb") as f:
                f.write(body)
        server = MOCK_SERVER.format(host=HOST, port=self.port, work=WORK)
        return nginx_process("nginx-mock", server, self.workers)

    def base_url(self, mode: str) -> str:
        return f"http://{HOST}:{self.port}/{mode}/v1"


class NginxProxy(Target):
    name = "nginx-proxy"

    def __init__(self, mock: Mock, key: str, workers: str = "auto") -> None:
        super().__init__()
        self.mock, self.key, self.workers = mock, key, workers

    def path(self, mode: str) -> str:
        return f"/{mode}/v1/chat/completions"

    def make_process(self) -> Process:
        server = PROXY_SERVER.format(
            host=HOST, port=self.port, mock_port=self.mock.port, key=self.key
        )
        return nginx_process("nginx-proxy", server, self.workers)


class Minimal(Target):
    name = "minimal"

    def __init__(self, mock: Mock, key: str) -> None:
        super().__init__()
        self.mock, self.key = mock, key

    def make_process(self) -> Process:
        argv = [sys.executable, os.path.join(HERE, "minimal_relay.py"), "--port", str(self.port)]
        argv += ["--key", self.key]
        for mode, model in MODELS.items():
            argv += ["--route", f"{model}={self.mock.base_url(mode)}"]
        return Process("minimal", argv)


class Edgeproxy(Target):
    """The product, on ``relay.bench.yaml``, with its own fresh database and one key."""

    def __init__(
        self,
        mock: Mock,
        workers: str,
        *,
        slow_port: int | None = None,
        name: str = "",
        access_log: bool = False,
    ) -> None:
        super().__init__()
        self.name = name or ("edgeproxy-1w" if workers == "1" else f"edgeproxy-{workers}")
        self.mock, self.workers = mock, workers
        self.metrics_port = free_port()
        self.database = os.path.join(WORK, f"{self.name}.db")
        self.env = {
            "BENCH_LISTEN": f"{HOST}:{self.port}",
            "BENCH_METRICS_LISTEN": f"{HOST}:{self.metrics_port}",
            "BENCH_WORKERS": workers,
            "BENCH_DATABASE": self.database,
            "BENCH_MOCK_PORT": str(mock.port),
            "BENCH_SLOW_PORT": str(slow_port or mock.port),
        }
        self.key = ""
        self.access_log = os.path.join(WORK, f"{self.name}.access.log") if access_log else None

    def create_key(self) -> str:
        """A fresh database and one key without limits: auth and metering, no quota checks."""
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.database + suffix):
                os.remove(self.database + suffix)
        done = subprocess.run(
            [EDGEPROXY, "-c", BENCH_CONFIG, "keys", "create", "bench"],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        self.key = done.stdout.strip()
        return self.key

    def make_process(self) -> Process:
        argv = [EDGEPROXY, "-c", BENCH_CONFIG, "serve"]
        return Process(self.name, argv, env=self.env, stdout_log=self.access_log)

    def metrics_status(self) -> int | None:
        return loadgen.http_get_status(HOST, self.metrics_port, "/metrics")

"""Profile edgeproxy (workers: 1) under py-spy during a wrk run, for JSON and for SSE.

``benchmarks/profile.sh`` (or ``.venv/bin/python benchmarks/pyspy_profile.py``) starts the nginx
mock and edgeproxy on ``relay.bench.yaml`` with ``workers: 1``, warms it up, and for each
mode runs wrk at 16 connections twice:

1. with ``py-spy record --format raw --function --threads`` (stacks by function, each
   frame named ``function (file:def-line)``), summarised into
   ``results/profile-<mode>.txt``: the top 25 functions by own time, the top ones by total
   time, and the share of each thread and package;
2. with ``py-spy record --format flamegraph`` (line-level frames) into
   ``results/profile-<mode>.svg``, kept under results/ only if it is under 1 MB.

Own time: samples where the function is the innermost Python frame. A leaf of
``Runner.run (asyncio/runners.py)`` means native code under the event loop: uvloop's loop,
socket reads and writes, and C callbacks with no Python frame of their own.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import threading
import time

import loadgen
import mock_bodies
import run
import targets

RESULTS = os.path.join(targets.HERE, "results")
PY_SPY = os.path.join(targets.VENV_BIN, "py-spy")
SVG_LIMIT = 1_000_000  # bytes: bigger flamegraphs stay in benchmarks/.work, uncommitted
NATIVE_LEAF = "Runner.run (asyncio/runners.py"
NO_FRAME = "(no Python frame: native code)"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_py_spy() -> None:
    if not os.path.exists(PY_SPY):
        log("installing py-spy into the venv")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True, timeout=300
        )


def parse_raw(path: str) -> list[tuple[list[str], int]]:
    stacks = []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            frames, _, count = line.rpartition(" ")
            stacks.append((frames.split(";"), int(count)))
    return stacks


def _thread_name(frame: str) -> str:
    # "thread (1355): Thread-1 (_connection_worker_thread)" -> "Thread-1 (_connection_worker_thread)"
    return frame.split(": ", 1)[1] if frame.startswith("thread (") and ": " in frame else frame


def _package(frame: str) -> str:
    where = frame[frame.rfind("(") + 1 :].rstrip(")")
    path = where.rsplit(":", 1)[0]
    if frame.startswith(NATIVE_LEAF) or frame == NO_FRAME:
        return "native (uvloop loop, socket I/O)"
    if ".py" not in path and not path.startswith("<"):
        return "other (a frame read mid-change: --nonblocking)"
    return path.split("/", 1)[0].removesuffix(".py") if "/" in path else path.removesuffix(".py")


def summarise(stacks: list[tuple[list[str], int]], header: list[str], top: int = 25) -> str:
    total = sum(n for _, n in stacks)
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    main_inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        thread, body = _thread_name(frames[0]), frames[1:] or [NO_FRAME]
        threads[thread] += n
        leaf = body[-1]
        own[leaf] += n
        packages[_package(leaf)] += n
        for frame in set(body):
            inclusive[frame] += n
            if thread == "MainThread":
                main_inclusive[frame] += n

    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    lines = [
        *header,
        f"active samples: {total} (idle excluded)",
        "",
        "by thread (share of active samples):",
    ]
    lines += [f"  {pct(n)}  {name}" for name, n in threads.most_common()]
    lines += [
        "",
        f"top {top} functions by own time (all threads):",
        "  own%    total%  function (file:line of its def)",
    ]
    for frame, n in own.most_common(top):
        lines.append(f"  {pct(n)}  {pct(inclusive[frame])}  {frame}")
    lines += ["", "by package, own time:"]
    lines += [f"  {pct(n)}  {name}" for name, n in packages.most_common(15)]
    lines += ["", "top 25 by total time, event loop thread (MainThread):", "  total%  function"]
    skip = ("<module>", "main (edgeproxy/cli.py", "cmd_serve", "run (edgeproxy/", "Runner.run")
    shown = 0
    for frame, n in main_inclusive.most_common():
        if frame.startswith(skip):
            continue  # the start-up frames every stack shares
        lines.append(f"  {pct(n)}  {frame}")
        shown += 1
        if shown == 25:
            break
    return "\n".join(lines) + "\n"


class Load(threading.Thread):
    """wrk in the background, so py-spy can sample while it runs."""

    def __init__(
        self, url: str, body_file: str, key: str, connections: int, seconds: float
    ) -> None:
        super().__init__(daemon=True)
        self.args = (url, body_file, key)
        self.connections, self.seconds = connections, seconds
        self.result: loadgen.WrkResult | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.result = loadgen.run_wrk(
                *self.args, connections=self.connections, duration_s=self.seconds
            )
        except Exception as exc:  # reported by the caller
            self.error = exc


def py_spy(pid: int, seconds: float, out: str, fmt: str, rate: int, extra: list[str]) -> None:
    cmd = [
        PY_SPY,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        str(rate),
    ]
    cmd += ["--format", fmt, "--output", out, "--nonblocking", *extra]
    subprocess.run(cmd, check=True, timeout=seconds + 60, capture_output=True)


def profile_mode(
    relay: targets.Edgeproxy, mode: str, body_file: str, args: argparse.Namespace
) -> None:
    sample_s = args.duration
    raw = os.path.join(targets.WORK, f"profile-{mode}.raw")
    load = Load(relay.url(mode), body_file, relay.key, args.connections, sample_s + 3)
    load.start()
    time.sleep(1.5)  # sample the steady state, not wrk's connection set-up
    py_spy(relay.proc.pid, sample_s, raw, "raw", args.rate, ["--function", "--threads"])  # type: ignore[union-attr]
    load.join(timeout=sample_s + 60)
    if load.result is None:
        raise RuntimeError(f"wrk failed during profiling: {load.error}")
    header = [
        f"edgeproxy profile: {mode.upper()}, workers: 1, {args.connections} connections "
        f"(wrk {load.result.rps:,.0f} req/s, {load.result.error_count} errors, while sampled)",
        f"py-spy record --format raw --function --threads --nonblocking, {args.rate} Hz for {sample_s:.0f} s; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; edgeproxy at {run.git_state()}; "
        f"load average {run.loadavg()}",
        f"samples over rate x duration = {sample_s * args.rate:.0f} would be one thread busy all the time",
    ]
    text = summarise(parse_raw(raw), header)
    with open(os.path.join(RESULTS, f"profile-{mode}.txt"), "w") as f:
        f.write(text)
    log(text)
    if args.no_svg:
        return
    svg = os.path.join(targets.WORK, f"profile-{mode}.svg")
    load = Load(relay.url(mode), body_file, relay.key, args.connections, sample_s + 3)
    load.start()
    time.sleep(1.5)
    py_spy(relay.proc.pid, sample_s, svg, "flamegraph", args.rate, [])  # type: ignore[union-attr]
    load.join(timeout=sample_s + 60)
    kept = os.path.join(RESULTS, f"profile-{mode}.svg")
    if os.path.getsize(svg) <= SVG_LIMIT:
        shutil.copyfile(svg, kept)
        log(f"flamegraph: {kept}")
    else:
        log(f"flamegraph over 1 MB, left at {svg}")


def main() -> int:
    p = argparse.ArgumentParser(
        description="py-spy profiles of edgeproxy workers: 1 (JSON and SSE)"
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds sampled per mode")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--modes", default="json,sse")
    p.add_argument("--no-svg", action="store_true", help="skip the flamegraph runs")
    args = p.parse_args()
    ensure_py_spy()
    os.makedirs(RESULTS, exist_ok=True)
    os.makedirs(targets.WORK, exist_ok=True)
    mock = targets.Mock()
    relay = targets.Edgeproxy(mock, "1")
    started: list[targets.Target] = []
    try:
        mock.start()
        started.append(mock)
        relay.create_key()
        relay.start()
        started.append(relay)
        for mode in args.modes.split(","):
            body_file = os.path.join(targets.WORK, f"request-{mode}.json")
            with open(body_file, "wb") as f:
                f.write(mock_bodies.request_body(targets.MODELS[mode], stream=mode == "sse"))
            loadgen.run_wrk(
                relay.url(mode), body_file, relay.key, connections=args.connections, duration_s=2
            )
            profile_mode(relay, mode, body_file, args)
    finally:
        for target in reversed(started):
            target.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

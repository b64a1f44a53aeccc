"""User-space instructions per request, counted by valgrind (callgrind): a noise-free
comparison of edgeproxy (workers: 1) with the minimal aiohttp relay.

``.venv/bin/python benchmarks/instructions.py`` (about 2 minutes; needs valgrind and
nginx) starts the nginx mock and each relay under ``valgrind --tool=callgrind``, warms it
up with wrk, zeroes the counters (``callgrind_control -z``), runs wrk at 16 connections,
dumps the counters (``callgrind_control -d``) and divides the instructions executed by
the requests wrk completed. Writes results/instructions.json and results/instructions.md.

Why: on a shared 2-core VM the CPU time per request moves 10-30% between runs, with the
host's load. Instructions executed do not: the same code and inputs give the same count
within about 1%, whatever else the machine does. What they leave out: the kernel's part
(the socket syscalls, the same for both relays; see benchmarks/README.md), and how fast
each instruction runs. Under valgrind a relay runs about 50x slower, so SQLite batches
are smaller than at full speed (a commit's fixed cost is shared by fewer rows), and glibc
counts a large copy (``rep movsb``) as one instruction per byte.

Every process is stopped by its PID's group in ``finally``; everything is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time

import loadgen
import mock_bodies
import run
import targets


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def under_callgrind(target: targets.Target, out: str) -> targets.Process:
    """The target's own command, run by valgrind."""
    plain = target.make_process()
    for old in glob.glob(out + "*"):
        os.remove(old)
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-line=no"]
    return targets.Process(target.name, argv + plain.argv, env=plain.env)


def wait_ready(target: targets.Target, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if loadgen.http_get_status(targets.HOST, target.port, "/healthz", timeout_s=2) == 200:
            return
        if not target.proc.alive():  # type: ignore[union-attr]
            raise RuntimeError(f"{target.name} exited: {target.proc.tail()}")  # type: ignore[union-attr]
        time.sleep(0.5)
    raise RuntimeError(f"{target.name} not ready under valgrind after {timeout_s} s")


def counted_pid(target: targets.Target) -> int:
    """The process valgrind runs the relay in: the started one (valgrind execs in place)."""
    return target.proc.pid  # type: ignore[union-attr]


def measure(target: targets.Target, out: str, mode: str, key: str, args) -> dict:
    body_file = os.path.join(targets.WORK, f"request-{mode}.json")
    with open(body_file, "wb") as f:
        f.write(mock_bodies.request_body(targets.MODELS[mode], stream=mode == "sse"))
    url = target.url(mode)
    loadgen.run_wrk(url, body_file, key, connections=args.connections, duration_s=args.warmup)
    pid = str(counted_pid(target))
    subprocess.run(["callgrind_control", "-z", pid], capture_output=True, check=True, timeout=60)
    result = loadgen.run_wrk(
        url, body_file, key, connections=args.connections, duration_s=args.duration
    )
    before = set(glob.glob(out + "*"))
    subprocess.run(["callgrind_control", "-d", pid], capture_output=True, check=True, timeout=60)
    dumps: list[str] = []
    for _ in range(50):
        dumps = sorted(set(glob.glob(out + "*")) - before, key=os.path.getmtime)
        if dumps:
            break
        time.sleep(0.2)
    if not dumps:
        raise RuntimeError(f"callgrind wrote no dump for {target.name}")
    total = None
    with open(dumps[-1]) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
    if total is None or result.requests == 0:
        raise RuntimeError(f"no count for {target.name} {mode}")
    return {
        "requests": result.requests,
        "errors": result.error_count,
        "instructions": total,
        "per_request": round(total / result.requests),
    }


def write_report(results: dict, header: dict) -> str:
    lines = [
        f"Run {header['when']} on {header['cpus']} CPUs; edgeproxy at {header['git']}; "
        f"valgrind {header['valgrind']}; wrk at {header['connections']} connections for "
        f"{header['duration_s']:.0f} s after {header['warmup_s']:.0f} s of warm-up, under callgrind.",
        "",
        "| user-space instructions per request | minimal | edgeproxy-1w | edgeproxy ÷ minimal |",
        "|---|---:|---:|---:|",
    ]
    for mode in ("json", "sse"):
        mine, floor = results["edgeproxy-1w"][mode], results["minimal"][mode]
        ratio = mine["per_request"] / floor["per_request"]
        lines.append(
            f"| {mode.upper()} | {floor['per_request'] / 1000:,.0f}k | "
            f"{mine['per_request'] / 1000:,.0f}k | {ratio:.2f}× |"
        )
    lines += [
        "",
        "Requests counted: "
        + ", ".join(
            f"{name} {mode} {r['requests']:,}"
            + (f" (⚠ {r['errors']} errors)" if r["errors"] else "")
            for name, by_mode in results.items()
            for mode, r in by_mode.items()
        )
        + ".",
        "Fewer instructions is better; 1.2× the minimal relay's req/s would need about 0.83× "
        "its CPU per request. The kernel's share of a request (socket syscalls) is not counted.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=8.0, help="seconds counted per mode")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--connections", type=int, default=16)
    args = p.parse_args()
    if missing := targets.missing_tools("valgrind", "callgrind_control", "nginx", "wrk"):
        log(f"{', '.join(missing)} missing: apt-get install -y valgrind nginx wrk")
        return 2
    os.makedirs(targets.WORK, exist_ok=True)
    mock = targets.Mock()
    started: list[targets.Target] = []
    results: dict[str, dict] = {}
    try:
        mock.start()
        started.append(mock)
        relay = targets.Edgeproxy(mock, "1")
        key = relay.create_key()
        minimal = targets.Minimal(mock, key)
        for target in (minimal, relay):
            out = os.path.join(targets.WORK, f"callgrind-{target.name}.out")
            target.proc = under_callgrind(target, out)
            target.proc.start()
            started.append(target)
            wait_ready(target)
            log(f"{target.name} ready under valgrind")
            results[target.name] = {}
            for mode in ("json", "sse"):
                results[target.name][mode] = measure(target, out, mode, key, args)
                log(f"{target.name} {mode}: {results[target.name][mode]}")
            target.stop()
            started.remove(target)
    finally:
        for target in reversed(started):
            target.stop()
    header = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "git": run.git_state(),
        "valgrind": subprocess.run(
            ["valgrind", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "connections": args.connections,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
    }
    text = write_report(results, header)
    targets.save_results("instructions", text, {"header": header, "results": results})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What each part of a request costs: edgeproxy (workers: 1) with parts switched off,
against the product and the minimal relay, in CPU time per request.

``.venv/bin/python benchmarks/ablation.py`` (about 9 minutes; needs nginx and wrk)
starts the nginx mock, the minimal relay, edgeproxy and one edgeproxy per variant of
``VARIANTS`` (``ablated_edgeproxy.py``: the same code with a part replaced by nothing).
For JSON, then SSE, it warms every target up, then runs wrk at 16 connections on each in
turn, ``--rounds`` times, and reads each target's CPU time (utime + stime of its process
tree, /proc) around every run. Writes results/ablation.json and results/ablation.md.

Why: the profile says where samples fall, not what a request would cost without that
code. Switching a part off and measuring the difference does, and running every variant
interleaved in the same rounds keeps the comparison fair on a noisy 2-core VM. Each
round's CPU per request is divided by the product's, and its req/s by the minimal
relay's, in the same round; the table gives the medians of those paired figures.

Every process is stopped by its PID's group in ``finally``; everything is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import loadgen
import mock_bodies
import run
import targets

LAUNCHER = os.path.join(targets.HERE, "ablated_edgeproxy.py")
# (name, parts switched off, modes it is measured in)
VARIANTS = (
    ("without the ledger", "ledger", ("json", "sse")),
    ("without the access log", "access-log", ("json", "sse")),
    ("without metrics", "metrics", ("json", "sse")),
    ("without any bookkeeping", "bookkeeping", ("json", "sse")),
    ("without reading the stream", "sse-inspection", ("sse",)),
    ("without bookkeeping or reading the stream", "bookkeeping,sse-inspection", ("sse",)),
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Ablated(targets.Edgeproxy):
    def __init__(self, mock: targets.Mock, name: str, parts: str, modes: tuple[str, ...]) -> None:
        slug = parts.replace(",", "+")
        super().__init__(mock, "1", name=f"edgeproxy-1w-no-{slug}")
        self.label, self.parts, self.modes = name, parts, modes

    def make_process(self) -> targets.Process:
        argv = [sys.executable, LAUNCHER, "-c", targets.BENCH_CONFIG, "serve"]
        return targets.Process(self.name, argv, env={**self.env, "EDGEPROXY_ABLATE": self.parts})


def measure(mode: str, group: list[targets.Target], args) -> dict[str, list[dict]]:
    body_file = os.path.join(targets.WORK, f"request-{mode}.json")
    with open(body_file, "wb") as f:
        f.write(mock_bodies.request_body(targets.MODELS[mode], stream=mode == "sse"))
    for target in group:
        loadgen.run_wrk(
            target.url(mode), body_file, target.key, connections=16, duration_s=args.warmup
        )
    rounds: dict[str, list[dict]] = {t.name: [] for t in group}
    for i in range(args.rounds):
        for target in group:
            before = targets.cpu_seconds(target.proc.pid)  # type: ignore[union-attr]
            result = loadgen.run_wrk(
                target.url(mode), body_file, target.key, connections=16, duration_s=args.duration
            )
            spent = targets.cpu_seconds(target.proc.pid) - before  # type: ignore[union-attr]
            if result.requests == 0:
                raise RuntimeError(f"{target.name} {mode}: no requests completed")
            rounds[target.name].append(
                {
                    "rps": round(result.rps),
                    "cpu_us_per_request": round(spent / result.requests * 1e6, 1),
                    "errors": result.error_count,
                }
            )
        log(f"{mode} round {i + 1}: " + ", ".join(
            f"{name} {r[-1]['cpu_us_per_request']:.0f} µs" for name, r in rounds.items()))  # fmt: skip
    return rounds


def summarise(rounds: dict[str, list[dict]]) -> dict[str, dict]:
    """Medians per target; and of its figures over the product's CPU time and the minimal
    relay's req/s in the same round (paired: both measured back to back)."""
    product, minimal = rounds["edgeproxy-1w"], rounds["minimal"]
    out = {}
    for name, runs in rounds.items():
        out[name] = {
            "cpu_us_per_request": statistics.median(r["cpu_us_per_request"] for r in runs),
            "rps": statistics.median(r["rps"] for r in runs),
            "cpu_vs_product": statistics.median(
                r["cpu_us_per_request"] / p["cpu_us_per_request"]
                for r, p in zip(runs, product, strict=True)
            ),
            "rps_vs_minimal": statistics.median(
                r["rps"] / m["rps"] for r, m in zip(runs, minimal, strict=True)
            ),
            "errors": sum(r["errors"] for r in runs),
        }
    return out


def write_report(summary: dict, labels: dict[str, str], header: dict) -> str:
    lines = [
        f"Run {header['when']} on {header['cpus']} CPUs; edgeproxy at {header['git']}; "
        f"wrk at 16 connections, {header['rounds']} interleaved rounds of "
        f"{header['duration_s']:.0f} s per target and mode (medians).",
        "",
        "| | JSON: CPU µs per request | ÷ the product's | req/s | ÷ minimal's |"
        " SSE: CPU µs per request | ÷ the product's | req/s | ÷ minimal's |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in labels.items():
        cells = []
        for mode in ("json", "sse"):
            s = summary[mode].get(name)
            if s is None:
                cells += ["", "", "", ""]
                continue
            warn = f" ⚠ {s['errors']} errors" if s["errors"] else ""
            cells += [
                f"{s['cpu_us_per_request']:.0f}{warn}",
                f"{s['cpu_vs_product']:.2f}×",
                f"{s['rps']:,.0f}",
                f"{s['rps_vs_minimal']:.2f}×",
            ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The product is edgeproxy-1w as `run.py` measures it (auth, ledger, metrics, access "
        "log, `stream_usage: inject`). Each variant is the same code with one part replaced "
        "by nothing (`ablated_edgeproxy.py`): a build that bills nothing or inspects nothing, "
        "measured only to price that part. CPU time is the process tree's, so it includes "
        "helper threads (SQLite's WAL checkpoint).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per target")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per mode")
    args = p.parse_args()
    if missing := targets.missing_tools("nginx", "wrk"):
        log(f"{', '.join(missing)} missing: apt-get install -y nginx wrk")
        return 2
    os.makedirs(targets.WORK, exist_ok=True)
    mock = targets.Mock()
    started: list[targets.Target] = []
    labels = {"minimal": "minimal relay", "edgeproxy-1w": "edgeproxy-1w, the product"}
    summary: dict[str, dict] = {}
    raw: dict[str, dict] = {}
    try:
        mock.start()
        started.append(mock)
        product = targets.Edgeproxy(mock, "1")
        key = product.create_key()
        minimal = targets.Minimal(mock, key)
        variants = [Ablated(mock, *v) for v in VARIANTS]
        for target in (minimal, product, *variants):
            if isinstance(target, targets.Edgeproxy) and not target.key:
                target.create_key()  # each its own database and key
            target.start()
            started.append(target)
        labels |= {v.name: v.label for v in variants}
        for mode in ("json", "sse"):
            group = [minimal, product, *(v for v in variants if mode in v.modes)]
            raw[mode] = measure(mode, group, args)
            summary[mode] = summarise(raw[mode])
    finally:
        for target in reversed(started):
            target.stop()
    header = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "git": run.git_state(),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
    }
    text = write_report(summary, labels, header)
    targets.save_results("ablation", text, {"header": header, "summary": summary, "rounds": raw})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

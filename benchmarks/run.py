"""Issue 7's benchmark suite, one command: ``.venv/bin/python benchmarks/run.py [--quick]``.

1. Starts the nginx mock upstream (``direct``) and the targets on free 127.0.0.1 ports:
   ``nginx-proxy``, ``minimal`` (minimal_relay.py), ``edgeproxy-1w`` and ``edgeproxy-auto``
   (relay.bench.yaml: auth with a created key, metering, /metrics on); records the time
   to the first 200 on /healthz and the idle RSS of each process tree.
2. Warms every target up, then runs wrk for JSON and SSE at 1, 16 and 64 connections,
   targets interleaved per scenario so a noisy neighbour hurts all of them alike.
3. Times the first SSE event at 1 connection (``loadgen.first_event_latencies``), reads
   RSS after load, stops the targets and checks the ledger metered what clients got.
4. Runs the slow-streams test (``slow_streams.run_test``).
5. Writes results/latest.json and results/latest.md and prints the table.

Everything listens on 127.0.0.1, every run is bounded, every process is stopped by PID
(``targets.Process.stop``) in ``finally``, on SIGTERM/SIGINT and on the overall deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time

import loadgen
import mock_bodies
import report
import slow_streams
import targets

RESULTS = os.path.join(targets.HERE, "results")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="edgeproxy benchmark suite (benchmarks/README.md)")
    p.add_argument(
        "--quick", action="store_true", help="about a minute: 1 s runs, 1,000 slow streams"
    )
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 5, quick 1)")
    p.add_argument(
        "--warmup", type=float, help="seconds of warm-up per target and mode (default 2, quick 1)"
    )
    p.add_argument(
        "--rounds", type=int, help="repeat every wrk run; the median is kept (default 3, quick 1)"
    )
    p.add_argument(
        "--ready-trials",
        type=int,
        help="starts per target for the time to ready (default 3, quick 1)",
    )
    p.add_argument(
        "--wrk-threads", type=int, default=1, help="wrk threads (never more than connections)"
    )
    p.add_argument(
        "--ttfe-count",
        type=int,
        help="sequential requests for the first SSE event (default 500, quick 100)",
    )
    p.add_argument(
        "--slow-count", type=int, help="concurrent slow streams (default 10000, quick 1000)"
    )
    p.add_argument(
        "--slow-workers",
        default=None,
        help='comma list of worker settings for the slow test (default "1,auto", quick "1")',
    )
    p.add_argument("--no-slow", action="store_true", help="skip the slow-streams test")
    p.add_argument(
        "--deadline", type=float, default=1800, help="abort the whole run after this many seconds"
    )
    args = p.parse_args()
    args.duration = args.duration or (1.0 if args.quick else 5.0)
    args.warmup = args.warmup or (1.0 if args.quick else 2.0)
    args.ttfe_count = args.ttfe_count or (100 if args.quick else 500)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.ready_trials = args.ready_trials or (1 if args.quick else 3)
    args.slow_count = args.slow_count or (1000 if args.quick else 10_000)
    args.slow_workers = (args.slow_workers or ("1" if args.quick else "1,auto")).split(",")
    return args  # fmt: skip


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def git_state() -> str:
    """The commit measured, and whether edgeproxy/ had uncommitted changes (a shared tree)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, cwd=targets.ROOT
        )
        return done.stdout.strip()

    try:
        head, dirty = (
            git("rev-parse", "--short", "HEAD"),
            git("status", "--porcelain", "--", "edgeproxy"),
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return head + (" + uncommitted edgeproxy/ changes" if dirty else "")


def environment() -> dict:
    def out(cmd: list[str]) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=targets.ROOT)
            return (done.stdout + done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    cpu_model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "nginx": out(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": " ".join(out(["wrk", "-v"]).split()[:2]),
        "git": git_state(),
        "nofile": slow_streams.raise_nofile(),
        "loadavg_before": loadavg(),
    }


def median_run(runs: list[loadgen.WrkResult]) -> dict:
    ordered = sorted(runs, key=lambda r: r.rps)
    chosen = ordered[(len(ordered) - 1) // 2].to_json()
    if len(runs) > 1:
        chosen["rounds_rps"] = [r.rps for r in runs]
    return chosen


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started: list[targets.Target] = []
        self.results: dict = {"notes": []}
        self.body_files: dict[str, str] = {}
        self.client_requests: dict[str, int] = {}

    def key_for(self, target: targets.Target) -> str:
        return target.key if isinstance(target, targets.Edgeproxy) else self.key

    def start(self) -> list[targets.Target]:
        os.makedirs(targets.WORK, exist_ok=True)
        for mode, model in targets.MODELS.items():
            path = os.path.join(targets.WORK, f"request-{mode}.json")
            with open(path, "wb") as f:
                f.write(mock_bodies.request_body(model, stream=mode == "sse"))
            self.body_files[mode] = path
        self.mock = targets.Mock()
        self._start(self.mock)
        one = targets.Edgeproxy(self.mock, "1")
        auto = targets.Edgeproxy(self.mock, "auto", name="edgeproxy-auto")
        self.key = one.create_key()
        auto.create_key()
        # The baselines check the same secret the product issued, so auth costs are alike.
        chosen = [
            self.mock,
            targets.NginxProxy(self.mock, self.key),
            targets.Minimal(self.mock, self.key),
            one,
            auto,
        ]
        ready: dict[str, list[float]] = {}
        for target in chosen[1:]:
            for _ in range(self.args.ready_trials - 1):  # earlier starts: only timed
                target.start()
                ready.setdefault(target.name, []).append(target.ready_s)
                target.stop()
            self._start(target)
        time.sleep(1.0)  # let start-up garbage settle before the idle reading
        self.results["ready_s"] = {}
        for t in chosen:
            trials = [*ready.get(t.name, []), t.ready_s]
            self.results["ready_s"][t.name] = round(statistics.median(trials), 4)
            self.results.setdefault("ready_trials_s", {})[t.name] = [round(x, 4) for x in trials]
        self.results["memory"] = {t.name: {"idle": t.memory().to_json()} for t in chosen}
        for t in (one, auto):
            if t.metrics_status() != 200:
                self.results["notes"].append(f"{t.name}: /metrics did not answer 200")
        return chosen

    def _start(self, target: targets.Target) -> None:
        target.start()
        self.started.append(target)
        log(f"started {target.name} on :{target.port}, ready in {target.ready_s * 1000:.0f} ms")

    def wrk(
        self, target: targets.Target, mode: str, conns: int, seconds: float
    ) -> loadgen.WrkResult:
        pid = target.proc.pid if target.proc is not None else None
        cpu0 = targets.cpu_seconds(pid) if pid else 0.0
        result = loadgen.run_wrk(
            target.url(mode), self.body_files[mode], self.key_for(target),
            connections=conns, duration_s=seconds, threads=self.args.wrk_threads,
        )  # fmt: skip
        if pid and result.requests:
            # CPU time (user + system, the whole process tree) per completed request: on a
            # shared 2-core machine steadier than req/s, which moves with whatever else runs
            spent = targets.cpu_seconds(pid) - cpu0
            result.cpu_us_per_request = round(spent / result.requests * 1e6, 1)
        self.client_requests[target.name] = (
            self.client_requests.get(target.name, 0) + result.requests
        )
        if result.error_count:
            self.results["errors"][target.name] = (
                self.results["errors"].get(target.name, 0) + result.error_count
            )
        return result

    def load(self, chosen: list[targets.Target]) -> None:
        self.results["errors"] = {}
        for target in chosen:
            for mode in report.MODES:
                self.wrk(target, mode, 16, self.args.warmup)
        log(f"warmed up ({loadavg()})")
        wrk: dict = {t.name: {m: {} for m in report.MODES} for t in chosen}
        for mode in report.MODES:
            for conns in report.CONNECTIONS:
                runs: dict[str, list[loadgen.WrkResult]] = {t.name: [] for t in chosen}
                for _ in range(self.args.rounds):
                    for target in chosen:
                        runs[target.name].append(self.wrk(target, mode, conns, self.args.duration))
                line = []
                for target in chosen:
                    wrk[target.name][mode][str(conns)] = median_run(runs[target.name])
                    line.append(f"{target.name} {wrk[target.name][mode][str(conns)]['rps']:,.0f}")
                log(f"{mode} {conns:>2} conn req/s: " + ", ".join(line))
        self.results["wrk"] = wrk

    def first_event(self, chosen: list[targets.Target]) -> None:
        """Time to the first SSE event, in ``--rounds`` interleaved rounds (as the wrk runs
        are), so that a noisy minute on this shared machine falls on every target alike."""
        body = mock_bodies.request_body(targets.MODELS["sse"], stream=True)
        rounds = max(1, self.args.rounds)
        per_round = max(1, self.args.ttfe_count // rounds)
        samples: dict[str, list[float]] = {target.name: [] for target in chosen}
        for _ in range(rounds):
            for target in chosen:
                samples[target.name] += loadgen.first_event_latencies(
                    targets.HOST,
                    target.port,
                    target.path("sse"),
                    body,
                    self.key_for(target),
                    count=per_round,
                )
                self.client_requests[target.name] += per_round + 20  # + the client's warm-up
        ttfe = {}
        for target in chosen:
            got = samples[target.name]
            ttfe[target.name] = {
                "count": len(got),
                "p50_ms": round(loadgen.percentile(got, 50), 4),
                "p99_ms": round(loadgen.percentile(got, 99), 4),
                "mean_ms": round(statistics.fmean(got), 4),
            }
            log(f"first SSE event {target.name}: p50 {ttfe[target.name]['p50_ms']:.3f} ms")
        self.results["first_event"] = ttfe

    def after_load(self, chosen: list[targets.Target]) -> None:
        time.sleep(1.0)
        for target in chosen:
            self.results["memory"][target.name]["after_load"] = target.memory().to_json()
        metered = {}
        for target in chosen:
            if target is self.mock:
                continue
            target.stop()
            if isinstance(target, targets.Edgeproxy):
                metered[target.name] = {
                    "ledger": ledger_requests(target),
                    "clients": self.client_requests[target.name],
                }
        self.results["metered"] = metered

    def slow(self) -> None:
        runs = []
        for workers in self.args.slow_workers:
            result = slow_streams.run_test(self.mock, workers, self.args.slow_count, log=log)
            runs.append(result)
            log(
                f"slow streams ({workers} worker setting): {result.get('kb_per_stream')} KB each, {result['dropped']} dropped"
            )
            errors = result.get("client", {}).get("errors")
            if errors:
                listed = ", ".join(f"{n} × {why}" for why, n in errors.items())
                self.results["notes"].append(
                    f"slow streams with workers: {workers}: failures: {listed}."
                )
            if result.get("capped_because"):
                self.results["notes"].append(
                    f"slow streams with workers: {workers}: count capped at {result['count']:,}: {result['capped_because']}."
                )
        self.results["slow_streams"] = runs  # fmt: skip

    def stop(self) -> None:
        for target in reversed(self.started):
            try:
                target.stop()
            except Exception as exc:  # keep stopping the others
                log(f"stopping {target.name}: {exc}")


def ledger_requests(target: targets.Edgeproxy) -> int:
    """Requests the stopped relay's ledger holds (it flushes on SIGTERM)."""
    done = subprocess.run(
        [targets.EDGEPROXY, "-c", targets.BENCH_CONFIG, "usage", "--json"],
        env={**os.environ, **target.env}, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(done.stdout)["total"]["requests"]


def _abort(signum: int, frame: object) -> None:
    # Once: a second signal (``timeout`` passes its TERM on after ours, Ctrl-C twice) must
    # not interrupt the ``finally`` that is stopping the targets.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
        signal.signal(sig, signal.SIG_IGN)
    raise SystemExit(f"stopped by signal {signum}")


def _deadline(signum: int, frame: object) -> None:
    raise TimeoutError("the run passed its --deadline")


def compile_bytecode() -> None:
    """Byte-compile edgeproxy's modules, as installing a package does: an editable checkout
    run with PYTHONDONTWRITEBYTECODE set (as on this VM) compiles every module from source
    at every start, about 80 ms more per process than a deployed relay spends."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", os.path.join(targets.ROOT, "edgeproxy")],
        check=True,
        timeout=120,
    )


def main() -> int:
    args = parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            log(f"{tool} is not installed: apt-get install -y nginx wrk")
            return 2
    signal.signal(signal.SIGTERM, _abort)
    signal.signal(signal.SIGINT, _abort)
    signal.signal(signal.SIGALRM, _deadline)
    signal.alarm(int(args.deadline))
    compile_bytecode()
    suite = Suite(args)
    suite.results["environment"] = environment()
    suite.results["settings"] = {
        "quick": args.quick, "duration_s": args.duration, "warmup_s": args.warmup, "rounds": args.rounds,
        "ready_trials": args.ready_trials,
        "wrk_threads": args.wrk_threads, "ttfe_count": args.ttfe_count,
        "slow_count": args.slow_count, "slow_workers": args.slow_workers,
    }  # fmt: skip
    try:
        chosen = suite.start()
        suite.results["targets"] = [t.name for t in chosen]
        suite.load(chosen)
        suite.first_event(chosen)
        suite.after_load(chosen)
        if not args.no_slow:
            suite.slow()
    finally:
        suite.stop()
        signal.alarm(0)
    suite.results["environment"]["loadavg_after"] = loadavg()
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "latest.json"), "w") as f:
        json.dump(suite.results, f, indent=1)
        f.write("\n")
    text = report.render(suite.results)
    with open(os.path.join(RESULTS, "latest.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

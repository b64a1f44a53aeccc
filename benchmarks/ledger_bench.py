"""Sustained throughput of the usage ledger (``edgeproxy.ledger.Ledger``), alone.

    .venv/bin/python benchmarks/ledger_bench.py [--seconds 5] [--db PATH] [--prefill N]

For each scenario (commit interval, offered records/s, worker processes, and whether the
event loop is otherwise idle or pegged) this feeds realistic ``UsageRecord``s to
``Ledger.record()`` on a uvloop loop, as a worker's ``log_request`` does, and measures:

- accepted/s: records ``record()`` took (none may be dropped);
- committed/s: records committed within the measured window. The writer keeps up when
  nothing was dropped and at most interval + 0.5 s worth of records is queued as the
  window ends (``keeps up``);
- commit latency p50/p99/max: from ``record()`` to the commit that holds the record. It
  includes the deliberate batching wait (``interval_s``); SPEC §4 allows 200 ms;
- max queue depth, mean rows per commit, and the worst event-loop lag, which every
  request in flight on that worker would feel.

Alone, once: the writer's ceiling (100k records queued at once, idle loop) with the CPU
the process spends per committed row, and what one ``record()`` call costs its caller.

Commits are observed through ``Ledger.pending`` only (a 1 ms poller: committed = records
given - pending), so latencies carry up to ~1 ms of polling error. Every scenario starts
from a copy of the same database: empty, or ``--prefill N`` rows (months of usage). The
base file is new (a temporary directory, or ``--db PATH``, which must not exist yet: the
benchmark never writes into a real ledger). Results go to a table on stdout and to
``benchmarks/results/ledger.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import multiprocessing
import os
import platform
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

try:  # a checkout without `pip install -e .`: import the package next to benchmarks/
    from edgeproxy import db
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from edgeproxy import db
from edgeproxy.context import new_id  # the relay's ids: a random per-process prefix + a counter
from edgeproxy.db import Ledger, UsageRecord
from edgeproxy.ledger import _INSERT_USAGE, _usage_row  # the prefill writes rows the same way

RESULTS = Path(__file__).resolve().parent / "results" / "ledger.json"
# The relay's target: a few thousand requests per second per node, every one a ledger
# row. 5000/s is the upper end of "a few thousand".
TARGET_RPS = 5000
KEYS = 200  # keys whose spent_usd the commits raise
MODELS = [("gpt-4o-mini", 0.15, 0.60), ("gpt-5-mini", 1.25, 10.0), ("claude-sonnet-4", 3.0, 15.0)]
ENDPOINTS = ["/v1/chat/completions"] * 8 + ["/v1/messages", "/v1/embeddings"]
BURST = 100_000  # the ceiling test: this many records queued at once (max_queue is 100k)


@dataclass(frozen=True)
class Scenario:
    """``rate`` records/s in all, split over ``workers`` processes, each with its own
    ``Ledger`` on the one database file, as ``workers: N`` runs. ``interval_s`` sets the
    batch size (rate x interval). ``busy`` keeps each event loop ~100% on the CPU, as in a
    worker at full load: aiosqlite's thread must then win the GIL from it."""

    name: str
    interval_s: float
    rate: int
    busy: bool = False
    workers: int = 1


SCENARIOS = [
    Scenario("idle loop 1k/s", 0.2, 1_000),
    Scenario("idle loop 5k/s", 0.2, 5_000),
    Scenario("idle loop 20k/s", 0.2, 20_000),
    Scenario("small batches 5k/s", 0.02, 5_000),
    Scenario("large batches 5k/s", 1.0, 5_000),
    Scenario("busy loop 2k/s", 0.2, 2_000, busy=True),
    Scenario("busy loop 5k/s", 0.2, 5_000, busy=True),
    Scenario("busy loop 10k/s", 0.2, 10_000, busy=True),
    Scenario("2 workers 5k/s", 0.2, 5_000, workers=2),
    Scenario("4 workers 10k/s", 0.2, 10_000, workers=4),
    Scenario("4 workers 20k/s", 0.2, 20_000, workers=4),
]


@dataclass
class Result:
    scenario: str
    interval_s: float
    offered_per_s: int
    busy_loop: bool
    workers: int
    seconds: float
    accepted_per_s: float
    committed_per_s: float  # committed inside the window / window; ~ accepted when it keeps up
    keeps_up: bool  # nothing dropped, and at the end at most interval + 0.5 s of records queued
    drain_s: float
    dropped: int
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    max_queue: int  # the deepest queue of any one worker
    mean_rows_per_commit: float
    loop_lag_p99_ms: float
    loop_lag_max_ms: float


@dataclass
class Measured:
    """One process's raw figures."""

    accepted: int
    committed_in_window: int
    elapsed: float
    drain_s: float
    dropped: int
    commits: int
    max_queue: int
    latencies: list[float]
    lags: list[float]


class Feed:
    """Realistic records: varied keys, models, endpoints, token counts and costs. Ids are
    the relay's own (``new_id``); a share ``client_ids`` of requests carry a random uuid4
    as ``request_id`` instead, as when clients send their own ``x-request-id``."""

    def __init__(
        self, key_ids: list[tuple[int, str]], rng: random.Random, client_ids: float = 0.0
    ) -> None:
        self.rng, self.client_ids = rng, client_ids
        self.templates = []
        for _ in range(4096):
            key_id, key_name = rng.choice(key_ids)
            model, inp, out = rng.choice(MODELS)
            prompt = int(rng.lognormvariate(6.5, 1.2))  # median ~660 tokens, a long tail
            completion = int(rng.lognormvariate(5, 1.0))
            cached = rng.choice([0, 0, 0, prompt // 2])
            cost = ((prompt - cached) * inp + cached * inp / 2 + completion * out) / 1e6
            status = rng.choices([200, 429, 502, 499], [95, 2, 1, 2])[0]
            self.templates.append(
                (key_id, key_name, model, rng.choice(["openai", "backup"]),
                 rng.choice(ENDPOINTS), status, rng.choice([1, 1, 1, 2]),
                 round(rng.uniform(200, 20_000), 3), round(rng.uniform(50, 900), 3),
                 prompt, completion, cached, cost if status == 200 else 0.0, status == 499)
            )  # fmt: skip
        self.i = 0

    def request_id(self) -> str:
        if self.client_ids and self.rng.random() < self.client_ids:
            return uuid.uuid4().hex
        return new_id()

    def next(self) -> UsageRecord:
        t = self.templates[self.i & 4095]
        self.i += 1
        return UsageRecord(
            record_id=new_id(), request_id=self.request_id(), ts=time.time(), key_id=t[0], key_name=t[1],
            model=t[2], upstream=t[3], endpoint=t[4], status=t[5], attempts=t[6],
            latency_ms=t[7], ttfb_ms=t[8], prompt_tokens=t[9], completion_tokens=t[10],
            cached_tokens=t[11], cost_usd=t[12], estimated=t[13],
        )  # fmt: skip


def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class Probe:
    """A 1 ms poller on the loop: commits seen through ``pending``, queue depth, loop lag."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.enqueued_at: list[float] = []
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.committed = self.commits = self.max_queue = 0
        self.task = asyncio.create_task(self._poll())

    def give(self, feed: Feed, n: int) -> None:
        for _ in range(n):
            rec = feed.next()
            self.enqueued_at.append(time.perf_counter())
            self.ledger.record(rec)

    async def _poll(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.lags.append(now - before - 0.001)
            committed = len(self.enqueued_at) - self.ledger.pending
            if committed > self.committed:
                self.latencies.extend(now - t for t in self.enqueued_at[self.committed : committed])
                self.committed = committed
                self.commits += 1
            self.max_queue = max(self.max_queue, self.ledger.pending)

    async def drained(self) -> float:
        """Seconds until the writer has committed everything given."""
        t0 = time.perf_counter()
        while self.ledger.pending:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.003)  # one more poll, for the last latencies
        self.task.cancel()
        return time.perf_counter() - t0


async def burn(stop: asyncio.Event) -> None:
    """Keep the loop busy in Python, yielding every 2 ms, like a worker at full load."""
    while not stop.is_set():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.002:
            pass
        await asyncio.sleep(0)


async def measure(
    db_path: str, feed: Feed, sc: Scenario, seconds: float, start_at: float
) -> Measured:
    """One worker's share of a scenario: feed at rate / workers, from ``start_at`` (wall
    clock, so the workers of a scenario start together) for ``seconds``."""
    ledger = await Ledger.open(db_path, interval_s=sc.interval_s)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    probe = Probe(ledger)
    stop = asyncio.Event()
    burner = asyncio.create_task(burn(stop)) if sc.busy else None
    rate = sc.rate / sc.workers
    start = time.perf_counter()
    while (now := time.perf_counter()) < start + seconds:
        probe.give(feed, int((now - start) * rate) - len(probe.enqueued_at))
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - start
    accepted, committed_in_window = len(probe.enqueued_at), probe.committed
    stop.set()
    if burner is not None:
        await burner
    drain_s = await probe.drained()
    dropped = ledger.dropped
    await ledger.close()
    return Measured(
        accepted, committed_in_window, elapsed, drain_s, dropped, probe.commits,
        probe.max_queue, probe.latencies, probe.lags,
    )  # fmt: skip


def measure_in_process(
    db_path: str, key_ids: list[tuple[int, str]], seed: int, sc: Scenario, seconds: float,
    start_at: float, client_ids: float,
) -> Measured:  # fmt: skip
    import uvloop  # as the server runs: only where the loop starts

    logging.basicConfig(level=logging.WARNING, format=f"worker {seed}: %(message)s")
    feed = Feed(key_ids, random.Random(seed), client_ids)
    return uvloop.run(measure(db_path, feed, sc, seconds, start_at))


def run_scenario(
    db_path: str, key_ids: list[tuple[int, str]], sc: Scenario, seconds: float,
    client_ids: float,
) -> Result:  # fmt: skip
    """Each worker in its own process (spawned, so nothing is shared but the file)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(sc.workers) as pool:
        start_at = time.time() + 1.0 + 0.3 * sc.workers  # after every process has started
        jobs = [
            pool.apply_async(
                measure_in_process, (db_path, key_ids, i, sc, seconds, start_at, client_ids)
            )
            for i in range(sc.workers)
        ]
        # A writer that stops committing must fail the run, not hang it.
        parts: list[Measured] = [job.get(timeout=seconds + 120) for job in jobs]
    elapsed = max(p.elapsed for p in parts)
    accepted = sum(p.accepted for p in parts)
    latencies = [x for p in parts for x in p.latencies]
    lags = [x for p in parts for x in p.lags]
    drain_s = max(p.drain_s for p in parts)
    backlog = accepted - sum(p.committed_in_window for p in parts)  # queued as the window ends
    dropped = sum(p.dropped for p in parts)
    ms = 1000
    return Result(
        scenario=sc.name, interval_s=sc.interval_s, offered_per_s=sc.rate, busy_loop=sc.busy,
        workers=sc.workers, seconds=round(elapsed, 3), accepted_per_s=round(accepted / elapsed),
        committed_per_s=round(sum(p.committed_in_window for p in parts) / elapsed),
        keeps_up=dropped == 0 and backlog <= sc.rate * (sc.interval_s + 0.5),
        drain_s=round(drain_s, 3),
        dropped=dropped, latency_p50_ms=round(percentile(latencies, 50) * ms, 1),
        latency_p99_ms=round(percentile(latencies, 99) * ms, 1),
        latency_max_ms=round(max(latencies, default=math.nan) * ms, 1),
        max_queue=max(p.max_queue for p in parts),
        mean_rows_per_commit=round(accepted / max(1, sum(p.commits for p in parts)), 1),
        loop_lag_p99_ms=round(percentile(lags, 99) * ms, 1),
        loop_lag_max_ms=round(max(lags, default=math.nan) * ms, 1),
    )  # fmt: skip


async def ceiling(db_path: str, feed: Feed) -> dict[str, float]:
    """The writer alone: BURST records queued at once, the loop otherwise idle. Rows per
    second until all are committed, and the CPU the process spent per committed row."""
    ledger = await Ledger.open(db_path)
    records = [feed.next() for _ in range(BURST)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for rec in records:
        ledger.record(rec)
    while ledger.pending:
        await asyncio.sleep(0.001)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    await ledger.close()
    return {
        "rows": BURST,
        "rows_per_s": round(BURST / wall),
        "cpu_us_per_row": round(cpu / BURST * 1e6, 2),
    }


async def baseline_lag(seconds: float = 1.0) -> float:
    """The loop lag of the 1 ms poller with no ledger at all (the floor of the lag columns)."""
    lags = []
    end = time.perf_counter() + seconds
    while (before := time.perf_counter()) < end:
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - before - 0.001)
    return round(percentile(lags, 99) * 1000, 2)


def record_cost_us(db_path: str, n: int = 200_000) -> float:
    """What one ``record()`` call costs the loop: validate a built record, queue its row."""

    async def measure() -> float:
        ledger = await Ledger.open(db_path, interval_s=3600, max_queue=n + 1)
        feed = Feed([(1, "k")], random.Random(1))
        records = [feed.next() for _ in range(n)]
        t0 = time.perf_counter()
        for rec in records:
            ledger.record(rec)
        per_call = (time.perf_counter() - t0) / n * 1e6
        await ledger.close()  # commits them all, outside the measured part
        return per_call

    return asyncio.run(measure())


def prefill(db_path: str, n: int, feed: Feed) -> None:
    """N rows spread over the last 400 days, written in big transactions; then a checkpoint,
    so the file alone holds everything and can be copied."""
    now, rng = time.time(), random.Random(7)
    with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        for start in range(0, n, 100_000):
            rows = []
            for _ in range(min(100_000, n - start)):
                rec = feed.next()
                rec.ts = now - rng.uniform(0, 400 * 86400)
                rows.append(_usage_row(rec))
            conn.execute("BEGIN")
            conn.executemany(_INSERT_USAGE, rows)
            conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def fmt(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def print_table(results: list[Result]) -> None:
    cols = [
        ("scenario", "scenario", "<"), ("interval", "interval_s", ">"),
        ("offered/s", "offered_per_s", ">"), ("accepted/s", "accepted_per_s", ">"),
        ("committed/s", "committed_per_s", ">"), ("keeps up", "keeps_up", ">"),
        ("drain s", "drain_s", ">"), ("p50 ms", "latency_p50_ms", ">"),
        ("p99 ms", "latency_p99_ms", ">"), ("max ms", "latency_max_ms", ">"),
        ("max queue", "max_queue", ">"), ("rows/commit", "mean_rows_per_commit", ">"),
        ("lag p99 ms", "loop_lag_p99_ms", ">"), ("lag max ms", "loop_lag_max_ms", ">"),
    ]  # fmt: skip
    cells = [[h for h, _, _ in cols]]
    for r in results:
        d = asdict(r)
        cells.append([fmt(d[k]) for _, k, _ in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print(
            "  ".join(
                c.ljust(w) if a == "<" else c.rjust(w)
                for c, w, (_, _, a) in zip(row, widths, cols, strict=True)
            )
        )


def remove(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


def fresh_copy(base: str, run: str) -> str:
    """Each scenario starts from the same table: a copy of the checkpointed base file."""
    remove(run)
    shutil.copyfile(base, run)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per scenario (default 5)")
    parser.add_argument("--db", help="benchmark database path; must not exist (default: temp)")
    parser.add_argument("--prefill", type=int, default=0, help="rows in the table at the start")
    parser.add_argument(
        "--client-ids", type=float, default=0.0,
        help="share of requests whose request_id is a client's random uuid4 (default 0)",
    )  # fmt: skip
    parser.add_argument("--only", default="", help="run the scenarios whose name has this")
    parser.add_argument("--out", default=str(RESULTS), help=f"JSON results (default {RESULTS})")
    args = parser.parse_args(argv)
    load_at_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp:
        base = args.db or os.path.join(tmp, "ledger.db")
        if os.path.exists(base):
            parser.error(f"--db {base} exists; give a new path (a real ledger is never used)")
        run = base + ".run"
        db.init_db(base)
        key_ids = [(db.create_key(base, f"key-{i}")[0].id, f"key-{i}") for i in range(KEYS)]
        feed = Feed(key_ids, random.Random(20250101), args.client_ids)
        t0 = time.perf_counter()
        prefill(base, args.prefill, feed)
        if args.prefill:
            print(f"prefilled {args.prefill} rows in {time.perf_counter() - t0:.1f}s")
        record_us = record_cost_us(os.path.join(tmp, "record-cost.db"))
        import uvloop  # as the server runs: only where the loop starts

        lag_floor_ms = uvloop.run(baseline_lag())
        top = uvloop.run(ceiling(fresh_copy(base, run), feed))
        print(f"  writer ceiling: {top['rows_per_s']} rows/s", file=sys.stderr)
        size = sum(os.path.getsize(p) for p in (run, run + "-wal") if os.path.exists(p))
        bytes_per_row = size / (args.prefill + BURST)
        results = []
        for sc in SCENARIOS:
            if args.only in sc.name:
                run_db = fresh_copy(base, run)
                results.append(run_scenario(run_db, key_ids, sc, args.seconds, args.client_ids))
                print(f"  {sc.name}: {results[-1].committed_per_s}/s committed", file=sys.stderr)
        remove(run)
    print_table(results)
    print(
        f"\nwriter ceiling (100k queued at once, idle loop): {top['rows_per_s']} rows/s,"
        f" {top['cpu_us_per_row']} us CPU per row; record() costs its caller {record_us:.2f} us;"
        f" loop lag p99 without a ledger {lag_floor_ms} ms; {bytes_per_row:.0f} bytes per row"
        f" on disk (indexes included); each scenario started with {args.prefill} rows"
    )
    out = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "loadavg_1m_at_start": load_at_start,  # other work on the machine skews results
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "platform": platform.platform(),
        },
        "seconds_per_scenario": args.seconds,
        "rows_at_start": args.prefill,
        "client_ids": args.client_ids,
        "target_rps": TARGET_RPS,
        "record_call_us": round(record_us, 3),
        "writer_ceiling": top,
        "loop_lag_p99_ms_without_ledger": lag_floor_ms,
        "bytes_per_row": round(bytes_per_row, 1),
        "results": [asdict(r) for r in results],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

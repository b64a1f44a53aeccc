"""The results of a run as one Markdown table, with Issue 7's targets marked met / not met.

Rows are measurements, columns the targets (direct, nginx-proxy, minimal, edgeproxy-1w,
edgeproxy-auto). The last rows are the targets, each in the column it judges.

It must not: measure anything. It reads the dict ``run.py`` writes to latest.json.
"""

from __future__ import annotations

from dataclasses import dataclass

COLUMNS = ("direct", "nginx-proxy", "minimal", "edgeproxy-1w", "edgeproxy-auto")
PRODUCT = ("edgeproxy-1w", "edgeproxy-auto")
CONNECTIONS = (1, 16, 64)
MODES = ("json", "sse")

# Issue 7's targets, all with auth, metering and metrics on.
GOAL_VS_MINIMAL = 1.2  # edgeproxy-1w req/s / minimal relay req/s
GOAL_VS_NGINX = {"json": 0.35, "sse": 0.3}  # edgeproxy-auto req/s / nginx-proxy req/s
GOAL_ADDED_MS = 0.3  # p50 at 1 connection minus direct's, JSON and first SSE event
GOAL_RSS_IDLE_MB = 45.0  # per worker
GOAL_RSS_LOADED_MB = 60.0  # per worker, after the load runs
GOAL_SLOW_STREAMS = 10_000
GOAL_SLOW_KB = 20.0  # RSS per open stream
GOAL_READY_S = 0.5


# Where the reasons are measured: a run's figures cannot say why a target was missed.
WHY_NOT_MET = (
    'Why a target is NOT MET: benchmarks/README.md, "Reading them"; for the req/s ratios '
    "with results/ablation.md (`benchmarks/ablation.py`), which prices each part of a "
    "request by switching it off in turn."
)


@dataclass
class Verdict:
    label: str
    column: str
    text: str  # the measured value, formatted
    met: bool | None  # None: not measured


def _run(results: dict, target: str, mode: str, conns: int) -> dict | None:
    return results.get("wrk", {}).get(target, {}).get(mode, {}).get(str(conns))


def rps(results: dict, target: str, mode: str, conns: int) -> float | None:
    run = _run(results, target, mode, conns)
    return run["rps"] if run else None


def added_ms(results: dict, target: str, mode: str) -> float | None:
    """p50 at 1 connection minus direct's: wrk's for JSON, the first-event client's for SSE."""
    if mode == "json":
        mine, direct = _run(results, target, "json", 1), _run(results, "direct", "json", 1)
        return mine["p50_ms"] - direct["p50_ms"] if mine and direct else None
    ttfe = results.get("first_event", {})
    if target in ttfe and "direct" in ttfe:
        return ttfe[target]["p50_ms"] - ttfe["direct"]["p50_ms"]
    return None


def _mb(kb: float | None) -> str:
    return "—" if kb is None else f"{kb / 1024:.1f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def verdicts(results: dict) -> list[Verdict]:
    out: list[Verdict] = []
    for mode in MODES:
        for conns in (16, 64):
            r = _ratio(
                rps(results, "edgeproxy-1w", mode, conns), rps(results, "minimal", mode, conns)
            )
            out.append(
                Verdict(
                    f"edgeproxy-1w ÷ minimal req/s, {mode.upper()} {conns} conn (≥ {GOAL_VS_MINIMAL}×)",
                    "edgeproxy-1w",
                    "—" if r is None else f"{r:.2f}×",
                    None if r is None else r >= GOAL_VS_MINIMAL,
                )
            )
    for mode in MODES:
        goal = GOAL_VS_NGINX[mode]
        r = _ratio(rps(results, "edgeproxy-auto", mode, 64), rps(results, "nginx-proxy", mode, 64))
        out.append(
            Verdict(
                f"edgeproxy-auto ÷ nginx-proxy req/s, {mode.upper()} 64 conn (≥ {goal}×)",
                "edgeproxy-auto",
                "—" if r is None else f"{r:.2f}×",
                None if r is None else r >= goal,
            )
        )
    for mode, what in (("json", "JSON"), ("sse", "to first SSE event")):
        for target in PRODUCT:
            ms = added_ms(results, target, mode)
            out.append(
                Verdict(
                    f"added latency {what}, 1 conn p50 (≤ {GOAL_ADDED_MS} ms)",
                    target,
                    f"{_ms(ms)} ms",
                    None if ms is None else ms <= GOAL_ADDED_MS,
                )
            )
    for when, goal in (("idle", GOAL_RSS_IDLE_MB), ("after_load", GOAL_RSS_LOADED_MB)):
        for target in PRODUCT:
            mem = results.get("memory", {}).get(target, {}).get(when)
            kb = mem["worker_max_kb"] if mem else None
            label = "idle" if when == "idle" else "after load"
            out.append(
                Verdict(
                    f"RSS per worker {label} (≤ {goal:.0f} MB)",
                    target,
                    f"{_mb(kb)} MB",
                    None if kb is None else kb / 1024 <= goal,
                )
            )
    for slow in results.get("slow_streams", []):
        column = "edgeproxy-1w" if slow["workers"] == "1" else "edgeproxy-auto"
        per = slow.get("kb_per_stream")
        dropped = slow.get("dropped")
        ramp = slow.get("ramp", {}).get("ramp_s")
        text = f"{slow['count']:,} streams: {'—' if per is None else f'{per:.1f}'} KB each, {dropped} dropped"
        text += f", plateau after {ramp:.0f} s" if ramp is not None else ", no plateau"
        if slow.get("capped_because"):
            text += " (count capped by ulimit -n)"
        met = (
            per is not None
            and per <= GOAL_SLOW_KB
            and dropped == 0
            and slow["count"] >= GOAL_SLOW_STREAMS
        )
        out.append(
            Verdict(
                f"{GOAL_SLOW_STREAMS:,} slow streams, ≤ {GOAL_SLOW_KB:.0f} KB RSS each, none dropped",
                column,
                text,
                met if per is not None else None,
            )
        )
    for target in PRODUCT:
        ready = results.get("ready_s", {}).get(target)
        out.append(
            Verdict(
                f"ready after start (≤ {GOAL_READY_S} s)",
                target,
                "—" if ready is None else f"{ready:.3f} s",
                None if ready is None else ready <= GOAL_READY_S,
            )
        )
    return out


def _mark(v: Verdict) -> str:
    if v.met is None:
        return f"{v.text} (not measured)"
    return f"{v.text} met" if v.met else f"{v.text} **NOT MET**"


def table(results: dict) -> str:
    cols = [c for c in COLUMNS if c in results.get("targets", COLUMNS)]
    rows: list[list[str]] = []

    def row(label: str, cells: dict[str, str]) -> None:
        rows.append([label] + [cells.get(c, "") for c in cols])

    for mode in MODES:
        for conns in CONNECTIONS:
            cells, lat = {}, {}
            for c in cols:
                run = _run(results, c, mode, conns)
                if run:
                    flag = " ⚠" if sum(run["errors"].values()) else ""
                    cells[c] = f"{run['rps']:,.0f}{flag}"
                    lat[c] = f"{_ms(run['p50_ms'])} / {_ms(run['p99_ms'])}"
            row(f"{mode.upper()} {conns} conn: req/s", cells)
            row(f"{mode.upper()} {conns} conn: p50 / p99 ms", lat)
            if conns == 16:
                cpu = {c: f"{run['cpu_us_per_request']:.0f}" for c in cols
                       if (run := _run(results, c, mode, conns)) and run.get("cpu_us_per_request")}  # fmt: skip
                row(f"{mode.upper()} {conns} conn: CPU µs per request", cpu)
    row(
        "added latency JSON, 1 conn p50 vs direct (ms)",
        {c: _ms(added_ms(results, c, "json")) for c in cols if c != "direct"},
    )
    ttfe = results.get("first_event", {})
    row(
        "first SSE event, 1 conn p50 / p99 (ms)",
        {c: f"{_ms(ttfe[c]['p50_ms'])} / {_ms(ttfe[c]['p99_ms'])}" for c in cols if c in ttfe},
    )
    row(
        "added latency to first SSE event, p50 vs direct (ms)",
        {c: _ms(added_ms(results, c, "sse")) for c in cols if c != "direct"},
    )
    mem = results.get("memory", {})
    for when, label in (("idle", "idle"), ("after_load", "after load")):
        row(
            f"RSS {label}, process tree (MB)",
            {c: _mb(mem[c][when]["total_kb"]) for c in cols if c in mem and when in mem[c]},
        )
    row(
        "RSS per worker idle / after load (MB)",
        {c: f"{_mb(mem[c]['idle']['worker_max_kb'])} / {_mb(mem[c]['after_load']['worker_max_kb'])}" for c in cols if c in mem and "after_load" in mem[c]},
    )  # fmt: skip
    ready = results.get("ready_s", {})
    row(
        "ready: start → first 200 on /healthz, median (ms)",
        {c: f"{ready[c] * 1000:.0f}" for c in cols if c in ready},
    )
    errors = results.get("errors", {})
    row("wrk errors (non-2xx, socket), all runs", {c: str(errors.get(c, 0)) for c in cols})
    metered = results.get("metered", {})
    row(
        "requests in the ledger / completed by clients",
        {c: f"{m['ledger']:,} / {m['clients']:,}" for c, m in metered.items() if c in cols},
    )
    rows.append(["**targets (Issue 7)**"] + [""] * len(cols))
    by_label: dict[str, dict[str, str]] = {}
    for v in verdicts(results):
        if v.column in cols:
            by_label.setdefault(v.label, {})[v.column] = _mark(v)
    for label, cells in by_label.items():
        row(label, cells)
    head = "| | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(r) + " |\n" for r in rows)


def render(results: dict) -> str:
    env = results.get("environment", {})
    cfg = results.get("settings", {})
    lines = [
        f"Run {env.get('date', '?')} on {env.get('cpus', '?')} CPUs ({env.get('cpu_model', '?')}), "
        f"load average {env.get('loadavg_before', '?')} before / {env.get('loadavg_after', '?')} after; "
        f"edgeproxy at {env.get('git', '?')}; Python {env.get('python', '?')}, {env.get('nginx', '?')}, "
        f"{env.get('wrk', '?')}.",
        f"Each wrk run {cfg.get('duration_s', '?')} s after {cfg.get('warmup_s', '?')} s of warm-up per mode, "
        f"{cfg.get('wrk_threads', '?')} wrk thread(s), targets interleaved per scenario, "
        f"{cfg.get('rounds', 1)} round(s) (median); first SSE event over {cfg.get('ttfe_count', '?')} "
        f"sequential requests in {cfg.get('rounds', 1)} interleaved round(s); ready time the median of {cfg.get('ready_trials', 1)} start(s)"
        f"{'; QUICK run' if cfg.get('quick') else ''}. ⚠ marks a run with errors.",
        "",
        table(results),
    ]
    notes = results.get("notes", [])
    if any(v.met is False for v in verdicts(results)):
        notes = [*notes, WHY_NOT_MET]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)

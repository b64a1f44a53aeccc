"""The soak and fault run (benchmarks/soak/soak.py), short: 60 streaming clients for 40 s
with upstream faults, client disconnects, a SIGHUP and a kill -9 + restart, then every
invariant of the full run (one usage record per authenticated request, overspend within
what is in flight, integrity_check, RSS and descriptors back to baseline).

The run is its own process tree (driver, fake upstream, relay), stopped by PID whatever
happens; its report goes to a temporary file, not to benchmarks/soak/results/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
def test_short_soak_keeps_every_invariant(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "soak" / "soak.py"), "--profile", "short",
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
    )  # fmt: skip
    try:
        printed, _ = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert out.with_suffix(".json").exists(), printed.decode(errors="replace")[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    failed = [name for name, ok in result["invariants"].items() if not ok]
    assert not failed, f"{failed}\n{out.with_suffix('.md').read_text()}\n{result['ledger']}"
    assert proc.returncode == 0
    # the run did what it says: load, faults, disconnects, a budget that ran out, a restart
    outcomes = result["outcomes"]
    assert outcomes["ok"] > 1000
    assert outcomes["stream_error_event"] > 0 and outcomes["client_disconnected"] > 0
    assert outcomes["http_429_insufficient_quota"] > 0
    assert sum(result["upstream"]["faults"].values()) > 50
    assert result["relay"]["end"]["pid"] != result["relay"]["start"]["pid"]

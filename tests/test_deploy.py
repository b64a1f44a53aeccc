"""The deployment artifacts: the single-file build, deploy/install.sh, the systemd unit, the
Prometheus scrape config and alert rules, and the Grafana dashboard.

The pyz is built once per session (scripts/build_pyz.sh, which pip-installs shiv and the
dependency wheels: PyPI or a pip cache is needed the first time) and then run the way an
operator runs it: ``python3 edgeproxy.pyz ...`` with an interpreter that has none of the
project's packages. Tools that may be missing on a developer machine (promtool,
systemd-analyze) are used when present; a pure-Python check of the same files always runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import zipapp
import zipfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from edgeproxy.metrics import Metrics
from tests.conftest import UPSTREAM_KEY, relay_dict, write_config
from tests.fakes import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BUILD = ROOT / "scripts" / "build_pyz.sh"
INSTALL = DEPLOY / "install.sh"
SECRET_LINE = re.compile(r"sk-[A-Za-z0-9_-]{40,}\n")

# Labels the metrics carry, plus what Prometheus adds (job, instance) and histogram buckets.
# A cold build downloads shiv and the dependency wheels; it happens in the first pyz test.
PYZ_TIMEOUT = pytest.mark.timeout(180)

KNOWN_LABELS = {"model", "upstream", "code", "kind", "outcome", "key", "le", "job", "instance"}


# --- the single file -------------------------------------------------------------------


def bare_python() -> str:
    """A python3 of this version without the venv's packages (edgeproxy is installed
    there), so the pyz must bring everything itself."""
    base = getattr(sys, "_base_executable", "") or sys.executable
    return base if os.path.exists(base) else sys.executable


@pytest.fixture(scope="session")
def shiv_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shiv")


@pytest.fixture(scope="session")
def pyz(tmp_path_factory: pytest.TempPathFactory, shiv_root: Path) -> Path:
    """dist/edgeproxy.pyz built from this tree into a session tmp dir."""
    probe = [sys.executable, "-m", "shiv", "--version"]
    if subprocess.run(probe, capture_output=True).returncode != 0:
        install = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "shiv>=1.0,<2"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if install.returncode != 0:
            pytest.skip(f"shiv cannot be installed here (needs PyPI): {install.stderr[-300:]}")
    out = tmp_path_factory.mktemp("dist") / "edgeproxy.pyz"
    env = os.environ | {"PYTHON": sys.executable}
    build = subprocess.run(
        ["bash", str(BUILD), "-o", str(out)], capture_output=True, text=True, env=env, timeout=600
    )
    assert build.returncode == 0, build.stdout + build.stderr
    # The first run extracts the dependencies into SHIV_ROOT; do it here, not in a timed test.
    first = run_pyz(out, shiv_root, "--version")
    assert first.returncode == 0, first.stderr
    return out


def run_pyz(
    pyz: Path, shiv_root: Path, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = pyz_env(shiv_root)
    return subprocess.run(
        [bare_python(), str(pyz), *args], capture_output=True, text=True, env=env, cwd=cwd,
        timeout=60,
    )  # fmt: skip


def pyz_env(shiv_root: Path) -> dict[str, str]:
    drop = {"EDGEPROXY_CONFIG", "EDGEPROXY_DATABASE", "PYTHONPATH", "VIRTUAL_ENV"}
    return {k: v for k, v in os.environ.items() if k not in drop} | {"SHIV_ROOT": str(shiv_root)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@PYZ_TIMEOUT
def test_pyz_version_and_check(pyz: Path, shiv_root: Path, tmp_path: Path) -> None:
    version = run_pyz(pyz, shiv_root, "--version")
    assert version.returncode == 0 and version.stdout.startswith("edgeproxy "), version

    config = write_config(tmp_path / "relay.yaml", relay_dict("http://127.0.0.1:9"))
    check = run_pyz(pyz, shiv_root, "-c", str(config), "check", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "fake-openai" in check.stdout and "Traceback" not in check.stderr

    bad = run_pyz(pyz, shiv_root, "check", cwd=tmp_path / "..")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr


@PYZ_TIMEOUT
def test_pyz_refuses_another_python_in_one_line(pyz: Path, tmp_path: Path) -> None:
    """The preamble names the mismatch instead of failing on a compiled extension."""
    with zipfile.ZipFile(pyz) as archive:
        preamble = archive.read("site-packages/bin/preamble.py").decode()
    built_for = f"({sys.version_info[0]}, {sys.version_info[1]}),"
    assert built_for in preamble
    other = tmp_path / "preamble.py"
    other.write_text(re.sub(r"BUILT_FOR = .*", 'BUILT_FOR = (2, 7), "pdp11"', preamble))
    result = subprocess.run([sys.executable, str(other)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("edgeproxy.pyz: built for Python 2.7 on pdp11, but this is")
    assert result.stderr.count("\n") == 1


@PYZ_TIMEOUT
async def test_pyz_serves_a_request_and_stops_on_sigterm(
    pyz: Path, shiv_root: Path, tmp_path: Path, fake: FakeUpstream
) -> None:
    port, metrics_port = free_port(), free_port()
    config = relay_dict(fake.url)
    config |= {"listen": f"127.0.0.1:{port}", "metrics_listen": f"127.0.0.1:{metrics_port}"}
    path = write_config(tmp_path / "relay.yaml", config)
    env = pyz_env(shiv_root)

    async def pyz_cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            bare_python(), str(pyz), "-c", str(path), *args, env=env, cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, secret, err = await pyz_cli("keys", "create", "alice")
    assert code == 0 and SECRET_LINE.fullmatch(secret), err
    key = secret.strip()

    log = (tmp_path / "serve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        bare_python(), str(pyz), "-c", str(path), "serve", env=env, cwd=tmp_path,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}"
            for _ in range(300):
                assert proc.returncode is None, (tmp_path / "serve.log").read_text()
                try:
                    async with http.get(f"{url}/healthz") as health:
                        if health.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            else:
                pytest.fail("no /healthz in 30 s: " + (tmp_path / "serve.log").read_text())

            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            headers = {"Authorization": f"Bearer {key}"}
            async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status == 200, await r.text()
                answer = await r.json()
            assert answer["choices"][0]["message"]["content"] == "Hello from the fake!"
            assert answer["usage"]["total_tokens"] == 18
            sent = fake.requests[-1]
            assert sent.path == "/v1/chat/completions"
            assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"

            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as m:
                metrics = await m.text()
            assert (
                'edgeproxy_requests_total{code="200",model="gpt-4o-mini",upstream="fake-openai"} 1.0'
                in metrics
            )

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 40) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
    served = (tmp_path / "serve.log").read_text()
    assert key not in served and UPSTREAM_KEY not in served
    code, usage, err = await pyz_cli("usage", "--json")
    assert code == 0, err
    assert json.loads(usage)["total"]["requests"] == 1


# --- deploy/install.sh -----------------------------------------------------------------


@pytest.fixture
def fake_pyz(tmp_path: Path) -> Path:
    """A tiny zipapp that answers --version like edgeproxy (install.sh runs it once)."""
    src = tmp_path / "fake-pyz"
    src.mkdir()
    (src / "__main__.py").write_text("import sys\nprint('edgeproxy 0.0-test')\n")
    out = tmp_path / "edgeproxy.pyz"
    zipapp.create_archive(src, out)
    return out


@pytest.fixture
def stubs(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """PATH stubs for the commands that would touch the host: they only log."""
    bin_dir = tmp_path / "stubs"
    bin_dir.mkdir()
    log = tmp_path / "stubs.log"
    for name in ("useradd", "chown", "systemctl", "getent"):
        exit_code = 2 if name == "getent" else 0  # getent: "no such user"
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit {exit_code}\n')
        script.chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    yield env, log


def install(prefix: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=60,
        env=env | {"EDGEPROXY_PREFIX": str(prefix)},
    )  # fmt: skip


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in sorted(root.rglob("*"))
    }


def test_install_dry_run_changes_nothing(
    tmp_path: Path, fake_pyz: Path, stubs: tuple[dict[str, str], Path]
) -> None:
    env, log = stubs
    prefix = tmp_path / "root"
    prefix.mkdir()
    result = install(prefix, env, "--dry-run", "--pyz", str(fake_pyz))
    assert result.returncode == 0, result.stderr
    assert list(prefix.iterdir()) == []
    assert log.read_text() == "getent passwd edgeproxy\n"  # looked, changed nothing
    out = result.stdout
    for planned in (
        "would run: useradd --system --user-group --home-dir /var/lib/edgeproxy",
        f"would run: install -m 0644 {fake_pyz} {prefix}/opt/edgeproxy/edgeproxy.pyz.new",
        f"would run: install -m 0640 {ROOT}/relay.yaml {prefix}/etc/edgeproxy/relay.yaml",
        f"would run: install -m 0600 {DEPLOY}/edgeproxy.env.example {prefix}/etc/edgeproxy/env",
        f"{prefix}/etc/systemd/system/edgeproxy.service",
        f"{prefix}/usr/local/bin/edgeproxy",
        "skipped: systemctl daemon-reload",
        "dry run done: nothing was changed",
    ):
        assert planned in out, (planned, out)


def test_install_is_idempotent_and_never_overwrites_config_or_env(
    tmp_path: Path, fake_pyz: Path, stubs: tuple[dict[str, str], Path]
) -> None:
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("install.sh checks the pyz on /usr/bin/python3, which is missing here")
    env, log = stubs
    prefix = tmp_path / "root"
    first = install(prefix, env, "--pyz", str(fake_pyz))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "checked: edgeproxy 0.0-test runs on Python 3" in first.stdout
    modes = tree(prefix)
    assert modes["opt/edgeproxy/edgeproxy.pyz"] == "0o644"
    assert modes["etc/edgeproxy"] == "0o750"
    assert modes["etc/edgeproxy/relay.yaml"] == "0o640"
    assert modes["etc/edgeproxy/env"] == "0o600"
    assert modes["var/lib/edgeproxy"] == "0o750"
    assert modes["usr/local/bin/edgeproxy"] == "0o755"
    assert (prefix / "etc/systemd/system/edgeproxy.service").read_bytes() == (
        DEPLOY / "edgeproxy.service"
    ).read_bytes()
    assert (prefix / "etc/edgeproxy/relay.yaml").read_bytes() == (ROOT / "relay.yaml").read_bytes()
    calls = log.read_text()
    assert "useradd --system --user-group" in calls
    assert f"chown root:edgeproxy {prefix}/etc/edgeproxy/relay.yaml" in calls
    assert f"chown edgeproxy:edgeproxy {prefix}/var/lib/edgeproxy" in calls
    assert "systemctl" not in calls  # never the host's systemd under a prefix

    (prefix / "etc/edgeproxy/relay.yaml").write_text("# mine\n")
    (prefix / "etc/edgeproxy/env").write_text("OPENAI_API_KEY=sk-mine\n")
    again = install(prefix, env, "--pyz", str(fake_pyz))
    assert again.returncode == 0, again.stdout + again.stderr
    assert (prefix / "etc/edgeproxy/relay.yaml").read_text() == "# mine\n"
    assert (prefix / "etc/edgeproxy/env").read_text() == "OPENAI_API_KEY=sk-mine\n"
    assert f"kept: {prefix}/etc/edgeproxy/relay.yaml exists" in again.stdout
    assert f"unchanged: {prefix}/opt/edgeproxy/edgeproxy.pyz" in again.stdout
    assert tree(prefix) == modes

    # An upgrade replaces the pyz (atomically, via a .new file) and nothing else.
    newer = tmp_path / "newer.pyz"
    shutil.copy(fake_pyz, newer)
    with zipfile.ZipFile(newer, "a") as z:
        z.writestr("VERSION", "2")
    upgrade = install(prefix, env, "--pyz", str(newer))
    assert upgrade.returncode == 0, upgrade.stderr
    assert (prefix / "opt/edgeproxy/edgeproxy.pyz").read_bytes() == newer.read_bytes()
    assert (prefix / "etc/edgeproxy/relay.yaml").read_text() == "# mine\n"


def test_install_refuses_a_pyz_that_does_not_run(
    tmp_path: Path, stubs: tuple[dict[str, str], Path]
) -> None:
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("install.sh checks the pyz on /usr/bin/python3, which is missing here")
    env, _ = stubs
    src = tmp_path / "broken"
    src.mkdir()
    (src / "__main__.py").write_text(
        "import sys\nsys.exit('edgeproxy.pyz: built for Python 2.7')\n"
    )
    broken = tmp_path / "broken.pyz"
    zipapp.create_archive(src, broken)
    prefix = tmp_path / "root"
    result = install(prefix, env, "--pyz", str(broken))
    assert result.returncode == 1
    assert "does not run on /usr/bin/python3: edgeproxy.pyz: built for Python 2.7" in result.stderr
    assert not prefix.exists()

    missing = install(prefix, env, "--pyz", str(tmp_path / "nope.pyz"))
    assert missing.returncode == 1 and "build it with scripts/build_pyz.sh" in missing.stderr


def test_wrapper_and_unit_agree_on_paths() -> None:
    """The CLI wrapper install.sh writes runs what the unit runs, on the same files."""
    script = INSTALL.read_text()
    unit = unit_directives()
    environment = dict(v.split("=", 1) for v in unit["Environment"])
    for name, value in environment.items():
        if name != "EDGEPROXY_DEMO":
            assert f"{name}={value}" in script, name
    assert unit["ExecStart"] == ["/usr/bin/python3 /opt/edgeproxy/edgeproxy.pyz serve"]
    assert '/usr/bin/python3 /opt/edgeproxy/edgeproxy.pyz "$@"' in script


# --- deploy/edgeproxy.service ----------------------------------------------------------


def unit_directives() -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in (DEPLOY / "edgeproxy.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        name, _, value = line.partition("=")
        directives.setdefault(name, []).append(value)
    return directives


def test_unit_is_hardened_and_runs_the_pyz() -> None:
    unit = unit_directives()
    one = {name: values[-1] for name, values in unit.items()}
    assert one["Type"] == "simple"
    assert one["User"] == one["Group"] == "edgeproxy"
    assert one["ExecStart"] == "/usr/bin/python3 /opt/edgeproxy/edgeproxy.pyz serve"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure"
    assert one["RestartPreventExitStatus"] == "2"
    assert one["StateDirectory"] == "edgeproxy"
    assert one["WorkingDirectory"] == "/var/lib/edgeproxy"
    assert one["LimitNOFILE"] == "65536"
    assert one["EnvironmentFile"] == "/etc/edgeproxy/env"
    assert one["ProtectSystem"] == "strict"
    for flag in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert one[flag] == "true", flag
    assert set(unit["Environment"]) == {
        "EDGEPROXY_CONFIG=/etc/edgeproxy/relay.yaml",
        "EDGEPROXY_DATABASE=/var/lib/edgeproxy/edgeproxy.db",
        "EDGEPROXY_DEMO=false",
        "SHIV_ROOT=/var/lib/edgeproxy/.shiv",
    }
    # Draining takes up to shutdown_grace (30s in the shipped relay.yaml): stop must wait longer.
    assert int(one["TimeoutStopSec"]) > 30


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    unit = tmp_path / "edgeproxy.service"
    shutil.copy(DEPLOY / "edgeproxy.service", unit)
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr


# --- Prometheus and Grafana ------------------------------------------------------------


def metric_names() -> set[str]:
    """Every sample name the relay can export, per-key series included."""
    names = set()
    for family in Metrics(per_key=True).registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def check_promql(expr: str, known: set[str]) -> None:
    used = set(re.findall(r"\bedgeproxy_[a-z0-9_]+", expr))
    assert used <= known, (sorted(used - known), expr)
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels = {label.strip() for label in group.split(",") if label.strip()}
        assert labels <= KNOWN_LABELS, (labels - KNOWN_LABELS, expr)
    for label in re.findall(r"[{,]\s*([a-z_]+)\s*=~?", expr):
        assert label in KNOWN_LABELS, (label, expr)


def alert_rules() -> list[dict[str, object]]:
    document = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_metric_names_match_the_spec() -> None:
    assert {
        "edgeproxy_requests_total", "edgeproxy_request_duration_seconds_bucket",
        "edgeproxy_time_to_first_byte_seconds_bucket", "edgeproxy_upstream_attempts_total",
        "edgeproxy_tokens_total", "edgeproxy_cost_usd_total", "edgeproxy_inflight_requests",
        "edgeproxy_upstream_healthy", "edgeproxy_key_requests_total", "edgeproxy_key_cost_usd_total",
    } <= metric_names()  # fmt: skip


def test_alert_rules_cover_the_operations_issue() -> None:
    known = metric_names() | {"up"}
    rules = alert_rules()
    by_name = {rule["alert"]: rule for rule in rules}
    assert len(by_name) == len(rules)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule  # type: ignore[index]
        assert {"summary", "description"} <= set(rule["annotations"]), rule  # type: ignore[arg-type]
        assert re.fullmatch(r"\d+[smh]", str(rule["for"])), rule
        check_promql(str(rule["expr"]), known)
    assert by_name["EdgeproxyDown"]["expr"] == 'up{job="edgeproxy"} == 0'
    assert by_name["EdgeproxyUpstreamEjected"]["expr"] == "edgeproxy_upstream_healthy == 0"
    assert by_name["EdgeproxyUpstreamEjected"]["for"] == "2m"
    assert "> 0.05" in str(by_name["EdgeproxyHighErrorRatio"]["expr"])
    assert 'code=~"5.."' in str(by_name["EdgeproxyHighErrorRatio"]["expr"])
    slow = by_name["EdgeproxySlowFirstByte"]
    assert "histogram_quantile(0.99" in str(slow["expr"]) and slow["for"] == "10m"
    assert str(slow["expr"]).rstrip().endswith("> 20")
    assert "edgeproxy_key_cost_usd_total" in str(by_name["EdgeproxyKeySpendSpike"]["expr"])

    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert scrape["rule_files"] == ["alerts.yml"]
    (job,) = scrape["scrape_configs"]
    assert job["job_name"] == "edgeproxy"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9464"]


def test_promtool_accepts_config_and_rules_and_the_rule_tests_pass() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package: prometheus)")
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=DEPLOY)
        assert result.returncode == 0, (args, result.stdout, result.stderr)


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    found = []

    def walk(panels: list[dict[str, object]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))  # type: ignore[arg-type]
            for target in panel.get("targets", []):  # type: ignore[attr-defined]
                found.append((str(panel["title"]), target["expr"]))

    walk(dashboard["panels"])
    return found


def test_dashboard_parses_and_queries_only_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] == "edgeproxy" and dashboard["title"] == "edgeproxy"
    known = metric_names()
    exprs = dashboard_exprs()
    for _, expr in exprs:
        check_promql(expr, known)
    titles = " | ".join(title for title, _ in exprs)
    for needed in (
        "Requests/s by code",
        "Error ratio",
        "Request duration p50 / p99",
        "Time to first byte p50 / p99",
        "Tokens/s by kind",
        "Cost USD/h by model",
        "In flight",
        "Upstream health",
        "Upstream attempts/s by outcome",
    ):
        assert needed in titles, needed
    used = {name for _, expr in exprs for name in re.findall(r"\bedgeproxy_[a-z0-9_]+", expr)}
    assert used >= {
        "edgeproxy_requests_total", "edgeproxy_request_duration_seconds_bucket",
        "edgeproxy_time_to_first_byte_seconds_bucket", "edgeproxy_tokens_total",
        "edgeproxy_cost_usd_total", "edgeproxy_inflight_requests", "edgeproxy_upstream_healthy",
        "edgeproxy_upstream_attempts_total",
    }  # fmt: skip
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package: prometheus)")
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*"),
        }
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

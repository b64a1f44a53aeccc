"""The edgeproxy command as users run it: ``python -m edgeproxy`` in a subprocess, a real
relay.yaml and database in tmp_path. Asserts what users see on stdout, stderr and in the
exit code, and what they must not see: a secret anywhere but create/rotate's stdout."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from edgeproxy import db

RELAY_YAML = """\
database: relay.db
metrics_listen: "off"
upstreams:
  - name: openai
    kind: openai
    base_url: https://api.openai.com/v1
    api_keys: ["sk-upstream-test-0123456789"]
    models: ["gpt-*"]
"""
SECRET_LINE = re.compile(r"sk-[A-Za-z0-9_-]{40,}\n")
KEY_FIELDS = {
    "name", "prefix", "budget_usd", "spent_usd", "models", "rpm", "tpm", "concurrency",
    "expires", "disabled", "created_at", "state",
}  # fmt: skip
ZERO_TOTAL = {
    "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0,
    "cost_usd": 0.0, "estimated_requests": 0,
}  # fmt: skip


class Cli:
    """Runs ``python -m edgeproxy`` with ``-c`` pointing at tmp_path/relay.yaml."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.config = tmp_path / "relay.yaml"
        self.config.write_text(RELAY_YAML)
        self.database = tmp_path / "relay.db"

    def raw(
        self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k != "EDGEPROXY_CONFIG"}
        return subprocess.run(
            [sys.executable, "-m", "edgeproxy", *args],
            capture_output=True, text=True, timeout=30, cwd=cwd or self.dir,
            env=environ | (env or {}),
        )  # fmt: skip

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.raw("-c", str(self.config), *args)

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def show(self, name: str) -> dict[str, object]:
        return json.loads(self.ok("keys", "show", name, "--json"))

    def files(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.dir.iterdir() if p.name.startswith("relay.db"))


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.rstrip("\n")


# --- keys ------------------------------------------------------------------------------


def test_create_prints_only_the_secret(cli: Cli) -> None:
    result = cli("keys", "create", "alice", "--budget", "5")
    assert result.returncode == 0, result.stderr
    assert SECRET_LINE.fullmatch(result.stdout)
    secret = result.stdout.strip()
    assert f"created key 'alice' ({secret[:11]}" in result.stderr
    assert secret not in result.stderr
    row = query(cli, "SELECT secret_hash, prefix FROM keys WHERE name = 'alice'")
    assert row == [(hashlib.sha256(secret.encode()).hexdigest(), secret[:11])]


def test_list_json_has_exactly_the_spec_shape(cli: Cli) -> None:
    assert json.loads(cli.ok("keys", "list", "--json")) == []
    cli.ok(
        "keys", "create", "alice", "--budget", "2.5", "--models", "gpt-4o*, claude-*",
        "--rpm", "60", "--tpm", "10000", "--concurrency", "4", "--expires", "2030-06-30",
    )  # fmt: skip
    cli.ok("keys", "create", "bob")
    keys = json.loads(cli.ok("keys", "list", "--json"))
    assert [set(k) for k in keys] == [KEY_FIELDS, KEY_FIELDS]
    alice, bob = keys
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", alice.pop("created_at"))
    assert alice == {
        "name": "alice", "prefix": alice["prefix"], "budget_usd": 2.5, "spent_usd": 0.0,
        "models": ["gpt-4o*", "claude-*"], "rpm": 60, "tpm": 10000, "concurrency": 4,
        "expires": "2030-06-30", "disabled": False, "state": "active",
    }  # fmt: skip
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{8}", alice["prefix"])
    assert (bob["name"], bob["budget_usd"], bob["models"], bob["expires"]) == (
        "bob",
        None,
        [],
        None,
    )
    assert (bob["rpm"], bob["tpm"], bob["concurrency"]) == (None, None, None)


def test_list_and_show_for_humans(cli: Cli) -> None:
    cli.ok("keys", "create", "alice", "--budget", "0", "--models", "gpt-*")
    cli.ok("keys", "create", "bob")
    lines = cli.ok("keys", "list").splitlines()
    assert lines[0].split() == [
        "NAME", "PREFIX", "STATE", "BUDGET", "SPENT", "MODELS", "RPM", "TPM", "CONCURRENCY",
        "EXPIRES", "CREATED",
    ]  # fmt: skip
    alice, bob = lines[1].split(), lines[2].split()
    assert alice[0] == "alice" and alice[2:6] == ["exhausted", "0", "0", "gpt-*"]
    assert bob[0] == "bob" and bob[2:10] == ["active", "-", "0", "(all)", "-", "-", "-", "-"]
    shown = cli.ok("keys", "show", "alice")
    assert "state:       exhausted" in shown and "models:      gpt-*" in shown
    assert cli.show("alice")["state"] == "exhausted"


def test_set_changes_and_removes_limits(cli: Cli) -> None:
    cli.ok("keys", "create", "alice", "--budget", "1", "--models", "gpt-*", "--rpm", "5",
           "--expires", "2030-01-01")  # fmt: skip
    result = cli("keys", "set", "alice", "--budget", "none", "--rpm", "none", "--tpm", "99")
    assert result.returncode == 0 and result.stdout == "", result.stderr
    key = cli.show("alice")
    assert (key["budget_usd"], key["rpm"], key["tpm"]) == (None, None, 99)
    assert key["models"] == ["gpt-*"] and key["expires"] == "2030-01-01"  # untouched
    cli.ok("keys", "set", "alice", "--models", "", "--expires", "none", "--budget", "3")
    key = cli.show("alice")
    assert (key["models"], key["expires"], key["budget_usd"]) == ([], None, 3.0)
    result = cli("keys", "set", "alice", "--expires", "2001-01-01")
    assert result.returncode == 0 and "expired" in result.stderr
    assert cli.show("alice")["state"] == "expired"
    assert "nothing to change" in one_line_error(cli("keys", "set", "alice"), 2)


def test_disable_and_enable(cli: Cli) -> None:
    cli.ok("keys", "create", "alice")
    assert cli.ok("keys", "disable", "alice") == ""
    assert (cli.show("alice")["disabled"], cli.show("alice")["state"]) == (True, "disabled")
    cli.ok("keys", "enable", "alice")
    assert (cli.show("alice")["disabled"], cli.show("alice")["state"]) == (False, "active")


def test_rotate_replaces_the_secret(cli: Cli) -> None:
    old = cli.ok("keys", "create", "alice").strip()
    result = cli("keys", "rotate", "alice")
    assert result.returncode == 0 and SECRET_LINE.fullmatch(result.stdout)
    new = result.stdout.strip()
    assert new != old and "rotated key 'alice'" in result.stderr
    hashes = [r[0] for r in query(cli, "SELECT secret_hash FROM keys")]
    assert hashes == [hashlib.sha256(new.encode()).hexdigest()]
    assert cli.show("alice")["prefix"] == new[:11]


def test_delete(cli: Cli) -> None:
    cli.ok("keys", "create", "alice")
    assert cli.ok("keys", "delete", "alice") == ""
    assert json.loads(cli.ok("keys", "list", "--json")) == []
    error = one_line_error(cli("keys", "show", "alice"), 1)
    assert error == "edgeproxy: no key named 'alice'"


def test_the_secret_never_shows_up_again(cli: Cli) -> None:
    first = cli.ok("keys", "create", "alice").strip()
    second = cli.ok("keys", "rotate", "alice").strip()
    outputs = [
        cli("keys", "list"), cli("keys", "list", "--json"), cli("keys", "show", "alice"),
        cli("keys", "show", "alice", "--json"), cli("usage"), cli("usage", "--json"),
    ]  # fmt: skip
    text = "".join(r.stdout + r.stderr for r in outputs)
    files = cli.files()
    for secret in (first, second):
        assert secret not in text and secret[11:] not in text
        assert secret.encode() not in files and secret[11:].encode() not in files
        assert hashlib.sha256(secret.encode()).hexdigest() not in text


# --- errors and exit codes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["keys", "show", "nobody"], 1, "edgeproxy: no key named 'nobody'"),
        (["keys", "rotate", "nobody"], 1, "edgeproxy: no key named 'nobody'"),
        (["keys", "create", "x", "--expires", "2025-02-30"], 2, "--expires: expected a date"),
        (["keys", "create", "x", "--expires", "tomorrow"], 2, "--expires: expected a date"),
        (["keys", "create", "x", "--budget", "-1"], 2, "--budget: expected a non-negative"),
        (["keys", "create", "x", "--budget=-0.5"], 2, "--budget: expected a non-negative"),
        (["keys", "create", "x", "--budget", "nan"], 2, "--budget: expected a non-negative"),
        (["keys", "create", "x", "--budget", "none"], 2, "--budget: expected a non-negative"),
        (["keys", "create", "x", "--rpm", "0"], 2, "--rpm: expected a positive integer"),
        (["keys", "set", "x", "--tpm", "1.5"], 2, "--tpm: expected a positive integer or none"),
        (["keys", "create", "x", "--models", "gpt-*,,claude-*"], 2, "--models: expected"),
        (["keys", "create", "bad name"], 2, "key name must be 1-64 characters"),
        (["usage", "--since", "yesterday"], 2, "--since: expected a duration"),
        (["usage", "--by", "key,region"], 2, "--by: expected some of key,model,upstream,day"),
    ],
)
def test_errors_are_one_line_with_the_right_exit_code(
    cli: Cli, args: list[str], code: int, needle: str
) -> None:
    assert needle in one_line_error(cli(*args), code)
    assert "nobody" in needle or json.loads(cli.ok("keys", "list", "--json")) == []


def test_a_duplicate_name_is_refused(cli: Cli) -> None:
    cli.ok("keys", "create", "alice")
    error = one_line_error(cli("keys", "create", "alice"), 1)
    assert error == "edgeproxy: a key named 'alice' already exists"


@pytest.mark.parametrize("command", [["check"], ["serve"], ["keys", "list"], ["usage"]])
def test_a_bad_config_is_one_line_and_exit_2(cli: Cli, command: list[str]) -> None:
    cli.config.write_text(RELAY_YAML + "    weight: -1\n")
    error = one_line_error(cli(*command), 2)
    assert error.startswith(f"{cli.config}: upstreams[0].weight: ")
    missing = one_line_error(cli.raw(*command, cwd=cli.dir / "..", env={}), 2)
    assert missing.startswith("relay.yaml: ")


def test_bad_usage_exits_2(cli: Cli) -> None:
    for args in (["keys"], ["keys", "create"], ["frobnicate"], ["keys", "list", "--bogus"]):
        result = cli(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, args
    assert cli.raw("--version").stdout.startswith("edgeproxy ")


def test_config_flag_before_or_after_the_command_and_from_the_environment(
    cli: Cli, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = str(cli.config)
    assert SECRET_LINE.fullmatch(cli.raw("-c", config, "keys", "create", "a", cwd=elsewhere).stdout)
    assert SECRET_LINE.fullmatch(cli.raw("keys", "-c", config, "create", "b", cwd=elsewhere).stdout)
    assert SECRET_LINE.fullmatch(
        cli.raw("keys", "create", "c", "--config", config, cwd=elsewhere).stdout
    )
    env = {"EDGEPROXY_CONFIG": config}
    assert SECRET_LINE.fullmatch(cli.raw("keys", "create", "d", cwd=elsewhere, env=env).stdout)
    assert SECRET_LINE.fullmatch(cli.raw("keys", "create", "e").stdout)  # ./relay.yaml
    # after the command wins over before it, and both win over the environment
    other = tmp_path / "other.yaml"
    other.write_text(RELAY_YAML.replace("relay.db", "other.db"))
    listed = cli.raw("-c", config, "keys", "list", "--json", "-c", str(other), env=env)
    assert json.loads(listed.stdout) == []
    names = [k["name"] for k in json.loads(cli.ok("keys", "list", "--json"))]
    assert names == ["a", "b", "c", "d", "e"]
    assert not (elsewhere / "relay.db").exists()


def test_keys_work_with_config_warnings_and_check_shows_them(cli: Cli) -> None:
    cli.config.write_text(RELAY_YAML.replace('["sk-upstream-test-0123456789"]', '["${NOPE:-}"]'))
    result = cli("check")
    assert result.returncode == 0, result.stderr
    assert f"database: {cli.database}" in result.stdout
    assert "warning:" not in result.stdout
    assert result.stderr.startswith("warning: ") and "openai" in result.stderr
    assert SECRET_LINE.fullmatch(cli.ok("keys", "create", "alice"))


# --- usage -----------------------------------------------------------------------------


def test_usage_json_on_an_empty_database(cli: Cli) -> None:
    assert json.loads(cli.ok("usage", "--json")) == {"rows": [], "total": ZERO_TOTAL}
    assert json.loads(cli.ok("usage", "--json", "--by", "day,model")) == {
        "rows": [],
        "total": ZERO_TOTAL,
    }
    lines = cli.ok("usage").splitlines()
    assert lines[0].split() == [
        "KEY", "REQUESTS", "PROMPT", "COMPLETION", "CACHED", "COST_USD", "ESTIMATED",
    ]  # fmt: skip
    assert lines[1].split() == ["total", "0", "0", "0", "0", "0", "0"]


async def test_usage_reports_what_the_ledger_recorded(cli: Cli) -> None:
    database = str(cli.database)
    alice, _ = db.create_key(database, "alice")
    now = time.time()
    ledger = await db.Ledger.open(database)
    for request_id, name, model, ts, cost in [
        ("r1", "alice", "gpt-4o", now - 60, 0.5),
        ("r2", "alice", "gpt-5", now - 10 * 86400, 0.25),
        ("r3", "bob", "gpt-4o", now - 120, 1.0),
    ]:
        ledger.record(db.UsageRecord(
            request_id=request_id, ts=ts, key_id=alice.id if name == "alice" else None,
            key_name=name, model=model, upstream="openai", endpoint="/v1/chat/completions",
            status=200, prompt_tokens=10, completion_tokens=5, cost_usd=cost,
        ))  # fmt: skip
    await ledger.close()

    report = json.loads(cli.ok("usage", "--json"))
    assert [(r["key"], r["requests"], r["cost_usd"]) for r in report["rows"]] == [
        ("alice", 2, 0.75),
        ("bob", 1, 1.0),
    ]
    assert report["total"] == ZERO_TOTAL | {
        "requests": 3, "prompt_tokens": 30, "completion_tokens": 15, "cost_usd": 1.75,
    }  # fmt: skip
    recent = json.loads(cli.ok("usage", "--json", "--since", "7d", "--by", "model"))
    assert [(r["model"], r["requests"]) for r in recent["rows"]] == [("gpt-4o", 2)]
    assert set(recent["rows"][0]) == {"model"} | set(ZERO_TOTAL)
    one_key = json.loads(cli.ok("usage", "--json", "--key", "alice", "--since", "2000-01-01"))
    assert one_key["total"]["requests"] == 2
    table = cli.ok("usage", "--by", "key,model").splitlines()
    assert table[0].split()[:3] == ["KEY", "MODEL", "REQUESTS"]
    assert [line.split()[:3] for line in table[1:]] == [
        ["alice", "gpt-4o", "1"], ["alice", "gpt-5", "1"], ["bob", "gpt-4o", "1"],
        ["total", "3", "30"],
    ]  # fmt: skip
    assert cli.show("alice")["spent_usd"] == 0.75


def query(cli: Cli, sql: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(cli.database)) as conn:
        return conn.execute(sql).fetchall()

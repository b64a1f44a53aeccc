"""db / ledger / records: real SQLite files in tmp_path, real second connections, no mocks."""

from __future__ import annotations

import asyncio
import hashlib
import re
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from edgeproxy import db
from edgeproxy.db import KeyRecord, UsageRecord


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "relay.db")


def key(**overrides: object) -> KeyRecord:
    fields: dict[str, object] = dict(
        id=1, name="alice", prefix="sk-AbC12345", secret_hash="h" * 64, budget_usd=None,
        spent_usd=0.0, models=(), rpm=None, tpm=None, concurrency=None, expires=None,
        disabled=False, created_at="2025-01-01T00:00:00Z",
    )  # fmt: skip
    return KeyRecord(**(fields | overrides))  # type: ignore[arg-type]


def usage(request_id: str, **overrides: object) -> UsageRecord:
    fields: dict[str, object] = dict(
        request_id=request_id, ts=time.time(), key_id=None, key_name="alice", model="gpt-4o",
        upstream="openai", endpoint="/v1/chat/completions", status=200, attempts=1,
        latency_ms=12.5, prompt_tokens=10, completion_tokens=5, cached_tokens=2, cost_usd=0.0,
    )  # fmt: skip
    return UsageRecord(**(fields | overrides))  # type: ignore[arg-type]


def query(path: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchall()


async def eventually(check: Callable[[], bool], within_s: float = 2.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# --- schema ----------------------------------------------------------------------------


def test_schema_is_created_once_and_in_wal_mode(path: str) -> None:
    db.init_db(path)
    db.init_db(path)  # idempotent
    tables = {r[0] for r in query(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"meta", "keys", "usage"} <= tables
    indexes = {r[0] for r in query(path, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"usage_ts", "usage_key_ts"} <= indexes
    assert query(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [("1",)]
    assert query(path, "PRAGMA journal_mode") == [("wal",)]


def test_a_newer_schema_is_refused(path: str) -> None:
    db.init_db(path)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(db.DbError, match="schema version 99 is newer"):
        db.list_keys(path)


def test_an_unopenable_database_is_one_clear_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-dir" / "relay.db")
    with pytest.raises(db.DbError, match=r"^database .*relay\.db: unable to open"):
        db.list_keys(missing)


async def test_the_server_side_refuses_an_unopenable_database(tmp_path: Path) -> None:
    with pytest.raises(db.DbError, match="unable to open"):
        await db.Ledger.open(str(tmp_path / "no-such-dir" / "relay.db"))


# --- secrets and key records -----------------------------------------------------------


def test_secrets_have_the_spec_shape_and_only_a_hash_is_kept() -> None:
    secret = db.new_secret()
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{44}", secret)
    assert db.looks_like_secret(secret)
    assert db.new_secret() != secret
    assert db.hash_secret(secret) == hashlib.sha256(secret.encode()).hexdigest()
    assert db.display_prefix(secret) == secret[:11]
    for garbage in ["", "sk-", "sk-short", "Bearer " + secret, secret + "!", "pk-" + secret[3:]]:
        assert not db.looks_like_secret(garbage), garbage
    assert not db.looks_like_secret("sk-" + "a" * 129)


def test_a_key_is_valid_through_the_end_of_its_expiry_day() -> None:
    record = key(expires=date(2025, 3, 1))
    assert not record.expired(date(2025, 2, 28))
    assert not record.expired(date(2025, 3, 1))
    assert record.expired(date(2025, 3, 2))
    assert record.state(date(2025, 3, 2)) == "expired"
    assert not key().expired(date(9999, 12, 31))


def test_allows_matches_globs_case_sensitively_and_empty_means_all() -> None:
    assert key().allows("anything")
    record = key(models=("gpt-4o*", "claude-?-haiku"))
    assert record.allows("gpt-4o") and record.allows("gpt-4o-mini")
    assert record.allows("claude-3-haiku")
    assert not record.allows("GPT-4o")
    assert not record.allows("gpt-5")


def test_state_precedence_and_a_zero_budget_is_exhausted() -> None:
    today = date(2025, 1, 1)
    assert key().state(today) == "active"
    assert key(budget_usd=0.0).state(today) == "exhausted"
    assert key(budget_usd=1.0, spent_usd=0.99).state(today) == "active"
    assert key(budget_usd=1.0, spent_usd=1.0).state(today) == "exhausted"
    expired = key(budget_usd=0.0, expires=date(2024, 12, 31))
    assert expired.state(today) == "expired"
    assert key(budget_usd=0.0, expires=date(2024, 12, 31), disabled=True).state(today) == "disabled"


def test_to_json_has_exactly_the_spec_fields_and_never_the_hash() -> None:
    record = key(models=("gpt-*",), expires=date(2030, 1, 2), budget_usd=5.0, rpm=60)
    assert record.to_json(date(2025, 1, 1)) == {
        "name": "alice", "prefix": "sk-AbC12345", "budget_usd": 5.0, "spent_usd": 0.0,
        "models": ["gpt-*"], "rpm": 60, "tpm": None, "concurrency": None,
        "expires": "2030-01-02", "disabled": False, "created_at": "2025-01-01T00:00:00Z",
        "state": "active",
    }  # fmt: skip
    assert "h" * 64 not in repr(record)


# --- synchronous key management --------------------------------------------------------


def test_create_get_list(path: str) -> None:
    record, secret = db.create_key(
        path, "alice", budget=2.5, models=["gpt-*", "claude-*", "gpt-*"], rpm=60, tpm=10_000,
        concurrency=4, expires="2030-06-30",
    )  # fmt: skip
    assert db.looks_like_secret(secret)
    assert record.name == "alice" and record.prefix == secret[:11]
    assert record.secret_hash == db.hash_secret(secret)
    assert record.budget_usd == 2.5 and record.spent_usd == 0.0
    assert record.models == ("gpt-*", "claude-*")  # duplicates dropped, order kept
    assert (record.rpm, record.tpm, record.concurrency) == (60, 10_000, 4)
    assert record.expires == date(2030, 6, 30)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record.created_at)
    assert db.get_key(path, "alice") == record
    db.create_key(path, "bob")
    assert [k.name for k in db.list_keys(path)] == ["alice", "bob"]
    assert db.get_key(path, "bob").budget_usd is None


def test_create_refuses_duplicates_and_bad_values(path: str) -> None:
    db.create_key(path, "alice")
    with pytest.raises(db.KeyExists, match=r"^a key named 'alice' already exists$"):
        db.create_key(path, "alice")
    bad: list[tuple[str, dict[str, object]]] = [
        ("al ice", {}), ("", {}), ("x" * 65, {}), ("a/b", {}),
        ("ok", {"budget": -1}), ("ok", {"budget": float("nan")}), ("ok", {"budget": True}),
        ("ok", {"rpm": 0}), ("ok", {"tpm": 1.5}), ("ok", {"concurrency": -2}),
        ("ok", {"models": "gpt-*"}), ("ok", {"models": ["a b"]}), ("ok", {"models": [""]}),
        ("ok", {"expires": "2025-13-01"}), ("ok", {"expires": "20250101"}),
    ]  # fmt: skip
    for name, values in bad:
        with pytest.raises(db.InvalidValue):
            db.create_key(path, name, **values)  # type: ignore[arg-type]
    assert [k.name for k in db.list_keys(path)] == ["alice"]
    assert db.create_key(path, "a.b_c-d@e.f", budget=0)[0].budget_usd == 0.0


def test_update_sets_and_removes_limits(path: str) -> None:
    db.create_key(path, "alice", budget=1, models=["gpt-*"], rpm=5, expires="2030-01-01")
    record = db.update_key(path, "alice", budget=None, models=(), rpm=None, expires=None, tpm=7)
    assert (record.budget_usd, record.models, record.rpm, record.expires) == (None, (), None, None)
    assert record.tpm == 7
    assert query(path, "SELECT updated_at IS NOT NULL FROM keys") == [(1,)]
    assert db.set_disabled(path, "alice", True).state() == "disabled"
    assert db.set_disabled(path, "alice", False).state() == "active"
    with pytest.raises(db.InvalidValue, match="cannot change spent_usd"):
        db.update_key(path, "alice", spent_usd=0)
    with pytest.raises(db.NoSuchKey, match=r"^no key named 'bob'$"):
        db.update_key(path, "bob", rpm=1)
    with pytest.raises(db.NoSuchKey):
        db.set_disabled(path, "bob", True)


def test_rotate_replaces_the_secret_and_delete_removes_the_key(path: str) -> None:
    old, old_secret = db.create_key(path, "alice")
    new_secret = db.rotate_key(path, "alice")
    assert new_secret != old_secret and db.looks_like_secret(new_secret)
    record = db.get_key(path, "alice")
    assert record.secret_hash == db.hash_secret(new_secret)
    assert record.prefix == new_secret[:11] and record.id == old.id
    hashes = [r[0] for r in query(path, "SELECT secret_hash FROM keys")]
    assert hashes == [db.hash_secret(new_secret)]
    db.delete_key(path, "alice")
    assert db.list_keys(path) == []
    for action in (db.delete_key, db.rotate_key, db.get_key):
        with pytest.raises(db.NoSuchKey, match="no key named 'alice'"):
            action(path, "alice")


def test_secrets_never_reach_the_database_file(path: str, tmp_path: Path) -> None:
    _, secret = db.create_key(path, "alice")
    rotated = db.rotate_key(path, "alice")
    files = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert secret.encode() not in files and rotated.encode() not in files
    assert secret[11:].encode() not in files


# --- the key cache ---------------------------------------------------------------------


async def test_key_cache_sees_cli_changes_within_two_seconds(path: str) -> None:
    cache = await db.KeyCache.open(path)
    try:
        _, secret = await asyncio.to_thread(db.create_key, path, "alice", rpm=5)
        digest = db.hash_secret(secret)
        await eventually(lambda: cache.get(digest) is not None)
        assert cache.by_name("alice") == cache.get(digest)

        await asyncio.to_thread(db.set_disabled, path, "alice", True)
        await eventually(lambda: cache.get(digest).disabled)  # type: ignore[union-attr]

        rotated = await asyncio.to_thread(db.rotate_key, path, "alice")
        await eventually(lambda: cache.get(digest) is None)
        assert cache.get(db.hash_secret(rotated)) is not None

        await asyncio.to_thread(db.delete_key, path, "alice")
        await eventually(lambda: cache.all() == [])
    finally:
        await cache.close()


async def test_key_cache_starts_with_existing_keys(path: str) -> None:
    _, secret = db.create_key(path, "alice")
    cache = await db.KeyCache.open(path)
    try:
        assert cache.get(db.hash_secret(secret)) is not None
        assert cache.get(db.hash_secret("sk-" + "x" * 44)) is None
    finally:
        await cache.close()


# --- the ledger ------------------------------------------------------------------------


async def test_ledger_commits_within_its_interval_and_bills_the_key(path: str) -> None:
    record, _ = db.create_key(path, "alice")
    ledger = await db.Ledger.open(path)
    try:
        started = time.monotonic()
        ledger.record(usage("r1", key_id=record.id, cost_usd=0.25))
        ledger.record(usage("r2", key_id=record.id, cost_usd=0.5))
        await eventually(lambda: query(path, "SELECT COUNT(*) FROM usage") == [(2,)])
        assert time.monotonic() - started < 1.0
        assert db.get_key(path, "alice").spent_usd == pytest.approx(0.75)
        assert ledger.healthy and ledger.pending == 0
    finally:
        await ledger.close()


async def test_ledger_never_bills_a_request_twice(path: str) -> None:
    record, _ = db.create_key(path, "alice")
    ledger = await db.Ledger.open(path)
    try:
        ledger.record(usage("same", key_id=record.id, cost_usd=1.0))
        ledger.record(usage("same", key_id=record.id, cost_usd=1.0))  # same batch
        await ledger.flush()
        ledger.record(usage("same", key_id=record.id, cost_usd=1.0))  # a later replay
        await ledger.flush()
        ledger.record(usage("same", key_id=record.id, cost_usd=1.0))  # a replay, and
        ledger.record(usage("new", key_id=record.id, cost_usd=0.5))  # a new one, together
        await ledger.flush()
    finally:
        await ledger.close()
    assert query(path, "SELECT COUNT(*) FROM usage WHERE request_id = 'same'") == [(1,)]
    assert query(path, "SELECT COUNT(*) FROM usage WHERE request_id = 'new'") == [(1,)]
    assert db.get_key(path, "alice").spent_usd == 1.5


async def test_while_another_process_holds_the_write_lock_the_loop_runs_on(path: str) -> None:
    """The ledger commits on the event loop's thread but never waits there for SQLite's
    write lock: the loop keeps serving, and the batch lands once the lock is free."""
    ledger = await db.Ledger.open(path, interval_s=0.01)
    holder = sqlite3.connect(path, isolation_level=None)
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    beat = asyncio.create_task(heartbeat())
    try:
        holder.execute("BEGIN IMMEDIATE")  # another writer (the CLI, another worker)
        ledger.record(usage("locked-out"))
        await asyncio.sleep(0.5)
        assert query(path, "SELECT COUNT(*) FROM usage") == [(0,)]
        assert ledger.pending == 1 and ledger.healthy  # waiting, well within stall_s
        assert ticks >= 25  # the loop ran all along (a blocked loop would tick about once)
        holder.execute("COMMIT")
        await eventually(lambda: query(path, "SELECT COUNT(*) FROM usage") == [(1,)])
        assert ledger.pending == 0
    finally:
        beat.cancel()
        holder.close()
        await ledger.close()


async def test_close_flushes_what_is_queued(path: str) -> None:
    ledger = await db.Ledger.open(path, interval_s=60)  # the writer would wait a minute
    for i in range(50):
        ledger.record(usage(f"r{i}"))
    await ledger.close()
    await ledger.close()  # idempotent
    assert query(path, "SELECT COUNT(*) FROM usage") == [(50,)]
    record_id, *rest = query(path, "SELECT * FROM usage WHERE request_id = 'r7'")[0]
    assert record_id == "r7"  # a record made without a record id of its own uses the request id
    row = tuple(rest)
    assert row[1:] == (
        pytest.approx(row[1]), None, "alice", "gpt-4o", "openai", "/v1/chat/completions",
        200, 1, 12.5, None, 10, 5, 2, 0.0, 0,
    )  # fmt: skip


async def test_ledger_is_unhealthy_while_another_writer_holds_the_lock(path: str) -> None:
    ledger = await db.Ledger.open(path, stall_s=0.5)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        assert ledger.healthy
        blocker.execute("BEGIN IMMEDIATE")
        ledger.record(usage("waiting"))
        await eventually(lambda: not ledger.healthy, within_s=3.0)
        assert not await ledger.writable()
        blocker.execute("ROLLBACK")
        await eventually(lambda: ledger.healthy, within_s=3.0)
        assert query(path, "SELECT request_id FROM usage") == [("waiting",)]
    finally:
        blocker.close()
        await ledger.close()


async def test_a_failed_batch_is_kept_retried_and_billed_once(path: str) -> None:
    record, _ = db.create_key(path, "alice")
    ledger = await db.Ledger.open(path)
    saboteur = sqlite3.connect(path, isolation_level=None)
    try:
        saboteur.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON usage BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
        )
        ledger.record(usage("kept", key_id=record.id, cost_usd=0.5))
        await eventually(lambda: not ledger.healthy)
        with pytest.raises(db.DbError, match="disk says no"):
            await ledger.flush()
        assert ledger.pending == 1
        saboteur.execute("DROP TRIGGER refuse")
        await eventually(lambda: ledger.healthy)
        assert ledger.pending == 0
    finally:
        saboteur.close()
        await ledger.close()
    assert query(path, "SELECT request_id FROM usage") == [("kept",)]
    assert db.get_key(path, "alice").spent_usd == 0.5


async def test_a_full_queue_marks_the_ledger_unhealthy_until_it_drains(path: str) -> None:
    ledger = await db.Ledger.open(path, interval_s=60, max_queue=2)
    try:
        for i in range(3):
            ledger.record(usage(f"r{i}"))
        assert not ledger.healthy and ledger.dropped == 1 and ledger.pending == 2
        await ledger.flush()
        assert ledger.healthy
    finally:
        await ledger.close()
    assert query(path, "SELECT COUNT(*) FROM usage") == [(2,)]


async def test_a_malformed_record_is_refused_without_blocking_others(path: str) -> None:
    ledger = await db.Ledger.open(path, interval_s=60)
    try:
        ledger.record(usage("bad-type", model={"not": "a string"}))
        ledger.record(usage("bad-cost", cost_usd=float("nan")))
        ledger.record(usage("good"))
        assert ledger.dropped == 2 and ledger.pending == 1 and ledger.healthy
        await ledger.flush()
        assert await ledger.writable()
    finally:
        await ledger.close()
    assert not await ledger.writable()
    assert query(path, "SELECT request_id FROM usage") == [("good",)]


# --- reports and retention -------------------------------------------------------------


def day_ts(d: str, hour: int = 12) -> float:
    return datetime.fromisoformat(d).replace(hour=hour, tzinfo=UTC).timestamp()


@pytest.fixture
async def ledger_rows(path: str) -> str:
    ledger = await db.Ledger.open(path, interval_s=60)
    rows = [
        usage("a1", key_name="alice", model="gpt-4o", upstream="openai", ts=day_ts("2025-01-01"),
              cost_usd=0.5),
        usage("a2", key_name="alice", model="claude-x", upstream="anthropic",
              ts=day_ts("2025-01-01", 23), cost_usd=0.25, estimated=True),
        usage("a3", key_name="alice", model="gpt-4o", upstream="openai", ts=day_ts("2025-01-02", 0),
              cost_usd=0.125),
        usage("b1", key_name="bob", model="gpt-4o", upstream="azure", ts=day_ts("2025-01-02"),
              cost_usd=1.0, prompt_tokens=100, completion_tokens=50, cached_tokens=0),
    ]  # fmt: skip
    for row in rows:
        ledger.record(row)
    await ledger.close()
    return path


def test_report_groups_by_key_by_default(ledger_rows: str) -> None:
    report = db.usage_report(ledger_rows)
    assert report["rows"] == [
        {"key": "alice", "requests": 3, "prompt_tokens": 30, "completion_tokens": 15,
         "cached_tokens": 6, "cost_usd": 0.875, "estimated_requests": 1},
        {"key": "bob", "requests": 1, "prompt_tokens": 100, "completion_tokens": 50,
         "cached_tokens": 0, "cost_usd": 1.0, "estimated_requests": 0},
    ]  # fmt: skip
    assert report["total"] == {
        "requests": 4, "prompt_tokens": 130, "completion_tokens": 65, "cached_tokens": 6,
        "cost_usd": 1.875, "estimated_requests": 1,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        (["model"], [({"model": "claude-x"}, 1), ({"model": "gpt-4o"}, 3)]),
        (["upstream"], [({"upstream": "anthropic"}, 1), ({"upstream": "azure"}, 1),
                        ({"upstream": "openai"}, 2)]),
        (["day"], [({"day": "2025-01-01"}, 2), ({"day": "2025-01-02"}, 2)]),
        (["day", "key"], [({"day": "2025-01-01", "key": "alice"}, 2),
                          ({"day": "2025-01-02", "key": "alice"}, 1),
                          ({"day": "2025-01-02", "key": "bob"}, 1)]),
    ],
)  # fmt: skip
def test_report_groups_by_each_field(
    ledger_rows: str, by: list[str], expected: list[tuple[dict[str, str], int]]
) -> None:
    rows = db.usage_report(ledger_rows, by=by)["rows"]
    assert [({f: row[f] for f in by}, row["requests"]) for row in rows] == expected
    assert all(list(row)[: len(by)] == by for row in rows)


def test_report_filters_by_key_and_time(ledger_rows: str) -> None:
    report = db.usage_report(ledger_rows, key="alice", since_ts=day_ts("2025-01-01", 13))
    assert [(r["key"], r["requests"]) for r in report["rows"]] == [("alice", 2)]
    assert report["total"]["cost_usd"] == 0.375
    assert db.usage_report(ledger_rows, key="nobody")["rows"] == []


def test_report_on_an_empty_database_and_bad_fields(path: str) -> None:
    assert db.usage_report(path, by=["model"]) == {
        "rows": [],
        "total": {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                  "cached_tokens": 0, "cost_usd": 0.0, "estimated_requests": 0},
    }  # fmt: skip
    with pytest.raises(db.InvalidValue, match="cannot group by region"):
        db.usage_report(path, by=["key", "region"])


def test_prune_deletes_only_older_rows(ledger_rows: str) -> None:
    assert db.prune_usage(ledger_rows, day_ts("2025-01-02", 0)) == 2
    assert db.prune_usage(ledger_rows, day_ts("2025-01-02", 0)) == 0
    assert db.usage_report(ledger_rows)["total"]["requests"] == 2

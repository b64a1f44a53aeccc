"""All SQLite, part one: the database file, its schema, key rows and the key cache.

Job: own the database file. The CLI (and the admin API, through ``asyncio.to_thread``)
manages keys with the synchronous functions here: stdlib ``sqlite3``, one short
transaction each. A worker reads keys through ``KeyCache`` (``aiosqlite``, so the loop
never waits on disk). Part two, ``ledger``, owns the usage table: the batched writer
``Ledger``, ``usage_report`` and ``prune_usage``. Callers import everything from here:
the pure records and rules of ``records`` and the names of ``ledger`` are re-exported.

Rules:

1. No module but this one and ``ledger`` touches SQLite, and nobody else runs SQL.
2. A key's secret is never stored, logged, returned or printed, and neither is its hash:
   only ``create_key`` and ``rotate_key`` return a fresh secret, once, to their caller.
3. User input reaches SQL only as a bound parameter, never by string formatting.
4. Nothing here answers HTTP or reads relay.yaml; callers pass the database path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import Iterable, Iterator
from datetime import date
from typing import TYPE_CHECKING, Any

import aiosqlite

from edgeproxy.records import (
    KEY_CHANGES,
    DbError,
    InvalidValue,
    KeyExists,
    KeyRecord,
    KeyState,
    NoSuchKey,
    UsageRecord,
    check_name,
    display_prefix,
    hash_secret,
    key_columns,
    looks_like_secret,
    new_secret,
    utc_now_iso,
    utc_today,
)

if TYPE_CHECKING:
    from edgeproxy.ledger import Ledger, prune_usage, usage_report

__all__ = [  # the re-exported names are part of this module's API
    "KEY_CHANGES", "DbError", "InvalidValue", "KeyCache", "KeyExists", "KeyRecord", "KeyState",
    "Ledger", "NoSuchKey", "UsageRecord", "check_name", "connect", "create_key", "delete_key",
    "display_prefix", "get_key", "hash_secret", "init_db", "list_keys", "looks_like_secret",
    "new_secret", "open_async", "open_connection", "prune_usage", "rotate_key", "set_disabled",
    "update_key", "usage_report", "utc_today", "write",
]  # fmt: skip

_LEDGER_NAMES = ("Ledger", "prune_usage", "usage_report")


def __getattr__(name: str) -> Any:
    """``ledger`` builds on this module, so its names are imported on first use (PEP 562)
    rather than at the top, which would be an import cycle."""
    if name in _LEDGER_NAMES:
        from edgeproxy import ledger

        return getattr(ledger, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


log = logging.getLogger("edgeproxy.db")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    id INTEGER PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    prefix TEXT,
    secret_hash TEXT UNIQUE NOT NULL,
    budget_usd REAL NULL,
    spent_usd REAL NOT NULL DEFAULT 0,
    models TEXT NOT NULL DEFAULT '[]',
    rpm INT NULL,
    tpm INT NULL,
    concurrency INT NULL,
    expires TEXT NULL,
    disabled INT NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT
);
CREATE TABLE IF NOT EXISTS usage (
    record_id TEXT PRIMARY KEY,  -- the relay's own id: what makes a record idempotent
    request_id TEXT NOT NULL,    -- the x-request-id the client saw (its own, if it sent one)
    ts REAL NOT NULL,
    key_id INT,
    key_name TEXT,
    model TEXT,
    upstream TEXT,
    endpoint TEXT,
    status INT,
    attempts INT,
    latency_ms REAL,
    ttfb_ms REAL NULL,
    prompt_tokens INT,
    completion_tokens INT,
    cached_tokens INT,
    cost_usd REAL,
    estimated INT
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
CREATE INDEX IF NOT EXISTS usage_key_ts ON usage (key_name, ts);
CREATE INDEX IF NOT EXISTS usage_request_id ON usage (request_id);
"""
_CREATE = f"""
BEGIN IMMEDIATE;
{_SCHEMA}
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');
COMMIT;
"""
# busy_timeout: a writer waits this long for another process's write lock. It equals
# SPEC §4's 5 s, after which the ledger counts as unavailable anyway.
_BUSY_TIMEOUT_MS = 5000
_PRAGMAS = (
    f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}",  # first: switching to WAL may wait on a lock
    "PRAGMA journal_mode=WAL",  # readers never block the ledger's writer, nor it them
    "PRAGMA synchronous=NORMAL",  # in WAL: durable across a process crash (kill -9)
)
_KEY_COLUMNS = (
    "id, name, prefix, secret_hash, budget_usd, spent_usd, models, rpm, tpm, concurrency,"
    " expires, disabled, created_at"
)


# --- synchronous access (the CLI; the admin API through asyncio.to_thread) ---------------


def _init(conn: sqlite3.Connection) -> None:
    """Set the pragmas and create the schema unless it is there already (idempotent)."""
    for pragma in _PRAGMAS:
        conn.execute(pragma)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError:  # no meta table: a new database
        row = None
    if row is None:  # every statement is IF NOT EXISTS: racing processes are fine
        conn.executescript(_CREATE)
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if int(row[0]) > SCHEMA_VERSION:
        raise DbError(f"database schema version {row[0]} is newer than this edgeproxy knows")


def open_connection(db_path: str, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """A connection in autocommit mode, pragmas set, schema ready; DbError if it cannot
    be opened. The caller closes it."""
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(
            db_path,
            timeout=_BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=check_same_thread,
        )
        _init(conn)
    except sqlite3.Error as err:
        if conn is not None:
            conn.close()
        raise DbError(f"database {db_path}: {err}") from None
    return conn


@contextlib.contextmanager
def connect(db_path: str) -> Iterator[sqlite3.Connection]:
    """A short-lived connection, schema ready, in autocommit mode (``write()`` for a
    transaction); sqlite3 errors inside become DbError."""
    conn = open_connection(db_path)
    try:
        yield conn
    except sqlite3.Error as err:
        raise DbError(f"database {db_path}: {err}") from None
    finally:
        conn.close()


@contextlib.contextmanager
def write(conn: sqlite3.Connection) -> Iterator[None]:
    """One ``BEGIN IMMEDIATE`` transaction: committed, or rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _key_from_row(row: Iterable[Any]) -> KeyRecord:
    (id_, name, prefix, secret_hash, budget, spent, models, rpm, tpm, concurrency, expires,
     disabled, created_at) = row  # fmt: skip
    return KeyRecord(
        id=id_,
        name=name,
        prefix=prefix or "",
        secret_hash=secret_hash,
        budget_usd=budget,
        spent_usd=spent or 0.0,
        models=tuple(json.loads(models or "[]")),
        rpm=rpm,
        tpm=tpm,
        concurrency=concurrency,
        expires=date.fromisoformat(expires) if expires else None,
        disabled=bool(disabled),
        created_at=created_at,
    )


def _fetch_key(conn: sqlite3.Connection, name: str) -> KeyRecord:
    row = conn.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NoSuchKey(f"no key named {name!r}")
    return _key_from_row(row)


def init_db(db_path: str) -> None:
    """Create the database file and schema if missing (idempotent)."""
    with connect(db_path):
        pass


def create_key(
    db_path: str,
    name: str,
    *,
    budget: float | None = None,
    models: Iterable[str] = (),
    rpm: int | None = None,
    tpm: int | None = None,
    concurrency: int | None = None,
    expires: date | str | None = None,
) -> tuple[KeyRecord, str]:
    """Create a key; returns it and its secret, which exists nowhere else afterwards."""
    check_name(name)
    columns = key_columns(
        {"budget": budget, "models": models, "rpm": rpm, "tpm": tpm,
         "concurrency": concurrency, "expires": expires}
    )  # fmt: skip
    secret = new_secret()
    columns |= {"name": name, "prefix": display_prefix(secret)}
    columns |= {"secret_hash": hash_secret(secret), "created_at": utc_now_iso()}
    marks = ", ".join("?" * len(columns))
    with connect(db_path) as conn, write(conn):
        if conn.execute("SELECT 1 FROM keys WHERE name = ?", (name,)).fetchone():
            raise KeyExists(f"a key named {name!r} already exists")
        conn.execute(
            f"INSERT INTO keys ({', '.join(columns)}) VALUES ({marks})", [*columns.values()]
        )
        return _fetch_key(conn, name), secret


def list_keys(db_path: str) -> list[KeyRecord]:
    with connect(db_path) as conn:
        rows = conn.execute(f"SELECT {_KEY_COLUMNS} FROM keys ORDER BY name").fetchall()
    return [_key_from_row(row) for row in rows]


def get_key(db_path: str, name: str) -> KeyRecord:
    with connect(db_path) as conn:
        return _fetch_key(conn, name)


def update_key(db_path: str, name: str, **changes: Any) -> KeyRecord:
    """Change some of budget, models, rpm, tpm, concurrency, expires, disabled.

    ``None`` removes a budget, limit or expiry; ``models=()`` allows every model.
    """
    columns = key_columns(changes) | {"updated_at": utc_now_iso()}
    assignments = ", ".join(f"{column} = ?" for column in columns)  # fixed names only
    with connect(db_path) as conn, write(conn):
        cur = conn.execute(
            f"UPDATE keys SET {assignments} WHERE name = ?", [*columns.values(), name]
        )
        if cur.rowcount == 0:
            raise NoSuchKey(f"no key named {name!r}")
        return _fetch_key(conn, name)


def set_disabled(db_path: str, name: str, disabled: bool) -> KeyRecord:
    return update_key(db_path, name, disabled=disabled)


def delete_key(db_path: str, name: str) -> None:
    """Delete the key; its usage rows stay in the ledger under its name."""
    with connect(db_path) as conn, write(conn):
        if conn.execute("DELETE FROM keys WHERE name = ?", (name,)).rowcount == 0:
            raise NoSuchKey(f"no key named {name!r}")


def rotate_key(db_path: str, name: str) -> str:
    """Give the key a new secret and return it; the old secret stops working."""
    secret = new_secret()
    with connect(db_path) as conn, write(conn):
        cur = conn.execute(
            "UPDATE keys SET prefix = ?, secret_hash = ?, updated_at = ? WHERE name = ?",
            (display_prefix(secret), hash_secret(secret), utc_now_iso(), name),
        )
        if cur.rowcount == 0:
            raise NoSuchKey(f"no key named {name!r}")
    return secret


# --- server side: the key cache --------------------------------------------------------


async def open_async(db_path: str) -> aiosqlite.Connection:
    """An aiosqlite connection in autocommit mode, after creating the schema if needed."""
    try:
        await asyncio.to_thread(init_db, db_path)
        conn = await aiosqlite.connect(db_path, isolation_level=None)
    except sqlite3.Error as err:
        raise DbError(f"database {db_path}: {err}") from None
    try:
        for pragma in _PRAGMAS:
            await conn.execute(pragma)
    except sqlite3.Error as err:
        await conn.close()
        raise DbError(f"database {db_path}: {err}") from None
    return conn


MISS_REFRESH_S = 0.05  # how often an unknown key may trigger a freshness check


class KeyCache:
    """Every key in memory, by secret hash; a CLI change shows up within ``poll_s``.

    ``get`` is a dict lookup on the hot path. A background task asks SQLite for
    ``PRAGMA data_version``, which changes when another connection commits, and reloads
    every key when it did. Ledger commits change it too, which keeps ``spent_usd`` fresh.
    """

    def __init__(self, conn: aiosqlite.Connection, poll_s: float) -> None:
        self._conn = conn
        self._poll_s = poll_s
        self._by_hash: dict[str, KeyRecord] = {}
        self._by_name: dict[str, KeyRecord] = {}
        self._version: int | None = None
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self.generation = 0  # bumped on every reload
        self._miss_lock = asyncio.Lock()
        self._miss_checked = 0.0

    @classmethod
    async def open(cls, db_path: str, *, poll_s: float = 0.5) -> KeyCache:
        cache = cls(await open_async(db_path), poll_s)
        try:
            await cache.reload()
        except BaseException:
            await cache._conn.close()
            raise
        cache._task = asyncio.create_task(cache._poll(), name="edgeproxy-keycache")
        return cache

    def get(self, secret_hash: str) -> KeyRecord | None:
        return self._by_hash.get(secret_hash)

    async def get_fresh(self, secret_hash: str) -> KeyRecord | None:
        """A miss may be a key created a moment ago (``KEY=$(edgeproxy keys create x)``
        then a request at once): check for changes now instead of at the next poll.
        Single-flight and at most every ``MISS_REFRESH_S``, so a flood of unknown keys
        costs at most a few cheap ``data_version`` reads a second."""
        record = self._by_hash.get(secret_hash)
        if record is not None:
            return record
        loop = asyncio.get_running_loop()
        async with self._miss_lock:
            if loop.time() - self._miss_checked >= MISS_REFRESH_S:
                with contextlib.suppress(sqlite3.Error, ValueError):  # the poll reports errors
                    if await self._changed():
                        await self.reload()
                    else:  # only fruitless checks are throttled: those are what a flood causes
                        self._miss_checked = loop.time()
        return self._by_hash.get(secret_hash)

    def by_name(self, name: str) -> KeyRecord | None:
        return self._by_name.get(name)

    def all(self) -> list[KeyRecord]:
        return list(self._by_name.values())

    async def reload(self) -> None:
        """Read data_version first: a commit racing the read is caught by the next poll."""
        async with self._conn.execute("PRAGMA data_version") as cur:
            row = await cur.fetchone()
        rows = await self._conn.execute_fetchall(f"SELECT {_KEY_COLUMNS} FROM keys")
        records = [_key_from_row(r) for r in rows]
        self._by_hash = {r.secret_hash: r for r in records}
        self._by_name = {r.name: r for r in records}
        self._version = row[0] if row else None
        self.generation += 1

    async def _changed(self) -> bool:
        async with self._conn.execute("PRAGMA data_version") as cur:
            row = await cur.fetchone()
        return row is None or row[0] != self._version

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                if await self._changed():
                    await self.reload()
            except (sqlite3.Error, ValueError) as err:  # ValueError: a row edited by hand
                if not self._failing:
                    log.error("key cache: cannot read keys, serving the last ones: %s", err)
                self._failing = True
            else:
                if self._failing:
                    log.info("key cache: reading keys again")
                self._failing = False

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        await self._conn.close()

"""All SQLite, part two: the usage table. The batched idempotent writer, reports, pruning.

Job: ``Ledger`` takes one ``UsageRecord`` per model request without ever blocking the
caller, and commits them in batches on one writer connection; ``usage_report`` answers
``edgeproxy usage`` (SPEC §1); ``prune_usage`` deletes old rows for retention.

Rules: a completed request is billed once and never lost (SPEC §4): ``INSERT OR IGNORE``
by request id, ``spent_usd`` raised only for rows that were new, in the same transaction,
and a batch that failed stays queued. SQL is built only from fixed names here; user
input is always a bound parameter. Import these names from ``edgeproxy.db``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import re
import sqlite3
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

from edgeproxy.db import connect, open_connection, utc_now_iso, write
from edgeproxy.records import DbError, InvalidValue, UsageRecord, check_expires

log = logging.getLogger("edgeproxy.db")

_INSERT_USAGE = "INSERT OR IGNORE INTO usage VALUES (" + ", ".join("?" * 17) + ")"
# Record ids looked up per SELECT. Always this many (a short list is padded): SQLite
# compiles each distinct statement, and the connection keeps 128 of them, so statements
# of every length from 1 to N held tens of MB (seen as RSS growing under load).
_LOOKUP_IDS = 500
# SPEC §4: records are committed at most 200 ms behind. A record reaches the ledger up to
# bookkeeping.BATCH_S (20 ms) after its request ended, and the writer waits this long
# after the first record of a batch: 100 ms in all, leaving the rest of the 200 ms for the
# commit itself (benchmarks/results/ledger.json: waiting the full 200 ms put the slowest
# 1% at 203-266 ms).
BATCH_WAIT_S = 0.08
# Rows per transaction: bounds how long one commit holds the write lock and the event loop
# (about 4 us a row: 4 ms; at 5,000 requests a second a 100 ms batch is 500 rows).
_BATCH_ROWS = 1000
_BUSY_RETRY_S = 0.01  # another process holds the write lock: try again this much later
_CHECKPOINT_EVERY_S = 1.0  # WAL checkpoints, in a thread, at most this often
_SQL_TYPES = frozenset((type(None), str, int, float, bool))
_PROBE_AFTER_S = 10.0  # writable() writes a probe when nothing was committed for this long


def _usage_row(r: UsageRecord) -> tuple[Any, ...]:
    """The usage table's columns, in its order."""
    return (r.record_id, r.request_id, r.ts, r.key_id, r.key_name, r.model, r.upstream, r.endpoint,
            r.status, r.attempts, r.latency_ms, r.ttfb_ms, r.prompt_tokens,
            r.completion_tokens, r.cached_tokens, r.cost_usd, int(r.estimated))  # fmt: skip


class Ledger:
    """Usage records, committed in batches by one writer connection; never blocks a caller.

    ``record`` appends to a bounded in-memory queue. A background task commits what is
    queued at most ``interval_s`` after it arrived, on the event loop's thread (see
    ``_with_lock_retries`` for why, and why that never waits on a lock), in one
    transaction per batch:
    ``INSERT OR IGNORE`` by request id, and ``spent_usd`` raised only for rows that were
    new, so a replayed batch never bills twice. A failed batch stays queued and is
    retried. ``healthy`` turns False when a commit failed, when a record has waited
    longer than ``stall_s`` (SPEC §4: 5 s), or when the queue overflowed; the server
    then refuses new requests. It turns True again after the next good commit.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        db_path: str,
        *,
        interval_s: float,
        stall_s: float,
        max_queue: int,
    ) -> None:
        self._conn = conn
        self._db_path = db_path
        self._checkpointed = time.monotonic()
        self._checkpoint: asyncio.Task[None] | None = None
        self._interval_s = interval_s
        self._stall_s = stall_s
        self._max_queue = max_queue
        self._queue: deque[tuple[float, tuple[Any, ...]]] = deque()  # (enqueued at, row)
        self._lock = asyncio.Lock()  # one transaction at a time on the one connection
        self._wakeup = asyncio.Event()
        self._failed = False
        self._overflowed = False
        self._closed = False
        self._last_ok = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0  # records refused: queue full, ledger closed, or malformed

    @classmethod
    async def open(
        cls,
        db_path: str,
        *,
        interval_s: float = BATCH_WAIT_S,
        stall_s: float = 5.0,
        max_queue: int = 100_000,
    ) -> Ledger:
        conn = await asyncio.to_thread(_open, db_path)
        ledger = cls(conn, db_path, interval_s=interval_s, stall_s=stall_s, max_queue=max_queue)
        ledger._task = asyncio.create_task(ledger._run(), name="edgeproxy-ledger")
        return ledger

    def record(self, rec: UsageRecord) -> None:
        """Queue one record. Synchronous and O(1): the bookkeeper calls it for every
        finished request, and a request must never wait on SQLite."""
        row = _usage_row(rec)
        storable = _SQL_TYPES.issuperset(map(type, row)) and math.isfinite(rec.cost_usd)
        if not (storable and isinstance(rec.request_id, str) and rec.request_id):
            # A bug upstream of here; refused now, so it cannot block every batch behind it.
            self.dropped += 1
            log.error("ledger: dropping malformed usage record %r", rec.request_id)
        elif self._closed or len(self._queue) >= self._max_queue:
            self.dropped += 1
            if not self._overflowed:
                log.error("ledger: queue full or closed, dropping usage records")
            self._overflowed = True
        else:
            self._queue.append((time.monotonic(), row))
            if not self._wakeup.is_set():
                self._wakeup.set()

    @property
    def healthy(self) -> bool:
        """Cheap, read for every request: False means answer 503 ledger_unavailable."""
        if self._failed or self._overflowed:
            return False
        return not self._queue or time.monotonic() - self._queue[0][0] <= self._stall_s

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def writable(self) -> bool:
        """For /readyz: ``healthy``, and a real write when the ledger has been idle."""
        if self._closed:
            return False
        if self._queue or (not self._failed and time.monotonic() - self._last_ok < _PROBE_AFTER_S):
            return self.healthy
        async with self._lock:
            try:
                await self._with_lock_retries(_probe, self._conn)
            except sqlite3.Error as err:
                self._fail(err)
            else:
                self._ok()
        return self.healthy

    async def flush(self) -> None:
        """Commit everything queued now. Raises DbError if the database refuses it."""
        async with self._lock:
            while self._queue:
                n = min(len(self._queue), _BATCH_ROWS)
                rows = [row for _, row in itertools.islice(self._queue, n)]
                try:
                    await self._with_lock_retries(_commit, self._conn, rows)
                except sqlite3.Error as err:
                    self._fail(err)
                    raise DbError(f"ledger: {err}") from None
                for _ in range(n):
                    self._queue.popleft()
                self._ok()
                self._maybe_checkpoint()
                if self._queue:
                    await asyncio.sleep(0)  # a backlog: let requests run between batches

    async def close(self) -> None:
        """Stop the writer, commit what is queued (the SIGTERM path), close the connection."""
        if self._closed:
            return
        async with self._lock:  # not in the middle of a transaction
            if self._task is not None:
                self._task.cancel()
        if self._task is not None:
            await asyncio.wait([self._task])
        try:
            await self.flush()
        except DbError:
            log.error("ledger: %d usage records could not be written at shutdown", self.pending)
        finally:
            self._closed = True
            if self._checkpoint is not None:
                await asyncio.wait([self._checkpoint])
            self._conn.close()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            await asyncio.sleep(self._interval_s)  # gather a batch
            try:
                await self.flush()
            except DbError:
                pass  # logged by _fail; the batch stays queued and the next round retries it
            except Exception as err:  # a bug must not stop billing silently; no traceback in logs
                log.error("ledger: writer error: %r", err)
            if not self._queue:
                self._wakeup.clear()

    async def _with_lock_retries(self, fn: Any, *args: Any) -> None:
        """Run one transaction on the event loop's thread. The connection never waits for
        a lock (busy_timeout 0): while another process writes, the loop serves requests
        and the transaction is tried again ``_BUSY_RETRY_S`` later, for up to ``stall_s``.

        Why on the loop and not in a thread: a batch costs about 4 us a row of SQLite
        work, but handing it to a thread cost the worker 25 us a request more CPU in the
        benchmark (the GIL changing hands for every row bound and stepped)."""
        give_up = time.monotonic() + self._stall_s
        while True:
            try:
                fn(*args)
                return
            except sqlite3.OperationalError as err:
                code = getattr(err, "sqlite_errorcode", 0) & 0xFF  # extended codes too
                busy = code in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED
                if not busy or time.monotonic() >= give_up:
                    raise
            await asyncio.sleep(_BUSY_RETRY_S)

    def _maybe_checkpoint(self) -> None:
        """Move the WAL into the database in a thread (the ledger's connection does not
        checkpoint on commit: that would fsync on the event loop)."""
        now = time.monotonic()
        if now - self._checkpointed < _CHECKPOINT_EVERY_S:
            return
        if self._checkpoint is not None and not self._checkpoint.done():
            return
        self._checkpointed = now
        self._checkpoint = asyncio.create_task(asyncio.to_thread(_wal_checkpoint, self._db_path))

    def _fail(self, err: sqlite3.Error) -> None:
        if not self._failed:
            log.error("ledger: cannot write usage (%d queued, kept): %s", self.pending, err)
        self._failed = True

    def _ok(self) -> None:
        if self._failed:
            log.info("ledger: writing usage again")
        self._failed = False
        self._overflowed = self._overflowed and len(self._queue) >= self._max_queue
        self._last_ok = time.monotonic()


# --- the writer thread's side: plain sqlite3, one call per batch -------------------------


def _open(db_path: str) -> sqlite3.Connection:
    """The ledger's connection: made in a thread, then used on the event loop only."""
    conn = open_connection(db_path, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout=0")  # never block the loop: see _with_lock_retries
        conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run in a thread
    except sqlite3.Error as err:
        conn.close()
        raise DbError(f"database {db_path}: {err}") from None
    return conn


def _commit(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """One transaction: insert rows not yet there, and bill only those."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("SAVEPOINT batch")
        before = conn.total_changes
        conn.executemany(_INSERT_USAGE, rows)
        fresh = rows
        if conn.total_changes - before != len(rows):
            # Some were in the ledger already (a batch tried again after a commit that did
            # land, or one id twice): undo, then insert and bill only the new ones. The
            # common case needs no lookup at all.
            conn.execute("ROLLBACK TO batch")
            fresh = _fresh(conn, rows)
            conn.executemany(_INSERT_USAGE, fresh)
        spend: dict[int, float] = {}
        for row in fresh:
            key_id, cost = row[3], row[15]
            if key_id is not None and cost:
                spend[key_id] = spend.get(key_id, 0.0) + cost
        conn.executemany(
            "UPDATE keys SET spent_usd = spent_usd + ? WHERE id = ?",
            [(usd, key_id) for key_id, usd in spend.items()],
        )
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _fresh(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The rows whose record id is in neither the ledger nor an earlier row (under the
    write lock, so no race)."""
    seen: set[str] = set()
    record_ids = [row[0] for row in rows]
    for i in range(0, len(record_ids), _LOOKUP_IDS):
        chunk = record_ids[i : i + _LOOKUP_IDS]
        chunk += chunk[:1] * (_LOOKUP_IDS - len(chunk))  # one statement shape: see above
        seen.update(row[0] for row in conn.execute(_SELECT_EXISTING, chunk))
    fresh = []
    for row in rows:
        if row[0] not in seen:
            seen.add(row[0])
            fresh.append(row)
    return fresh


_SELECT_EXISTING = (
    f"SELECT record_id FROM usage WHERE record_id IN ({', '.join('?' * _LOOKUP_IDS)})"
)


def _probe(conn: sqlite3.Connection) -> None:
    """A real write, for /readyz when the ledger has been idle."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('ledger_probe', ?)", (utc_now_iso(),)
        )
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _wal_checkpoint(db_path: str) -> None:
    """A passive checkpoint on a connection of its own: it never blocks a writer."""
    try:
        with contextlib.closing(sqlite3.connect(db_path, timeout=1.0)) as conn:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    except sqlite3.Error as err:
        log.warning("ledger: WAL checkpoint failed: %s", err)


def _rollback(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):  # "no transaction is active" is fine
        conn.execute("ROLLBACK")


# --- retention and reports (synchronous: the CLI, the admin API through to_thread) -----

_PRUNE_ROWS = 10_000  # rows per delete transaction, so the writer never waits long


def prune_usage(db_path: str, older_than_ts: float) -> int:
    """Delete usage rows older than ``older_than_ts`` (unix seconds); returns how many."""
    deleted = 0
    with connect(db_path) as conn:
        while True:
            with write(conn):
                n = conn.execute(
                    "DELETE FROM usage WHERE rowid IN"
                    " (SELECT rowid FROM usage WHERE ts < ? LIMIT ?)",
                    (older_than_ts, _PRUNE_ROWS),
                ).rowcount
            deleted += n
            if n < _PRUNE_ROWS:
                return deleted


# A --by field -> its SQL expression. Only these fixed strings are ever put into SQL.
REPORT_FIELDS: dict[str, str] = {
    "key": "key_name",
    "model": "model",
    "upstream": "upstream",
    "day": "strftime('%Y-%m-%d', ts, 'unixepoch')",  # a UTC date
}
_SUMS = (
    "COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0),"
    " COALESCE(SUM(cached_tokens), 0), COALESCE(SUM(cost_usd), 0.0),"
    " COALESCE(SUM(estimated), 0)"
)
_SUM_NAMES = (
    "requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd",
    "estimated_requests",
)  # fmt: skip


def usage_report(
    db_path: str,
    *,
    key: str | None = None,
    since_ts: float | None = None,
    by: list[str] | None = None,
) -> dict[str, Any]:
    """SPEC §1 ``usage --json``: ``{"rows": [...], "total": {...}}``.

    Each row holds its ``by`` fields (default ``["key"]``) and the sums; rows are ordered
    by those fields. ``key`` keeps one key's rows, ``since_ts`` rows at or after it.
    """
    fields = list(dict.fromkeys(by or ["key"]))
    unknown = [f for f in fields if f not in REPORT_FIELDS]
    if unknown:
        raise InvalidValue(f"cannot group by {', '.join(unknown)}; use {', '.join(REPORT_FIELDS)}")
    where, params = ["1"], []
    if key is not None:
        where.append("key_name = ?")
        params.append(key)
    if since_ts is not None:
        where.append("ts >= ?")
        params.append(since_ts)
    group = ", ".join(REPORT_FIELDS[f] for f in fields)
    cond = " AND ".join(where)
    with connect(db_path) as conn:
        grouped = conn.execute(
            f"SELECT {group}, {_SUMS} FROM usage WHERE {cond} GROUP BY {group} ORDER BY {group}",
            params,
        ).fetchall()
        total = conn.execute(f"SELECT {_SUMS} FROM usage WHERE {cond}", params).fetchone()
    return {
        "rows": [
            dict(zip(fields, row, strict=False)) | _sums(row[len(fields) :]) for row in grouped
        ],
        "total": _sums(total),
    }


def _sums(values: tuple[Any, ...]) -> dict[str, Any]:
    sums = dict(zip(_SUM_NAMES, values, strict=True))
    sums["cost_usd"] = round(sums["cost_usd"], 12)  # float noise, not money: 1e-12 USD
    return sums


_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float) -> float:
    """``30m`` / ``24h`` / ``7d`` / ``2w`` back from now, or the UTC start of ``YYYY-MM-DD``."""
    if m := re.fullmatch(r"([0-9]+)([smhdw])", text.strip()):
        return now - int(m[1]) * _UNIT_S[m[2]]
    try:
        day = check_expires(text)
    except InvalidValue:
        raise InvalidValue(
            f"expected a duration such as 30m, 24h, 7d or a date YYYY-MM-DD, got {text!r}"
        ) from None
    assert day is not None
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()

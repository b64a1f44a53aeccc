"""Node-wide limits across worker processes: the supervisor's Limiter, reached over a
Unix socket.

With one worker the proxy uses ``LocalLimits`` (the Limiter in its own process). With
several, the supervisor runs ``LimiterServer`` and every worker a ``RemoteLimits`` client,
so rpm, tpm, concurrency and budgets hold for the whole node, whatever the number of
workers (SPEC §4). Only keys that carry a limit or a budget ever make this round trip.

Protocol: one JSON object per line, both ways.

    worker -> {"i": 7, "op": "admit", "key": {...}, "reserve": 0.001}
    server -> {"i": 7, "t": 42}                      admitted: ticket 42
    server -> {"i": 7, "code": "...", "message": "...", "retry_after": 3}
    worker -> {"op": "settle", "t": 42, "tokens": 120, "cost": 0.0004}   (no answer)

When a worker's connection drops (it crashed), the server releases that worker's tickets.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import Any

import orjson

from edgeproxy import errors
from edgeproxy.limits import KeyLimits, Limiter, Ticket

log = logging.getLogger("edgeproxy")

# The 429s a limiter raises, by code, to raise them again on the worker's side.
_REFUSALS: dict[str, type[errors.ProxyError]] = {
    cls.code: cls
    for cls in (errors.RateLimitExceeded, errors.ConcurrencyLimitExceeded, errors.InsufficientQuota)
}
_TIMEOUT_S = 2.0  # an admission that waits longer than this on the supervisor fails closed


class LocalLimits:
    """The single-process case: the Limiter itself, behind the same interface."""

    def __init__(self, limiter: Limiter | None = None) -> None:
        self.limiter = limiter or Limiter()

    async def admit(self, key: KeyLimits, reserve_usd: float) -> Ticket:
        return self.limiter.admit(key, reserve_usd)

    def settle(self, ticket: Ticket, tokens: int, cost_usd: float) -> None:
        self.limiter.settle(ticket, tokens, cost_usd)

    async def close(self) -> None:
        return None


@dataclass(slots=True)
class _Key:
    """A key's limit fields as they travel over the socket."""

    id: int
    name: str
    rpm: int | None
    tpm: int | None
    concurrency: int | None
    budget_usd: float | None
    spent_usd: float


def _key_json(key: KeyLimits) -> dict[str, Any]:
    return {f: getattr(key, f) for f in _Key.__slots__}  # type: ignore[attr-defined]


class RemoteLimits:
    """A worker's client of the supervisor's LimiterServer."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._connecting = asyncio.Lock()

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                reader, self._writer = await asyncio.open_unix_connection(self.path)
                self._reader_task = asyncio.create_task(self._read(reader))
            return self._writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                reply = orjson.loads(line)
                future = self._waiting.pop(reply.get("i"), None)
                if future is not None and not future.done():
                    future.set_result(reply)
        except (ConnectionError, orjson.JSONDecodeError):
            pass
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError("limiter connection lost"))
            self._waiting.clear()
            self._writer = None

    async def admit(self, key: KeyLimits, reserve_usd: float) -> Ticket:
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            writer = await self._connect()
            writer.write(orjson.dumps({"i": request_id, "op": "admit", "key": _key_json(key),
                                       "reserve": reserve_usd}) + b"\n")  # fmt: skip
            async with asyncio.timeout(_TIMEOUT_S):
                reply = await future
        except (OSError, TimeoutError):
            # fail closed: a limited key must not run unlimited because the supervisor is away
            raise errors.ServerOverloaded(
                "limits are unavailable; retry shortly", retry_after=1
            ) from None
        finally:
            self._waiting.pop(request_id, None)
        if "t" in reply:
            return Ticket(key.id, reserve_usd, ref=reply["t"])
        refusal = _REFUSALS.get(reply.get("code", ""), errors.RateLimitExceeded)
        raise refusal(reply.get("message"), retry_after=reply.get("retry_after"))

    def settle(self, ticket: Ticket, tokens: int, cost_usd: float) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            return  # the server released this worker's tickets when the connection dropped
        writer.write(
            orjson.dumps({"op": "settle", "t": ticket.ref, "tokens": tokens, "cost": cost_usd})
            + b"\n"
        )

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task


class LimiterServer:
    """The supervisor's side: one Limiter for the node, a connection per worker."""

    def __init__(self, path: str, limiter: Limiter | None = None) -> None:
        self.path = path
        self.limiter = limiter or Limiter()
        self._tickets = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held: dict[int, Ticket] = {}  # this worker's open tickets
        try:
            while line := await reader.readline():
                message = orjson.loads(line)
                if message.get("op") == "admit":
                    writer.write(self._admit(message, held) + b"\n")
                elif message.get("op") == "settle":
                    ticket = held.pop(message.get("t"), None)
                    if ticket is not None:
                        self.limiter.settle(
                            ticket, int(message.get("tokens") or 0), float(message.get("cost") or 0)
                        )
        except (ConnectionError, orjson.JSONDecodeError, ValueError, TypeError) as exc:
            log.warning(
                orjson.dumps(
                    {"event": "limiter_connection_error", "error": type(exc).__name__}
                ).decode()
            )
        finally:
            for ticket in held.values():  # the worker is gone: free its slots and reservations
                self.limiter.settle(ticket, 0, 0.0)
            writer.close()

    def _admit(self, message: dict[str, Any], held: dict[int, Ticket]) -> bytes:
        key = _Key(**message["key"])
        try:
            ticket = self.limiter.admit(key, float(message.get("reserve") or 0.0))
        except errors.ProxyError as exc:
            return orjson.dumps({"i": message.get("i"), "code": exc.code, "message": exc.message,
                                 "retry_after": exc.retry_after})  # fmt: skip
        ref = next(self._tickets)
        held[ref] = ticket
        return orjson.dumps({"i": message.get("i"), "t": ref})

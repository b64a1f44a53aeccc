"""Per-key admission limits: requests per minute, tokens per minute, concurrency, budget.

Job: ``Limiter.admit`` decides whether a key may start one more model request and returns
a ``Ticket``; ``Limiter.settle`` is called exactly once per ticket when the request ends,
with its tokens and cost. One ``Limiter`` is the authority for a whole node (the supervisor
hosts it when there are several workers), so limits hold whatever the worker count.

- rpm: admitted requests in a sliding 60 s window (a request refused by a limit does not
  count, or a client that keeps knocking would never get back in).
- tpm: tokens of the requests that *finished* in the last 60 s (SPEC §4).
- concurrency: requests in flight.
- budget: spent (from the database once, then kept here as requests settle) plus what
  in-flight requests reserved must stay below the budget for a new request to start; the
  overshoot is therefore bounded by what is in flight.

Pure: no sockets, no SQLite; time is injected.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from edgeproxy import errors

WINDOW_S = 60.0
COST_SMOOTHING = 0.2  # weight of the newest cost in the moving average


@dataclass(slots=True)
class Ticket:
    key_id: int
    reserved_usd: float
    ref: int = 0  # the supervisor's ticket number when the limiter is remote


@dataclass(slots=True)
class KeyWindow:
    requests: deque[float] = field(default_factory=deque)  # admission times
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (finish time, tokens)
    tokens_sum: int = 0
    inflight: int = 0
    reserved_usd: float = 0.0
    spent_usd: float | None = None  # None until first seen: then taken from the database
    typical_cost_usd: float = 0.0  # moving average of settled costs: the least a request reserves


class KeyLimits(Protocol):
    """The limit fields of a key, as the limiter needs them (a KeyRecord has them all)."""

    id: int
    name: str
    rpm: int | None
    tpm: int | None
    concurrency: int | None
    budget_usd: float | None
    spent_usd: float


class Limiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.windows: dict[int, KeyWindow] = {}

    def admit(self, key: KeyLimits, reserve_usd: float = 0.0) -> Ticket:
        """Raise the 429 of the first limit reached, else count the request in."""
        now = self.clock()
        w = self.windows.get(key.id)
        if w is None:
            w = self.windows[key.id] = KeyWindow()
        self._expire(w, now)
        if w.spent_usd is None or key.spent_usd > w.spent_usd:
            w.spent_usd = key.spent_usd  # the database knows more (another node, a restart)
        if key.budget_usd is not None and w.spent_usd + w.reserved_usd >= key.budget_usd:
            raise errors.InsufficientQuota(
                f"key '{key.name}' has spent its budget of ${key.budget_usd:g}"
            )
        if key.concurrency is not None and w.inflight >= key.concurrency:
            raise errors.ConcurrencyLimitExceeded(
                f"key '{key.name}' allows {key.concurrency} concurrent requests", retry_after=1
            )
        if key.rpm is not None and len(w.requests) >= key.rpm:
            wait = w.requests[0] + WINDOW_S - now
            raise errors.RateLimitExceeded(
                f"key '{key.name}' allows {key.rpm} requests per minute", retry_after=_seconds(wait)
            )
        if key.tpm is not None and w.tokens_sum >= key.tpm:
            raise errors.RateLimitExceeded(
                f"key '{key.name}' allows {key.tpm} tokens per minute",
                retry_after=_seconds(self._tokens_wait(w, key.tpm, now)),
            )
        if key.rpm is not None:
            w.requests.append(now)
        # A prompt estimate alone under-reserves: before costs are known, reserve what this
        # key's requests have recently cost, so a burst stops near the budget, not far past it.
        reserve_usd = max(reserve_usd, w.typical_cost_usd)
        w.inflight += 1
        w.reserved_usd += reserve_usd
        return Ticket(key.id, reserve_usd)

    def settle(self, ticket: Ticket, tokens: int, cost_usd: float) -> None:
        """The request ended: free its slot, swap its reservation for its real cost."""
        w = self.windows.get(ticket.key_id)
        if w is None:
            return
        w.inflight = max(0, w.inflight - 1)
        w.reserved_usd = max(0.0, w.reserved_usd - ticket.reserved_usd)
        if w.spent_usd is not None:
            w.spent_usd += cost_usd
        if cost_usd > 0:
            w.typical_cost_usd = (
                cost_usd
                if not w.typical_cost_usd
                else (COST_SMOOTHING * cost_usd + (1 - COST_SMOOTHING) * w.typical_cost_usd)
            )
        if tokens > 0:
            w.tokens.append((self.clock(), tokens))
            w.tokens_sum += tokens

    def _expire(self, w: KeyWindow, now: float) -> None:
        horizon = now - WINDOW_S
        while w.requests and w.requests[0] <= horizon:
            w.requests.popleft()
        while w.tokens and w.tokens[0][0] <= horizon:
            w.tokens_sum -= w.tokens.popleft()[1]

    @staticmethod
    def _tokens_wait(w: KeyWindow, tpm: int, now: float) -> float:
        """Seconds until enough finished tokens leave the window to get under ``tpm``."""
        excess = w.tokens_sum - tpm + 1
        for finished, tokens in w.tokens:
            excess -= tokens
            if excess <= 0:
                return finished + WINDOW_S - now
        return WINDOW_S


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait))


def needs_limiter(key: KeyLimits) -> bool:
    """Keys with no limit and no budget skip the limiter entirely (the common fast path)."""
    return not (
        key.rpm is None and key.tpm is None and key.concurrency is None and key.budget_usd is None
    )

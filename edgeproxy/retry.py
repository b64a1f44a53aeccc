"""When to try again, how long to wait first, and whether the relay can afford it.

Pure: the caller sleeps, and time comes from an injected ``clock``. Outcomes are the
words of ``retry.on`` in relay.yaml: an HTTP status (int) or ``connect_error`` /
``timeout`` / ``empty_response``.

- ``should_retry``: the outcome is in ``retry.on`` (or our own key was refused) and
  tries are left.
- ``delay``: full jitter, ``uniform(0, min(max_backoff, backoff * 2**(n-1)))`` (AWS
  "Exponential Backoff and Jitter"; envoy's router filter does the same).
- ``overall_deadline_s``: one deadline for all the tries of a request, up to its
  commit point.
- ``RetryBudget``: retries may be at most a fraction of recent requests, so a failing
  upstream cannot multiply the load on the others (Envoy's ``retry_budget``, Finagle's
  ``RetryBudget``).

It must not: sleep, read the wall clock, or know about sockets.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable

from edgeproxy.config import Retry, Timeouts

Outcome = int | str

# An upstream that refused our own key: always worth another upstream, never shown.
KEY_REFUSED: frozenset[int] = frozenset({401, 403})


def should_retry(policy: Retry, outcome: Outcome, attempt: int) -> bool:
    """``attempt`` is the number of tries made so far (1 after the first)."""
    if attempt >= policy.attempts:
        return False
    return outcome in KEY_REFUSED or outcome in policy.on


def delay(policy: Retry, attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before try ``attempt + 1``: the first wait is at most ``backoff``."""
    cap = min(policy.max_backoff, policy.backoff * (2 ** (attempt - 1)))
    return (rng or random).uniform(0, cap)


def overall_deadline_s(policy: Retry, timeouts: Iterable[Timeouts]) -> float:
    """How long all the tries of one request may take, backoff sleeps included, until
    its commit point: ``retry.attempts`` times the slowest allowed try (``connect`` +
    ``first_byte``) among the upstreams that may serve it.

    Why this bound: each try keeps its own timeouts (one hang cannot use up the time of
    the tries after it), while sleeps and slow connects come out of the same budget
    instead of adding to it, so a client never waits longer than ``attempts`` hung tries.
    A try that starts late gets only what is left. After the commit point only ``idle``
    applies: a long stream is never cut.
    """
    slowest = max((t.connect + t.first_byte for t in timeouts), default=0.0)
    return policy.attempts * slowest


class RetryBudget:
    """Retries allowed only while, over the last ``window_s``, they stay within
    ``ratio`` of the requests seen plus a floor of ``floor`` retries.

    Why: with ``retry.attempts: 3`` an upstream that fails everything can triple the
    load it sends elsewhere exactly when the pool is short of capacity. The budget
    (after Envoy's ``retry_budget`` and Finagle's ``RetryBudget``, both 20 %) caps that
    at 1.2x; the floor keeps a quiet relay (a few requests a second) retrying every
    failure. Ejection takes a hard-down upstream out after ``eject_after`` failures, so
    the budget only binds when an upstream flaps or the whole pool is failing.

    Counts live in ``buckets`` slots of ``window_s / buckets`` seconds: constant memory
    and O(buckets) work per call, whatever the request rate.
    """

    __slots__ = ("_clock", "_epochs", "_requests", "_retries", "_width", "floor", "ratio")

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        floor: int = 10,
        window_s: float = 10.0,
        buckets: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.floor = floor
        self._width = window_s / buckets
        self._clock = clock
        self._epochs = [-1] * buckets  # which time slot each bucket counts now
        self._requests = [0] * buckets
        self._retries = [0] * buckets

    def _bucket(self) -> tuple[int, int]:
        epoch = int(self._clock() // self._width)
        i = epoch % len(self._epochs)
        if self._epochs[i] != epoch:
            self._epochs[i] = epoch
            self._requests[i] = self._retries[i] = 0
        return epoch, i

    def _totals(self) -> tuple[int, int]:
        epoch, _ = self._bucket()
        oldest = epoch - len(self._epochs)
        live = [i for i, e in enumerate(self._epochs) if e > oldest]
        return sum(self._requests[i] for i in live), sum(self._retries[i] for i in live)

    def request(self) -> None:
        """Count a client request (once, however many tries it takes)."""
        _, i = self._bucket()
        self._requests[i] += 1

    def can_retry(self) -> bool:
        """Whether one more retry would stay within the budget; does not spend it."""
        if self.floor >= 1 and not any(self._retries):
            return True  # asked before every try: no retry counted at all is the common case
        requests, retries = self._totals()
        return retries + 1 <= self.ratio * requests + self.floor

    def try_retry(self) -> bool:
        """Spend one retry if the budget allows it."""
        if not self.can_retry():
            return False
        _, i = self._bucket()
        self._retries[i] += 1
        return True

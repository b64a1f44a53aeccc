"""When to try again and how long to wait first.

Pure: the caller sleeps. Outcomes are the words of ``retry.on`` in relay.yaml: an HTTP
status (int) or ``connect_error`` / ``timeout`` / ``empty_response``. Backoff is full
jitter, ``uniform(0, min(max_backoff, backoff * 2**n))`` (AWS "Exponential Backoff and
Jitter"; envoy's router filter does the same).
"""

from __future__ import annotations

import random

from edgeproxy.config import Retry

Outcome = int | str

# An upstream that refused our own key: always worth another upstream, never shown.
KEY_REFUSED: frozenset[int] = frozenset({401, 403})


def should_retry(policy: Retry, outcome: Outcome, attempt: int) -> bool:
    """``attempt`` is the number of tries made so far (1 after the first)."""
    if attempt >= policy.attempts:
        return False
    return outcome in KEY_REFUSED or outcome in policy.on


def delay(policy: Retry, attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before try ``attempt + 1``."""
    cap = min(policy.max_backoff, policy.backoff * (2 ** (attempt - 1)))
    return (rng or random).uniform(0, cap)

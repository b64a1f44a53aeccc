"""retry.py: should_retry, full-jitter delay bounds, the overall deadline, the retry budget.

Pure: no sockets, no loop; the budget gets an injected clock.
"""

from __future__ import annotations

import random

import pytest

from edgeproxy.config import Retry, Timeouts
from edgeproxy.retry import RetryBudget, delay, overall_deadline_s, should_retry

POLICY = Retry(attempts=3, backoff=0.2, max_backoff=1.0)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "outcome", [429, 500, 502, 503, 504, "connect_error", "timeout", "empty_response"]
)
def test_every_default_retry_on_outcome_is_retried(outcome: int | str) -> None:
    assert should_retry(POLICY, outcome, 1)
    assert should_retry(POLICY, outcome, 2)


@pytest.mark.parametrize("outcome", [400, 404, 422, 501, "bogus"])
def test_outcomes_outside_retry_on_are_not_retried(outcome: int | str) -> None:
    assert not should_retry(POLICY, outcome, 1)


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_upstream_key_is_retried_even_when_not_listed(status: int) -> None:
    assert should_retry(Retry(attempts=3, on=frozenset({500})), status, 1)


def test_attempts_bound_every_outcome() -> None:
    assert not should_retry(POLICY, 503, 3)
    assert not should_retry(POLICY, 401, 3)
    assert not should_retry(Retry(attempts=1), 503, 1)


def test_retry_on_is_the_operators_list() -> None:
    policy = Retry(attempts=3, on=frozenset({503, "timeout"}))
    assert should_retry(policy, 503, 1) and should_retry(policy, "timeout", 1)
    assert not should_retry(policy, 500, 1) and not should_retry(policy, "connect_error", 1)


def test_delay_is_full_jitter_under_a_doubling_cap() -> None:
    rng = random.Random(7)
    for attempt, cap in [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (10, 1.0), (60, 1.0)]:
        samples = [delay(POLICY, attempt, rng) for _ in range(2000)]
        assert all(0.0 <= s <= cap for s in samples)
        # full jitter: spread over the whole range, not clustered at the cap
        assert min(samples) < cap * 0.05 and max(samples) > cap * 0.95
        assert abs(sum(samples) / len(samples) - cap / 2) < cap * 0.05


def test_delay_is_reproducible_with_a_seeded_rng() -> None:
    a = [delay(POLICY, n, random.Random(3)) for n in (1, 2, 3)]
    b = [delay(POLICY, n, random.Random(3)) for n in (1, 2, 3)]
    assert a == b


def test_overall_deadline_is_attempts_times_the_slowest_try() -> None:
    fast = Timeouts(connect=1.0, first_byte=10.0)
    slow = Timeouts(connect=2.0, first_byte=30.0)
    assert overall_deadline_s(POLICY, [fast, slow]) == 3 * 32.0
    assert overall_deadline_s(Retry(attempts=1), [fast]) == 11.0
    assert overall_deadline_s(POLICY, []) == 0.0


def test_budget_floor_lets_a_quiet_relay_retry_every_failure() -> None:
    budget = RetryBudget(clock=Clock())
    for _ in range(12):
        budget.request()
        assert budget.try_retry()
    budget.request()
    assert not budget.try_retry()  # 13 retries > 20% of 13 requests + 10


def test_budget_allows_twenty_percent_of_requests_plus_the_floor() -> None:
    budget = RetryBudget(clock=Clock())
    for _ in range(1000):
        budget.request()
    allowed = 0
    while budget.try_retry():
        allowed += 1
    assert allowed == 210  # 0.2 * 1000 + 10
    assert not budget.can_retry()


def test_can_retry_does_not_spend() -> None:
    budget = RetryBudget(floor=1, clock=Clock())
    assert budget.can_retry() and budget.can_retry()
    assert budget.try_retry()
    assert not budget.can_retry() and not budget.try_retry()


def test_budget_window_slides_and_forgets() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.0, floor=2, window_s=10.0, buckets=10, clock=clock)
    assert budget.try_retry() and budget.try_retry()
    assert not budget.try_retry()
    clock.now += 5.0
    assert not budget.try_retry()  # still inside the window
    clock.now += 5.0
    assert budget.try_retry()  # the first bucket aged out


def test_budget_counts_requests_only_inside_the_window() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.5, floor=0, clock=clock)
    for _ in range(10):
        budget.request()
    assert budget.try_retry()
    clock.now += 11.0  # the requests aged out; the retry too
    assert not budget.can_retry()
    budget.request()
    budget.request()
    assert budget.try_retry() and not budget.try_retry()


def test_budget_survives_a_long_silence() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.0, floor=1, clock=clock)
    assert budget.try_retry()
    clock.now += 3600.0 * 24  # a stale bucket whose slot index comes round again
    assert budget.try_retry()
    assert not budget.try_retry()

"""The limiter's rules, with an injected clock (no sockets)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from edgeproxy import errors
from edgeproxy.limits import Limiter, needs_limiter


@dataclass
class Key:
    id: int = 1
    name: str = "k"
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    budget_usd: float | None = None
    spent_usd: float = 0.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keys_without_limits_skip_the_limiter():
    assert not needs_limiter(Key())
    assert needs_limiter(Key(rpm=1)) and needs_limiter(Key(budget_usd=0))


def test_rpm_is_a_sliding_minute_with_retry_after():
    clock = Clock()
    limiter = Limiter(clock)
    key = Key(rpm=2)
    limiter.admit(key)
    clock.now += 20
    limiter.admit(key)
    clock.now += 10
    with pytest.raises(errors.RateLimitExceeded) as refused:
        limiter.admit(key)
    assert refused.value.retry_after == 30  # the first request leaves the window at +60 s
    clock.now += 30
    limiter.admit(key)  # the first one slid out


def test_tpm_counts_tokens_of_finished_requests():
    clock = Clock()
    limiter = Limiter(clock)
    key = Key(tpm=100)
    t1 = limiter.admit(key)
    t2 = limiter.admit(key)  # in flight tokens do not count yet
    limiter.settle(t1, tokens=60, cost_usd=0)
    clock.now += 10
    limiter.settle(t2, tokens=50, cost_usd=0)
    with pytest.raises(errors.RateLimitExceeded) as refused:
        limiter.admit(key)
    assert refused.value.retry_after == 50  # when the first 60 tokens leave the window
    clock.now += 50
    limiter.admit(key)


def test_concurrency_frees_on_settle():
    limiter = Limiter(Clock())
    key = Key(concurrency=1)
    ticket = limiter.admit(key)
    with pytest.raises(errors.ConcurrencyLimitExceeded) as refused:
        limiter.admit(key)
    assert refused.value.retry_after == 1 and refused.value.status == 429
    limiter.settle(ticket, tokens=0, cost_usd=0)
    limiter.admit(key)


def test_budget_counts_spend_and_reservations():
    limiter = Limiter(Clock())
    key = Key(budget_usd=1.0, spent_usd=0.5)
    first = limiter.admit(key, reserve_usd=0.4)
    second = limiter.admit(key, reserve_usd=0.2)  # 0.5 + 0.4 < 1: still admitted
    with pytest.raises(errors.InsufficientQuota):
        limiter.admit(key, reserve_usd=0.1)  # 0.5 + 0.6 >= 1
    limiter.settle(first, tokens=10, cost_usd=0.01)
    limiter.settle(second, tokens=10, cost_usd=0.01)
    limiter.admit(key)  # 0.52 spent, nothing reserved


def test_zero_budget_admits_nothing():
    with pytest.raises(errors.InsufficientQuota):
        Limiter(Clock()).admit(Key(budget_usd=0.0))


def test_database_spend_wins_when_it_is_ahead():
    limiter = Limiter(Clock())
    limiter.settle(limiter.admit(Key(budget_usd=1.0)), tokens=1, cost_usd=0.1)
    with pytest.raises(errors.InsufficientQuota):
        limiter.admit(Key(budget_usd=1.0, spent_usd=1.0))  # e.g. another node spent it

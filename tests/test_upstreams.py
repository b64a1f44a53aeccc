"""upstreams.py: pick by tier and weight, exclusion, ejection and its doubling, the trial
request, cooling, key rotation and refusal, carry-over on reload.

Pure: a seeded rng and an injected clock, no sockets.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from edgeproxy.config import Health, Timeouts, Upstream
from edgeproxy.upstreams import MAX_EJECTION_S, UpstreamSet, UpstreamState

HEALTH = Health(eject_after=3, eject_for=10.0)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def up(name: str, *, weight: int = 1, priority: int = 0, models: tuple[str, ...] = ("gpt-*",),
       keys: tuple[str, ...] = ("k1",), kind: str = "openai") -> Upstream:  # fmt: skip
    return Upstream(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        base_url=f"http://{name}.invalid/v1",
        api_keys=keys,
        models=models,
        weight=weight,
        priority=priority,
        timeouts=Timeouts(connect=1.0, first_byte=4.0),
    )


def pool(*upstreams: Upstream, clock: Clock | None = None, seed: int = 1) -> UpstreamSet:
    return UpstreamSet(upstreams, HEALTH, clock=clock or Clock(), rng=random.Random(seed))


def fail(state: UpstreamState, clock: Clock, times: int = 1) -> None:
    for _ in range(times):
        state.record_failure(clock(), HEALTH)


# --- pick: tiers, weights, exclusion -------------------------------------------------


def test_weighted_random_inside_the_lowest_tier() -> None:
    s = pool(up("a", weight=3), up("b", weight=1), up("c", priority=1, weight=100))
    counts = Counter(s.pick("gpt-4o").name for _ in range(4000))  # type: ignore[union-attr]
    assert set(counts) == {"a", "b"}  # c is in a higher tier
    assert 0.70 < counts["a"] / 4000 < 0.80


def names(s: UpstreamSet, n: int, model: str = "gpt-x") -> list[str]:
    return [s.pick(model).name for _ in range(n)]  # type: ignore[union-attr]


def test_pick_is_reproducible_with_a_seeded_rng() -> None:
    s1, s2 = pool(up("a"), up("b"), up("c"), seed=5), pool(up("a"), up("b"), up("c"), seed=5)
    first = names(s1, 50)
    assert first == names(s2, 50)
    assert set(first) == {"a", "b", "c"}


def test_only_upstreams_serving_the_model_are_picked() -> None:
    s = pool(up("a", models=("claude-*",)), up("b"))
    assert {s.pick("gpt-4o").name for _ in range(50)} == {"b"}  # type: ignore[union-attr]
    assert s.pick("gemini-pro") is None
    assert s.serves("claude-x") and not s.serves("gemini-pro")
    assert not s.serves("claude-x", frozenset({"anthropic"}))


def test_a_retry_prefers_an_untried_upstream_of_the_same_tier_then_the_next_tier() -> None:
    s = pool(up("a"), up("b"), up("c", priority=1), up("d", priority=2))
    for _ in range(50):
        assert s.pick("gpt-x", {"a"}).name == "b"  # type: ignore[union-attr]
        assert s.pick("gpt-x", {"a", "b"}).name == "c"  # type: ignore[union-attr]
        assert s.pick("gpt-x", {"a", "b", "c"}).name == "d"  # type: ignore[union-attr]


def test_when_everything_was_tried_the_lowest_tier_is_tried_again() -> None:
    s = pool(up("a"), up("c", priority=1))
    assert s.pick("gpt-x", {"a", "c"}).name == "a"  # type: ignore[union-attr]


def test_kinds_limit_the_pick() -> None:
    s = pool(up("a", kind="anthropic"), up("b", priority=1))
    assert s.pick("gpt-x", kinds=frozenset({"openai"})).name == "b"  # type: ignore[union-attr]


def test_an_unhealthy_tier_falls_through_to_the_next() -> None:
    clock = Clock()
    s = pool(up("a"), up("b", priority=1), clock=clock)
    fail(s.by_name["a"], clock, 3)
    assert s.pick("gpt-x").name == "b"  # type: ignore[union-attr]


# --- ejection, doubling, trial --------------------------------------------------------


def test_eject_after_consecutive_failures_only() -> None:
    clock = Clock()
    s = pool(up("a"), clock=clock)
    a = s.by_name["a"]
    fail(a, clock, 2)
    a.record_success()  # resets the run
    fail(a, clock, 2)
    assert s.pick("gpt-x") is a
    a.record_success()
    fail(a, clock, 3)
    assert s.pick("gpt-x") is None
    assert not s.any_healthy()
    assert s.unhealthy_reasons() == ["a: ejected for 10s more"]


def test_ejection_doubles_on_a_failed_trial_and_resets_on_success() -> None:
    clock = Clock()
    s = pool(up("a"), clock=clock)
    a = s.by_name["a"]
    fail(a, clock, 3)
    assert a.ejected_until == clock.now + 10.0
    for expected in (20.0, 40.0, 80.0):
        clock.now = a.ejected_until
        assert s.pick("gpt-x") is a  # the trial
        fail(a, clock)  # one failed trial is enough
        assert a.ejected_until == clock.now + expected
    clock.now = a.ejected_until
    assert s.pick("gpt-x") is a
    a.record_success()
    assert not a.trial_pending and a.ejections == 0
    fail(a, clock, 2)
    assert s.pick("gpt-x") is a  # back to eject_after failures in a row
    fail(a, clock)
    assert a.ejected_until == clock.now + 10.0  # and back to eject_for


def test_ejection_doubling_is_capped() -> None:
    clock = Clock()
    a = UpstreamState(up("a"))
    fail(a, clock, 3)
    for _ in range(40):
        clock.now = a.ejected_until
        fail(a, clock)
    assert a.ejected_until - clock.now == MAX_EJECTION_S


def test_failures_of_requests_in_flight_at_ejection_do_not_extend_it() -> None:
    clock = Clock()
    a = UpstreamState(up("a"))
    fail(a, clock, 3)
    until = a.ejected_until
    clock.now += 1.0
    fail(a, clock, 20)  # stragglers that were sent before the ejection
    assert a.ejected_until == until and a.ejections == 1


def test_one_trial_request_at_a_time_after_an_ejection() -> None:
    clock = Clock()
    s = pool(up("a"), up("b"), clock=clock)
    a = s.by_name["a"]
    fail(a, clock, 3)
    clock.now = a.ejected_until
    picks = [s.pick("gpt-x", {"b"}) for _ in range(3)]
    assert picks[0] is a  # the trial
    assert picks[1].name == picks[2].name == "b"  # type: ignore[union-attr]
    a.record_success()
    assert s.pick("gpt-x", {"b"}) is a and s.pick("gpt-x", {"b"}) is a  # restored


def test_a_trial_without_verdict_frees_its_slot() -> None:
    clock = Clock()
    s = pool(up("a"), clock=clock)
    a = s.by_name["a"]
    fail(a, clock, 3)
    clock.now = a.ejected_until
    assert s.pick("gpt-x") is a
    assert s.pick("gpt-x") is None
    a.release_trial()  # e.g. the client went away
    assert s.pick("gpt-x") is a  # another trial
    assert a.trial_pending


def test_a_lost_trial_frees_its_slot_after_connect_plus_first_byte() -> None:
    clock = Clock()
    s = pool(up("a"), clock=clock)
    a = s.by_name["a"]
    fail(a, clock, 3)
    clock.now = a.ejected_until
    assert s.pick("gpt-x") is a
    clock.now += 4.9
    assert s.pick("gpt-x") is None
    clock.now += 0.2  # connect 1 s + first_byte 4 s
    assert s.pick("gpt-x") is a


# --- cooling and keys -----------------------------------------------------------------


def test_cooling_takes_an_upstream_out_until_then_without_being_unhealthy() -> None:
    clock = Clock()
    s = pool(up("a"), up("b"), clock=clock)
    s.by_name["a"].cool(clock.now + 5.0)
    assert {s.pick("gpt-x").name for _ in range(20)} == {"b"}  # type: ignore[union-attr]
    assert s.cooling_wait("gpt-x") is None  # b is not cooling
    s.by_name["b"].cool(clock.now + 2.5)
    assert s.pick("gpt-x") is None
    assert s.cooling_wait("gpt-x") == 2.5  # the first to come back
    assert s.any_healthy()  # cooling is not unhealthy (/readyz stays 200)
    clock.now += 2.5
    assert s.pick("gpt-x").name == "b"  # type: ignore[union-attr]


def test_cooling_only_extends() -> None:
    a = UpstreamState(up("a"))
    a.cool(50.0)
    a.cool(20.0)
    assert a.cooling_until == 50.0


def test_keys_rotate_round_robin() -> None:
    a = UpstreamState(up("a", keys=("k1", "k2", "k3")))
    assert [a.next_key() for _ in range(6)] == ["k1", "k2", "k3", "k1", "k2", "k3"]


def test_a_refused_key_leaves_the_rotation_and_the_last_one_ejects() -> None:
    clock = Clock()
    s = pool(up("a", keys=("k1", "k2")), up("b", priority=1), clock=clock)
    a = s.by_name["a"]
    a.drop_key("k1")
    assert [a.next_key() for _ in range(3)] == ["k2", "k2", "k2"]
    assert s.pick("gpt-x") is a
    a.drop_key("k2")
    a.drop_key("k2")  # twice: harmless
    assert s.pick("gpt-x").name == "b"  # type: ignore[union-attr]
    assert not a.healthy(clock.now)
    assert s.unhealthy_reasons() == ["a: every api key was refused by the upstream"]


# --- reload ---------------------------------------------------------------------------


def test_health_and_budget_carry_over_a_reload_by_name_and_keys() -> None:
    clock = Clock()
    old = pool(up("a"), up("b", keys=("k1", "k2")), up("c"), clock=clock)
    fail(old.by_name["a"], clock, 3)
    old.by_name["b"].drop_key("k1")
    old.by_name["c"].cool(clock.now + 9)
    old.budget.request()
    new = pool(up("a"), up("b", keys=("k1", "k2")), up("c", keys=("k9",)), clock=clock)
    new.carry_over(old)
    assert new.by_name["a"].ejected_until == old.by_name["a"].ejected_until
    assert new.by_name["a"].trial_pending
    assert new.by_name["b"].keys == ["k2"]
    assert new.by_name["c"].cooling_until == 0.0  # new keys: a fresh start
    assert new.budget is old.budget


@pytest.mark.parametrize("model", ["gpt-4o", "unknown-model"])
def test_candidates_are_every_configured_upstream_serving_the_model(model: str) -> None:
    clock = Clock()
    s = pool(up("a"), up("b", priority=1), up("c", models=("claude-*",)), clock=clock)
    fail(s.by_name["a"], clock, 3)
    names = [u.name for u in s.candidates(model)]
    assert names == (["a", "b"] if model == "gpt-4o" else [])

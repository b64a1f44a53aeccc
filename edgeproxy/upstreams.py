"""Upstream pools: which upstream serves a model, key rotation, health and cooling.

Job: ``UpstreamSet.pick(model, exclude)`` returns the next upstream to try: the lowest
priority tier that serves the model and has a healthy member, weighted random inside it,
preferring upstreams not yet tried. Each ``UpstreamState`` rotates its API keys round-robin,
counts consecutive failures, ejects itself per SPEC §5 and cools down after a 429.

Health, per upstream:

- ``eject_after`` consecutive failures eject it for ``eject_for``, doubled on each
  ejection in a row (capped, as Envoy's ``max_ejection_time``); a success resets both.
- When an ejection ends, exactly one request is let through as a trial: while it runs
  nobody else picks the upstream; its success restores the upstream, its failure ejects
  it again for twice as long. A trial that ends without a verdict (the client left) frees
  the slot at once; one that never reports frees it after ``connect + first_byte``.
- A key the upstream refused (401/403) leaves the rotation; with no key left the
  upstream is out until a reload brings new keys.
- A 429 with ``Retry-After`` cools it until then; cooling is not a failure.

Pure: no sockets, no loop. Time and randomness are injected (``clock``, ``rng``) so tests
can drive them. Health state and the retry budget survive a config reload:
``UpstreamSet.carry_over`` copies them by upstream name.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable

from edgeproxy.config import Health, Timeouts, Upstream
from edgeproxy.retry import RetryBudget

# Longest ejection, however often it doubled: Envoy's max_ejection_time default. Without a
# cap an upstream that was down for an hour would stay out for days after it came back.
MAX_EJECTION_S = 300.0


class UpstreamState:
    """One configured upstream plus its mutable health."""

    __slots__ = (
        "_key_index",
        "config",
        "cooling_until",
        "ejected_until",
        "ejections",
        "failures",
        "keys",
        "name",
        "trial_pending",
        "trial_until",
    )

    def __init__(self, config: Upstream) -> None:
        self.config = config
        self.name = config.name
        self.keys: list[str] = list(config.api_keys)
        self._key_index = 0
        self.failures = 0  # consecutive
        self.ejections = 0  # consecutive ejections, for the doubling
        self.ejected_until = 0.0
        self.cooling_until = 0.0  # after a 429 with Retry-After
        self.trial_pending = False  # ejection ended: the next request is a trial
        self.trial_until = 0.0  # a trial is in flight until then: nobody else picks us

    def next_key(self) -> str:
        key = self.keys[self._key_index % len(self.keys)]
        self._key_index += 1
        return key

    def usable(self, now: float) -> bool:
        return (
            bool(self.keys)
            and self.ejected_until <= now
            and self.cooling_until <= now
            and self.trial_until <= now
        )

    def healthy(self, now: float) -> bool:
        """Not ejected and holding a key (cooling after a 429 is not unhealthy)."""
        return bool(self.keys) and self.ejected_until <= now

    def drop_key(self, key: str) -> None:
        """The upstream refused this key (401/403): take it out of the rotation."""
        if key in self.keys:
            self.keys.remove(key)

    def cool(self, until: float) -> None:
        self.cooling_until = max(self.cooling_until, until)

    def begin(self, now: float) -> None:
        """Picked for a request: if this is the trial after an ejection, hold the others
        off until it reports (or could have: connect + first_byte)."""
        if self.trial_pending:
            t: Timeouts = self.config.timeouts
            self.trial_until = now + t.connect + t.first_byte

    def release_trial(self) -> None:
        """The request ended without saying anything about the upstream's health."""
        self.trial_until = 0.0

    def record_success(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.trial_pending = False
        self.trial_until = 0.0

    def record_failure(self, now: float, health: Health) -> None:
        """Count a failure; eject after ``eject_after`` in a row, or at once after a failed
        trial, for ``eject_for`` doubled on each consecutive ejection."""
        if self.ejected_until > now:
            # requests that were in flight when it was ejected: already counted for, and
            # they must not double the ejection once per straggler
            return
        self.failures += 1
        if self.trial_pending or self.failures >= health.eject_after:
            cap = max(MAX_EJECTION_S, health.eject_for)
            self.ejected_until = now + min(cap, health.eject_for * (2 ** min(self.ejections, 32)))
            self.ejections += 1
            self.failures = 0
            self.trial_pending = True
            self.trial_until = 0.0


class UpstreamSet:
    def __init__(
        self,
        upstreams: Iterable[Upstream],
        health: Health,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.states = [UpstreamState(u) for u in upstreams]
        self.by_name = {s.name: s for s in self.states}
        self.health = health
        self.clock = clock
        self.rng = rng or random.Random()
        self.budget = RetryBudget(clock=clock)  # shared by every request of this worker
        self._routes: dict[str, list[list[UpstreamState]]] = {}

    def carry_over(self, old: UpstreamSet) -> None:
        """Keep health across a reload for upstreams that kept their name and keys, and
        the retry budget (a reload must not hand out a fresh one)."""
        self.budget = old.budget
        for state in self.states:
            previous = old.by_name.get(state.name)
            if previous is None or previous.config.api_keys != state.config.api_keys:
                continue
            state.keys = [k for k in state.keys if k in previous.keys]
            for attr in (
                "failures",
                "ejections",
                "ejected_until",
                "cooling_until",
                "trial_pending",
                "trial_until",
            ):
                setattr(state, attr, getattr(previous, attr))

    def tiers(self, model: str) -> list[list[UpstreamState]]:
        """Upstreams serving ``model``, grouped by priority (lowest first). Memoised:
        the config is immutable, and the cache is bounded by the names clients send."""
        tiers = self._routes.get(model)
        if tiers is None:
            by_priority: dict[int, list[UpstreamState]] = {}
            for state in self.states:
                if state.config.serves(model):
                    by_priority.setdefault(state.config.priority, []).append(state)
            tiers = [by_priority[p] for p in sorted(by_priority)]
            if len(self._routes) < 10_000:  # unknown names must not grow memory forever
                self._routes[model] = tiers
        return tiers

    def serves(self, model: str, kinds: frozenset[str] | None = None) -> bool:
        return any(kinds is None or s.config.kind in kinds for t in self.tiers(model) for s in t)

    def pick(
        self,
        model: str,
        exclude: set[str] | frozenset[str] = frozenset(),
        kinds: frozenset[str] | None = None,
    ) -> UpstreamState | None:
        """The next upstream to try, or None when nothing usable is left.

        Lowest tier first; inside a tier an untried usable upstream wins (weighted random);
        then an untried one of the next tiers; then an already tried one, lowest tier first.
        ``kinds`` limits the upstream kinds (the OpenAI-only endpoints). The upstream
        returned is marked as picked (``begin``): it may be an ejected one's trial.
        """
        now = self.clock()
        fallback: list[UpstreamState] | None = None
        for tier in self.tiers(model):
            usable = [
                s for s in tier if s.usable(now) and (kinds is None or s.config.kind in kinds)
            ]
            fresh = [s for s in usable if s.name not in exclude]
            if fresh:
                return self._begin(self._weighted(fresh), now)
            if usable and fallback is None:
                fallback = usable
        return self._begin(self._weighted(fallback), now) if fallback else None

    def _begin(self, state: UpstreamState, now: float) -> UpstreamState:
        state.begin(now)
        return state

    def candidates(self, model: str) -> list[Upstream]:
        """Every configured upstream that serves ``model``, healthy or not."""
        return [s.config for tier in self.tiers(model) for s in tier]

    def _weighted(self, states: list[UpstreamState]) -> UpstreamState:
        if len(states) == 1:
            return states[0]
        total = sum(s.config.weight for s in states)
        point = self.rng.uniform(0, total)
        for state in states:
            point -= state.config.weight
            if point <= 0:
                return state
        return states[-1]

    def cooling_wait(self, model: str) -> float | None:
        """Seconds until the first cooling upstream of ``model`` comes back, when every
        healthy upstream for it is cooling after a 429; else None."""
        now = self.clock()
        states = [s for tier in self.tiers(model) for s in tier if s.healthy(now)]
        if states and all(s.cooling_until > now for s in states):
            return min(s.cooling_until for s in states) - now
        return None

    def any_healthy(self) -> bool:
        now = self.clock()
        return any(s.healthy(now) for s in self.states)

    def unhealthy_reasons(self) -> list[str]:
        now = self.clock()
        reasons = []
        for s in self.states:
            if not s.keys:
                reasons.append(f"{s.name}: every api key was refused by the upstream")
            elif s.ejected_until > now:
                reasons.append(f"{s.name}: ejected for {s.ejected_until - now:.0f}s more")
        return reasons

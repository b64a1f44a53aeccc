"""Upstream pools: which upstream serves a model, key rotation, health and cooling.

Job: ``UpstreamSet.pick(model, exclude)`` returns the next upstream to try: the lowest
priority tier that serves the model and has a healthy member, weighted random inside it,
preferring upstreams not yet tried. Each ``UpstreamState`` rotates its API keys round-robin,
counts consecutive failures, ejects itself per SPEC §5 and cools down after a 429.

Pure: no sockets, no loop. Time and randomness are injected (``clock``, ``rng``) so tests
can drive them. Health state survives a config reload: ``UpstreamSet.carry_over`` copies it
by upstream name.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable

from edgeproxy.config import Health, Upstream


class UpstreamState:
    """One configured upstream plus its mutable health."""

    __slots__ = (
        "_key_index",
        "config",
        "cooling_until",
        "ejections",
        "ejected_until",
        "failures",
        "keys",
        "name",
        "trial_pending",
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

    def next_key(self) -> str:
        key = self.keys[self._key_index % len(self.keys)]
        self._key_index += 1
        return key

    def usable(self, now: float) -> bool:
        return bool(self.keys) and self.ejected_until <= now and self.cooling_until <= now

    def healthy(self, now: float) -> bool:
        """Not ejected and holding a key (cooling after a 429 is not unhealthy)."""
        return bool(self.keys) and self.ejected_until <= now

    def drop_key(self, key: str) -> None:
        """The upstream refused this key (401/403): take it out of the rotation."""
        if key in self.keys:
            self.keys.remove(key)

    def cool(self, until: float) -> None:
        self.cooling_until = max(self.cooling_until, until)

    def record_success(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.trial_pending = False

    def record_failure(self, now: float, health: Health) -> None:
        """Count a failure; eject after ``eject_after`` in a row, or at once after a failed
        trial, for ``eject_for`` doubled on each consecutive ejection."""
        self.failures += 1
        if self.trial_pending or self.failures >= health.eject_after:
            self.ejected_until = now + health.eject_for * (2**self.ejections)
            self.ejections += 1
            self.failures = 0
            self.trial_pending = True


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
        self._routes: dict[str, list[list[UpstreamState]]] = {}

    def carry_over(self, old: UpstreamSet) -> None:
        """Keep health across a reload for upstreams that kept their name and keys."""
        for state in self.states:
            previous = old.by_name.get(state.name)
            if previous is None or previous.config.api_keys != state.config.api_keys:
                continue
            state.keys = [k for k in state.keys if k in previous.keys]
            for attr in ("failures", "ejections", "ejected_until", "cooling_until"):
                setattr(state, attr, getattr(previous, attr))
            state.trial_pending = previous.trial_pending

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

        Lowest tier first; inside a tier an untried usable upstream wins (weighted random),
        then an already tried one; then the next tier. ``kinds`` limits the upstream kinds
        (the OpenAI-only endpoints).
        """
        now = self.clock()
        fallback: UpstreamState | None = None
        for tier in self.tiers(model):
            usable = [s for s in tier if s.usable(now) and (kinds is None or s.config.kind in kinds)]
            fresh = [s for s in usable if s.name not in exclude]
            if fresh:
                return self._weighted(fresh)
            if usable and fallback is None:
                fallback = self._weighted(usable)
        return fallback

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

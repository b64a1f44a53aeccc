"""The SPEC §7 metrics and their rendering.

Job: own every prometheus-client object (nobody else imports it), take one finished
request at a time (``observe``), and render the text format for ``/metrics``.

Label values are bounded: ``model`` only takes names the config knows (the proxy maps
anything else to ``other``), ``upstream`` only configured names or ``none``; no secret,
URL or client-supplied string ever becomes a label.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

# LLM latencies span milliseconds (cached, embeddings) to minutes (long reasoning streams).
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    20,
    30,
    60,
    120,
    300,
    600,
)
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)

__all__ = ["Metrics", "content_type", "mark_process_dead", "render_multiprocess"]

# prometheus-client is imported on first use (a flush, a scrape): it costs a worker about
# 20 ms of its start, and requests only need the tallies below.

# With several workers, prometheus-client's multiprocess mode keeps every value in an
# mmap'd file under PROMETHEUS_MULTIPROC_DIR (set by the supervisor before any worker
# imports this module) and the supervisor sums them on scrape. We chose it over our own
# aggregation: it is the library's documented way, and counters survive a worker restart.
#
# Requests are tallied in plain ints and floats and moved into prometheus-client's objects
# by ``flush``: at every scrape of a lone worker, and every FLUSH_EVERY_S under a
# supervisor (the server's publish loop). prometheus-client takes a lock per value and,
# in multiprocess mode, writes an mmap'd file per value: about 8 us a request, done per
# request, against well under 1 us to tally. A worker killed with -9 loses at most the
# last FLUSH_EVERY_S of its counts (the ledger, not /metrics, is what bills).
FLUSH_EVERY_S = 1.0


def content_type() -> str:
    """The Content-Type of what ``render`` and ``render_multiprocess`` return."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return CONTENT_TYPE_LATEST


def render_multiprocess(path: str) -> bytes:
    """The supervisor's /metrics: every worker's values, aggregated."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return generate_latest(registry)


def mark_process_dead(pid: int, path: str) -> None:
    """A worker exited: its live gauges (in-flight, health) stop counting."""
    from prometheus_client.multiprocess import mark_process_dead as mark

    mark(pid, path)


@dataclass(slots=True)
class _Children:
    requests: Any
    duration: Any
    ttfb: Any
    prompt: Any
    completion: Any
    cached: Any
    cost: Any


class _Tally:
    """What one (model, upstream, status) series gathered since the last flush.
    Histograms as prometheus-client keeps them: a count per bucket (not cumulative, the
    last one +Inf) and the sum."""

    __slots__ = (
        "cached", "completion", "cost", "duration", "duration_sum", "prompt", "requests",
        "ttfb", "ttfb_sum",
    )  # fmt: skip

    def __init__(self) -> None:
        self.requests = self.prompt = self.completion = self.cached = 0
        self.cost = self.duration_sum = self.ttfb_sum = 0.0
        self.duration = [0] * (len(LATENCY_BUCKETS) + 1)
        self.ttfb = [0] * (len(TTFB_BUCKETS) + 1)


def _add_to_histogram(child: Any, counts: list[int], total: float) -> None:
    """Add tallied observations to a labelled Histogram: what its ``observe`` does one at
    a time, on the same value objects (``_buckets``, ``_sum``; prometheus-client has kept
    them so since 0.4, and tests/test_metrics.py checks the result value by value)."""
    for i, n in enumerate(counts):
        if n:
            child._buckets[i].inc(n)
    child._sum.inc(total)


class _Families:
    """The prometheus-client objects: the SPEC §7 metric families, in one registry."""

    def __init__(self, per_key: bool) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "edgeproxy_requests",
            "Model requests by outcome",
            ["model", "upstream", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "edgeproxy_request_duration_seconds",
            "Whole request time",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "edgeproxy_time_to_first_byte_seconds",
            "Time to the first response byte",
            ["model", "upstream"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.attempts = Counter(
            "edgeproxy_upstream_attempts",
            "Upstream tries by outcome",
            ["upstream", "outcome"],
            registry=r,
        )
        self.tokens = Counter("edgeproxy_tokens", "Tokens metered", ["model", "kind"], registry=r)
        self.cost = Counter("edgeproxy_cost_usd", "USD metered", ["model"], registry=r)
        self.inflight = Gauge(
            "edgeproxy_inflight_requests", "Model requests in flight", registry=r,
            multiprocess_mode="livesum",  # the node's total over live workers
        )  # fmt: skip
        self.healthy = Gauge(
            "edgeproxy_upstream_healthy", "1 when the upstream is not ejected", ["upstream"],
            registry=r, multiprocess_mode="livemin",  # 0 as soon as one worker ejected it
        )  # fmt: skip
        self.key_requests = self.key_cost = None
        if per_key:
            self.key_requests = Counter(
                "edgeproxy_key_requests", "Model requests per key", ["key", "code"], registry=r
            )
            self.key_cost = Counter("edgeproxy_key_cost_usd", "USD per key", ["key"], registry=r)


class Metrics:
    def __init__(self, *, per_key: bool = False) -> None:
        self.per_key = per_key
        self._families: _Families | None = None
        self._cache: dict[tuple[str, str, int], _Children] = {}
        self._attempts: dict[tuple[str, str], Any] = {}  # labelled children, as _children()
        self._tallies: dict[tuple[str, str, int], _Tally] = {}
        self._attempt_counts: dict[tuple[str, str], int] = {}
        self._key_counts: dict[tuple[str, str], tuple[int, float]] = {}

    @property
    def families(self) -> _Families:
        if self._families is None:
            self._families = _Families(self.per_key)
        return self._families

    @property
    def registry(self) -> Any:
        return self.families.registry

    def attempt(self, upstream: str, outcome: str) -> None:
        key = (upstream, outcome)
        self._attempt_counts[key] = self._attempt_counts.get(key, 0) + 1

    def observe(
        self,
        *,
        model: str,
        upstream: str,
        status: int,
        duration_s: float,
        ttfb_s: float | None,
        prompt: int,
        completion: int,
        cached: int,
        cost_usd: float,
        key_name: str | None,
    ) -> None:
        """Tally one finished request (``flush`` publishes it)."""
        key = (model, upstream, status)
        t = self._tallies.get(key)
        if t is None:
            t = self._tallies[key] = _Tally()
        t.requests += 1
        t.duration[bisect_left(LATENCY_BUCKETS, duration_s)] += 1  # the first bound >= it
        t.duration_sum += duration_s
        if ttfb_s is not None:
            t.ttfb[bisect_left(TTFB_BUCKETS, ttfb_s)] += 1
            t.ttfb_sum += ttfb_s
        t.prompt += prompt
        t.completion += completion
        t.cached += cached
        t.cost += cost_usd
        if self.per_key and key_name:
            per = (key_name, str(status))
            n, usd = self._key_counts.get(per, (0, 0.0))
            self._key_counts[per] = (n + 1, usd + cost_usd)

    def flush(self, inflight: int) -> None:
        """Move the tallies into prometheus-client's values (its files, with workers)."""
        f = self.families
        f.inflight.set(inflight)
        tallies, self._tallies = self._tallies, {}
        for key, t in tallies.items():
            c = self._children(*key)
            c.requests.inc(t.requests)
            _add_to_histogram(c.duration, t.duration, t.duration_sum)
            if any(t.ttfb):
                _add_to_histogram(c.ttfb, t.ttfb, t.ttfb_sum)
            for child, amount in (
                (c.prompt, t.prompt), (c.completion, t.completion), (c.cached, t.cached),
                (c.cost, t.cost),
            ):  # fmt: skip
                if amount:
                    child.inc(amount)
        attempts, self._attempt_counts = self._attempt_counts, {}
        for key, n in attempts.items():
            child = self._attempts.get(key)
            if child is None:
                child = self._attempts[key] = f.attempts.labels(*key)
            child.inc(n)
        per_key, self._key_counts = self._key_counts, {}
        if f.key_requests is not None and f.key_cost is not None:
            for (name, status), (n, usd) in per_key.items():
                f.key_requests.labels(name, status).inc(n)
                if usd:
                    f.key_cost.labels(name).inc(usd)

    def _children(self, model: str, upstream: str, status: int) -> _Children:
        """The labelled series of one (model, upstream, status), looked up once: ``labels()``
        takes a lock and builds a key every call, and label values are bounded anyway."""
        key = (model, upstream, status)
        children = self._cache.get(key)
        if children is None:
            f = self.families
            children = self._cache[key] = _Children(
                requests=f.requests.labels(model, upstream, str(status)),
                duration=f.duration.labels(model),
                ttfb=f.ttfb.labels(model, upstream),
                prompt=f.tokens.labels(model, "prompt"),
                completion=f.tokens.labels(model, "completion"),
                cached=f.tokens.labels(model, "cached"),
                cost=f.cost.labels(model),
            )
        return children

    def set_health(self, states: dict[str, bool]) -> None:
        for name, ok in states.items():
            self.families.healthy.labels(name).set(1 if ok else 0)

    def render(self, inflight: int) -> bytes:
        """A lone worker's /metrics: everything up to this request."""
        from prometheus_client import generate_latest

        self.flush(inflight)
        return generate_latest(self.registry)

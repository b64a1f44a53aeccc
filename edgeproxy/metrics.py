"""The SPEC §7 metrics and their rendering.

Job: own every prometheus-client object (nobody else imports it), take one finished
request at a time (``observe``), and render the text format for ``/metrics``.

Label values are bounded: ``model`` only takes names the config knows (the proxy maps
anything else to ``other``), ``upstream`` only configured names or ``none``; no secret,
URL or client-supplied string ever becomes a label.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

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

__all__ = ["CONTENT_TYPE", "Metrics", "mark_process_dead", "render_multiprocess"]

# With several workers, prometheus-client's multiprocess mode keeps every value in an
# mmap'd file under PROMETHEUS_MULTIPROC_DIR (set by the supervisor before any worker
# imports this module) and the supervisor sums them on scrape. We chose it over our own
# aggregation: it is the library's documented way, and counters survive a worker restart.


def render_multiprocess(path: str) -> bytes:
    """The supervisor's /metrics: every worker's values, aggregated."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return generate_latest(registry)


@dataclass(slots=True)
class _Children:
    requests: Any
    duration: Any
    ttfb: Any
    prompt: Any
    completion: Any
    cached: Any
    cost: Any


class Metrics:
    def __init__(self, *, per_key: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.per_key = per_key
        r = self.registry
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
        self._cache: dict[tuple[str, str, int], _Children] = {}
        self._attempts: dict[tuple[str, str], Any] = {}  # labelled children, as _children()
        self.key_requests = self.key_cost = None
        if per_key:
            self.key_requests = Counter(
                "edgeproxy_key_requests", "Model requests per key", ["key", "code"], registry=r
            )
            self.key_cost = Counter("edgeproxy_key_cost_usd", "USD per key", ["key"], registry=r)

    def attempt(self, upstream: str, outcome: str) -> None:
        child = self._attempts.get((upstream, outcome))
        if child is None:
            child = self._attempts[(upstream, outcome)] = self.attempts.labels(upstream, outcome)
        child.inc()

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
        c = self._children(model, upstream, status)
        c.requests.inc()
        c.duration.observe(duration_s)
        if ttfb_s is not None:
            c.ttfb.observe(ttfb_s)
        if prompt:
            c.prompt.inc(prompt)
        if completion:
            c.completion.inc(completion)
        if cached:
            c.cached.inc(cached)
        if cost_usd:
            c.cost.inc(cost_usd)
        if self.key_requests is not None and self.key_cost is not None and key_name:
            self.key_requests.labels(key_name, str(status)).inc()
            if cost_usd:
                self.key_cost.labels(key_name).inc(cost_usd)

    def _children(self, model: str, upstream: str, status: int) -> _Children:
        """The labelled series of one (model, upstream, status), looked up once: ``labels()``
        takes a lock and builds a key every call, and label values are bounded anyway."""
        key = (model, upstream, status)
        children = self._cache.get(key)
        if children is None:
            children = self._cache[key] = _Children(
                requests=self.requests.labels(model, upstream, str(status)),
                duration=self.duration.labels(model),
                ttfb=self.ttfb.labels(model, upstream),
                prompt=self.tokens.labels(model, "prompt"),
                completion=self.tokens.labels(model, "completion"),
                cached=self.tokens.labels(model, "cached"),
                cost=self.cost.labels(model),
            )
        return children

    def set_health(self, states: dict[str, bool]) -> None:
        for name, ok in states.items():
            self.healthy.labels(name).set(1 if ok else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

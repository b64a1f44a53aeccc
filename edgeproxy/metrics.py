"""The SPEC §7 metrics and their rendering.

Job: own every prometheus-client object (nobody else imports it), take one finished
request at a time (``observe``), and render the text format for ``/metrics``.

Label values are bounded: ``model`` only takes names the config knows (the proxy maps
anything else to ``other``), ``upstream`` only configured names or ``none``; no secret,
URL or client-supplied string ever becomes a label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE

# LLM latencies span milliseconds (cached, embeddings) to minutes (long reasoning streams).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)

__all__ = ["CONTENT_TYPE", "Metrics"]


class Metrics:
    def __init__(self, *, per_key: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.per_key = per_key
        r = self.registry
        self.requests = Counter(
            "edgeproxy_requests", "Model requests by outcome", ["model", "upstream", "code"], registry=r
        )
        self.duration = Histogram(
            "edgeproxy_request_duration_seconds", "Whole request time", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttfb = Histogram(
            "edgeproxy_time_to_first_byte_seconds", "Time to the first response byte",
            ["model", "upstream"], buckets=TTFB_BUCKETS, registry=r,
        )
        self.attempts = Counter(
            "edgeproxy_upstream_attempts", "Upstream tries by outcome", ["upstream", "outcome"],
            registry=r,
        )
        self.tokens = Counter("edgeproxy_tokens", "Tokens metered", ["model", "kind"], registry=r)
        self.cost = Counter("edgeproxy_cost_usd", "USD metered", ["model"], registry=r)
        self.inflight = Gauge("edgeproxy_inflight_requests", "Model requests in flight", registry=r)
        self.healthy = Gauge(
            "edgeproxy_upstream_healthy", "1 when the upstream is not ejected", ["upstream"], registry=r
        )
        self.key_requests = self.key_cost = None
        if per_key:
            self.key_requests = Counter(
                "edgeproxy_key_requests", "Model requests per key", ["key", "code"], registry=r
            )
            self.key_cost = Counter("edgeproxy_key_cost_usd", "USD per key", ["key"], registry=r)

    def attempt(self, upstream: str, outcome: str) -> None:
        self.attempts.labels(upstream, outcome).inc()

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
        code = str(status)
        self.requests.labels(model, upstream, code).inc()
        self.duration.labels(model).observe(duration_s)
        if ttfb_s is not None:
            self.ttfb.labels(model, upstream).observe(ttfb_s)
        if prompt:
            self.tokens.labels(model, "prompt").inc(prompt)
        if completion:
            self.tokens.labels(model, "completion").inc(completion)
        if cached:
            self.tokens.labels(model, "cached").inc(cached)
        if cost_usd:
            self.cost.labels(model).inc(cost_usd)
        if self.key_requests is not None and key_name:
            self.key_requests.labels(key_name, code).inc()
            if cost_usd:
                self.key_cost.labels(key_name).inc(cost_usd)

    def set_health(self, states: dict[str, bool]) -> None:
        for name, ok in states.items():
            self.healthy.labels(name).set(1 if ok else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

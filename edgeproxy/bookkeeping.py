"""After the answer: each finished request's metrics, usage record and access log line.

Job: ``Bookkeeper.add(ctx, rt, now, idle=...)`` queues a finished request; ``drain()``
books every queued one: metrics tallied, a ``UsageRecord`` handed to the ledger, an
access log line written. A busy worker's requests wait for a batch: it drains itself
``BATCH_S`` after the first request it queued, or at once at ``BATCH_MAX``. A worker
with nothing else in flight books at once, while its client reads the answer. The server
drains it before metrics are read and at shutdown.

Why batches: done per request, between other requests' socket calls, this code ran
cache-cold; done for a batch of requests at a time, the same work cost a JSON request
4.5 us less and an SSE one 8.8 us (benchmarks/README.md). Why not when idle: a batch
booked while the next request is in flight delays that request. Nothing here is
something a client or the next request waits for: a rate-limit ticket is settled at once
(``proxy.log_request``).

It must not: await, keep a request's response (its body) alive, or let one bad record
stop the others of its batch.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from edgeproxy.records import UsageRecord
from edgeproxy.usage import Usage, cost_usd, estimate_tokens

if TYPE_CHECKING:
    from edgeproxy.accesslog import AccessLog
    from edgeproxy.context import RequestContext
    from edgeproxy.ledger import Ledger
    from edgeproxy.metrics import Metrics
    from edgeproxy.runtime import Runtime

log = logging.getLogger("edgeproxy")

# How long a finished request may wait for its bookkeeping. The ledger waits its own
# batch interval after that (ledger.BATCH_WAIT_S): together they stay within SPEC §4's
# 200 ms from a request's end to its commit.
BATCH_S = 0.02
BATCH_MAX = 512  # drain at once past this many: a bound on what waits in memory


def usage_and_cost(ctx: RequestContext, rt: Runtime) -> tuple[Usage, bool, float]:
    """(usage, estimated, cost in USD) of a finished request: the upstream's usage, or an
    estimate when it sent none or the client left before the end."""
    usage = ctx.usage
    estimated = usage is None or ctx.client_gone
    if usage is None:
        usage = Usage(estimated=True)
        if ctx.upstream != "none" and ctx.status in (200, 499):
            usage.prompt = estimate_tokens(ctx.prompt_bytes)
            usage.completion = ctx.events_out
    rule = rt.model_rule(ctx.model) if ctx.model else None
    return usage, estimated, cost_usd(rule.price if rule else None, usage)


class Bookkeeper:
    __slots__ = ("_access", "_ledger", "_metrics", "_queue", "_timer")

    def __init__(self, *, metrics: Metrics, ledger: Ledger, access: AccessLog) -> None:
        self._metrics = metrics
        self._ledger = ledger
        self._access = access
        self._queue: list[tuple[RequestContext, Runtime, float]] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, ctx: RequestContext, rt: Runtime, now: float, *, idle: bool) -> None:
        """Queue a finished, authenticated request (``now``: when it ended; ``idle``: no
        other request is in flight, so book now)."""
        ctx.response = None  # its bytes are sent: the body must not wait for the batch
        self._queue.append((ctx, rt, now))
        if idle or len(self._queue) >= BATCH_MAX:
            self.drain()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(BATCH_S, self.drain)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def drain(self) -> None:
        """Book every queued request now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue, self._queue = self._queue, []
        for ctx, rt, now in queue:
            try:
                self._book(ctx, rt, now)
            except Exception as err:  # a bug: log it, and book the rest
                log.error("bookkeeping failed for request %s: %r", ctx.request_id, err)

    def _book(self, ctx: RequestContext, rt: Runtime, now: float) -> None:
        key = ctx.key
        assert key is not None  # add() is only called for authenticated requests
        usage, estimated, cost = usage_and_cost(ctx, rt)
        latency = now - ctx.started
        label = rt.model_label(ctx.model) if ctx.model else "other"
        self._metrics.observe(
            model=label, upstream=ctx.upstream, status=ctx.status, duration_s=latency,
            ttfb_s=ctx.ttfb, prompt=usage.prompt, completion=usage.completion,
            cached=usage.cached, cost_usd=cost, key_name=key.name,
        )  # fmt: skip
        record = UsageRecord(
            record_id=ctx.record_id,
            request_id=ctx.request_id, ts=ctx.ts, key_id=key.id, key_name=key.name,
            model=ctx.model, upstream=ctx.upstream, endpoint=ctx.endpoint, status=ctx.status,
            attempts=ctx.attempts, latency_ms=round(latency * 1000, 3),
            ttfb_ms=round(ctx.ttfb * 1000, 3) if ctx.ttfb is not None else None,
            prompt_tokens=usage.prompt, completion_tokens=usage.completion,
            cached_tokens=usage.cached, cost_usd=cost, estimated=estimated,
        )  # fmt: skip
        self._ledger.record(record)
        self._access.write({
            "ts": round(ctx.ts, 3), "request_id": ctx.request_id, "key": key.name,
            "endpoint": ctx.endpoint, "model": ctx.model[:256], "upstream": ctx.upstream,
            "status": ctx.status, "code": ctx.error_code or None, "attempts": ctx.attempts,
            "latency_ms": record.latency_ms, "ttfb_ms": record.ttfb_ms,
            "prompt_tokens": usage.prompt, "completion_tokens": usage.completion,
            "cached_tokens": usage.cached, "cost_usd": round(cost, 8), "estimated": estimated,
        })  # fmt: skip

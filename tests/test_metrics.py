"""/metrics values, one by one, against what the relay served and the ledger billed.

The relay tallies requests in plain numbers and moves them into prometheus-client's
objects when /metrics is scraped (``Metrics.flush``); these tests read the rendered text
back with prometheus-client's own parser, so a tally that lands in the wrong bucket, a
count lost between scrapes or a histogram whose buckets do not add up fails here.
"""

from __future__ import annotations

import math
import sqlite3

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeproxy.metrics import LATENCY_BUCKETS
from tests.conftest import Relay
from tests.fakes import FakeUpstream, Json

HI = [{"role": "user", "content": "hi"}]


def scrape(relay: Relay) -> dict[tuple[str, frozenset], float]:
    svc = relay.worker.svc
    svc.bookkeeper.drain()  # as the /metrics handler does
    text = svc.metrics.render(svc.inflight).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def ledger_totals(relay: Relay) -> tuple[int, int, float]:
    with sqlite3.connect(relay.db_path) as conn:
        row = conn.execute(
            "SELECT SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_usd) FROM usage"
            " WHERE model = 'gpt-4o-mini'"
        ).fetchone()
    return row[0], row[1], row[2]


async def test_counts_histograms_and_tokens_match_what_was_served(
    relay: Relay, client: openai.AsyncOpenAI, fake: FakeUpstream
):
    for _ in range(3):
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)
    async for _ in stream:
        pass
    fake.push(Json({"error": {"message": "bad request"}}, status=400))
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=HI)
    await relay.settle()

    m = scrape(relay)
    served = {"model": "gpt-4o-mini", "upstream": "fake-openai"}
    assert value(m, "edgeproxy_requests_total", code="200", **served) == 4
    assert value(m, "edgeproxy_requests_total", code="400", **served) == 1
    assert value(m, "edgeproxy_requests_total", code="404", model="other", upstream="none") == 1
    assert value(m, "edgeproxy_upstream_attempts_total", upstream="fake-openai", outcome="ok") == 5
    assert value(m, "edgeproxy_inflight_requests") == 0

    # the duration histogram, bucket by bucket, against the latencies the ledger holds
    # (the same measurement, rounded to the microsecond)
    model = {"model": "gpt-4o-mini"}
    with sqlite3.connect(relay.db_path) as conn:
        latencies = [
            ms / 1000
            for (ms,) in conn.execute("SELECT latency_ms FROM usage WHERE model = 'gpt-4o-mini'")
        ]
    assert len(latencies) == 5
    buckets = [
        value(m, "edgeproxy_request_duration_seconds_bucket", le=str(float(b)), **model)
        for b in LATENCY_BUCKETS
    ]
    assert buckets == [sum(1 for s in latencies if s <= b) for b in LATENCY_BUCKETS]
    assert value(m, "edgeproxy_request_duration_seconds_bucket", le="+Inf", **model) == 5
    assert value(m, "edgeproxy_request_duration_seconds_count", **model) == 5
    assert math.isclose(
        value(m, "edgeproxy_request_duration_seconds_sum", **model), sum(latencies), abs_tol=1e-5
    )
    # time to first byte: every answer that reached the client from the upstream but the
    # passed-on 400, which is an error, not a first byte
    assert value(m, "edgeproxy_time_to_first_byte_seconds_count", **served) == 4

    prompt, completion, cost = ledger_totals(relay)
    assert prompt > 0 and completion > 0
    assert value(m, "edgeproxy_tokens_total", kind="prompt", **model) == prompt
    assert value(m, "edgeproxy_tokens_total", kind="completion", **model) == completion
    assert math.isclose(value(m, "edgeproxy_cost_usd_total", **model), cost, rel_tol=1e-9)


async def test_nothing_is_counted_twice_or_lost_between_scrapes(
    relay: Relay, client: openai.AsyncOpenAI
):
    await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    first = scrape(relay)
    second = scrape(relay)
    await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    third = scrape(relay)
    labels = {"code": "200", "model": "gpt-4o-mini", "upstream": "fake-openai"}
    counts = [value(s, "edgeproxy_requests_total", **labels) for s in (first, second, third)]
    assert counts == [1, 1, 2]
    durations = [
        value(s, "edgeproxy_request_duration_seconds_count", model="gpt-4o-mini")
        for s in (first, second, third)
    ]
    assert durations == [1, 1, 2]

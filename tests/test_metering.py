"""Metering and quotas end to end: one record per request, exact costs, budgets under a
race, rpm / tpm / concurrency over HTTP, and the billing reads."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from edgeproxy import db
from edgeproxy.dialects import anthropic, gemini
from edgeproxy.usage import MAX_TOKENS, Usage, from_openai
from tests.conftest import Relay
from tests.fakes import FakeUpstream, Json, Sse, openai_completion, openai_stream

HI = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"


def rows(relay: Relay, where: str = "1=1", *args: object) -> list[dict]:
    conn = sqlite3.connect(relay.db_path)
    conn.row_factory = sqlite3.Row
    try:
        return [
            dict(r) for r in conn.execute(f"SELECT * FROM usage WHERE {where} ORDER BY ts", args)
        ]
    finally:
        conn.close()


async def post(http, relay: Relay, secret: str, body: dict, path: str = CHAT):
    async with http.post(
        relay.url + path, json=body, headers={"Authorization": f"Bearer {secret}"}
    ) as r:
        return r.status, r.headers.copy(), await r.read()


async def test_a_token_count_beyond_reason_is_not_billed_and_metering_goes_on(
    relay: Relay, http, fake: FakeUpstream
):
    """An upstream's usage of 2**64 - 1 tokens (an unsigned -1): counted as none. Billed
    it would be absurd, and SQLite's integers end at 2**63: such a row used to make every
    later batch of the ledger fail, and the relay refuse every request."""
    absurd = openai_completion()
    absurd["usage"] = {"prompt_tokens": 2**64 - 1, "completion_tokens": 7, "total_tokens": 6}
    fake.push(Json(absurd))
    for _ in range(2):  # the absurd answer, then the fake's usual one
        status, _, _ = await post(http, relay, relay.key, {"model": "gpt-4o-mini", "messages": HI})
        assert status == 200
    await relay.settle()
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in rows(relay)] == [(0, 7), (11, 7)]
    assert relay.worker.svc.ledger.healthy and relay.worker.svc.ledger.pending == 0


def test_every_usage_reader_counts_a_number_beyond_reason_as_none() -> None:
    assert from_openai({"prompt_tokens": 2**64 - 1, "completion_tokens": 2**63}) == Usage()
    assert from_openai({"prompt_tokens": 5, "completion_tokens": MAX_TOKENS}) == Usage(
        prompt=5, completion=MAX_TOKENS
    )
    assert anthropic.usage_from(
        {"input_tokens": 2**64 - 1, "cache_read_input_tokens": 2**63, "output_tokens": 5}
    ) == Usage(completion=5)
    assert gemini.usage_from({"promptTokenCount": 2**63, "candidatesTokenCount": 3}) == Usage(
        completion=3
    )


async def test_one_record_per_request_with_exact_cost(relay: Relay, http):
    status, headers, _ = await post(
        http, relay, relay.key, {"model": "gpt-4o-mini", "messages": HI}
    )
    assert status == 200
    await relay.settle()
    (row,) = rows(relay)
    assert row["request_id"] == headers["x-request-id"]
    assert (row["key_name"], row["model"], row["upstream"], row["endpoint"]) == (
        "alice",
        "gpt-4o-mini",
        "fake-openai",
        CHAT,
    )
    assert (row["status"], row["attempts"], row["estimated"]) == (200, 1, 0)
    # the fake's default usage: 11 prompt, 7 completion; gpt-4o-mini $0.15 / $0.60 per 1M
    assert row["cost_usd"] == pytest.approx((11 * 0.15 + 7 * 0.60) / 1e6)
    assert 0 < row["ttfb_ms"] <= row["latency_ms"]  # for JSON the first byte comes with the body


async def test_cached_tokens_are_priced_at_cached_input(relay: Relay, fake: FakeUpstream, http):
    reply = openai_completion()
    reply["usage"] = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500,
                      "prompt_tokens_details": {"cached_tokens": 400}}  # fmt: skip
    fake.push(Json(reply))
    await post(http, relay, relay.key, {"model": "gpt-4o-mini", "messages": HI})
    await relay.settle()
    (row,) = rows(relay)
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (
        1000,
        500,
        400,
    )
    assert row["cost_usd"] == pytest.approx((600 * 0.15 + 400 * 0.075 + 500 * 0.60) / 1e6)
    key = db.get_key(relay.db_path, "alice")
    assert key.spent_usd == pytest.approx(row["cost_usd"])


async def test_stream_without_usage_is_estimated(relay: Relay, fake: FakeUpstream, http):
    fake.push(Sse(openai_stream(["a", "b", "c"], with_usage=False)))
    status, _, _ = await post(
        http, relay, relay.key, {"model": "gpt-4o-mini", "messages": HI, "stream": True}
    )
    assert status == 200
    await relay.settle()
    (row,) = rows(relay)
    assert row["estimated"] == 1 and row["completion_tokens"] > 0 and row["prompt_tokens"] > 0


async def test_refused_requests_are_recorded_at_zero_cost(relay: Relay, http):
    await post(http, relay, relay.key, {"model": "no-such", "messages": HI})
    await post(
        http, relay, "sk-" + "x" * 44, {"model": "gpt-4o-mini", "messages": HI}
    )  # unknown: no record
    await relay.settle()
    (row,) = rows(relay)
    assert (row["status"], row["cost_usd"], row["upstream"]) == (404, 0, "none")


async def test_budget_race_overspends_by_at_most_the_in_flight_requests(
    relay: Relay, fake: FakeUpstream, http
):
    """Issue 3: a $0.01 budget hammered by 50 concurrent clients, each sending requests
    until it is refused. Every request is admitted only while spent + reserved < budget,
    so the overshoot is bounded by the requests in flight when the budget was crossed."""
    secret = relay.new_key("racer", budget=0.01)
    await relay.worker.svc.keys.reload()
    reply = openai_completion()
    # $0.003 a request: 10000 × 0.15/1M + 2500 × 0.60/1M
    reply["usage"] = {"prompt_tokens": 10000, "completion_tokens": 2500, "total_tokens": 12500}
    per_request = 0.003
    fake.push(*[Json(reply, delay=0.02) for _ in range(500)])
    inflight = peak = 0
    statuses: list[int] = []

    async def client() -> None:
        nonlocal inflight, peak
        for _ in range(10):
            inflight += 1
            peak = max(peak, inflight)
            status, _, body = await post(
                http, relay, secret, {"model": "gpt-4o-mini", "messages": HI}
            )
            inflight -= 1
            statuses.append(status)
            if status == 429:
                assert b"insufficient_quota" in body
                return

    await asyncio.gather(*[client() for _ in range(50)])
    admitted = statuses.count(200)
    assert statuses.count(429) == 50  # every client was stopped by the budget
    await relay.settle()
    spent = db.get_key(relay.db_path, "racer").spent_usd
    assert spent == pytest.approx(admitted * per_request)  # billed exactly what ran
    assert spent >= 0.01  # the budget was used up...
    assert spent - 0.01 <= peak * per_request  # ...overshot by at most what was in flight
    assert len(rows(relay, "key_name = ?", "racer")) == len(statuses)  # one record each


async def test_rpm_limit_over_http(relay: Relay, http):
    secret = relay.new_key("slow", rpm=2)
    await relay.worker.svc.keys.reload()
    statuses = []
    for _ in range(3):
        status, headers, body = await post(
            http, relay, secret, {"model": "gpt-4o-mini", "messages": HI}
        )
        statuses.append(status)
    assert statuses == [200, 200, 429]
    assert b"rate_limit_exceeded" in body and 1 <= int(headers["Retry-After"]) <= 60


async def test_tpm_limit_over_http(relay: Relay, http):
    secret = relay.new_key("tokens", tpm=20)
    await relay.worker.svc.keys.reload()
    assert (await post(http, relay, secret, {"model": "gpt-4o-mini", "messages": HI}))[
        0
    ] == 200  # 18 tokens
    assert (await post(http, relay, secret, {"model": "gpt-4o-mini", "messages": HI}))[
        0
    ] == 200  # 36 > 20 now
    status, headers, body = await post(
        http, relay, secret, {"model": "gpt-4o-mini", "messages": HI}
    )
    assert status == 429 and b"rate_limit_exceeded" in body and int(headers["Retry-After"]) >= 1


async def test_concurrency_limit_over_http(relay: Relay, fake: FakeUpstream, http):
    secret = relay.new_key("one-at-a-time", concurrency=1)
    await relay.worker.svc.keys.reload()
    fake.push(Json(openai_completion(), delay=0.3))
    first = asyncio.create_task(post(http, relay, secret, {"model": "gpt-4o-mini", "messages": HI}))
    await asyncio.sleep(0.1)
    status, headers, body = await post(
        http, relay, secret, {"model": "gpt-4o-mini", "messages": HI}
    )
    assert status == 429 and b"concurrency_limit_exceeded" in body and headers["Retry-After"] == "1"
    assert (await first)[0] == 200
    assert (await post(http, relay, secret, {"model": "gpt-4o-mini", "messages": HI}))[0] == 200


async def test_billing_endpoints(relay: Relay, http):
    secret = relay.new_key("front-end", budget=5)
    await relay.worker.svc.keys.reload()
    await post(http, relay, secret, {"model": "gpt-4o-mini", "messages": HI})
    await relay.settle()
    await relay.worker.svc.keys.reload()
    auth = {"Authorization": f"Bearer {secret}"}
    async with http.get(relay.url + "/v1/dashboard/billing/subscription", headers=auth) as r:
        sub = await r.json()
    assert sub["hard_limit_usd"] == 5
    async with http.get(relay.url + "/v1/dashboard/billing/usage", headers=auth) as r:
        usage = await r.json()
    assert usage["total_usage"] == pytest.approx((11 * 0.15 + 7 * 0.60) / 1e6 * 100)
    async with http.get(relay.url + "/v1/dashboard/billing/subscription",
                        headers={"Authorization": f"Bearer {relay.key}"}) as r:  # fmt: skip
        assert (await r.json())["hard_limit_usd"] == 1e8  # unlimited
    await relay.settle()
    assert all(r["endpoint"] == CHAT for r in rows(relay))  # billing reads are not metered


async def test_ledger_unavailable_refuses_new_requests(relay: Relay, http):
    """A write lock held longer than the stall bound makes the ledger unhealthy: new
    requests get 503 ledger_unavailable instead of flowing unbilled."""
    ledger = relay.worker.svc.ledger
    ledger._stall_s = 0.3
    blocker = sqlite3.connect(relay.db_path, timeout=0.1)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        await post(http, relay, relay.key, {"model": "gpt-4o-mini", "messages": HI})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while ledger.healthy and loop.time() < deadline:
            await asyncio.sleep(0.05)
        status, _, body = await post(
            http, relay, relay.key, {"model": "gpt-4o-mini", "messages": HI}
        )
        assert status == 503 and b"ledger_unavailable" in body
    finally:
        blocker.rollback()
        blocker.close()
    await relay.settle()
    assert ledger.healthy
    assert len(rows(relay)) == 2  # nothing was lost: both records landed once the lock went

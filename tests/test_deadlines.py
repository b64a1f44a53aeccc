"""edgeproxy.deadlines: asyncio.timeout_at's behaviour, on one shared timer."""

from __future__ import annotations

import asyncio

import pytest

from edgeproxy.deadlines import Deadlines


def now() -> float:
    return asyncio.get_running_loop().time()


async def test_a_block_past_its_deadline_raises_timeout_error():
    deadlines = Deadlines()
    start = now()
    with pytest.raises(TimeoutError):
        async with deadlines.at(start + 0.05):
            await asyncio.sleep(5)
    assert 0.04 < now() - start < 1.0
    assert len(deadlines) == 0


async def test_a_block_that_ends_in_time_is_never_cancelled_afterwards():
    deadlines = Deadlines()
    async with deadlines.at(now() + 0.05):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # past the deadline: the shared timer fires and finds nothing
    assert not asyncio.current_task().cancelling()  # type: ignore[union-attr]


async def test_moved_later_it_waits_for_the_new_time():
    deadlines = Deadlines()
    start = now()
    with pytest.raises(TimeoutError):
        async with deadlines.at(start + 0.05) as deadline:
            await asyncio.sleep(0.02)
            deadline.reschedule(start + 0.3)
            await asyncio.sleep(0.1)  # past the first deadline: still running
            assert now() - start > 0.1
            await asyncio.sleep(5)
    assert 0.28 < now() - start < 1.5


async def test_moved_earlier_it_fires_at_the_new_time():
    deadlines = Deadlines()
    start = now()
    with pytest.raises(TimeoutError):
        async with deadlines.at(start + 30) as deadline:
            deadline.reschedule(start + 0.05)
            await asyncio.sleep(5)
    assert now() - start < 1.0


async def test_a_cancellation_from_outside_stays_a_cancellation():
    deadlines = Deadlines()

    async def guarded() -> None:
        async with deadlines.at(now() + 30):
            await asyncio.sleep(5)

    task = asyncio.create_task(guarded())
    await asyncio.sleep(0.01)
    task.cancel()  # the client left: not a timeout
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_deadline_and_an_outside_cancellation_together_stay_a_cancellation():
    deadlines = Deadlines()
    entered = asyncio.Event()

    async def guarded() -> None:
        async with deadlines.at(now() + 0.05):
            entered.set()
            try:
                await asyncio.sleep(5)
            finally:
                await asyncio.sleep(0.1)  # the outside cancel lands while the deadline's is handled

    task = asyncio.create_task(guarded())
    await entered.wait()
    await asyncio.sleep(0.07)  # the deadline has fired
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_many_requests_expire_exactly_when_due_and_the_heap_stays_small():
    deadlines = Deadlines()
    outcomes: dict[int, str] = {}

    async def request(i: int) -> None:
        late = i % 2 == 0  # every other one overruns its deadline
        try:
            async with deadlines.at(now() + 0.05 + (i % 7) * 0.01):
                await asyncio.sleep(1.0 if late else 0.0)
            outcomes[i] = "done"
        except TimeoutError:
            outcomes[i] = "timeout"

    for wave in range(5):
        await asyncio.gather(*(request(wave * 200 + i) for i in range(200)))
    assert all(outcomes[i] == ("timeout" if i % 2 == 0 else "done") for i in range(1000))
    assert len(deadlines) == 0
    assert len(deadlines._heap) <= 64 + 4 * 200  # stale entries are dropped as they pile up


async def test_a_relay_under_load_leaves_no_deadline_behind(relay, http):
    """Every upstream try enters and leaves a deadline: after 400 requests, 16 at a time,
    none is live and the heap holds at most a rebuild's worth of stale entries."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {relay.key}"}
    semaphore = asyncio.Semaphore(16)

    async def one() -> int:
        async with semaphore:
            url = relay.url + "/v1/chat/completions"
            async with http.post(url, json=body, headers=headers) as r:
                await r.read()
                return r.status

    statuses = await asyncio.gather(*(one() for _ in range(400)))
    assert statuses == [200] * 400
    deadlines = relay.worker.svc.deadlines
    assert len(deadlines) == 0
    assert len(deadlines._heap) <= 64 + 4 * 16

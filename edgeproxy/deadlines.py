"""Request deadlines on one timer: ``asyncio.timeout_at`` without a uvloop timer each.

Job: ``Deadlines.at(when)`` is an async context manager that behaves as
``asyncio.timeout_at(when)`` does for the code inside it (the task is cancelled at
``when`` and ``TimeoutError`` comes out; ``reschedule`` moves the deadline), while every
deadline of the worker shares one timer armed for the earliest of them.

Why: asyncio's Timeout makes and cancels a uvloop timer per use (a libuv handle, closed
on the next loop turn): about 4% of a worker's time in the profile, for deadlines that
almost never fire. Here a deadline is an entry in a heap. Entries are left behind when a
request ends or moves its deadline on, and skipped when they come up; the heap is rebuilt
when stale entries outnumber live ones, so it stays within a few times the requests in
flight.

It must not: be used outside a task, or across event loops.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from types import TracebackType

_ENTERED, _EXPIRING, _EXPIRED, _EXITED = range(4)


class Deadline:
    __slots__ = ("_cancelling", "_entry", "_owner", "_state", "_task", "when")

    def __init__(self, owner: Deadlines, when: float) -> None:
        self._owner = owner
        self.when = when
        self._entry = math.inf  # the deadline its live heap entry holds
        self._state = _EXITED
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline needs a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._state = _ENTERED
        self._owner._add(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        expiring = self._state == _EXPIRING
        self._state = _EXPIRED if expiring else _EXITED
        self._owner._discard()
        # When the cancellation was ours alone (not the client leaving, not a shutdown),
        # turn it into TimeoutError, as asyncio.Timeout does.
        if (
            expiring
            and self._task is not None
            and self._task.uncancel() <= self._cancelling
            and exc_type is not None
            and issubclass(exc_type, asyncio.CancelledError)
        ):
            raise TimeoutError from exc

    def reschedule(self, when: float) -> None:
        """Move the deadline: later is an assignment, earlier a new heap entry."""
        self.when = when
        if self._state == _ENTERED and when < self._entry:
            self._owner._push(self)

    def _expire(self) -> None:
        self._state = _EXPIRING
        assert self._task is not None
        self._task.cancel()


class Deadlines:
    """One worker's deadlines: a heap of (when, seq, deadline) and one timer."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._live = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def at(self, when: float) -> Deadline:
        """A deadline at loop time ``when``: ``async with deadlines.at(when) as d: ...``."""
        return Deadline(self, when)

    def __len__(self) -> int:
        return self._live

    def _add(self, deadline: Deadline) -> None:
        self._live += 1
        self._push(deadline)

    def _push(self, deadline: Deadline) -> None:
        deadline._entry = deadline.when
        heapq.heappush(self._heap, (deadline.when, next(self._seq), deadline))
        if deadline.when < self._timer_at:
            self._arm(deadline.when)

    def _discard(self) -> None:
        """A deadline left its block; its entry stays until it comes up, or a rebuild."""
        self._live -= 1
        heap = self._heap
        if len(heap) > 64 and len(heap) > 4 * self._live:
            self._heap = [e for e in heap if e[2]._state == _ENTERED and e[0] == e[2]._entry]
            heapq.heapify(self._heap)
            if not self._heap and self._timer is not None:
                self._timer.cancel()
                self._timer, self._timer_at = None, math.inf

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = asyncio.get_running_loop().call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        heap = self._heap
        now = asyncio.get_running_loop().time()
        while heap and heap[0][0] <= now:
            when, _, deadline = heapq.heappop(heap)
            if deadline._state != _ENTERED or when != deadline._entry:
                continue  # left its block, or a newer entry stands for it
            if deadline.when > now:  # moved on since: stand again at the new time
                deadline._entry = deadline.when
                heapq.heappush(heap, (deadline.when, next(self._seq), deadline))
                continue
            deadline._entry = math.inf
            deadline._expire()
        if heap:
            self._arm(heap[0][0])

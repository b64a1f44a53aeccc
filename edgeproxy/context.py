"""The state of one request, in one typed object, and the services a worker shares.

``RequestContext`` is created when a request arrives and read by ``log_request`` when it
ends; every phase writes what it learnt here, never into string-keyed bags.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from edgeproxy.deadlines import Deadlines
from edgeproxy.limits import Ticket
from edgeproxy.limits_ipc import LocalLimits, RemoteLimits
from edgeproxy.usage import Usage

if TYPE_CHECKING:
    import aiohttp

    from edgeproxy.bookkeeping import Bookkeeper
    from edgeproxy.db import KeyCache, KeyRecord, Ledger
    from edgeproxy.http11 import Response, StreamResponse
    from edgeproxy.metrics import Metrics
    from edgeproxy.runtime import RuntimeRef
    from edgeproxy.upstream_client import UpstreamClient


# Request ids: a random per-process prefix and a counter. Unique across workers and
# restarts (64 random bits each time a process starts) and far cheaper than uuid4(),
# which the profile showed on the hot path.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def new_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


@dataclass(slots=True)
class RequestContext:
    request_id: str  # the x-request-id of the response: the client's own, if it sent one
    endpoint: str  # the public path, e.g. "/v1/chat/completions"
    dialect: Literal["openai", "anthropic"]  # the shape of errors and streams the client wants
    started: float  # time.perf_counter(): uvloop's loop.time() only has 1 ms resolution
    ts: float  # wall clock, for the ledger
    key: KeyRecord | None = None
    model: str = ""
    stream: bool = False
    client_wants_usage: bool = False
    upstream: str = "none"
    attempts: int = 0
    tried: set[str] = field(default_factory=set)
    status: int = 0
    ttfb: float | None = None  # seconds from arrival to the status line
    usage: Usage | None = None
    prompt_bytes: int = 0  # for estimating tokens when the upstream reports none
    events_out: int = 0
    response: StreamResponse | Response | None = None  # set at the commit point
    client_gone: bool = False
    error_code: str = ""
    ticket: Ticket | None = None  # admitted by the limiter: settled in log_request
    record_id: str = field(default_factory=lambda: new_id())  # unique: the ledger's key

    @property
    def committed(self) -> bool:
        return self.response is not None


@dataclass(slots=True)
class Services:
    """What every request of a worker shares; built once in ``server``."""

    ref: RuntimeRef
    upstream: UpstreamClient
    keys: KeyCache
    ledger: Ledger
    metrics: Metrics
    bookkeeper: Bookkeeper  # metrics, usage records and access log lines, in batches
    limits: LocalLimits | RemoteLimits = field(default_factory=LocalLimits)
    deadlines: Deadlines = field(default_factory=Deadlines)  # the upstream tries' timeouts
    rng: random.Random = field(default_factory=random.Random)
    inflight: int = 0
    draining: bool = False
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)  # model requests, for the drain
    _image_session: aiohttp.ClientSession | None = None

    def image_session(self) -> aiohttp.ClientSession:
        """aiohttp's client, only for fetching image URLs for Gemini (``image_fetch``):
        made on first use, so a relay that never needs it never loads it."""
        if self._image_session is None:
            import aiohttp

            from edgeproxy import __version__

            self._image_session = aiohttp.ClientSession(
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None),
                headers={"User-Agent": f"edgeproxy/{__version__}"},
            )
        return self._image_session

    async def close_image_session(self) -> None:
        if self._image_session is not None:
            await self._image_session.close()

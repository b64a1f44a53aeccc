"""edgeproxy with parts of its per-request work switched off, for ``ablation.py`` only.

``EDGEPROXY_ABLATE=part,part python benchmarks/ablated_edgeproxy.py -c relay.yaml serve``

These builds are not the product: they bill nothing, log nothing or inspect nothing, and
exist only to measure what each part costs a request. The parts:

| part | what is switched off |
|---|---|
| ledger | ``Ledger.record``: no usage row is queued or committed |
| access-log | ``AccessLog.write``: no access log line |
| metrics | ``Metrics.observe`` and ``Metrics.attempt``: no request or attempt metrics |
| bookkeeping | ``proxy.log_request`` as a whole: the three above, and cost and limits |
| sse-inspection | ``PassThrough``: stream bytes relayed without reading a single event |
"""

from __future__ import annotations

import os
import sys

PARTS = ("ledger", "access-log", "metrics", "bookkeeping", "sse-inspection")


def ablate(parts: set[str]) -> None:
    unknown = parts - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    from edgeproxy import accesslog, ledger, metrics, proxy, streams

    if "ledger" in parts:
        ledger.Ledger.record = lambda self, rec: None  # type: ignore[method-assign]
    if "access-log" in parts:
        accesslog.AccessLog.write = lambda self, fields: None  # type: ignore[method-assign]
    if "metrics" in parts:
        metrics.Metrics.observe = lambda self, **kw: None  # type: ignore[method-assign]
        metrics.Metrics.attempt = lambda self, *a, **kw: None  # type: ignore[method-assign]
    if "bookkeeping" in parts:
        proxy.log_request = lambda *a, **kw: None  # type: ignore[assignment]
    if "sse-inspection" in parts:
        streams.PassThrough.feed = _relay_unread  # type: ignore[method-assign]
        streams.PassThrough.pending = property(lambda self: False)  # type: ignore[assignment]
        streams.PassThrough.finish = lambda self: b""  # type: ignore[method-assign]


def _relay_unread(self, chunk: bytes) -> bytes:
    """The least a relay must know of a stream: that it has begun, and whether it ended."""
    self.content_seen = True
    if chunk.endswith(b"[DONE]\n\n"):
        self.done = True
    return chunk


if __name__ == "__main__":
    ablate(set(filter(None, os.environ.get("EDGEPROXY_ABLATE", "").split(","))))
    from edgeproxy.cli import main

    sys.exit(main())

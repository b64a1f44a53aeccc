"""The small endpoints: ``/v1/models``, the legacy billing reads, ``/healthz``, ``/readyz``.

None of them writes a usage record (SPEC §4): they are not model requests.
"""

from __future__ import annotations

import time

import orjson

from edgeproxy import errors, keys
from edgeproxy.context import Services
from edgeproxy.http11 import Request, Response

JSON = "application/json"
UNLIMITED_USD = 1e8  # what chat front-ends expect as "no limit" (SPEC §3)


def _json(data: object, status: int = 200) -> Response:
    return Response(body=orjson.dumps(data), status=status, content_type=JSON)


async def list_models(request: Request, svc: Services) -> Response:
    key = await keys.authenticate(request.headers, svc.keys)
    keys.check_state(key)
    rt = svc.ref.current
    created = int(rt.loaded_at)
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": kind}
        for name, kind in rt.public_models
        if key.allows(name)
    ]
    return _json({"object": "list", "data": data})


async def billing_subscription(request: Request, svc: Services) -> Response:
    key = await keys.authenticate(request.headers, svc.keys)
    budget = key.budget_usd if key.budget_usd is not None else UNLIMITED_USD
    expires = 0
    if key.expires is not None:
        expires = int(time.mktime(key.expires.timetuple())) + 86400
    return _json(
        {
            "object": "billing_subscription",
            "has_payment_method": True,
            "hard_limit_usd": budget,
            "soft_limit_usd": budget,
            "system_hard_limit_usd": budget,
            "access_until": expires,
        }
    )


async def billing_usage(request: Request, svc: Services) -> Response:
    key = await keys.authenticate(request.headers, svc.keys)
    return _json({"object": "list", "total_usage": round(key.spent_usd * 100, 6)})


def healthz(request: Request, svc: Services) -> Response:
    return _json({"status": "ok"})


async def readyz(request: Request, svc: Services) -> Response:
    rt = svc.ref.current
    reasons: list[str] = []
    if svc.draining:
        reasons.append("shutting down")
    if not rt.config.upstreams:
        reasons.append("no usable upstream in the config (every api_keys entry is empty?)")
    elif not rt.upstreams.any_healthy():
        reasons.append("no healthy upstream: " + "; ".join(rt.upstreams.unhealthy_reasons()))
    if not svc.ledger.healthy or not await svc.ledger.writable():
        reasons.append("the usage database is not writable")
    if reasons:
        return _json({"status": "unavailable", "reasons": reasons}, status=503)
    return _json({"status": "ready"})


def not_found(path: str) -> errors.ProxyError:
    return errors.UnknownEndpoint(f"unknown endpoint {path[:200]!r}")

"""Admission: who is calling, and may they make this request.

Job: read the client's key from the headers (``Authorization: Bearer`` wins over
``x-api-key``; never the query string), find it in the in-memory ``KeyCache``, and check
its state against the request (disabled, expired, model allowlist, budget).

It must not: touch the network, await anything on the hot path (the cache is a dict), or
log a secret. Errors are raised as the ProxyError of their SPEC code.
"""

from __future__ import annotations

import datetime as dt
import hashlib

from edgeproxy import errors
from edgeproxy.db import KeyCache, KeyRecord, looks_like_secret


def client_secret(headers: dict[str, str] | object) -> str | None:
    """The key the client sent, or None. ``headers`` is a case-insensitive mapping."""
    auth = headers.get("Authorization")  # type: ignore[attr-defined]
    if auth:
        scheme, _, token = auth.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None
    return headers.get("x-api-key")  # type: ignore[attr-defined]


async def authenticate(headers: object, cache: KeyCache) -> KeyRecord:
    secret = client_secret(headers)
    if not secret or not looks_like_secret(secret):
        raise errors.InvalidApiKey(
            "missing or malformed API key: send 'Authorization: Bearer sk-...'"
            if not secret
            else "invalid API key"
        )
    digest = hashlib.sha256(secret.encode()).hexdigest()
    record = cache.get(digest) or await cache.get_fresh(digest)
    if record is None:
        raise errors.InvalidApiKey("invalid API key")
    return record


def check_state(key: KeyRecord, today: dt.date | None = None) -> None:
    """Key-level refusals that do not depend on the model."""
    if key.disabled:
        raise errors.KeyDisabled(f"key '{key.name}' is disabled")
    if key.expired(today):  # today's date is looked up only for a key that expires
        raise errors.KeyExpired(f"key '{key.name}' expired on {key.expires}")


def check_model(key: KeyRecord, model: str) -> None:
    if not key.allows(model):
        raise errors.ModelNotAllowed(f"key '{key.name}' may not use model '{model}'", param="model")

"""The JSON admin API: ``/admin/keys``, ``/admin/keys/{name}``, ``/admin/usage``.

It mirrors the CLI (SPEC §1, §3) and shares its validation (``records``) and storage
(``db``, ``ledger``): GET lists and shows, POST creates (the response carries the secret,
once), PATCH changes limits, state, or rotates (``{"rotate": true}``), DELETE deletes.

Only when ``admin_token`` is set; then every call needs ``Authorization: Bearer <token>``,
compared in constant time, else 401. With no token the API answers 404 to everything.
SQLite calls run in a thread: the admin API must not stall model traffic.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Any

import orjson

from edgeproxy import db, errors
from edgeproxy.context import Services
from edgeproxy.http11 import Request, Response
from edgeproxy.ledger import parse_since, usage_report

# The JSON field names of `keys list --json` -> the names db.update_key takes.
PATCH_FIELDS = {
    "budget_usd": "budget",
    "models": "models",
    "rpm": "rpm",
    "tpm": "tpm",
    "concurrency": "concurrency",
    "expires": "expires",
    "disabled": "disabled",
}


class AdminUnauthorized(errors.ProxyError):
    status = 401
    code = "invalid_admin_token"
    type = "authentication_error"
    message = "missing or wrong admin token"


class NotFound(errors.ProxyError):
    status = 404
    code = "not_found"
    type = "invalid_request_error"


ADMIN_BODY_LIMIT = 1024 * 1024  # a key's settings are a few hundred bytes


def _json(data: object, status: int = 200) -> Response:
    return Response(body=orjson.dumps(data), status=status, content_type="application/json")


def authorize(request: Request, token: str) -> None:
    if not token:
        raise errors.UnknownEndpoint("the admin API is off: set admin_token in relay.yaml")
    auth = request.headers.get("Authorization", "")
    scheme, _, given = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise AdminUnauthorized()


async def handle(request: Request, svc: Services) -> Response:
    config = svc.ref.current.config
    authorize(request, config.admin_token)
    parts = request.path.strip("/").split("/")  # ["admin", "keys", name?]
    db_path = config.database
    try:
        if parts == ["admin", "keys"]:
            return await _keys(request, db_path)
        if len(parts) == 3 and parts[:2] == ["admin", "keys"]:
            return await _key(request, db_path, parts[2])
        if parts == ["admin", "usage"]:
            return await _usage(request, db_path)
    except db.NoSuchKey as exc:
        raise NotFound(str(exc)) from None
    except db.KeyExists as exc:
        raise errors.InvalidRequest(str(exc)) from None
    except db.InvalidValue as exc:
        raise errors.InvalidRequest(str(exc)) from None
    raise errors.UnknownEndpoint(f"unknown admin endpoint {request.path[:100]!r}")


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.read(ADMIN_BODY_LIMIT)
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise errors.InvalidJson() from None
    if not isinstance(body, dict):
        raise errors.InvalidRequest("request body must be a JSON object")
    return body


async def _keys(request: Request, db_path: str) -> Response:
    if request.method == "GET":
        keys = await asyncio.to_thread(db.list_keys, db_path)
        return _json([k.to_json() for k in keys])
    if request.method == "POST":
        body = await _body(request)
        name = body.pop("name", None)
        changes = _changes(body)
        changes.pop("disabled", None)
        record, secret = await asyncio.to_thread(db.create_key, db_path, name, **changes)
        return _json({**record.to_json(), "key": secret}, status=201)
    raise errors.MethodNotAllowed("use GET or POST")


async def _key(request: Request, db_path: str, name: str) -> Response:
    if request.method == "GET":
        return _json((await asyncio.to_thread(db.get_key, db_path, name)).to_json())
    if request.method == "PATCH":
        body = await _body(request)
        rotate = body.pop("rotate", False) is True
        changes = _changes(body)
        record = await asyncio.to_thread(db.get_key, db_path, name)
        if changes:
            record = await asyncio.to_thread(db.update_key, db_path, name, **changes)
        if rotate:
            secret = await asyncio.to_thread(db.rotate_key, db_path, name)
            record = await asyncio.to_thread(db.get_key, db_path, name)
            return _json({**record.to_json(), "key": secret})
        return _json(record.to_json())
    if request.method == "DELETE":
        await asyncio.to_thread(db.delete_key, db_path, name)
        return _json({"deleted": name})
    raise errors.MethodNotAllowed("use GET, PATCH or DELETE")


def _changes(body: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(body) - set(PATCH_FIELDS))
    if unknown:
        raise errors.InvalidRequest(
            f"unknown field(s) {', '.join(unknown)}; use {', '.join(PATCH_FIELDS)}"
        )
    return {PATCH_FIELDS[k]: v for k, v in body.items()}


async def _usage(request: Request, db_path: str) -> Response:
    if request.method != "GET":
        raise errors.MethodNotAllowed("use GET")
    q = request.query
    since = parse_since(q["since"], time.time()) if q.get("since") else None
    by = [f.strip() for f in q["by"].split(",")] if q.get("by") else None
    report = await asyncio.to_thread(usage_report, db_path, key=q.get("key"), since_ts=since, by=by)
    return _json(report)

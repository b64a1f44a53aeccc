"""Building the request sent upstream: URL, headers, body, per upstream kind.

Job: ``build`` turns the client's parsed request into what one upstream expects. On the
pass-through paths the client's bytes go out untouched unless the config changes them
(``model_map``, ``params`` rules, ``stream_options.include_usage``); then the body is
serialised once. Across dialects the body is translated through the OpenAI pivot.

Headers: the upstream's own key and configured headers (precomputed in ``Runtime``), the
content type, and only the provider feature headers SPEC §10 lets through. The client's
key never leaves. Pure: no sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import orjson

from edgeproxy.config import Params, Upstream
from edgeproxy.dialects import anthropic, gemini

ClientDialect = Literal["openai", "anthropic"]

# Client headers that may reach an upstream of the given kind (SPEC §10).
FEATURE_HEADERS = {
    "openai": ("OpenAI-Beta",),
    "anthropic": ("anthropic-version", "anthropic-beta"),
    "gemini": (),
}


@dataclass(slots=True)
class Outbound:
    url: str
    headers: dict[str, str]
    body: bytes
    translated: bool  # the response must be translated back to the client's dialect


@dataclass(slots=True)
class ClientRequest:
    """What the proxy learnt from the client's request (see proxy.RequestContext)."""

    dialect: ClientDialect
    path: str  # e.g. "/chat/completions" (the endpoint without "/v1")
    raw: bytes
    body: dict[str, Any] | None  # None for multipart and other non-JSON bodies
    content_type: str
    stream: bool
    client_headers: Any  # the case-insensitive request headers
    model_span: tuple[int, int] | None = None  # multipart: where the model value sits


def apply_params(body: dict[str, Any], params: Params) -> None:
    """SPEC `models.*.params`: drop fields, then rename (a rename never overwrites)."""
    for name in params.drop:
        body.pop(name, None)
    for old, new in params.rename.items():
        if old in body and new not in body:
            body[new] = body.pop(old)


def build(
    req: ClientRequest,
    upstream: Upstream,
    base_headers: dict[str, str],
    params: Params,
    images: dict[str, tuple[str, bytes]] | None = None,
) -> Outbound:
    public = req.body.get("model") if req.body is not None else None
    upstream_model = upstream.upstream_model(public) if isinstance(public, str) else ""
    headers = dict(base_headers)
    for name in FEATURE_HEADERS[upstream.kind]:
        value = req.client_headers.get(name)
        if value is not None:
            headers[name] = value
    if upstream.kind == "gemini":
        return _to_gemini(req, upstream, headers, params, upstream_model, images)
    if upstream.kind == "anthropic" and req.dialect == "openai":
        body = dict(req.body or {})
        apply_params(body, params)
        out = anthropic.request_from_openai(body, upstream_model)
        return _json(upstream.base_url + "/v1/messages", headers, out, translated=True)
    if upstream.kind == "openai" and req.dialect == "anthropic":
        body = anthropic.request_to_openai(req.body or {})
        body["model"] = upstream_model
        apply_params(body, params)
        _inject_usage(body, upstream)
        return _json(upstream.base_url + "/chat/completions", headers, body, translated=True)
    # same dialect on both sides: pass through
    url = upstream.base_url + ("/v1/messages" if upstream.kind == "anthropic" else req.path)
    if req.body is None:
        headers["Content-Type"] = req.content_type
        return Outbound(url, headers, _multipart(req, public, upstream), translated=False)
    headers["Content-Type"] = "application/json"
    return Outbound(url, headers, _passthrough_body(req, upstream, params, upstream_model), False)


def _passthrough_body(req: ClientRequest, upstream: Upstream, params: Params, model: str) -> bytes:
    body = req.body or {}
    wants_inject = (
        req.stream
        and upstream.kind == "openai"
        and upstream.stream_usage == "inject"
        and req.path in ("/chat/completions", "/completions")
        and not _client_asked_usage(body)
    )
    if model == body.get("model") and not params and not wants_inject:
        return req.raw  # untouched: the bytes the client sent
    body = dict(body)
    body["model"] = model
    apply_params(body, params)
    if wants_inject:
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        body["stream_options"] = options
    return orjson.dumps(body)


def _client_asked_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def client_wants_usage(req: ClientRequest) -> bool:
    return req.body is not None and _client_asked_usage(req.body)


def _inject_usage(body: dict[str, Any], upstream: Upstream) -> None:
    if body.get("stream"):
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        body["stream_options"] = options


def _multipart(req: ClientRequest, public: object, upstream: Upstream) -> bytes:
    if req.model_span is None:
        return req.raw
    start, end = req.model_span
    model = req.raw[start:end].decode("utf-8").strip()
    mapped = upstream.upstream_model(model)
    if mapped == model:
        return req.raw
    return req.raw[:start] + mapped.encode() + req.raw[end:]


def _to_gemini(
    req: ClientRequest,
    upstream: Upstream,
    headers: dict[str, str],
    params: Params,
    model: str,
    images: dict[str, tuple[str, bytes]] | None,
) -> Outbound:
    body = (
        anthropic.request_to_openai(req.body or {})
        if req.dialect == "anthropic"
        else dict(req.body or {})
    )
    apply_params(body, params)
    out = gemini.request_from_openai(body, model, images)
    action = ":streamGenerateContent?alt=sse" if req.stream else ":generateContent"
    url = f"{upstream.base_url}/v1beta/models/{quote(model, safe='')}{action}"
    return _json(url, headers, out, translated=True)


def _json(url: str, headers: dict[str, str], body: dict[str, Any], *, translated: bool) -> Outbound:
    headers["Content-Type"] = "application/json"
    return Outbound(url, headers, orjson.dumps(body), translated)

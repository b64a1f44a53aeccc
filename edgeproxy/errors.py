"""Every error a client can see, and the only place their JSON is built.

Phases raise a ``ProxyError`` subclass named for its SPEC §6 code; only the request
handler catches them and renders ``to_json()`` (OpenAI shape) or ``to_anthropic_json()``.
``scrub()`` removes upstream secrets and addresses from text that came from an upstream.

Tree::

    ProxyError
    ├── InvalidJson, ModelRequired, MessagesRequired, InvalidRequest      400
    ├── InvalidApiKey                                                     401
    ├── KeyDisabled, KeyExpired, ModelNotAllowed                          403
    ├── ModelNotFound, UnknownEndpoint                                    404
    ├── MethodNotAllowed                                                  405
    ├── RequestTooLarge                                                   413
    ├── UnsupportedMediaType                                              415
    ├── RateLimitExceeded, ConcurrencyLimitExceeded, InsufficientQuota,
    │   UpstreamRateLimited                                               429
    ├── UpstreamError                                                     502
    ├── NoAvailableUpstream, LedgerUnavailable, ServerOverloaded          503
    └── UpstreamTimeout                                                   504
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson


class ProxyError(Exception):
    status = 500
    code = "internal_error"
    type = "server_error"
    message = "internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        self.message = message or self.message
        self.param = param
        self.retry_after = retry_after  # whole seconds, sent as Retry-After
        super().__init__(self.message)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )

    def to_anthropic_json(self) -> bytes:
        return orjson.dumps(
            {
                "type": "error",
                "error": {
                    "type": ANTHROPIC_TYPES.get(self.status, "api_error"),
                    "message": self.message,
                    "code": self.code,
                },
            }
        )

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
}


def _error(name: str, status: int, code: str, type_: str, message: str) -> type[ProxyError]:
    cls = type(name, (ProxyError,), {"status": status, "code": code, "type": type_})
    cls.message = message
    return cls


_BAD = "invalid_request_error"
InvalidJson = _error("InvalidJson", 400, "invalid_json", _BAD, "request body is not valid JSON")
ModelRequired = _error("ModelRequired", 400, "model_required", _BAD, "'model' is required")
MessagesRequired = _error(
    "MessagesRequired", 400, "messages_required", _BAD, "'messages' is required"
)
InvalidRequest = _error("InvalidRequest", 400, "invalid_request", _BAD, "invalid request")
InvalidApiKey = _error(
    "InvalidApiKey", 401, "invalid_api_key", "authentication_error", "invalid API key"
)
KeyDisabled = _error("KeyDisabled", 403, "key_disabled", "permission_error", "this key is disabled")
KeyExpired = _error("KeyExpired", 403, "key_expired", "permission_error", "this key has expired")
ModelNotAllowed = _error(
    "ModelNotAllowed",
    403,
    "model_not_allowed",
    "permission_error",
    "this key may not use this model",
)
ModelNotFound = _error(
    "ModelNotFound", 404, "model_not_found", _BAD, "no upstream serves this model"
)
UnknownEndpoint = _error("UnknownEndpoint", 404, "unknown_endpoint", _BAD, "unknown endpoint")
MethodNotAllowed = _error("MethodNotAllowed", 405, "method_not_allowed", _BAD, "method not allowed")
RequestTooLarge = _error(
    "RequestTooLarge", 413, "request_too_large", _BAD, "request body is too large"
)
UnsupportedMediaType = _error(
    "UnsupportedMediaType", 415, "unsupported_media_type", _BAD, "unsupported Content-Encoding"
)
RateLimitExceeded = _error(
    "RateLimitExceeded", 429, "rate_limit_exceeded", "rate_limit_error", "rate limit exceeded"
)
ConcurrencyLimitExceeded = _error(
    "ConcurrencyLimitExceeded",
    429,
    "concurrency_limit_exceeded",
    "rate_limit_error",
    "too many concurrent requests for this key",
)
InsufficientQuota = _error(
    "InsufficientQuota",
    429,
    "insufficient_quota",
    "insufficient_quota",
    "this key's budget is spent",
)
UpstreamRateLimited = _error(
    "UpstreamRateLimited",
    429,
    "upstream_rate_limited",
    "rate_limit_error",
    "every upstream for this model is rate limited; retry later",
)
UpstreamError = _error("UpstreamError", 502, "upstream_error", "server_error", "upstream failed")
NoAvailableUpstream = _error(
    "NoAvailableUpstream",
    503,
    "no_available_upstream",
    "server_error",
    "no healthy upstream for this model",
)
LedgerUnavailable = _error(
    "LedgerUnavailable",
    503,
    "ledger_unavailable",
    "server_error",
    "usage ledger unavailable; refusing unbilled traffic",
)
ServerOverloaded = _error(
    "ServerOverloaded", 503, "server_overloaded", "server_error", "server overloaded; retry later"
)
UpstreamTimeout = _error(
    "UpstreamTimeout", 504, "upstream_timeout", "server_error", "upstream timed out"
)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret (upstream keys, base URLs, hosts) in ``text``."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "[redacted]")
    return text


def scrub_bytes(data: bytes, secrets: Iterable[bytes]) -> bytes:
    for secret in secrets:
        if secret and secret in data:
            data = data.replace(secret, b"[redacted]")
    return data

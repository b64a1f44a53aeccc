"""Reading a client's request body once, within limits, and checking the fields we act on.

Job: ``read_body`` returns the decoded bytes (gzip/deflate decoded here, bounded by
``max_request_body`` while reading, not after); ``parse_json`` turns them into a dict under
the SPEC §10 rules; ``check_fields`` validates the fields the relay itself acts on and
leaves the rest for the upstream to judge; ``multipart_model`` finds the ``model`` form
field of a transcription upload.

It must not: log or echo the body, or know about upstreams.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import orjson

from edgeproxy import errors

# A decompressor is asked for at most this much output per step, so a bomb is stopped
# within one step of the limit, whatever size of pieces the HTTP layer hands us.
_STEP = 64 * 1024


class BodyReader:
    """Accumulates a request body, decoding and bounding it as it arrives."""

    __slots__ = ("_decoder", "_limit", "_parts", "_size", "_sniff")

    def __init__(self, encoding: str, limit: int) -> None:
        encoding = encoding.strip().lower()
        self._decoder: Any = None
        self._sniff: bytes | None = None
        if encoding in ("", "identity"):
            pass
        elif encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            # RFC 9110 "deflate" is zlib-wrapped, but some clients send raw deflate: the
            # first two bytes tell which (see _wrapped), so the decoder is made on them
            self._sniff = b""
        else:
            raise errors.UnsupportedMediaType(
                f"Content-Encoding '{encoding[:32]}' is not supported; use gzip, deflate or none"
            )
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> None:
        if self._sniff is not None:
            data = self._sniff + data
            if len(data) < 2:
                self._sniff = data
                return
            self._sniff = None
            self._decoder = zlib.decompressobj(
                zlib.MAX_WBITS if _wrapped(data) else -zlib.MAX_WBITS
            )
        if self._decoder is None:
            self._add(data)
            return
        try:
            out = self._decoder.decompress(data, _STEP)
            self._add(out)
            while self._decoder.unconsumed_tail:
                out = self._decoder.decompress(self._decoder.unconsumed_tail, _STEP)
                self._add(out)
        except zlib.error:
            raise errors.InvalidRequest("request body could not be decompressed") from None

    def _add(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            raise errors.RequestTooLarge(f"request body is larger than {self._limit} bytes")
        if data:
            self._parts.append(data)

    def finish(self) -> bytes:
        if self._sniff is not None:
            raise errors.InvalidRequest("compressed request body is truncated")
        if self._decoder is not None:
            try:
                self._add(self._decoder.flush())
            except zlib.error:
                raise errors.InvalidRequest("request body could not be decompressed") from None
            if not self._decoder.eof:
                raise errors.InvalidRequest("compressed request body is truncated")
        if len(self._parts) == 1:
            return self._parts[0]
        return b"".join(self._parts)


def _wrapped(head: bytes) -> bool:
    """Whether a deflate body starts with a zlib header (RFC 1950): compression method 8
    in the low nibble, and the two header bytes a multiple of 31. A raw deflate stream's
    first two bytes almost never pass both checks."""
    return head[0] & 0x0F == 8 and ((head[0] << 8) | head[1]) % 31 == 0


# orjson parses JSON nested up to 1024 levels deep but serialises only up to 254 ("Recursion
# limit reached", a TypeError), and the relay re-serialises every body it changes
# (model_map, params rules, include_usage, translation): a deeper body would pass the
# parser and fail later as a 500. It is refused here, as invalid JSON, whatever the path.
MAX_DEPTH = 254


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object. orjson is strict RFC 8259: it refuses NaN, Infinity,
    invalid UTF-8 and lone surrogates, which SPEC §10 wants refused."""
    if not raw:
        raise errors.InvalidJson("request body is empty; send a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise errors.InvalidJson("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise errors.InvalidRequest("request body must be a JSON object")
    # only a body with more brackets than MAX_DEPTH can be nested that deep: most are not
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and _deeper_than(body, MAX_DEPTH):
        raise errors.InvalidJson(f"request body is nested deeper than {MAX_DEPTH} levels")
    return body


def _deeper_than(body: dict[str, Any], limit: int) -> bool:
    """Whether any value sits more than ``limit`` containers deep (the body is level 1).
    Iterative, so a deep body cannot exhaust the Python stack here either."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        for child in value.values() if isinstance(value, dict) else value:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


POSITIVE_INT_FIELDS = ("n", "max_tokens", "max_completion_tokens")


def check_fields(body: dict[str, Any], *, needs_messages: bool) -> str:
    """Validate what the relay acts on; return the model name."""
    model = body.get("model")
    if model is None or model == "":
        raise errors.ModelRequired("'model' is required", param="model")
    if not isinstance(model, str) or len(model) > 256:
        raise errors.InvalidRequest(
            "'model' must be a string of at most 256 characters", param="model"
        )
    if needs_messages:
        messages = body.get("messages")
        if messages is None:
            raise errors.MessagesRequired("'messages' is required", param="messages")
        if not isinstance(messages, list):
            raise errors.InvalidRequest("'messages' must be an array", param="messages")
        _check_messages(messages)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise errors.InvalidRequest("'stream' must be a boolean", param="stream")
    for name in POSITIVE_INT_FIELDS:
        value = body.get(name)
        if value is not None and not _positive_int(value):
            raise errors.InvalidRequest(f"'{name}' must be a positive integer", param=name)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise errors.InvalidRequest("'stream_options' must be an object", param="stream_options")
    return model


def _check_messages(messages: list[Any]) -> None:
    """The shape of each message, which the translators to other providers walk: an
    object, ``content`` a string, an array or null, ``tool_calls`` an array of objects
    whose ``function`` is an object. Anything inside a content part is left to the
    upstream (the translators skip parts they do not know)."""
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise errors.InvalidRequest(f"'{where}' must be an object", param="messages")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise errors.InvalidRequest(
                f"'{where}.content' must be a string or an array", param="messages"
            )
        calls = message.get("tool_calls")
        if calls is None:
            continue
        if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("function", {}), dict) for c in calls
        ):
            raise errors.InvalidRequest(
                f"'{where}.tool_calls' must be an array of objects with a 'function' object",
                param="messages",
            )


_BOUNDARY = re.compile(r'boundary="?([^";]{1,200})"?', re.IGNORECASE)
_MODEL_PART = re.compile(rb'Content-Disposition:[^\r\n]*\bname="model"[^\r\n]*\r?\n', re.IGNORECASE)


def multipart_model(content_type: str, raw: bytes) -> tuple[str, tuple[int, int]]:
    """The ``model`` field of a multipart/form-data body and the byte span of its value
    (so the proxy can replace it when ``model_map`` renames the model)."""
    match = _BOUNDARY.search(content_type)
    if not match:
        raise errors.InvalidRequest("multipart body without a boundary")
    delimiter = b"\r\n--" + match.group(1).encode("latin-1")
    header = _MODEL_PART.search(raw)
    if header is None:
        raise errors.ModelRequired("'model' form field is required", param="model")
    blank = raw.find(b"\r\n\r\n", header.start())
    blank_len = 4
    if blank < 0:
        raise errors.InvalidRequest("malformed multipart body")
    start = blank + blank_len
    end = raw.find(delimiter, start)
    if end < 0:
        raise errors.InvalidRequest("malformed multipart body")
    try:
        model = raw[start:end].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise errors.InvalidRequest("'model' must be UTF-8", param="model") from None
    if not model:
        raise errors.ModelRequired("'model' form field is required", param="model")
    if len(model) > 256:
        raise errors.InvalidRequest("'model' must be at most 256 characters", param="model")
    return model, (start, end)

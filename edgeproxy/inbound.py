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

# aiohttp hands us the body in pieces of up to this size; a decompressor is asked for at
# most this much output per step, so a bomb is stopped within one step of the limit.
_STEP = 64 * 1024


class BodyReader:
    """Accumulates a request body, decoding and bounding it as it arrives."""

    __slots__ = ("_decoder", "_limit", "_parts", "_size")

    def __init__(self, encoding: str, limit: int) -> None:
        encoding = encoding.strip().lower()
        if encoding in ("", "identity"):
            self._decoder = None
        elif encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            # RFC 9110 "deflate" is zlib-wrapped; some clients send raw deflate: accept both
            self._decoder = zlib.decompressobj(32 + zlib.MAX_WBITS)
        else:
            raise errors.UnsupportedMediaType(
                f"Content-Encoding '{encoding[:32]}' is not supported; use gzip, deflate or none"
            )
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> None:
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
    return body


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


POSITIVE_INT_FIELDS = ("n", "max_tokens", "max_completion_tokens")


def check_fields(body: dict[str, Any], *, needs_messages: bool) -> str:
    """Validate what the relay acts on; return the model name."""
    model = body.get("model")
    if model is None or model == "":
        raise errors.ModelRequired("'model' is required", param="model")
    if not isinstance(model, str) or len(model) > 256:
        raise errors.InvalidRequest("'model' must be a string of at most 256 characters", param="model")
    if needs_messages:
        messages = body.get("messages")
        if messages is None:
            raise errors.MessagesRequired("'messages' is required", param="messages")
        if not isinstance(messages, list):
            raise errors.InvalidRequest("'messages' must be an array", param="messages")
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

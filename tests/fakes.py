"""A scripted fake upstream on a real 127.0.0.1 socket: OpenAI, Anthropic and Gemini paths.

Tests push behaviours (``Json``, ``Sse``, ``Hang``, ``Reset``) that answer the next
requests in order; with none queued, each path answers like its provider would, with usage.
Every request is recorded (path, headers, raw body) so tests can assert what was sent.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Json:
    body: Any
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Sse:
    chunks: list[bytes]  # written one write() each, exactly as given
    delay: float = 0.0  # between chunks
    then: str = "end"  # end | hang | reset
    status: int = 200


@dataclass
class Hang:
    """Accept the request and never answer."""


@dataclass
class Reset:
    """Close the connection without an answer."""


@dataclass
class Raw:
    body: bytes
    content_type: str
    status: int = 200


OPENAI_USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


def openai_completion(
    content: str = "Hello from the fake!", model: str = "fake-model", **extra: Any
) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, **extra}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": OPENAI_USAGE,
    }


def openai_chunk(
    delta: dict[str, Any] | None, finish: str | None = None, usage: Any = "absent"
) -> bytes:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage != "absent":
        chunk["usage"] = usage
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def openai_stream(words: list[str], *, with_usage: bool) -> list[bytes]:
    """What OpenAI sends: a role chunk, content chunks, a finish chunk, the usage chunk
    (only when include_usage was asked for; then every chunk carries "usage":null), [DONE]."""
    u = None if with_usage else "absent"
    chunks = [openai_chunk({"role": "assistant", "content": ""}, usage=u)]
    chunks += [openai_chunk({"content": w}, usage=u) for w in words]
    chunks.append(openai_chunk({}, "stop", usage=u))
    if with_usage:
        chunks.append(openai_chunk(None, usage=OPENAI_USAGE))
    chunks.append(b"data: [DONE]\n\n")
    return chunks


def anthropic_message(text: str = "Hello from Claude!") -> dict[str, Any]:
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": "claude-fake",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 20,
            "output_tokens": 5,
            "cache_read_input_tokens": 4,
            "cache_creation_input_tokens": 2,
        },
    }


def anthropic_event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def anthropic_stream(words: list[str]) -> list[bytes]:
    start = anthropic_message("")
    start["content"] = []
    start["usage"] = {
        "input_tokens": 20,
        "output_tokens": 1,
        "cache_read_input_tokens": 4,
        "cache_creation_input_tokens": 2,
    }
    out = [anthropic_event("message_start", {"type": "message_start", "message": start})]
    out.append(
        anthropic_event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
    )
    out.append(anthropic_event("ping", {"type": "ping"}))
    for w in words:
        out.append(
            anthropic_event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": w},
                },
            )
        )
    out.append(anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    out.append(
        anthropic_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 5},
            },
        )
    )
    out.append(anthropic_event("message_stop", {"type": "message_stop"}))
    return out


def gemini_response(text: str = "Hello from Gemini!") -> dict[str, Any]:
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": text}]},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 9,
            "candidatesTokenCount": 4,
            "thoughtsTokenCount": 2,
            "totalTokenCount": 15,
        },
        "modelVersion": "gemini-fake",
    }


def gemini_stream(words: list[str]) -> list[bytes]:
    out = []
    for i, w in enumerate(words):
        event: dict[str, Any] = {
            "candidates": [{"content": {"role": "model", "parts": [{"text": w}]}, "index": 0}]
        }
        if i == len(words) - 1:
            event["candidates"][0]["finishReason"] = "STOP"
            event["usageMetadata"] = gemini_response()["usageMetadata"]
        out.append(b"data: " + orjson.dumps(event) + b"\r\n\r\n")
    return out


class FakeUpstream:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.script: collections.deque[Any] = collections.deque()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.open_streams = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def push(self, *behaviours: Any) -> None:
        self.script.extend(behaviours)

    async def start(self) -> FakeUpstream:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Recorded(
                request.method, request.path, request.query_string, dict(request.headers), body
            )
        )
        behaviour = self.script.popleft() if self.script else self._default(request.path, body)
        return await self._play(request, behaviour)

    def _default(self, path: str, body: bytes) -> Any:
        try:
            parsed = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            parsed = {}
        stream = isinstance(parsed, dict) and parsed.get("stream") is True
        if path.endswith("/messages"):
            return (
                Sse(anthropic_stream(["Hello", " from", " Claude!"]))
                if stream
                else Json(anthropic_message())
            )
        if ":streamGenerateContent" in path:
            return Sse(gemini_stream(["Hello", " from", " Gemini!"]))
        if ":generateContent" in path:
            return Json(gemini_response())
        if path.endswith("/embeddings"):
            return Json(
                {
                    "object": "list",
                    "model": parsed.get("model"),
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                    "usage": {"prompt_tokens": 3, "total_tokens": 3},
                }
            )
        if path.endswith("/audio/speech"):
            return Raw(b"ID3fake-mp3-bytes" * 100, "audio/mpeg")
        if path.endswith("/audio/transcriptions"):
            return Json({"text": "hello world"})
        if stream:
            with_usage = (parsed.get("stream_options") or {}).get("include_usage") is True
            return Sse(openai_stream(["Hello", " from", " the", " fake!"], with_usage=with_usage))
        return Json(openai_completion())

    async def _play(self, request: web.Request, b: Any) -> web.StreamResponse:
        if isinstance(b, Json):
            if b.delay:
                await asyncio.sleep(b.delay)
            return web.Response(
                status=b.status,
                body=orjson.dumps(b.body),
                headers={"Content-Type": "application/json", **b.headers},
            )
        if isinstance(b, Raw):
            return web.Response(
                status=b.status, body=b.body, headers={"Content-Type": b.content_type}
            )
        if isinstance(b, Hang):
            await asyncio.sleep(3600)
        if isinstance(b, Reset):
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        assert isinstance(b, Sse), b
        response = web.StreamResponse(
            status=b.status, headers={"Content-Type": "text/event-stream"}
        )
        await response.prepare(request)
        self.open_streams += 1
        try:
            for chunk in b.chunks:
                await response.write(chunk)
                if b.delay:
                    await asyncio.sleep(b.delay)
            if b.then == "hang":
                await asyncio.sleep(3600)
            if b.then == "reset":
                assert request.transport is not None
                request.transport.abort()
                return response
            await response.write_eof()
        finally:
            self.open_streams -= 1
        return response

"""Relaying one upstream response to the client: JSON, SSE, or raw bytes.

Job: read the upstream response, find the commit point (SPEC §3), send the status line
there and not before, relay the rest, and collect usage on the way. Before the commit
point a problem is raised as ``AttemptFailed`` so the proxy can try again; after it, the
stream is ended with an SSE error event and nothing is retried.

Runs inside the attempt's ``asyncio.timeout``: ``first_byte`` (or the request's overall
deadline) until the commit point, then rescheduled to ``idle`` after each content event.
Keep-alive comments (``: ping``) and Anthropic ``ping`` events are not content: an upstream
that only pings is idle.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from edgeproxy import errors
from edgeproxy.context import RequestContext
from edgeproxy.deadlines import Deadline
from edgeproxy.dialects import anthropic, gemini
from edgeproxy.http11 import Request, Response, StreamResponse
from edgeproxy.streams import PassThrough, StreamError, Translated
from edgeproxy.upstream_client import UpstreamResponse
from edgeproxy.usage import Usage, from_openai

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx in front must not buffer the stream
}
# Reschedule the idle deadline at most this often: a timer per chunk costs more than the
# second of precision it buys. With short idle timeouts the step shrinks to a tenth of it.
_BUMP_EVERY_S = 1.0
_PING_EVENT = b"event: ping"


class AttemptFailed(Exception):
    """One try failed before the commit point. ``outcome`` is a ``retry.on`` word or status."""

    def __init__(self, outcome: int | str, error: errors.ProxyError) -> None:
        super().__init__(error.message)
        self.outcome = outcome
        self.error = error


class ClientGone(Exception):
    """Writing to the client failed: it went away."""


def empty_chat(body: dict[str, Any]) -> bool:
    """A chat completion with no content, no tool call and no refusal in any choice."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return True
    for choice in choices:
        if isinstance(choice, dict) and choice.get("finish_reason") == "content_filter":
            return False  # a safety refusal is an answer: never retried elsewhere
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        if message.get("content") or message.get("tool_calls") or message.get("refusal"):
            return False
        if message.get("reasoning_content") or message.get("function_call"):
            return False
        if isinstance(choice.get("text"), str) and choice["text"]:
            return False
    return True


async def relay_json(
    ctx: RequestContext,
    resp: UpstreamResponse,
    *,
    upstream_kind: str,
    translated: bool,
    last: bool,
    headers: dict[str, str],
) -> Response:
    """A whole JSON body: its arrival is the commit point."""
    raw = await resp.read()
    chat = ctx.endpoint in ("/v1/chat/completions", "/v1/messages")
    parsed: Any = None
    try:
        parsed = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        if chat:
            raise AttemptFailed(502, errors.UpstreamError("upstream sent invalid JSON")) from None
    if not isinstance(parsed, dict):
        if chat or not raw:
            raise AttemptFailed("empty_response", errors.UpstreamError("upstream sent no body"))
        return _respond(ctx, raw, resp.content_type, headers)  # e.g. a JSON array: relay it
    try:
        body, usage = _json_to_client(ctx, parsed, upstream_kind, translated)
    except (TypeError, AttributeError, KeyError, ValueError, IndexError):
        # fields of the wrong shape: the upstream's fault, and worth another try
        raise AttemptFailed(502, errors.UpstreamError("upstream sent a malformed answer")) from None
    as_openai = body if ctx.dialect == "openai" else _anthropic_as_openai(body)
    if chat and not last and empty_chat(as_openai):
        raise AttemptFailed(
            "empty_response", errors.UpstreamError("upstream sent an empty completion")
        )
    ctx.usage = usage
    out = orjson.dumps(body) if translated else raw
    return _respond(ctx, out, "application/json", headers)


def _anthropic_as_openai(body: dict[str, Any]) -> dict[str, Any]:
    if body.get("stop_reason") == "refusal":
        return {"choices": [{"finish_reason": "content_filter"}]}
    has = any(
        (b.get("type") == "text" and b.get("text")) or b.get("type") == "tool_use"
        for b in body.get("content") or []
        if isinstance(b, dict)
    )
    return {"choices": [{"message": {"content": "x" if has else ""}}]}


def _json_to_client(
    ctx: RequestContext, parsed: dict[str, Any], upstream_kind: str, translated: bool
) -> tuple[dict[str, Any], Usage | None]:
    """(body in the client's dialect, normalised usage)."""
    if not translated:
        if upstream_kind == "anthropic":
            return parsed, anthropic.usage_from(parsed.get("usage") or {})
        return parsed, from_openai(parsed.get("usage"))
    if upstream_kind == "anthropic":
        usage = anthropic.usage_from(parsed.get("usage") or {})
        as_openai = anthropic.response_to_openai(parsed, ctx.model)
    elif upstream_kind == "gemini":
        usage = gemini.usage_from(parsed.get("usageMetadata") or {})
        as_openai = gemini.response_to_openai(parsed, ctx.model)
    else:
        usage = from_openai(parsed.get("usage"))
        as_openai = parsed
    if ctx.dialect == "anthropic":
        return anthropic.response_from_openai(as_openai, ctx.model), usage
    return as_openai, usage


def _respond(
    ctx: RequestContext, body: bytes, content_type: str, headers: dict[str, str]
) -> Response:
    response = Response(body=body, headers={**headers, "Content-Type": content_type})
    ctx.response = response
    ctx.status = 200
    ctx.ttfb = time.perf_counter() - ctx.started  # the whole body is the first byte
    return response


async def relay_stream(
    ctx: RequestContext,
    request: Request,
    resp: UpstreamResponse,
    deadline: Deadline,
    *,
    upstream_kind: str,
    translated: bool,
    withhold_usage: bool,
    last: bool,
    idle_s: float,
    headers: dict[str, str],
    secrets: tuple[str, ...] = (),
    secret_bytes: tuple[bytes, ...] = (),
    first_alone: bool = True,
) -> StreamResponse:
    """SSE: hold the status line until the first content event, then relay as it comes.

    ``first_alone``: send the first content event the moment it is read, in a write of its
    own, before the rest of the same read is inspected. The proxy asks for it when the
    worker has no other request in flight. A busy worker sends such a read in one write:
    the split gets the first event out tens of microseconds sooner, and costs about 25 us
    of CPU (mostly the kernel waking the client) that every other request waits for
    (benchmarks/README.md, "Reading them"). Only reads that hold more than the first event
    differ: an upstream that sends its whole answer at once, or several events together."""
    flt: PassThrough | Translated
    if translated:
        # an Anthropic client always gets usage (in message_delta), so ask the translator for it
        wants_usage = ctx.client_wants_usage or ctx.dialect == "anthropic"
        flt = Translated(upstream_kind, ctx.dialect, ctx.model, include_usage=wants_usage)
    else:
        flavor = (
            "anthropic"
            if upstream_kind == "anthropic"
            else (
                "openai"
                if ctx.endpoint in ("/v1/chat/completions", "/v1/completions")
                else "generic"
            )
        )
        flt = PassThrough(
            flavor, withhold_usage=withhold_usage, secrets=secret_bytes, stop_at_commit=first_alone
        )
    loop = asyncio.get_running_loop()
    held: list[bytes] = []
    bumped = 0.0
    # The deadline is moved at most every `step` seconds, so it is set `step` beyond idle:
    # a silence shorter than idle never cuts a stream; one up to idle + step may be allowed.
    step = min(_BUMP_EVERY_S, idle_s / 10)
    try:
        async for chunk in resp.iter_any():
            out = flt.feed(chunk)
            if ctx.response is None:
                if flt.error is not None:
                    message = errors.scrub(flt.error, secrets)
                    raise AttemptFailed(502, errors.UpstreamError(f"upstream error: {message}"))
                if out:
                    held.append(out)
                if not flt.content_seen or flt.done:
                    if flt.done:
                        break
                    continue
                await _commit(ctx, request, {**headers, **SSE_HEADERS}, b"".join(held))
                held.clear()
                # the rest of the read the first content came in
                out = flt.feed(b"") if isinstance(flt, PassThrough) and flt.pending else b""
                if not flt.done:  # (a whole answer in one read needs no idle deadline)
                    bumped = loop.time()
                    deadline.reschedule(bumped + idle_s + step)
                    if not out:
                        continue
            if flt.done:
                held.append(out)  # the last bytes go out with the end of the stream
                break
            if out:
                await write(ctx, out)
                if (now := loop.time()) - bumped > step and _has_content(out):
                    bumped = now
                    deadline.reschedule(now + idle_s + step)
        try:
            held.append(flt.finish())
        except StreamError:  # an error event after content: that content goes out first
            if held and (ctx.response is not None or flt.content_seen):
                await _send_held(ctx, request, headers, b"".join(held))
            raise
    finally:
        ctx.usage = flt.usage
        ctx.events_out = flt.events
    rest = b"".join(held)
    # What is still held goes out with the end of the stream, in one write; with the
    # status line too when the loop never committed: a translated stream whose content
    # and end came in one read, or an empty stream on the last try.
    if ctx.response is None:
        if not flt.content_seen and not last:
            raise AttemptFailed(
                "empty_response", errors.UpstreamError("upstream sent an empty stream")
            )
        await _commit(ctx, request, {**headers, **SSE_HEADERS}, rest, end=flt.done)
    elif flt.done:
        await _end(ctx, rest)
    elif rest:
        await write(ctx, rest)
    if not flt.done:
        await end_stream(ctx, errors.UpstreamError("upstream closed the stream before its end"))
    return ctx.response  # type: ignore[return-value]


def _has_content(out: bytes) -> bool:
    """Whether relayed SSE bytes hold an event other than a keep-alive: a ``: ping``
    comment has no ``data:`` line, an Anthropic ping is ``event: ping`` with one."""
    return out.count(b"data:") > out.count(_PING_EVENT)


async def _send_held(
    ctx: RequestContext, request: Request, headers: dict[str, str], held: bytes
) -> None:
    if ctx.response is None:
        await _commit(ctx, request, {**headers, **SSE_HEADERS}, held)
    else:
        await write(ctx, held)


async def _commit(
    ctx: RequestContext,
    request: Request,
    headers: dict[str, str],
    first: bytes = b"",
    *,
    end: bool = False,
) -> None:
    """Send the status line and headers, with the first bytes (and the end of the
    response, when it is all there): from here on nothing is retried."""
    response = StreamResponse(status=200, headers=headers)
    ctx.response = response
    ctx.status = 200
    ctx.ttfb = time.perf_counter() - ctx.started
    try:
        await response.prepare(request, first, end=end)
    except ConnectionError as exc:
        raise ClientGone from exc


async def relay_bytes(
    ctx: RequestContext,
    request: Request,
    resp: UpstreamResponse,
    deadline: Deadline,
    *,
    idle_s: float,
    headers: dict[str, str],
) -> StreamResponse:
    """Anything else (audio, files): the headers are the commit point, bytes follow as is."""
    content_type = resp.headers.get("Content-Type", "application/octet-stream")
    await _commit(ctx, request, {**headers, "Content-Type": content_type})
    loop = asyncio.get_running_loop()
    async for chunk in resp.iter_any():
        deadline.reschedule(loop.time() + idle_s)
        await write(ctx, chunk)
    assert ctx.response is not None
    return ctx.response


async def write(ctx: RequestContext, data: bytes) -> None:
    assert isinstance(ctx.response, StreamResponse)
    try:
        await ctx.response.write(data)
    except ConnectionError as exc:
        raise ClientGone from exc


async def _end(ctx: RequestContext, last: bytes) -> None:
    """The last bytes and the end of the response, in one write."""
    assert isinstance(ctx.response, StreamResponse)
    try:
        await ctx.response.write_eof(last)
    except ConnectionError as exc:
        raise ClientGone from exc


async def end_stream(ctx: RequestContext, error: errors.ProxyError) -> None:
    """After the commit point: an SSE error event in the client's dialect, no [DONE], and
    the end of the response, so the client reads a complete body that ends in the error
    (also when the handler is being cancelled at shutdown)."""
    ctx.error_code = error.code
    body = error.to_anthropic_json() if ctx.dialect == "anthropic" else error.to_json()
    event = (b"event: error\ndata: " if ctx.dialect == "anthropic" else b"data: ") + body + b"\n\n"
    assert ctx.response is not None
    try:
        # bounded: a client that stopped reading must not hold us here
        async with asyncio.timeout(1.0):
            await _end(ctx, event)
    except (TimeoutError, ClientGone, ConnectionError):
        ctx.client_gone = True

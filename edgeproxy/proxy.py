"""The story of one model request, phase by phase (after Pingora's proxy phases).

1. ``request_filter``  request id, admission, body read once and parsed once, field checks
2. ``upstream_peer``   pick an upstream: lowest healthy tier, weighted, untried first
3. ``attempt``         build the upstream request (``outbound``), send it, and hand the
                       response to ``relay`` which finds the commit point
4. retry loop          a failed try before the commit point backs off and goes to 2
5. ``fail_to_proxy``   an error JSON if nothing was sent yet; else the stream was already
                       ended with an SSE error event by ``relay``
6. ``log_request``     always, in ``finally``, synchronous: metrics, access log, ledger

Only ``handle`` catches ``ProxyError``; phases raise them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from typing import Any

import orjson

from edgeproxy import errors, inbound, keys, outbound, relay
from edgeproxy.bookkeeping import usage_and_cost
from edgeproxy.context import RequestContext, Services, new_id
from edgeproxy.dialects import anthropic, gemini
from edgeproxy.http11 import AnyResponse, Request, Response, error_response
from edgeproxy.limits import needs_limiter
from edgeproxy.relay import AttemptFailed, ClientGone
from edgeproxy.retry import KEY_REFUSED, delay, overall_deadline_s, should_retry
from edgeproxy.runtime import Runtime
from edgeproxy.streams import StreamError
from edgeproxy.upstream_client import UpstreamResponse
from edgeproxy.upstreams import UpstreamState
from edgeproxy.usage import Usage, cost_usd, estimate_tokens

log = logging.getLogger("edgeproxy")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Endpoints that any upstream kind can serve (translated when needed); the others of
# SPEC §3 are OpenAI-only and passed through.
CHAT_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/messages"})
OPENAI_ONLY = frozenset({"openai"})
# How much of an upstream error body we read: enough for any error message, and bounded.
_ERROR_BODY_LIMIT = 64 * 1024


def request_id(headers: Any) -> str:
    sent = headers.get("x-request-id")
    if sent and _REQUEST_ID.fullmatch(sent):
        return sent
    return new_id()


async def handle(request: Request, svc: Services, endpoint: str, dialect: str) -> AnyResponse:
    rt = svc.ref.current  # read once: a reload mid-request does not change this request
    ctx = RequestContext(
        request_id=request_id(request.headers),
        endpoint=endpoint,
        dialect=dialect,  # type: ignore[arg-type]
        started=time.perf_counter(),
        ts=time.time(),
    )
    headers = {"x-request-id": ctx.request_id}
    task = asyncio.current_task()
    svc.tasks.add(task)  # type: ignore[arg-type]
    svc.inflight += 1
    try:
        req = await request_filter(ctx, request, rt, svc)
        # send() answers before the ``finally``: the client does not wait for log_request
        return request.send(await proxy(ctx, request, req, rt, svc, headers))
    except errors.ProxyError as exc:
        return request.send(fail_to_proxy(ctx, exc, headers))
    except ClientGone:
        ctx.client_gone = True
        return ctx.response or Response(status=499)
    except asyncio.CancelledError:
        if svc.draining and ctx.response is not None:
            # shutdown_grace is over: end the stream cleanly rather than cutting it
            await relay.end_stream(ctx, errors.ServerOverloaded("the relay is shutting down"))
            ctx.status = 503
        else:
            ctx.client_gone = True  # the client went away: http11 cancelled us
        raise
    finally:
        svc.tasks.discard(task)  # type: ignore[arg-type]
        svc.inflight -= 1
        log_request(ctx, rt, svc, time.perf_counter())


async def request_filter(
    ctx: RequestContext, request: Request, rt: Runtime, svc: Services
) -> outbound.ClientRequest:
    """Admission and the client's body. Raising refuses the request before any upstream."""
    # max_inflight is per node (SPEC §2): each worker admits its share, as it does of
    # max_connections; SO_REUSEPORT spreads connections evenly enough, and a node-wide
    # count would cost an IPC round trip per request.
    if svc.inflight > math.ceil(rt.config.max_inflight / rt.config.workers):
        raise errors.ServerOverloaded("too many requests in flight; retry later")
    ctx.key = await keys.authenticate(request.headers, svc.keys)
    keys.check_state(ctx.key)
    raw = await read_body(request, rt)
    ctx.prompt_bytes = len(raw)
    content_type = request.headers.get("Content-Type", "")
    span = None
    if content_type.lower().startswith("multipart/"):
        model, span = inbound.multipart_model(content_type, raw)
        body = None
    else:
        body = inbound.parse_json(raw)
        model = inbound.check_fields(body, needs_messages=ctx.endpoint in CHAT_ENDPOINTS)
        ctx.stream = body.get("stream") is True
    ctx.model = model
    keys.check_model(ctx.key, model)
    if not svc.ledger.healthy:
        raise errors.LedgerUnavailable()
    if not rt.upstreams.serves(model, _kinds(ctx)):
        raise errors.ModelNotFound(f"no upstream serves model '{model}'", param="model")
    if needs_limiter(ctx.key):
        ctx.ticket = await svc.limits.admit(ctx.key, _reservation(rt, model, body, len(raw)))
    req = outbound.ClientRequest(
        dialect=ctx.dialect,
        path=ctx.endpoint[3:],  # "/v1/x" -> "/x": the upstream's base_url carries its version
        raw=raw,
        body=body,
        content_type=content_type,
        stream=ctx.stream,
        client_headers=request.headers,
        model_span=span,
    )
    ctx.client_wants_usage = ctx.dialect == "openai" and outbound.client_wants_usage(req)
    return req


def _reservation(rt: Runtime, model: str, body: dict[str, Any] | None, n_bytes: int) -> float:
    """What an admitted request holds against its key's budget until it settles: its
    prompt, estimated, and the completion it asked for at most."""
    rule = rt.model_rule(model)
    if rule is None or rule.price is None:
        return 0.0
    body = body or {}
    most = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    return cost_usd(rule.price, Usage(prompt=estimate_tokens(n_bytes), completion=most))


def _kinds(ctx: RequestContext) -> frozenset[str] | None:
    return None if ctx.endpoint in CHAT_ENDPOINTS else OPENAI_ONLY


async def read_body(request: Request, rt: Runtime) -> bytes:
    """The body, decoded and bounded by ``max_request_body`` as it arrives (a Content-Length
    over it is refused before reading). Headers and body share one ``client_read``
    deadline, counted from the request's first byte (``http11.HttpProtocol``)."""
    limit = rt.config.max_request_body
    if request.content_length is not None and request.content_length > limit:
        raise errors.RequestTooLarge(f"request body is larger than {limit} bytes")
    reader = inbound.BodyReader(request.headers.get("Content-Encoding", ""), limit)
    if request.complete:  # the common case: it came with the headers, nothing to wait for
        reader.feed(request.take_body())
        return reader.finish()
    try:
        async with asyncio.timeout_at(request.started + rt.config.timeouts.client_read):
            while chunk := await request.readany():
                reader.feed(chunk)
    except TimeoutError:
        raise errors.InvalidRequest("request body was not received in time") from None
    return reader.finish()


async def proxy(
    ctx: RequestContext,
    request: Request,
    req: outbound.ClientRequest,
    rt: Runtime,
    svc: Services,
    headers: dict[str, str],
) -> AnyResponse:
    """The retry loop: one try per upstream pick until success, the commit point, or the
    end of what a request may spend on retries: ``retry.attempts`` tries in all, one
    overall deadline (``retry.overall_deadline_s``), and the worker's retry budget."""
    policy = rt.config.retry
    budget = rt.upstreams.budget
    budget.request()
    loop = asyncio.get_running_loop()
    candidates = rt.upstreams.candidates(ctx.model)
    deadline = loop.time() + overall_deadline_s(policy, (u.timeouts for u in candidates))
    failures: list[AttemptFailed] = []
    kinds = _kinds(ctx)
    while True:
        state = rt.upstreams.pick(ctx.model, ctx.tried, kinds)
        if state is None:
            break
        trial = state.trial_pending  # picked while on trial: this request is the trial
        ctx.attempts += 1
        ctx.tried.add(state.name)
        ctx.upstream = state.name
        # the last try delivers an empty completion rather than fail it (nothing to retry on)
        last = ctx.attempts >= policy.attempts or not budget.can_retry()
        try:
            response = await attempt(ctx, request, req, rt, svc, state, last, headers, deadline)
        except AttemptFailed as failure:
            failures.append(failure)
            svc.metrics.attempt(state.name, str(failure.outcome))
            _record_failed_try(state, failure, rt)
            # a 429 that cooled its upstream sends the next try elsewhere: no need to wait
            cooled = state.cooling_until > rt.upstreams.clock()
            wait_s = 0.0 if cooled else delay(policy, ctx.attempts, svc.rng)
            if (
                not should_retry(policy, failure.outcome, ctx.attempts)
                or loop.time() + wait_s >= deadline
                or not budget.try_retry()
            ):
                break
            if wait_s:
                await asyncio.sleep(wait_s)
            continue
        except BaseException:
            if trial:  # no verdict (the client left, or we are shutting down): free the slot
                state.release_trial()
            raise
        svc.metrics.attempt(state.name, "ok")
        _record_answer(ctx, state, rt)
        return response
    raise final_error(ctx, rt, failures)


def _record_failed_try(state: UpstreamState, failure: AttemptFailed, rt: Runtime) -> None:
    """Health after a try that failed before the commit point. A refused key (already out
    of the rotation) and a 429 (cooling or backoff) say nothing about the upstream's health."""
    if failure.outcome in KEY_REFUSED or failure.outcome == 429:
        state.release_trial()
    else:
        state.record_failure(rt.upstreams.clock(), rt.config.health)


def _record_answer(ctx: RequestContext, state: UpstreamState, rt: Runtime) -> None:
    """Health after a try that reached the client: a stream that the upstream broke after
    the commit point (ended by ``relay.end_stream``, status 200) is a failure; anything
    else, a passed-on 4xx included, is an upstream that works."""
    if ctx.status == 200 and ctx.error_code and not ctx.client_gone:
        state.record_failure(rt.upstreams.clock(), rt.config.health)
    else:
        state.record_success()


def final_error(
    ctx: RequestContext, rt: Runtime, failures: list[AttemptFailed]
) -> errors.ProxyError:
    """What the client sees when no try succeeded (SPEC §5, §6): 429 when every try was
    rate limited or every upstream of the model is cooling, with Retry-After = whole
    seconds until the first of them comes back; 503 when none was available at all;
    504 when every try timed out; else the last error."""
    wait = rt.upstreams.cooling_wait(ctx.model)
    if all(f.outcome == 429 for f in failures) and (failures or wait is not None):
        if wait is None:  # rate limited without Retry-After: nothing better to say than 1 s
            wait = min(f.error.retry_after or 1 for f in failures)
        return errors.UpstreamRateLimited(retry_after=max(1, math.ceil(wait)))
    if not failures:
        return errors.NoAvailableUpstream(f"no healthy upstream for model '{ctx.model}'")
    if all(f.outcome == "timeout" for f in failures):
        return errors.UpstreamTimeout(f"upstream timed out on {len(failures)} tries")
    return failures[-1].error


async def attempt(
    ctx: RequestContext,
    request: Request,
    req: outbound.ClientRequest,
    rt: Runtime,
    svc: Services,
    state: UpstreamState,
    last: bool,
    headers: dict[str, str],
    deadline: float,
) -> AnyResponse:
    """One try at one upstream. Raises AttemptFailed before the commit point; after it,
    ends the client's stream itself and returns the response. Until the commit point the
    try is bounded by its own ``connect`` / ``first_byte`` and by the request's overall
    ``deadline`` (loop time), whichever comes first; after it ``relay`` moves the same
    timer to ``idle`` after each content event."""
    upstream = state.config
    key = state.next_key()
    rule = rt.model_rule(ctx.model)
    params = rule.params if rule is not None else outbound.Params()
    images = await _gemini_images(req, svc) if upstream.kind == "gemini" else None
    out = outbound.build(req, upstream, rt.headers[upstream.name][key], params, images)
    t = upstream.timeouts
    now = asyncio.get_running_loop().time()
    connect_s = max(0.001, min(t.connect, deadline - now))
    upstream_request = svc.upstream.post(
        out.url, body=out.body, headers=out.headers, connect_timeout=connect_s
    )
    out.body = b""  # it is in the request's bytes now: a long stream must not hold a copy
    try:
        async with svc.deadlines.at(min(now + t.first_byte, deadline)) as timer:
            async with upstream_request as resp:
                if resp.status >= 300:
                    return await _upstream_error(ctx, resp, rt, state, key, headers)
                if resp.content_type == "text/event-stream":
                    return await relay.relay_stream(
                        ctx, request, resp, timer,
                        upstream_kind=upstream.kind, translated=out.translated,
                        withhold_usage=ctx.stream and not ctx.client_wants_usage,
                        last=last, idle_s=t.idle, headers=headers, secrets=rt.secrets,
                        secret_bytes=rt.secret_bytes, first_alone=svc.inflight <= 1,
                    )  # fmt: skip
                if resp.content_type == "application/json" or out.translated:
                    return await relay.relay_json(
                        ctx, resp, upstream_kind=upstream.kind, translated=out.translated,
                        last=last, headers=headers,
                    )  # fmt: skip
                return await relay.relay_bytes(
                    ctx, request, resp, timer, idle_s=t.idle, headers=headers
                )
    except TimeoutError:
        return await _failed(ctx, "timeout", errors.UpstreamTimeout("upstream timed out"))
    except OSError as exc:  # upstream_client.UpstreamConnectionError among them
        if ctx.client_gone:
            raise ClientGone from exc
        message = (
            "could not reach the upstream" if not ctx.committed else "upstream connection failed"
        )
        return await _failed(ctx, "connect_error", errors.UpstreamError(message))
    except StreamError as exc:
        return await _failed(ctx, 502, errors.UpstreamError(_scrub(rt, str(exc))))


async def _failed(ctx: RequestContext, outcome: int | str, error: errors.ProxyError) -> AnyResponse:
    """A transport failure: retryable before the commit point, an error event after it.
    The retry loop records the upstream's health either way."""
    if ctx.response is None:
        raise AttemptFailed(outcome, error)
    await relay.end_stream(ctx, error)
    return ctx.response


async def _upstream_error(
    ctx: RequestContext,
    resp: UpstreamResponse,
    rt: Runtime,
    state: UpstreamState,
    key: str,
    headers: dict[str, str],
) -> Response:
    """A non-2xx status line from the upstream."""
    status = resp.status
    body = await resp.read(_ERROR_BODY_LIMIT)
    if status in KEY_REFUSED:
        # our own upstream key is bad: out of the rotation; the client never sees this body
        state.drop_key(key)
        log.warning(
            orjson.dumps(
                {"event": "upstream_key_refused", "upstream": state.name, "status": status}
            ).decode()
        )
        raise AttemptFailed(
            status, errors.UpstreamError("upstream refused the relay's credentials")
        )
    if status == 429:
        retry_after = _retry_after(resp.headers.get("Retry-After"))
        if retry_after:
            state.cool(rt.upstreams.clock() + retry_after)
        raise AttemptFailed(
            429, errors.UpstreamRateLimited(retry_after=math.ceil(retry_after or 1))
        )
    message = _scrub(rt, _error_message(body)) or f"upstream returned HTTP {status}"
    if status >= 500 or status in rt.config.retry.on:
        raise AttemptFailed(
            status, errors.UpstreamError(f"upstream returned HTTP {status}: {message}"[:600])
        )
    # other 4xx describe the client's request: pass them on, scrubbed, in the client's shape
    ctx.status = status
    ctx.error_code = f"upstream_{status}"
    response = Response(
        status=status,
        body=_client_error_body(ctx, state.config.kind, body, rt),
        headers={**headers, "Content-Type": "application/json"},
    )
    ctx.response = response
    return response


def _client_error_body(ctx: RequestContext, kind: str, body: bytes, rt: Runtime) -> bytes:
    body = _scrub(rt, body.decode("utf-8", "replace")).encode()
    converted: bytes | None = body
    if ctx.dialect == "openai" and kind == "anthropic":
        converted = anthropic.error_to_openai(body)
    elif ctx.dialect == "openai" and kind == "gemini":
        converted = gemini.error_to_openai(body)
    elif ctx.dialect == "anthropic" and kind == "gemini":
        as_openai = gemini.error_to_openai(body)
        converted = anthropic.error_from_openai(as_openai) if as_openai else None
    elif ctx.dialect == "anthropic" and kind == "openai":
        converted = anthropic.error_from_openai(body)
    if converted is None:
        error = errors.InvalidRequest(_error_message(body) or "upstream refused the request")
        converted = error.to_anthropic_json() if ctx.dialect == "anthropic" else error.to_json()
    return converted


def _error_message(body: bytes) -> str:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:300].decode("utf-8", "replace").strip()
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or "")[:500]
    if isinstance(error, str):
        return error[:500]
    return ""


def _scrub(rt: Runtime, text: str) -> str:
    return errors.scrub(text, rt.secrets)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare from LLM APIs; fall back to backoff
    return seconds if 0 < seconds <= 3600 else None


async def _gemini_images(
    req: outbound.ClientRequest, svc: Services
) -> dict[str, tuple[str, bytes]]:
    from edgeproxy.image_fetch import ImageFetchError, fetch_image

    body = req.body or {}
    if req.dialect == "anthropic":
        body = anthropic.request_to_openai(body)
    found: dict[str, tuple[str, bytes]] = {}
    for url in gemini.image_urls(body):
        try:
            found[url] = await fetch_image(svc.image_session(), url)
        except ImageFetchError as exc:
            raise errors.InvalidRequest(f"image {url[:100]!r}: {exc}", param="messages") from None
    return found


def fail_to_proxy(
    ctx: RequestContext, exc: errors.ProxyError, headers: dict[str, str]
) -> AnyResponse:
    """Before the commit point: the error JSON. After it the stream was already ended."""
    if ctx.response is not None:
        return ctx.response
    ctx.status = exc.status
    ctx.error_code = exc.code
    return error_response(exc, headers, anthropic=ctx.dialect == "anthropic")


def log_request(ctx: RequestContext, rt: Runtime, svc: Services, now: float) -> None:
    """Always runs, never awaits: settles a rate-limit ticket now, and queues the request
    for its metrics, usage record and access log line (``bookkeeping``)."""
    if ctx.key is None:
        return  # unauthenticated: nothing to bill, nobody to name (SPEC §4)
    if ctx.client_gone and ctx.status in (0, 200):
        ctx.status = 499  # nginx's "client closed request"
    if ctx.ticket is not None:  # now: a slot must never leak, and the next request needs it
        usage, _, cost = usage_and_cost(ctx, rt)
        svc.limits.settle(ctx.ticket, usage.prompt + usage.completion, cost)
    svc.bookkeeper.add(ctx, rt, now, idle=svc.inflight == 0)

"""The public HTTP/1.1 server: one asyncio protocol per connection, parsed by httptools.

Why not aiohttp's server: profiled under load (benchmarks/results/profile-json.txt), its
request and response layers took more of a relayed request than everything edgeproxy
does; a protocol that hands the handler a plain ``Request`` and writes the response
head and body in one ``transport.write`` serves several times more requests a second.

What a public relay needs from its HTTP layer, and where it is:

- Malformed requests get a fixed JSON error that echoes and logs none of their bytes
  (``_refuse``): 400, or 431 for a line over ``MAX_LINE_SIZE``.
- A header deadline (slowloris): ``client_read`` from a request's first byte until its
  headers are complete; the body shares the same deadline (``Request.started``, read in
  ``proxy.read_body``). Between requests ``client_keepalive`` governs an idle connection.
- A client that leaves cancels its handler (and with it the upstream request).
- Responses: ``Response`` (whole body, Content-Length) or ``StreamResponse`` (chunked,
  written as it comes, waiting for the socket to drain: a client that stops reading
  holds at most the transport's write buffer).
- Pipelined requests are answered in order, one at a time; reading pauses meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import parse_qsl, unquote

import httptools
import orjson

from edgeproxy import errors
from edgeproxy.headers import Headers

log = logging.getLogger("edgeproxy")

# At most 8190 bytes in the request line or one header line (an Authorization header
# included), at most 128 headers: the limits the README documents.
MAX_LINE_SIZE = 8190
MAX_HEADERS = 128
# A request's whole header block may not exceed this while it arrives (httptools keeps
# a header it has not finished in memory; this bounds that).
MAX_HEAD_SIZE = 64 * 1024
# Body bytes buffered ahead of the handler before the socket stops being read.
BODY_HIGH_WATER = 256 * 1024
# The socket's write buffer: past it, ``StreamResponse.write`` waits for the client.
WRITE_HIGH_WATER = 64 * 1024

Handler = Callable[["Request"], Awaitable["Response"]]
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus} | {499: b"Client Closed Request"}


class BadHttpRequest(errors.ProxyError):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"
    message = "malformed HTTP request"


class HeaderTooLarge(errors.ProxyError):
    status = 431
    code = "request_header_too_large"
    type = "invalid_request_error"
    message = (
        f"the request line or a header is longer than {MAX_LINE_SIZE} bytes, "
        f"or there are more than {MAX_HEADERS} headers"
    )


class ExpectationFailed(errors.ProxyError):
    status = 417
    code = "invalid_request"
    type = "invalid_request_error"
    message = "only 'Expect: 100-continue' is supported"


class InternalError(errors.ProxyError):
    """A handler raised something unexpected (ProxyError's own defaults: 500)."""


class Request:
    """One request: method, decoded path, headers, and a body that streams in."""

    __slots__ = (
        "_body",
        "_eof",
        "_error",
        "_protocol",
        "_waiter",
        "buffered",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "path",
        "query_string",
        "started",
        "version",
    )

    def __init__(
        self, protocol: HttpProtocol, method: str, target: bytes, headers: Headers, started: float
    ) -> None:
        self._protocol = protocol
        self.method = method
        self.path, self.query_string = _split_target(target)
        self.headers = headers
        self.started = started  # loop time of the request's first byte (client_read)
        length = headers.get("content-length")
        self.content_length = int(length) if length is not None else None
        self.version = protocol.parser.get_http_version()
        self.keep_alive = protocol.parser.should_keep_alive()
        self._body: list[bytes] = []  # a list: an empty deque costs 600 bytes a request
        self.buffered = 0
        self._eof = False
        self._error: errors.ProxyError | None = None  # the body broke the HTTP framing
        self._waiter: asyncio.Future[None] | None = None

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(self.query_string, keep_blank_values=True))

    async def readany(self) -> bytes:
        """The body bytes that have arrived (waiting for some); b"" at its end."""
        while not self._body:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._waiter = self._protocol.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = b"".join(self._body) if len(self._body) > 1 else self._body[0]
        self._body.clear()
        self.buffered = 0
        self._protocol.body_taken()
        return data

    @property
    def complete(self) -> bool:
        """The whole body has arrived (and the framing was sound)."""
        return self._eof and self._error is None

    def take_body(self) -> bytes:
        """All the body bytes buffered now, without waiting (see ``complete``)."""
        data = b"".join(self._body)
        self._body.clear()
        if self.buffered:
            self.buffered = 0
            self._protocol.body_taken()
        return data

    def send(self, response: AnyResponse) -> AnyResponse:
        """Write a whole ``Response`` now, so that work a handler does after its answer
        (metering, logs) is not on the client's clock. A stream writes itself: returned
        as it is. A body whose framing broke is answered with that error instead."""
        if not isinstance(response, Response) or response.sent:
            return response
        protocol = self._protocol
        if protocol.response_started or protocol.closed:
            return response  # a stream's head is out already: _answer closes the connection
        if self._error is not None:
            response = error_response(self._error)  # broken framing wins over the answer
        response.sent = protocol.response_started = True
        protocol.write(_whole(response, self.keep_alive, body=self.method != "HEAD"))
        return response

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; past ``limit`` bytes, 413."""
        parts = []
        size = 0
        while chunk := await self.readany():
            size += len(chunk)
            if limit is not None and size > limit:
                raise errors.RequestTooLarge(f"request body is larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def _feed(self, data: bytes) -> None:
        self._body.append(data)
        self.buffered += len(data)
        self._wake()

    def _finish(self) -> None:
        self._eof = True
        self._wake()

    def _fail(self, error: errors.ProxyError) -> None:
        self._error = error
        self.keep_alive = False
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Response:
    """A whole response: its head and body go out in one write."""

    __slots__ = ("body", "headers", "sent", "status")

    def __init__(
        self,
        *,
        status: int = 200,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
        text: str | None = None,
    ) -> None:
        self.status = status
        self.sent = False
        self.body = text.encode() if text is not None else body
        self.headers = dict(headers) if headers else {}
        if content_type is not None:
            self.headers["Content-Type"] = content_type
        elif text is not None:
            self.headers.setdefault("Content-Type", "text/plain; charset=utf-8")

    @property
    def prepared(self) -> bool:
        return False


class StreamResponse:
    """A response written as it comes: the head at ``prepare``, then chunks."""

    __slots__ = ("_chunked", "_protocol", "ended", "headers", "status")

    def __init__(self, *, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.headers = dict(headers) if headers else {}
        self._protocol: HttpProtocol | None = None
        self._chunked = True
        self.ended = False

    @property
    def prepared(self) -> bool:
        return self._protocol is not None

    async def prepare(self, request: Request, body: bytes = b"", *, end: bool = False) -> None:
        """Send the head, with the first ``body`` bytes and, with ``end``, the end of the
        response: one write (and one syscall) where the answer is all there already."""
        protocol = request._protocol
        if protocol.closed:
            raise ConnectionResetError("the client has gone")
        self._protocol = protocol
        protocol.response_started = True
        self._chunked = request.version != "1.0"  # HTTP/1.0: the body ends with the connection
        if not self._chunked:
            request.keep_alive = False
        extra = b"Transfer-Encoding: chunked\r\n" if self._chunked else b""
        head = _head(self.status, self.headers, extra, request.keep_alive)
        protocol.write(head + self._frame(body, end))
        self.ended = end
        if protocol.paused_writing:
            await protocol.drain()

    async def write(self, data: bytes) -> None:
        protocol = self._protocol
        assert protocol is not None, "prepare() first"
        if protocol.closed:
            raise ConnectionResetError("the client has gone")
        if not data:
            return
        protocol.write(self._frame(data, False))
        if protocol.paused_writing:
            await protocol.drain()

    async def write_eof(self, last: bytes = b"") -> None:
        """The ``last`` bytes, then the end of the response."""
        if self.ended:
            return
        self.ended = True
        protocol = self._protocol
        assert protocol is not None, "prepare() first"
        if protocol.closed:
            raise ConnectionResetError("the client has gone")
        protocol.write(self._frame(last, True))
        if protocol.paused_writing:
            await protocol.drain()

    def _frame(self, data: bytes, end: bool) -> bytes:
        if not self._chunked:
            return data
        if not data:
            return b"0\r\n\r\n" if end else b""
        return b"".join((b"%x\r\n" % len(data), data, b"\r\n0\r\n\r\n" if end else b"\r\n"))


AnyResponse = Response | StreamResponse


class HttpProtocol(asyncio.Protocol):
    """One client connection.

    Timers: ``client_read`` runs from a request's first byte (for the first request,
    from the connection's start) until its headers are complete; ``client_keepalive``
    from the end of a response until the next request's first byte. While a handler
    runs neither does: the handler bounds its own body read and upstream.
    """

    __slots__ = (
        "_answering",
        "_deadline",
        "_drain",
        "_head_bytes",
        "_header_count",
        "_headers",
        "_idle_since_answer",
        "_on_deadline",
        "_parsing",
        "_queue",
        "_started_at",
        "_task",
        "_timer",
        "_timer_at",
        "_url",
        "client_read_s",
        "closed",
        "handler",
        "keepalive_s",
        "loop",
        "on_close",
        "parser",
        "paused_writing",
        "request",
        "response_started",
        "transport",
    )

    def __init__(
        self,
        handler: Handler,
        *,
        client_read_s: float,
        keepalive_s: float,
        on_close: Callable[[HttpProtocol], None] | None = None,
    ) -> None:
        self.handler = handler
        self.client_read_s = client_read_s
        self.keepalive_s = keepalive_s
        self.on_close = on_close
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused_writing = False
        self.response_started = False  # the current answer's head is out: no error page now
        self.request: Request | None = None  # the request whose body is being parsed
        self._drain: asyncio.Future[None] | None = None
        self._queue: list[Request] = []  # pipelined: parsed, waiting for their turn (rare)
        self._task: asyncio.Task[None] | None = None  # answering ``_answering``
        self._answering: Request | None = None
        self._parsing = False  # between a request's first byte and its headers' end
        # The connection's one deadline (client_read or client_keepalive) and what happens
        # then. Its timer is armed lazily (see _set_deadline): moving the deadline is an
        # assignment, not a timer cancelled and made again for every request.
        self._deadline: float | None = None
        self._on_deadline: Callable[[], None] = self.close
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._idle_since_answer = False  # the deadline is client_keepalive's
        self._started_at = 0.0  # loop time of the current request's first byte
        self._url = b""
        self._headers = Headers()
        self._header_count = 0
        self._head_bytes = 0

    # --- connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[union-attr]
        self._start_read_clock()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client left: stop its upstream request too
        for request in (self.request, *self._queue):
            if request is not None:
                request._finish()
        self._queue.clear()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client has gone"))
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close(self)

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("the client has gone")
        if self.paused_writing:
            self._drain = self.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()

    @property
    def idle(self) -> bool:
        """No request is being answered or arriving: safe to close at shutdown."""
        return self._task is None and not self._parsing and not self._queue

    # --- parsing ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # CONNECT, or an Upgrade header: answered as a plain request, then closed
            if self.request is not None:
                self.request.keep_alive = False
                self._message_complete()
            self.transport.pause_reading()  # type: ignore[union-attr]
        except errors.ProxyError as exc:
            self._refuse(exc)
        except httptools.HttpParserError as exc:
            self._refuse(_parser_error(exc))
        else:
            if self._parsing:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_SIZE:
                    self._refuse(HeaderTooLarge())

    def on_message_begin(self) -> None:
        self._parsing = True
        self._head_bytes = 0
        self._url = b""
        self._headers = Headers()
        self._header_count = 0
        if self._idle_since_answer:
            self._start_read_clock()  # the first byte after a keep-alive wait

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_LINE_SIZE:
            raise HeaderTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            raise BadHttpRequest("more than 128 headers")
        if len(name) + len(value) + 2 > MAX_LINE_SIZE:
            raise HeaderTooLarge()
        self._headers.add(name.decode("latin-1").lower(), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._parsing = False
        self._clear_deadline()
        method = self.parser.get_method().decode("latin-1")
        request = Request(self, method, self._url, self._headers, self._started_at)
        self.request = request
        expect = request.headers.get("expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                raise ExpectationFailed()
            if request.version == "1.1" and self._task is None:
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self._task is None:
            self._run(request)
        else:  # pipelined behind one in progress: it waits, and so does the socket
            self._queue.append(request)
            self.transport.pause_reading()  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        request = self.request
        if request is not None:
            request._feed(body)
            if request.buffered > BODY_HIGH_WATER:
                self.transport.pause_reading()  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        self._message_complete()

    def _message_complete(self) -> None:
        if self.request is not None:
            self.request._finish()
            self.request = None

    def body_taken(self) -> None:
        if not self.closed and not self._queue:
            self.transport.resume_reading()  # type: ignore[union-attr]

    # --- answering ----------------------------------------------------------------------

    def _run(self, request: Request) -> None:
        self.response_started = False
        self._answering = request
        self._task = self.loop.create_task(self._answer(request))

    async def _answer(self, request: Request) -> None:
        try:
            response = await self.handler(request)
        except errors.ProxyError as exc:
            response = error_response(exc)
            request.keep_alive = False
        except asyncio.CancelledError:
            self._task = None
            self.close()  # the client left, or the relay is shutting down
            return
        except Exception as exc:
            log.error(orjson.dumps({"event": "internal_error", "error": type(exc).__name__,
                                    "where": _where(exc)}).decode())  # fmt: skip
            response = error_response(InternalError())
            request.keep_alive = False
        self._task = None
        if self.closed:
            return
        if isinstance(response, StreamResponse):
            try:
                if not response.prepared:
                    await response.prepare(request)
                await response.write_eof()
            except ConnectionError:
                self.close()
                return
        elif not response.sent:
            if self.response_started:
                self.close()  # a handler failed after its head went out: the body is lost
                return
            request.send(response)
        self._next(request)

    def _next(self, answered: Request) -> None:
        """After a response: close, start the next pipelined request, or wait idle."""
        if not answered.keep_alive or not answered._eof or self.closed:
            self.close()  # unread body bytes would be taken for the next request
            return
        if self._queue:
            self._run(self._queue.pop(0))
            if not self._queue:
                self.transport.resume_reading()  # type: ignore[union-attr]
        elif self._parsing:
            self._start_read_clock()  # the next request began arriving meanwhile
        else:
            self._idle_since_answer = True
            self._set_deadline(self.loop.time() + self.keepalive_s, self.close)

    # --- refusals and deadlines ---------------------------------------------------------

    def _refuse(self, exc: errors.ProxyError) -> None:
        """A request the parser refused: a fixed JSON error unless an answer is under way,
        and the connection closed. Nothing of the request's bytes is echoed or logged."""
        log.info(orjson.dumps({"event": "bad_http_request", "status": exc.status,
                               "error": type(exc).__name__}).decode())  # fmt: skip
        request = self.request
        if request is not None and request is self._answering and not self.response_started:
            # the body of the request being answered broke: its handler's read raises this,
            # and the handler answers it in its own shape; the connection closes after
            request._fail(exc)
            self.transport.pause_reading()  # type: ignore[union-attr]
            return
        if self._task is None and not self.closed:
            self.write(_whole(error_response(exc), keep_alive=False))
        self.close()

    def _start_read_clock(self) -> None:
        self._idle_since_answer = False
        self._started_at = now = self.loop.time()
        self._set_deadline(now + self.client_read_s, self._read_timeout)

    def _read_timeout(self) -> None:
        if self._task is None:
            self.close()  # headers still incomplete, or nothing came: nothing to answer

    def _clear_deadline(self) -> None:
        self._deadline = None  # the armed timer finds nothing due and is not re-armed

    def _set_deadline(self, when: float, action: Callable[[], None]) -> None:
        """Every deadline is set ``now`` + client_read or keepalive, and the timer is armed
        at most the shorter of the two ahead: so a deadline set later never falls before
        the armed timer, which then only needs re-arming when it fires early."""
        self._deadline, self._on_deadline = when, action
        if self._timer is None:
            self._arm(self.loop.time())
        elif self._timer_at > when:  # not expected (see above), but never late
            self._timer.cancel()
            self._arm(self.loop.time())

    def _arm(self, now: float) -> None:
        assert self._deadline is not None
        self._timer_at = min(self._deadline, now + min(self.client_read_s, self.keepalive_s))
        self._timer = self.loop.call_at(self._timer_at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._deadline is None or self.closed:
            return
        now = self.loop.time()
        if now < self._deadline:
            self._arm(now)  # the deadline moved on since the timer was armed
            return
        self._deadline = None
        self._on_deadline()


def error_response(
    exc: errors.ProxyError, headers: dict[str, str] | None = None, *, anthropic: bool = False
) -> Response:
    """A ``ProxyError`` as a JSON response, in the OpenAI shape or Anthropic's."""
    body = exc.to_anthropic_json() if anthropic else exc.to_json()
    return Response(
        status=exc.status,
        body=body,
        headers={**(headers or {}), **exc.headers(), "Content-Type": "application/json"},
    )


def _parser_error(exc: Exception) -> errors.ProxyError:
    """httptools wraps an exception raised in a callback: ours, if it was one."""
    cause = exc.__cause__ or exc.__context__
    return cause if isinstance(cause, errors.ProxyError) else BadHttpRequest()


def _where(exc: BaseException | None) -> str:
    """``file.py:line`` of the innermost frame: enough to find a bug, and no stack trace,
    message or value (which may hold a secret) in the log (SPEC §6)."""
    frames = traceback.extract_tb(exc.__traceback__) if exc is not None else []
    if not frames:
        return ""
    last = frames[-1]
    return f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno}"


def _split_target(target: bytes) -> tuple[str, str]:
    """(percent-decoded path, raw query) of a request target; an absolute-form target
    counts by its path only, and a target that is not a path (``*``, ``host:port``)
    stays as it came (the router answers 404 for it)."""
    text = target.decode("latin-1")
    if text.startswith("/") and "%" not in text and "?" not in text:
        return text, ""  # the common case
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        return text, ""
    if url.path is None:
        return text, ""
    path = url.path.decode("latin-1")
    if "%" in path:
        path = unquote(path, errors="replace")
    return path, (url.query or b"").decode("latin-1")


_date = [0, b""]


def _date_header() -> bytes:
    now = int(time.time())
    if now != _date[0]:
        _date[0], _date[1] = now, b"Date: %s\r\n" % formatdate(now, usegmt=True).encode()
    return _date[1]  # type: ignore[return-value]


def _whole(response: Response, keep_alive: bool, *, body: bool = True) -> bytes:
    """A whole response's bytes: head with Content-Length, then (unless HEAD) its body."""
    length = b"Content-Length: %d\r\n" % len(response.body)
    head = _head(response.status, response.headers, length, keep_alive)
    return head + response.body if body else head


def _head(status: int, headers: dict[str, str], extra: bytes, keep_alive: bool) -> bytes:
    lines = [b"HTTP/1.1 %d %b\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    for name, value in headers.items():
        lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    lines.append(extra)
    lines.append(_date_header())
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)

"""One worker: the runtime, the app, reload and graceful shutdown.

``run(config, path)`` is what ``edgeproxy serve`` calls: it starts uvloop, opens the shared
services (key cache, ledger, upstream client session, metrics), serves the public API and
``/metrics``, and handles signals:

- SIGHUP re-reads relay.yaml; a valid file becomes the runtime of new requests (requests in
  flight keep theirs), an invalid one is logged and the running config stays.
- SIGTERM / SIGINT stop accepting, let requests finish for ``shutdown_grace``, end what is
  left with an SSE error event, flush the ledger and return 0.

The HTTP layer is aiohttp's, with three changes a public relay needs (``RelayProtocol``,
``ListenSite``): malformed requests get a fixed JSON error that echoes and logs none of
their bytes; a request must deliver its headers within ``timeouts.client_read`` (aiohttp
has no header deadline); and at ``max_connections`` open connections the listener stops
accepting, so new ones wait in the kernel's backlog.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import signal
import socket
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import http_exceptions, web

from edgeproxy import __version__, admin, endpoints, errors, proxy
from edgeproxy.config import Config, ConfigError, load_config
from edgeproxy.context import Services
from edgeproxy.db import KeyCache, Ledger, prune_usage
from edgeproxy.limits_ipc import RemoteLimits
from edgeproxy.metrics import CONTENT_TYPE, Metrics
from edgeproxy.runtime import Runtime, RuntimeRef

log = logging.getLogger("edgeproxy")
SERVICES = web.AppKey("services", Services)

# Model endpoints: path -> the dialect its clients speak (errors and streams in that shape).
MODEL_ENDPOINTS = {
    "/v1/chat/completions": "openai",
    "/v1/completions": "openai",
    "/v1/embeddings": "openai",
    "/v1/responses": "openai",
    "/v1/images/generations": "openai",
    "/v1/audio/speech": "openai",
    "/v1/audio/transcriptions": "openai",
    "/v1/moderations": "openai",
    "/v1/messages": "anthropic",
}
Handler = Callable[[web.Request, Services], "web.StreamResponse | Awaitable[web.StreamResponse]"]
GET_ENDPOINTS: dict[str, Handler] = {
    "/v1/models": endpoints.list_models,
    "/v1/dashboard/billing/subscription": endpoints.billing_subscription,
    "/v1/dashboard/billing/usage": endpoints.billing_usage,
    "/healthz": endpoints.healthz,
    "/readyz": endpoints.readyz,
}
RESTART_ONLY = ("listen", "metrics_listen", "workers", "database")
# Retention: the first pass waits a minute, so a relay that restarts in a loop does not
# delete in a loop too and a start is not slowed by a big first delete; rows expire after
# days, so a pass every 6 hours keeps the table within a quarter-day of usage_retention.
PRUNE_AFTER_S = 60.0
PRUNE_EVERY_S = 6 * 3600.0
HEALTH_PUBLISH_S = 2.0


async def dispatch(request: web.Request) -> web.StreamResponse:
    """One route for everything: a dict lookup instead of the router, and our own 404/405
    in the OpenAI shape."""
    svc = request.app[SERVICES]
    path = request.path
    dialect = MODEL_ENDPOINTS.get(path)
    if dialect is not None and request.method == "POST":
        return await proxy.handle(request, svc, path, dialect)
    if path.startswith("/admin/"):
        try:
            return await admin.handle(request, svc)
        except errors.ProxyError as exc:
            return _error(exc)
    handler = GET_ENDPOINTS.get(path)
    if handler is not None and request.method in ("GET", "HEAD"):
        try:
            result = handler(request, svc)
            return await result if asyncio.iscoroutine(result) else result  # type: ignore[return-value]
        except errors.ProxyError as exc:
            return _error(exc)
    if dialect is not None or handler is not None:
        allow = "POST" if dialect is not None else "GET, HEAD"
        exc = errors.MethodNotAllowed(f"{request.method[:16]} is not allowed here; use {allow}")
        return _error(exc, {"Allow": allow}, anthropic=dialect == "anthropic")
    return _error(endpoints.not_found(path))


def _error(
    exc: errors.ProxyError, headers: dict[str, str] | None = None, *, anthropic: bool = False
) -> web.Response:
    body = exc.to_anthropic_json() if anthropic else exc.to_json()
    return web.Response(
        status=exc.status,
        body=body,
        headers={**(headers or {}), **exc.headers(), "Content-Type": "application/json"},
    )


def build_app(svc: Services) -> web.Application:
    app = web.Application(client_max_size=svc.ref.current.config.max_request_body)
    app[SERVICES] = svc
    app.router.add_route("*", "/{tail:.*}", dispatch, expect_handler=_expect)
    return app


async def _expect(request: web.Request) -> web.Response | None:
    """``Expect: 100-continue`` as aiohttp does it; anything else gets 417 without the
    echo of the header that aiohttp's own handler puts in its text."""
    if request.headers.get("Expect", "").lower() == "100-continue":
        if request.version >= aiohttp.HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None
    return _error(ExpectationFailed())


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
        "the request line or a header is longer than 8190 bytes, or there are more than 128 headers"
    )


class ExpectationFailed(errors.ProxyError):
    status = 417
    code = "invalid_request"
    type = "invalid_request_error"
    message = "only 'Expect: 100-continue' is supported"


class InternalError(errors.ProxyError):
    status = 500
    code = "internal_error"
    type = "server_error"
    message = "internal error"


def _where(exc: BaseException | None) -> str:
    """``file.py:line`` of the innermost frame: enough to find a bug, and no stack trace,
    message or value (which may hold a secret) in the log (SPEC §6)."""
    frames = traceback.extract_tb(exc.__traceback__) if exc is not None else []
    if not frames:
        return ""
    last = frames[-1]
    return f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno}"


# Request line, header line and header count limits. aiohttp's defaults, made explicit
# because the README documents them: at most 8190 bytes a line (an Authorization header
# included), 128 headers. Beyond them the HTTP layer answers 431 (line too long) or 400.
MAX_LINE_SIZE = 8190
MAX_HEADERS = 128


class RelayProtocol(web.RequestHandler):
    """One client connection: aiohttp's ``RequestHandler`` with three changes.

    1. ``handle_error``: aiohttp's error page for a malformed request echoes the offending
       bytes (``Invalid header value char: b'Authorization: Bearer sk-...'``) and logs
       them with a traceback. Here the body is a fixed JSON error and the log line names
       only the status and the exception type.
    2. A header deadline. aiohttp bounds only the wait *between* requests
       (``keepalive_timeout``); a client that sends a header byte every few seconds keeps
       a connection forever (slowloris). A timer is armed when a request's first byte
       arrives (for the first request: when the connection opens) and disarmed when its
       headers are complete; if it fires first, the connection is closed. The time it was
       armed is ``request_started``: ``proxy.read_body`` bounds the body by the same
       ``client_read`` deadline, so headers and body together get ``client_read``
       (SPEC §2). A timer per request rather than per ``data_received`` call: one
       ``call_at`` handle, not one per packet.
    3. ``on_close``: called once when the connection ends (``ListenSite`` counts them).
    """

    __slots__ = ("_answered_at", "_read_timer", "client_read_s", "on_close", "request_started")

    def __init__(self, manager: web.Server, *, client_read_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.client_read_s = client_read_s
        self.on_close: Callable[[], None] | None = None
        self.request_started = 0.0
        self._answered_at = 0.0
        self._read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:  # a request's headers are complete
            if self._read_timer is None:  # pipelined behind one in progress: starts now
                self.request_started = self._loop.time()
            self._disarm()
        elif data and self._read_timer is None and not self._request_in_progress:
            self._arm()  # the first bytes of the next request on a kept-alive connection

    def _arm(self) -> None:
        self.request_started = now = self._loop.time()
        self._read_timer = self._loop.call_at(now + self.client_read_s, self._read_timeout)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timeout(self) -> None:
        self._read_timer = None
        if self._request_in_progress or self.request_started < self._answered_at:
            # a handler runs (read_body keeps the deadline), or the timer was armed by body
            # bytes that came before their handler started and that request is answered:
            # the connection is idle between requests, which client_keepalive governs
            return
        self.force_close()  # a request's headers are still incomplete: nothing to answer

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        self._answered_at = self._loop.time()
        return await super().finish_response(request, resp, start_time)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, http_exceptions.LineTooLong):
            error: errors.ProxyError = HeaderTooLarge()
        elif status == 500:
            error = InternalError()
        elif 400 <= status < 500:
            error = BadHttpRequest()
        else:  # 504: a handler timed out (aiohttp's mapping of an escaped TimeoutError)
            error = errors.UpstreamTimeout()
        if error.status == 500:
            log.error(_line("internal_error", error=type(exc).__name__, where=_where(exc)))
        else:
            log.info(_line("bad_http_request", status=error.status,
                           error=type(exc).__name__ if exc else None))  # fmt: skip
        if request.writer.output_size > 0:  # as aiohttp: a response is already under way
            raise ConnectionError("response already started; closing the connection")
        response = _error(error)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """aiohttp's other error logs ("Unhandled exception") carry a traceback whose
        message may hold request bytes: log the exception's type and place only."""
        exc = kwargs.get("exc_info")
        exc = exc if isinstance(exc, BaseException) else None
        log.error(_line("http_error", error=type(exc).__name__ if exc else None, where=_where(exc)))


class RelayServer(web.Server):
    """``web.Server`` whose connections are ``RelayProtocol``s."""

    def __init__(self, handler: Any, *, client_read: Callable[[], float], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.client_read = client_read  # read per connection: SIGHUP reaches new ones

    def __call__(self) -> RelayProtocol:
        return RelayProtocol(
            self, loop=self._loop, client_read_s=self.client_read(), **self._kwargs
        )


class RelayRunner(web.AppRunner):
    """``AppRunner`` serving through ``RelayServer``: aiohttp builds its ``Server`` for the
    app; this builds the same one with our protocol (the app's handler, request factory and
    the runner's keyword arguments are carried over)."""

    def __init__(
        self, app: web.Application, *, client_read: Callable[[], float], **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self.client_read = client_read

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return RelayServer(
            _json_errors(plain.request_handler),
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            client_read=self.client_read,
            **plain._kwargs,
        )


def _json_errors(app_handler: Any) -> Any:
    """The app's handler, with aiohttp's own text answers made JSON: request targets that
    are not paths (``CONNECT host:port``, ``OPTIONS *``) never reach the router's one
    route, and aiohttp raises ``HTTPException`` for a few things (a body over
    ``client_max_size`` on the admin API)."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if not request.path.startswith("/"):
            return _error(errors.UnknownEndpoint("the request target is not a path"))
        try:
            return await app_handler(request)
        except web.HTTPException as exc:
            if exc.status == 413:
                return _error(errors.RequestTooLarge())
            error = errors.ProxyError(exc.reason)
            error.status, error.code = exc.status, "invalid_request"
            error.type = "invalid_request_error" if exc.status < 500 else "server_error"
            return _error(error)

    return handle


# Accepting stops while the process is out of file descriptors; it is tried again after
# this long (asyncio's own accept loop waits 1 s, ACCEPT_RETRY_DELAY).
ACCEPT_RETRY_S = 1.0
# Connections accepted per wake-up, so that a burst of them cannot starve requests.
ACCEPT_BATCH = 64


class ListenSite(web.BaseSite):
    """The public listener. It accepts connections itself, because aiohttp's sites hand
    the socket to ``loop.create_server``, which accepts whenever the socket is readable
    and has no way to stop. Here:

    - at ``limit()`` open connections the socket is no longer watched: new connections
      wait in the kernel's listen backlog (SPEC ``max_connections``) and are accepted as
      open ones close;
    - out of file descriptors (EMFILE), accepting pauses for ``ACCEPT_RETRY_S`` and the
      relay goes on serving the connections it has; the new ones wait in the backlog too.
      uvloop's listener (libuv) instead accepts every pending connection and closes it at
      once: measured with 300 connections against a 96-descriptor limit, it dropped 223.
    """

    __slots__ = (
        "_closed",
        "_limit",
        "_loop",
        "_open",
        "_port",
        "_retry",
        "_sock",
        "_starved",
        "_watching",
    )

    def __init__(
        self, runner: web.BaseRunner, sock: socket.socket, limit: Callable[[], int]
    ) -> None:
        super().__init__(runner)
        self._sock = sock
        self._port = int(sock.getsockname()[1])
        self._limit = limit
        self._open = 0
        self._watching = False
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        self._starved = False  # out of descriptors: logged once, until an accept succeeds

    @property
    def name(self) -> str:
        return f"http://{self._sock.getsockname()[0]}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def open_connections(self) -> int:
        return self._open

    async def start(self) -> None:
        await super().start()
        self._loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        self._watch()

    async def stop(self) -> None:
        self._closed = True
        self._unwatch()
        if self._retry is not None:
            self._retry.cancel()
        self._sock.close()
        await super().stop()

    def _watch(self) -> None:
        if not self._watching and not self._closed and self._open < self._limit():
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            self._loop.remove_reader(self._sock.fileno())
            self._watching = False

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self._open >= self._limit():
                self._unwatch()  # at max_connections: the rest wait in the backlog
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._unwatch()
                self._retry = self._loop.call_later(ACCEPT_RETRY_S, self._resume)
                if not self._starved:
                    self._starved = True
                    name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
                    log.error(_line("accept_paused", error=name, open_connections=self._open,
                                    retry_s=ACCEPT_RETRY_S))  # fmt: skip
                return
            if self._starved:
                self._starved = False
                log.warning(_line("accept_resumed", open_connections=self._open))
            self._open += 1
            conn.setblocking(False)
            self._loop.create_task(self._serve(conn))

    def _resume(self) -> None:
        self._retry = None
        self._watch()

    async def _serve(self, conn: socket.socket) -> None:
        made: list[RelayProtocol] = []

        def factory() -> RelayProtocol:
            protocol = self._runner.server()  # type: ignore[misc]
            protocol.on_close = self._release
            made.append(protocol)
            return protocol

        try:
            await self._loop.connect_accepted_socket(factory, conn)
        except Exception:
            conn.close()
            if not made:
                self._release()
            elif made[0].on_close is not None:  # never connected: release its slot here
                made[0].on_close = None
                self._release()

    def _release(self) -> None:
        self._open -= 1
        if self._retry is None:
            self._watch()


def listen_socket(host: str, port: int, *, reuse_port: bool, backlog: int = 1024) -> socket.socket:
    """A bound, listening, non-blocking socket for ``listen`` (what TCPSite would make)."""
    family, type_, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def open_services(config: Config) -> Services:
    keys = await KeyCache.open(config.database)
    ledger = await Ledger.open(config.database)
    connector = aiohttp.TCPConnector(
        limit=0,  # max_inflight bounds us; aiohttp's default of 100 would queue streams
        ttl_dns_cache=300,
        keepalive_timeout=60,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # bytes pass through as the upstream sent them
        timeout=aiohttp.ClientTimeout(total=None),  # the 5-minute default would cut streams
        headers={"User-Agent": f"edgeproxy/{__version__}"},
    )
    return Services(
        ref=RuntimeRef(Runtime.build(config)),
        session=session,
        keys=keys,
        ledger=ledger,
        metrics=Metrics(per_key=config.metrics.per_key),
    )


async def close_services(svc: Services) -> None:
    await svc.limits.close()
    await svc.session.close()
    await svc.ledger.close()
    await svc.keys.close()


def reload(svc: Services, path: str) -> None:
    """SIGHUP: swap in a new runtime if the file is valid; never raise."""
    old = svc.ref.current
    try:
        config = load_config(path)
    except ConfigError as exc:
        log.error(_line("reload_rejected", error=str(exc)))
        return
    for name in RESTART_ONLY:
        if getattr(config, name) != getattr(old.config, name):
            log.warning(_line("reload_ignored", field=name, reason="needs a restart"))
    svc.ref.current = Runtime.build(config, previous=old)
    for warning in config.warnings:
        log.warning(_line("config_warning", warning=warning))
    log.info(_line("reloaded", upstreams=[u.name for u in config.upstreams]))


def _set_health(svc: Services) -> None:
    rt = svc.ref.current
    now = rt.upstreams.clock()
    svc.metrics.set_health({s.name: s.healthy(now) for s in rt.upstreams.states})


async def _publish_health(svc: Services) -> None:
    """Under a supervisor nobody scrapes this worker: refresh its health gauge instead."""
    while True:
        _set_health(svc)
        await asyncio.sleep(HEALTH_PUBLISH_S)


async def metrics_handler(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    _set_health(svc)
    return web.Response(body=svc.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def prune_forever(svc: Services, db_path: str, *, after_s: float, every_s: float) -> None:
    """Delete usage rows older than ``usage_retention`` after ``after_s``, then every
    ``every_s``; retention is read each round, so SIGHUP can change it (0 = keep forever).
    SQLite work runs in a thread; errors are logged, never raised: billing goes on."""
    await asyncio.sleep(after_s)
    while True:
        retention_s = svc.ref.current.config.usage_retention
        if retention_s > 0:
            try:
                deleted = await asyncio.to_thread(prune_usage, db_path, time.time() - retention_s)
            except Exception as err:
                log.error(_line("usage_prune_failed", error=str(err) or type(err).__name__))
            else:
                if deleted:
                    log.info(_line("usage_pruned", rows=deleted, retention_s=retention_s))
        await asyncio.sleep(every_s)


def _line(event: str, **fields: object) -> str:
    return orjson.dumps({"event": event, **fields}).decode()


class Worker:
    """The public site, the metrics site, and the shutdown sequence."""

    prune_after_s = PRUNE_AFTER_S  # tests set these on the instance before start()
    prune_every_s = PRUNE_EVERY_S

    def __init__(
        self,
        config: Config,
        path: str,
        *,
        sock: socket.socket | None = None,
        limits_path: str | None = None,
    ) -> None:
        self.config = config
        self.path = path
        self.sock = sock  # a listening socket handed over by tests
        # Under a supervisor: its limiter is the node's, and it serves /metrics itself.
        self.limits_path = limits_path
        self.stopping = asyncio.Event()
        self._health_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.svc = await open_services(self.config)
        if self.limits_path is not None:
            self.svc.limits = RemoteLimits(self.limits_path)
            self._health_task = asyncio.create_task(_publish_health(self.svc))
        t = self.config.timeouts
        self.runner = RelayRunner(
            build_app(self.svc),
            # the header deadline (RelayProtocol), as SIGHUP last set it
            client_read=lambda: self.svc.ref.current.config.timeouts.client_read,
            handle_signals=False,
            access_log=None,  # we write our own, with no secrets and no query strings
            handler_cancellation=True,  # a client that leaves cancels its upstream request
            auto_decompress=False,  # inbound.BodyReader decodes, bounded (decompression bombs)
            keepalive_timeout=t.client_keepalive,
            max_line_size=MAX_LINE_SIZE,
            max_field_size=MAX_LINE_SIZE,
            max_headers=MAX_HEADERS,
            shutdown_timeout=1.0,
        )
        await self.runner.setup()
        sock = self.sock
        if sock is None:
            host, port = self.config.listen
            sock = listen_socket(host, port, reuse_port=self.config.workers > 1)
        workers = max(1, self.config.workers)
        self.site = ListenSite(
            self.runner, sock,
            # max_connections is per node: each worker takes its share of it
            lambda: max(1, math.ceil(self.svc.ref.current.config.max_connections / workers)),
        )  # fmt: skip
        await self.site.start()
        self.metrics_runner = None
        if self.config.metrics_listen is not None and self.limits_path is None:
            app = web.Application()
            app[SERVICES] = self.svc
            app.router.add_get("/metrics", metrics_handler)
            self.metrics_runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await self.metrics_runner.setup()
            host, port = self.config.metrics_listen
            await web.TCPSite(self.metrics_runner, host, port).start()
        self.pruner = asyncio.create_task(
            prune_forever(self.svc, self.config.database, after_s=self.prune_after_s,
                          every_s=self.prune_every_s), name="edgeproxy-prune",
        )  # fmt: skip
        for warning in self.config.warnings:
            log.warning(_line("config_warning", warning=warning))
        demo = [u.name for u in self.config.upstreams if u.name == "demo"]
        if demo:
            log.warning(_line("demo_mode", message="the 'demo' upstream is an offline mock; "
                              "set provider keys and EDGEPROXY_DEMO=false for real traffic"))  # fmt: skip
        log.info(_line("ready", listen=f"{self.config.listen[0]}:{self.bound_port()}",
                       upstreams=[u.name for u in self.config.upstreams]))  # fmt: skip

    def bound_port(self) -> int:
        return self.site.port

    async def stop(self) -> None:
        """Close the listener, drain for shutdown_grace, end the rest, flush the ledger."""
        svc = self.svc
        svc.draining = True
        await self.site.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace
        while svc.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        tasks = list(svc.tasks)
        for task in tasks:
            task.cancel()  # proxy.handle ends a committed stream with an error event
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        await self.runner.cleanup()
        if self._health_task is not None:
            self._health_task.cancel()
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
        self.pruner.cancel()
        await asyncio.wait([self.pruner])
        await close_services(svc)
        log.info(_line("stopped"))


async def serve(config: Config, path: str, limits_path: str | None = None) -> int:
    worker = Worker(config, path, limits_path=limits_path)
    await worker.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    loop.add_signal_handler(signal.SIGHUP, reload, worker.svc, path)
    await worker.stopping.wait()
    await worker.stop()
    return 0


def setup_logging() -> None:
    """JSON lines on stderr; the access log goes to stdout on its own (``accesslog``), and
    journald keeps both."""
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(_JsonFormatter())
    root = logging.getLogger("edgeproxy")
    root.addHandler(err)
    root.setLevel(logging.INFO)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if message.startswith("{"):
            return '{"level":"%s",%s' % (record.levelname.lower(), message[1:])  # noqa: UP031
        return orjson.dumps({"level": record.levelname.lower(), "message": message}).decode()


def run(config: Config, path: str, limits_path: str | None = None) -> int:
    """Run one worker in the foreground until SIGTERM/SIGINT; the exit code."""
    setup_logging()
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but stay runnable
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve(config, path, limits_path))

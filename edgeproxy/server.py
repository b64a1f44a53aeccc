"""One worker: the runtime, the app, reload and graceful shutdown.

``run(config, path)`` is what ``edgeproxy serve`` calls: it starts uvloop, opens the shared
services (key cache, ledger, upstream client session, metrics), serves the public API and
``/metrics``, and handles signals:

- SIGHUP re-reads relay.yaml; a valid file becomes the runtime of new requests (requests in
  flight keep theirs), an invalid one is logged and the running config stays.
- SIGTERM / SIGINT stop accepting, let requests finish for ``shutdown_grace``, end what is
  left with an SSE error event, flush the ledger and return 0.

The HTTP layer is ``http11`` (malformed requests, header deadline, keep-alive); the
listener is ``ListenSite``: at ``max_connections`` open connections it stops accepting,
so new ones wait in the kernel's backlog. Upstreams are reached with
``upstream_client.UpstreamClient``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import signal
import socket
import time
from collections.abc import Awaitable, Callable

import orjson

from edgeproxy import __version__, admin, endpoints, errors, http11, proxy
from edgeproxy.accesslog import AccessLog
from edgeproxy.bookkeeping import Bookkeeper
from edgeproxy.config import Config, ConfigError, load_config
from edgeproxy.context import Services
from edgeproxy.db import KeyCache, Ledger, prune_usage
from edgeproxy.limits_ipc import RemoteLimits
from edgeproxy.logs import setup_logging
from edgeproxy.metrics import FLUSH_EVERY_S, Metrics, content_type
from edgeproxy.runtime import Runtime, RuntimeRef
from edgeproxy.upstream_client import UpstreamClient

log = logging.getLogger("edgeproxy")

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
Handler = Callable[[http11.Request, Services], "http11.AnyResponse | Awaitable[http11.AnyResponse]"]
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


def make_dispatch(svc: Services) -> http11.Handler:
    """One route for everything: a dict lookup, and our own 404/405 in the OpenAI shape."""

    async def dispatch(request: http11.Request) -> http11.AnyResponse:
        path = request.path
        dialect = MODEL_ENDPOINTS.get(path)
        if dialect is not None and request.method == "POST":
            return await proxy.handle(request, svc, path, dialect)
        if request.method == "CONNECT" or not path.startswith("/"):  # a host, or "*"
            return _error(errors.UnknownEndpoint("the request target is not a path"))
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

    return dispatch


_error = http11.error_response


# Accepting stops while the process is out of file descriptors; it is tried again after
# this long (asyncio's own accept loop waits 1 s, ACCEPT_RETRY_DELAY).
ACCEPT_RETRY_S = 1.0
# Connections accepted per wake-up, so that a burst of them cannot starve requests.
ACCEPT_BATCH = 64


class ListenSite:
    """The public listener. It accepts connections itself, because ``loop.create_server``
    accepts whenever the socket is readable and has no way to stop. Here:

    - at ``limit()`` open connections the socket is no longer watched: new connections
      wait in the kernel's listen backlog (SPEC ``max_connections``) and are accepted as
      open ones close;
    - out of file descriptors (EMFILE), accepting pauses for ``ACCEPT_RETRY_S`` and the
      relay goes on serving the connections it has; the new ones wait in the backlog too.
      uvloop's listener (libuv) instead accepts every pending connection and closes it at
      once: measured with 300 connections against a 96-descriptor limit, it dropped 223.

    Each connection is an ``http11.HttpProtocol`` made by ``protocol()``.
    """

    __slots__ = (
        "_closed",
        "_limit",
        "_loop",
        "_port",
        "_protocol",
        "_retry",
        "_sock",
        "_starved",
        "_watching",
        "connections",
    )

    def __init__(
        self,
        sock: socket.socket,
        protocol: Callable[[Callable[[http11.HttpProtocol], None]], http11.HttpProtocol],
        limit: Callable[[], int],
    ) -> None:
        self._sock = sock
        self._port = int(sock.getsockname()[1])
        self._protocol = protocol
        self._limit = limit
        self.connections: set[http11.HttpProtocol] = set()
        self._watching = False
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        self._starved = False  # out of descriptors: logged once, until an accept succeeds

    @property
    def port(self) -> int:
        return self._port

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        self._watch()

    def stop_accepting(self) -> None:
        self._closed = True
        self._unwatch()
        if self._retry is not None:
            self._retry.cancel()
        self._sock.close()

    def close_idle(self) -> None:
        """Close kept-alive connections with no request in progress."""
        for protocol in list(self.connections):
            if protocol.idle:
                protocol.close()

    async def close_all(self, timeout: float = 1.0) -> None:
        for protocol in list(self.connections):
            protocol.close()
        deadline = self._loop.time() + timeout
        while self.connections and self._loop.time() < deadline:
            await asyncio.sleep(0.01)

    def _watch(self) -> None:
        if not self._watching and not self._closed and len(self.connections) < self._limit():
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            self._loop.remove_reader(self._sock.fileno())
            self._watching = False

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if len(self.connections) >= self._limit():
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
                    log.error(_line("accept_paused", error=name, open_connections=len(self.connections),
                                    retry_s=ACCEPT_RETRY_S))  # fmt: skip
                return
            if self._starved:
                self._starved = False
                log.warning(_line("accept_resumed", open_connections=len(self.connections)))
            conn.setblocking(False)
            protocol = self._protocol(self._release)
            self.connections.add(protocol)
            self._loop.create_task(self._serve(conn, protocol))

    def _resume(self) -> None:
        self._retry = None
        self._watch()

    async def _serve(self, conn: socket.socket, protocol: http11.HttpProtocol) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: protocol, conn)
        except Exception:
            conn.close()
            if protocol.on_close is not None:  # never connected: release its slot here
                protocol.on_close = None
                self._release(protocol)

    def _release(self, protocol: http11.HttpProtocol) -> None:
        self.connections.discard(protocol)
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
    metrics = Metrics(per_key=config.metrics.per_key)
    return Services(
        ref=RuntimeRef(Runtime.build(config)),
        upstream=UpstreamClient(user_agent=f"edgeproxy/{__version__}", keepalive_s=60.0),
        keys=keys,
        ledger=ledger,
        metrics=metrics,
        bookkeeper=Bookkeeper(metrics=metrics, ledger=ledger, access=AccessLog()),
    )


async def close_services(svc: Services) -> None:
    svc.bookkeeper.drain()  # the last requests' records, before the ledger closes
    await svc.limits.close()
    await svc.upstream.close()
    await svc.close_image_session()
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


async def _publish_metrics(svc: Services) -> None:
    """Under a supervisor nobody scrapes this worker: publish its tallies (and its upstream
    health) into the shared metric files every FLUSH_EVERY_S instead."""
    while True:
        _set_health(svc)
        svc.bookkeeper.drain()
        svc.metrics.flush(svc.inflight)
        await asyncio.sleep(FLUSH_EVERY_S)


def make_metrics_handler(svc: Services) -> http11.Handler:
    """The worker's own ``/metrics`` listener (one worker, no supervisor)."""

    async def metrics(request: http11.Request) -> http11.Response:
        if request.path != "/metrics":
            return _error(endpoints.not_found(request.path))
        _set_health(svc)
        svc.bookkeeper.drain()  # every request that has ended, counted
        return http11.Response(
            body=svc.metrics.render(svc.inflight), headers={"Content-Type": content_type()}
        )

    return metrics


def serve_socket(
    sock: socket.socket, handler: http11.Handler, limit: Callable[[], int],
    client_read: Callable[[], float], keepalive: Callable[[], float],
) -> ListenSite:  # fmt: skip
    """A ``ListenSite`` whose connections run ``handler``; the timeouts are read per
    connection, so SIGHUP reaches new ones."""

    def protocol(on_close: Callable[[http11.HttpProtocol], None]) -> http11.HttpProtocol:
        return http11.HttpProtocol(handler, client_read_s=client_read(),
                                   keepalive_s=keepalive(), on_close=on_close)  # fmt: skip

    return ListenSite(sock, protocol, limit)


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
        self._publish_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.svc = await open_services(self.config)
        if self.limits_path is not None:
            self.svc.limits = RemoteLimits(self.limits_path)
            self._publish_task = asyncio.create_task(_publish_metrics(self.svc))
        sock = self.sock
        if sock is None:
            host, port = self.config.listen
            sock = listen_socket(host, port, reuse_port=self.config.workers > 1)
        workers = max(1, self.config.workers)
        timeouts = lambda: self.svc.ref.current.config.timeouts  # noqa: E731 - SIGHUP's
        self.site = serve_socket(
            sock, make_dispatch(self.svc),
            # max_connections is per node: each worker takes its share of it
            lambda: max(1, math.ceil(self.svc.ref.current.config.max_connections / workers)),
            lambda: timeouts().client_read, lambda: timeouts().client_keepalive,
        )  # fmt: skip
        await self.site.start()
        self.metrics_site = None
        if self.config.metrics_listen is not None and self.limits_path is None:
            host, port = self.config.metrics_listen
            self.metrics_site = serve_socket(
                listen_socket(host, port, reuse_port=False), make_metrics_handler(self.svc),
                lambda: 64, lambda: timeouts().client_read, lambda: timeouts().client_keepalive,
            )  # fmt: skip
            await self.metrics_site.start()
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
        self.site.stop_accepting()
        self.site.close_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace
        while svc.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
            self.site.close_idle()  # connections whose last answer just ended
        tasks = list(svc.tasks)
        for task in tasks:
            task.cancel()  # proxy.handle ends a committed stream with an error event
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        await self.site.close_all()
        svc.bookkeeper.drain()
        if self._publish_task is not None:
            self._publish_task.cancel()
            self.svc.metrics.flush(0)  # the last tallies, before the supervisor scrapes again
        if self.metrics_site is not None:
            self.metrics_site.stop_accepting()
            await self.metrics_site.close_all()
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

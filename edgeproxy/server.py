"""One worker: the runtime, the app, reload and graceful shutdown.

``run(config, path)`` is what ``edgeproxy serve`` calls: it starts uvloop, opens the shared
services (key cache, ledger, upstream client session, metrics), serves the public API and
``/metrics``, and handles signals:

- SIGHUP re-reads relay.yaml; a valid file becomes the runtime of new requests (requests in
  flight keep theirs), an invalid one is logged and the running config stays.
- SIGTERM / SIGINT stop accepting, let requests finish for ``shutdown_grace``, end what is
  left with an SSE error event, flush the ledger and return 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web

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


def _error(exc: errors.ProxyError, headers: dict[str, str] | None = None, *, anthropic: bool = False) -> web.Response:
    body = exc.to_anthropic_json() if anthropic else exc.to_json()
    return web.Response(
        status=exc.status,
        body=body,
        headers={**(headers or {}), **exc.headers(), "Content-Type": "application/json"},
    )


def build_app(svc: Services) -> web.Application:
    app = web.Application(client_max_size=svc.ref.current.config.max_request_body)
    app[SERVICES] = svc
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


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
        self.runner = web.AppRunner(
            build_app(self.svc),
            handle_signals=False,
            access_log=None,  # we write our own, with no secrets and no query strings
            handler_cancellation=True,  # a client that leaves cancels its upstream request
            auto_decompress=False,  # inbound.BodyReader decodes, bounded (decompression bombs)
            keepalive_timeout=t.client_keepalive,
            shutdown_timeout=1.0,
        )
        await self.runner.setup()
        if self.sock is not None:
            site: web.BaseSite = web.SockSite(self.runner, self.sock)
        else:
            host, port = self.config.listen
            site = web.TCPSite(self.runner, host, port, reuse_port=self.config.workers > 1, backlog=1024)
        await site.start()
        self.site = site
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
        server = self.site._server
        sockets = getattr(server, "sockets", None) or []
        return sockets[0].getsockname()[1] if sockets else self.config.listen[1]

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
    """JSON lines: access log on stdout, everything else on stderr (journald keeps both)."""
    access = logging.getLogger("edgeproxy.access")
    access.propagate = False
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(out)
    access.setLevel(logging.INFO)
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



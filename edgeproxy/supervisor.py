"""N workers sharing one port, under one supervisor.

Job: ``run(config, path)`` is what ``edgeproxy serve`` calls. With ``workers: 1`` it runs
the worker in this process. With more, this process becomes the supervisor:

1. makes a private run directory holding the prometheus-client multiprocess files and
   the limiter's Unix socket, and sets PROMETHEUS_MULTIPROC_DIR *before* anything imports
   prometheus_client (it reads the variable at import);
2. starts the node's ``LimiterServer`` and, on ``metrics_listen``, ``/metrics`` aggregated
   over all workers;
3. spawns the workers (fresh interpreters: ``spawn``, not ``fork``, so none inherits a
   running event loop or the supervisor's imports), each binding ``listen`` with
   SO_REUSEPORT so the kernel spreads connections across them;
4. restarts a worker that dies (with a short backoff), forwards SIGHUP (each worker reloads
   relay.yaml itself) and SIGTERM/SIGINT (each worker drains), waits, cleans up, exits 0.

It must not: serve model traffic itself, or touch SQLite (the workers own their ledger
writers; SQLite serialises them).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from multiprocessing.process import BaseProcess

import orjson

from edgeproxy.config import Config, ConfigError, load_config

log = logging.getLogger("edgeproxy")
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)  # repeated crashes back off, up to 5 s
STOP_MARGIN_S = 10.0  # beyond shutdown_grace, before a worker that will not stop is killed


def run(config: Config, path: str) -> int:
    if config.workers <= 1:
        from edgeproxy import server

        return server.run(config, path)
    rundir = tempfile.mkdtemp(prefix="edgeproxy-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(rundir, "metrics")
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    try:
        from edgeproxy.logs import setup_logging

        setup_logging()
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(Supervisor(config, path, rundir).run())
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def _loop_factory():
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return None
    return uvloop.new_event_loop


def worker_main(path: str, index: int, limits_path: str) -> None:
    """A worker process: load the config itself (it may have changed since the supervisor
    read it) and serve until told to stop."""
    from edgeproxy import server

    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # Ctrl-C reaches the whole group: the supervisor decides
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    sys.exit(server.run(config, path, limits_path))


def _line(event: str, **fields: object) -> str:
    return orjson.dumps({"event": event, **fields}).decode()


class Supervisor:
    def __init__(self, config: Config, path: str, rundir: str) -> None:
        self.config = config
        self.path = path
        self.rundir = rundir
        self.metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        self.limits_path = os.path.join(rundir, "limits.sock")
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: dict[int, BaseProcess] = {}
        self.crashes: dict[int, int] = {}
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        from edgeproxy.limits_ipc import LimiterServer

        limiter = LimiterServer(self.limits_path)
        await limiter.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        # the workers first: the /metrics listener imports the HTTP layer (0.2 s) that
        # they import too, and starting them is what "ready" waits for
        for index in range(self.config.workers):
            self._spawn(index)
        try:
            metrics_site = await self._serve_metrics()
        except BaseException:  # e.g. metrics_listen in use: no worker outlives us
            await self._stop_workers()
            await limiter.close()
            raise
        log.info(_line("supervisor_ready", workers=self.config.workers, pid=os.getpid()))
        watcher = asyncio.create_task(self._watch())
        await self.stopping.wait()
        watcher.cancel()
        await self._stop_workers()
        if metrics_site is not None:
            metrics_site.stop_accepting()
            await metrics_site.close_all()
        await limiter.close()
        log.info(_line("supervisor_stopped"))
        return 0

    def _spawn(self, index: int) -> None:
        process = self.ctx.Process(
            target=worker_main,
            args=(self.path, index, self.limits_path),
            name=f"edgeproxy-worker-{index}",
        )
        process.start()
        self.workers[index] = process
        log.info(_line("worker_started", worker=index, pid=process.pid))

    async def _watch(self) -> None:
        """Restart a worker that exits while we are not stopping."""
        while True:
            await asyncio.sleep(0.2)
            for index, process in list(self.workers.items()):
                if process.is_alive() or self.stopping.is_set():
                    continue
                self._forget(process)
                crashes = self.crashes.get(index, 0)
                log.error(
                    _line("worker_exited", worker=index, pid=process.pid, code=process.exitcode)
                )
                if process.exitcode == 2:
                    # a bad config in the worker: restarting would only loop
                    log.error(_line("worker_not_restarted", worker=index, reason="bad config"))
                    del self.workers[index]
                    continue
                await asyncio.sleep(RESTART_BACKOFF_S[min(crashes, len(RESTART_BACKOFF_S) - 1)])
                self.crashes[index] = crashes + 1
                self._spawn(index)
            if not self.workers:
                self.stopping.set()

    def _forget(self, process: BaseProcess) -> None:
        from edgeproxy.metrics import mark_process_dead

        if process.pid is not None:
            mark_process_dead(process.pid, self.metrics_dir)

    def _reload(self) -> None:
        try:
            load_config(self.path)  # validate once here too, to log a single clear line
        except ConfigError as exc:
            log.error(_line("reload_rejected", error=str(exc)))
            return
        for process in self.workers.values():
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGHUP)

    async def _stop_workers(self) -> None:
        for process in self.workers.values():
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace + STOP_MARGIN_S
        while any(p.is_alive() for p in self.workers.values()) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        for process in self.workers.values():
            if process.is_alive():
                log.error(_line("worker_killed", pid=process.pid, reason="did not stop in time"))
                process.kill()
            process.join(timeout=1)
            self._forget(process)

    async def _serve_metrics(self):
        if self.config.metrics_listen is None:
            return None
        from edgeproxy import endpoints, http11
        from edgeproxy.metrics import content_type, render_multiprocess
        from edgeproxy.server import listen_socket, serve_socket

        async def metrics(request: http11.Request) -> http11.Response:
            if request.path != "/metrics":
                return http11.error_response(endpoints.not_found(request.path))
            body = await asyncio.to_thread(render_multiprocess, self.metrics_dir)
            return http11.Response(body=body, headers={"Content-Type": content_type()})

        host, port = self.config.metrics_listen
        timeouts = self.config.timeouts
        site = serve_socket(
            listen_socket(host, port, reuse_port=False), metrics, lambda: 64,
            lambda: timeouts.client_read, lambda: timeouts.client_keepalive,
        )  # fmt: skip
        await site.start()
        return site

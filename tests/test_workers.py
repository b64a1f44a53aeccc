"""workers: N under the supervisor, as a real process group: limits hold for the node,
/metrics sums every worker, a crashed worker comes back, SIGTERM stops them all."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from edgeproxy import db
from tests.conftest import relay_dict, write_config
from tests.fakes import FakeUpstream

HI = [{"role": "user", "content": "hi"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    async with aiohttp.ClientSession() as http:
        while loop.time() < deadline:
            assert proc.poll() is None, "the relay exited"
            try:
                async with http.get(url + "/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("the relay did not come up")


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's worker children (not multiprocessing's resource tracker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == supervisor and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.mark.timeout(120)
async def test_two_workers_share_limits_metrics_and_restart(tmp_path: Path, fake: FakeUpstream):
    port, metrics_port = free_port(), free_port()
    config = relay_dict(fake.url)
    config.update(listen=f"127.0.0.1:{port}", metrics_listen=f"127.0.0.1:{metrics_port}", workers=2)
    path = write_config(tmp_path / "relay.yaml", config)
    db.init_db(str(tmp_path / "relay.db"))
    _, limited = db.create_key(str(tmp_path / "relay.db"), "limited", rpm=5)
    _, free = db.create_key(str(tmp_path / "relay.db"), "free")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeproxy", "-c", str(path), "serve"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, proc)
        await asyncio.sleep(1.0)  # both workers listening
        statuses = []
        for _ in range(12):  # a fresh connection each: the kernel spreads them over workers
            async with aiohttp.ClientSession() as http:
                body = {"model": "gpt-4o-mini", "messages": HI}
                async with http.post(url + "/v1/chat/completions", json=body,
                                     headers={"Authorization": f"Bearer {limited}"}) as r:  # fmt: skip
                    statuses.append(r.status)
        assert statuses.count(200) == 5 and statuses.count(429) == 7  # rpm 5 for the node

        for _ in range(8):
            async with aiohttp.ClientSession() as http:
                async with http.post(url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI},
                                     headers={"Authorization": f"Bearer {free}"}) as r:  # fmt: skip
                    assert r.status == 200
        # workers publish their counts every FLUSH_EVERY_S (1 s): poll a little longer
        served: list[str] = []
        refused: list[str] = []
        for _ in range(30):
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                    text = await r.text()
            served = re.findall(
                r'edgeproxy_requests_total\{code="200",model="gpt-4o-mini",upstream="fake-openai"\} (\S+)',
                text,
            )
            refused = re.findall(
                r'edgeproxy_requests_total\{code="429",model="gpt-4o-mini",upstream="none"\} (\S+)',
                text,
            )
            if [float(x) for x in served] == [13.0] and [float(x) for x in refused] == [7.0]:
                break
            await asyncio.sleep(0.2)
        assert [float(x) for x in served] == [13.0] and [float(x) for x in refused] == [7.0]
        assert len(fake.requests) == 13

        pids = worker_pids(proc.pid)
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)  # a worker crash: the supervisor starts another
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while loop.time() < deadline:
            now = worker_pids(proc.pid)
            if len(now) == 2 and pids[0] not in now:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the crashed worker was not replaced")
        await wait_ready(url, proc)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert worker_pids(proc.pid) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

"""Shared fixtures: a fake upstream and a relay, each on a real 127.0.0.1 socket.

The relay runs in the test's event loop (``server.Worker`` on a socket bound to port 0),
so tests can await it and read its state; subprocess tests (CLI, signals) start
``python -m edgeproxy`` instead.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from edgeproxy import db
from edgeproxy.config import load_config
from edgeproxy.server import Worker
from tests.fakes import FakeUpstream

UPSTREAM_KEY = "sk-upstream-CANARY-0123456789abcdef"


def relay_dict(upstream_url: str) -> dict[str, Any]:
    """A config whose upstreams all point at the fake; tests change it before writing."""
    return {
        "listen": "127.0.0.1:1",  # unused: tests hand the worker a bound socket
        "metrics_listen": "off",
        "database": "relay.db",
        "retry": {"attempts": 3, "backoff": "1ms", "max_backoff": "5ms"},
        "upstreams": [
            {
                "name": "fake-openai",
                "kind": "openai",
                "base_url": f"{upstream_url}/v1",
                "api_keys": [UPSTREAM_KEY],
                "models": [
                    "gpt-4o-mini",
                    "gpt-5*",
                    "text-embedding-3-small",
                    "tts-1",
                    "whisper-1",
                    "omni-moderation-latest",
                    "dall-e-3",
                ],
                "model_map": {"gpt-5-alias": "gpt-5-2025-08-07"},
            },
            {
                "name": "fake-anthropic",
                "kind": "anthropic",
                "base_url": upstream_url,
                "api_keys": [UPSTREAM_KEY + "-anthropic"],
                "models": ["claude-*"],
            },
            {
                "name": "fake-gemini",
                "kind": "gemini",
                "base_url": upstream_url,
                "api_keys": [UPSTREAM_KEY + "-gemini"],
                "models": ["gemini-*"],
            },
        ],
        "models": {
            "gpt-4o-mini": {"price": {"input": 0.15, "output": 0.60, "cached_input": 0.075}},
            "gpt-5*": {
                "price": {"input": 1.25, "output": 10.0},
                "params": {"rename": {"max_tokens": "max_completion_tokens"}},
            },
            "claude-*": {
                "price": {"input": 3, "output": 15, "cached_input": 0.3, "cache_write": 3.75}
            },
            "gemini-*": {"price": {"input": 1, "output": 2}},
        },
    }


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Relay:
    worker: Worker
    port: int
    key: str
    db_path: str
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def new_key(self, name: str, **limits: object) -> str:
        _, secret = db.create_key(self.db_path, name, **limits)  # type: ignore[arg-type]
        return secret

    async def settle(self) -> None:
        """Wait for the ledger to commit every finished request (tests read the database)."""
        self.worker.svc.bookkeeper.drain()
        await self.worker.svc.ledger.flush()


async def start_relay(config_path: Path) -> tuple[Worker, int]:
    config = load_config(str(config_path))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    worker = Worker(config, str(config_path), sock=sock)
    await worker.start()
    return worker, sock.getsockname()[1]


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    upstream = await FakeUpstream().start()
    yield upstream
    await upstream.close()


@pytest.fixture
def relay_config(tmp_path: Path, fake: FakeUpstream) -> Path:
    return write_config(tmp_path / "relay.yaml", relay_dict(fake.url))


@pytest.fixture
async def relay(relay_config: Path) -> AsyncIterator[Relay]:
    config = load_config(str(relay_config))
    db.init_db(config.database)
    _, secret = db.create_key(config.database, "alice")
    worker, port = await start_relay(relay_config)
    yield Relay(worker, port, secret, config.database, relay_config)
    await worker.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture
async def client(relay: Relay) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official openai SDK, on the relay with its key (no SDK retries)."""
    c = openai.AsyncOpenAI(base_url=relay.url + "/v1", api_key=relay.key, max_retries=0)
    yield c
    await c.close()

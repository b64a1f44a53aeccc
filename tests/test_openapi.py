"""docs/openapi.yaml against a live relay, with schemathesis (Issue 8).

The relay and the fake upstream run on 127.0.0.1 in a thread of their own (schemathesis
calls are blocking), with a key and an admin token; the fake serves every model name, so
generated requests go all the way through the relay and back. For every operation of
the document schemathesis generates requests (its examples, coverage and fuzzing phases,
a bounded number of examples each) and checks that:

- no answer is a 5xx (``not_a_server_error``; the fake never fails, so none is expected);
- the status code is one the document lists for that operation;
- the body and content type conform to the schema documented for that status.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from edgeproxy import db
from tests.conftest import relay_dict, start_relay, write_config
from tests.fakes import FakeUpstream

REPO = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "schemathesis-admin-token-0123456789"
# per operation and phase; raise it (SCHEMATHESIS_EXAMPLES=500) for a longer hunt
EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

schema = schemathesis.openapi.from_path(REPO / "docs" / "openapi.yaml")


@dataclass
class Live:
    url: str
    key: str
    statuses: Counter[str] = field(default_factory=Counter)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The fake and the relay, served by an event loop in a background thread."""
    tmp = tmp_path_factory.mktemp("openapi")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="live-relay", daemon=True)
    thread.start()

    def run(coro):  # type: ignore[no-untyped-def]
        future: Future = asyncio.run_coroutine_threadsafe(coro, loop)
        return future.result(timeout=30)

    async def start():  # type: ignore[no-untyped-def]
        fake = await FakeUpstream().start()
        config = relay_dict(fake.url)
        config["upstreams"][0]["models"] = ["*"]  # any generated model name is served
        config["admin_token"] = ADMIN_TOKEN
        config["shutdown_grace"] = "1s"
        path = write_config(tmp / "relay.yaml", config)
        db.init_db(str(tmp / "relay.db"))
        # a name schemathesis will not generate, so no DELETE or PATCH reaches this key
        _, secret = db.create_key(str(tmp / "relay.db"), "client-7f3a9c1e")
        worker, port = await start_relay(path)
        return fake, worker, port, secret

    fake, worker, port, secret = run(start())
    live = Live(f"http://127.0.0.1:{port}", secret)
    try:
        yield live
    finally:
        print("schemathesis answers by operation and status:", dict(sorted(live.statuses.items())))
        run(worker.stop())
        run(fake.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_the_relay_conforms_to_its_openapi_document(case: schemathesis.Case, live: Live) -> None:
    token = ADMIN_TOKEN if case.path.startswith("/admin/") else live.key
    response = case.call_and_validate(
        base_url=live.url,
        headers={"Authorization": f"Bearer {token}"},
        checks=CHECKS,
        timeout=10,
    )
    live.statuses[f"{case.method} {case.path} {response.status_code}"] += 1

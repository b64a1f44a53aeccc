"""The admin API on a real socket: off without a token, 401 with a wrong one, and the
CLI's operations over JSON."""

from __future__ import annotations

import pytest

from edgeproxy import db
from tests.conftest import Relay, relay_dict, start_relay, write_config

TOKEN = "admin-token-0123456789"


@pytest.fixture
async def admin_relay(tmp_path, fake):
    config = relay_dict(fake.url)
    config["admin_token"] = TOKEN
    path = write_config(tmp_path / "relay.yaml", config)
    db.init_db(str(tmp_path / "relay.db"))
    _, secret = db.create_key(str(tmp_path / "relay.db"), "alice")
    worker, port = await start_relay(path)
    yield Relay(worker, port, secret, str(tmp_path / "relay.db"), path)
    await worker.stop()


async def test_admin_api_is_off_without_a_token(relay: Relay, http):
    async with http.get(
        relay.url + "/admin/keys", headers={"Authorization": "Bearer anything"}
    ) as r:
        assert r.status == 404


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x"])
async def test_wrong_or_missing_token_is_401(admin_relay: Relay, http, auth):
    headers = {"Authorization": auth} if auth else {}
    async with http.get(admin_relay.url + "/admin/keys", headers=headers) as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "invalid_admin_token"


async def test_admin_key_lifecycle_and_usage(admin_relay: Relay, http):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = admin_relay.url + "/admin/keys"
    async with http.post(url, json={"name": "bob", "budget_usd": 5, "models": ["gpt-*"], "rpm": 10},
                         headers=auth) as r:  # fmt: skip
        assert r.status == 201
        created = await r.json()
    secret = created.pop("key")
    assert (
        secret.startswith("sk-") and created["budget_usd"] == 5 and created["models"] == ["gpt-*"]
    )
    async with http.post(url, json={"name": "bob"}, headers=auth) as r:
        assert r.status == 400  # exists
    async with http.post(url, json={"name": "x", "budget_usd": -1}, headers=auth) as r:
        assert r.status == 400 and "budget" in (await r.json())["error"]["message"]
    async with http.get(url, headers=auth) as r:
        listed = await r.json()
    assert {k["name"] for k in listed} == {"alice", "bob"}
    assert secret not in str(listed)
    async with http.patch(
        url + "/bob", json={"budget_usd": None, "disabled": True}, headers=auth
    ) as r:
        patched = await r.json()
    assert (
        patched["budget_usd"] is None
        and patched["disabled"] is True
        and patched["state"] == "disabled"
    )
    async with http.patch(url + "/bob", json={"rotate": True}, headers=auth) as r:
        rotated = await r.json()
    assert rotated["key"] != secret and rotated["prefix"] == rotated["key"][:11]
    async with http.patch(url + "/bob", json={"colour": "red"}, headers=auth) as r:
        assert r.status == 400
    async with http.get(admin_relay.url + "/admin/usage?by=key,model&since=1d", headers=auth) as r:
        report = await r.json()
    assert set(report) == {"rows", "total"}
    async with http.delete(url + "/bob", headers=auth) as r:
        assert r.status == 200
    async with http.get(url + "/bob", headers=auth) as r:
        assert r.status == 404

"""The relay end to end: the official openai SDK and raw HTTP against a relay and a fake
upstream, both on real 127.0.0.1 sockets."""

from __future__ import annotations

import gzip
import re
import sqlite3

import aiohttp
import orjson
import pytest

from tests.conftest import UPSTREAM_KEY, Relay
from tests.fakes import FakeUpstream, Json, Sse, openai_completion, openai_stream

HI = [{"role": "user", "content": "hi"}]


def ledger_rows(relay: Relay) -> list[dict]:
    conn = sqlite3.connect(relay.db_path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY ts")]
    finally:
        conn.close()


async def test_chat_json_reaches_upstream_with_its_own_key(
    client, relay: Relay, fake: FakeUpstream
):
    r = await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert r.choices[0].message.content == "Hello from the fake!"
    sent = fake.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert relay.key not in str(sent.headers) and relay.key.encode() not in sent.body
    assert sent.headers["Accept-Encoding"] == "identity"
    assert sent.json()["messages"] == HI


async def test_untouched_body_is_forwarded_byte_for_byte(relay: Relay, fake: FakeUpstream, http):
    raw = b'{"model":"gpt-4o-mini",  "messages":[{"role":"user","content":"hi"}], "x_unknown": [1, 2]}'
    async with http.post(
        relay.url + "/v1/chat/completions",
        data=raw,
        headers={"Authorization": f"Bearer {relay.key}"},
    ) as r:
        assert r.status == 200
    assert fake.requests[-1].body == raw


async def test_stream_is_byte_identical_when_client_asked_for_usage(
    relay: Relay, fake: FakeUpstream, http
):
    chunks = openai_stream(["Hel", "lo", " world"], with_usage=True)
    fake.push(Sse(chunks))
    body = {
        "model": "gpt-4o-mini",
        "messages": HI,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(
        relay.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {relay.key}"},
    ) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["Cache-Control"] == "no-cache"
        received = await r.read()
    assert received == b"".join(chunks)


async def test_injected_usage_chunk_is_withheld_but_metered(relay: Relay, fake: FakeUpstream, http):
    body = {"model": "gpt-4o-mini", "messages": HI, "stream": True}
    async with http.post(
        relay.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {relay.key}"},
    ) as r:
        received = await r.read()
    sent = fake.requests[-1].json()
    assert sent["stream_options"] == {"include_usage": True}  # injected
    expected = openai_stream(["Hello", " from", " the", " fake!"], with_usage=True)
    usage_chunk = expected[-2]
    assert b'"choices":[]' in usage_chunk
    assert received == b"".join(c for c in expected if c is not usage_chunk)
    await relay.settle()
    row = ledger_rows(relay)[-1]
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (11, 7, 0)


async def test_a_whole_answer_in_one_read_is_relayed_alike_by_a_busy_worker(
    relay: Relay, fake: FakeUpstream, http
):
    """An idle worker sends the first content event in a write of its own; a busy one sends
    a read that holds the whole answer in one write. The client gets the same bytes, the
    withheld usage chunk stays withheld, and both are metered."""
    answer = openai_stream(["Hello", " there"], with_usage=True)
    usage_chunk = answer[-2]
    expected = b"".join(c for c in answer if c is not usage_chunk)
    auth = {"Authorization": f"Bearer {relay.key}"}
    body = {"model": "gpt-4o-mini", "messages": HI, "stream": True}

    async def whole_answer() -> bytes:
        fake.push(Sse([b"".join(answer)]))
        async with http.post(relay.url + "/v1/chat/completions", json=body, headers=auth) as r:
            return await r.read()

    assert await whole_answer() == expected  # idle
    fake.push(Sse(openai_stream(["busy"], with_usage=False)[:2], then="hang"))
    async with http.post(relay.url + "/v1/chat/completions", json=body, headers=auth) as held:
        assert held.status == 200 and relay.worker.svc.inflight == 1  # committed, held open
        assert await whole_answer() == expected  # busy
    await relay.settle()
    rows = [r for r in ledger_rows(relay) if r["status"] == 200]
    assert [(r["prompt_tokens"], r["completion_tokens"], r["estimated"]) for r in rows] == [
        (11, 7, 0),
        (11, 7, 0),
    ]


async def test_stream_split_at_odd_boundaries_keeps_events_intact(
    relay: Relay, fake: FakeUpstream, http
):
    whole = b"".join(openai_stream(["a", "b", "c"], with_usage=True))
    pieces = [whole[i : i + 7] for i in range(0, len(whole), 7)]  # events cut mid-line
    fake.push(Sse(pieces))
    body = {
        "model": "gpt-4o-mini",
        "messages": HI,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(
        relay.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {relay.key}"},
    ) as r:
        assert await r.read() == whole


async def test_sdk_stream_tools_and_vision(client, fake: FakeUpstream):
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ]
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    fake.push(Json(openai_completion(None, tool_calls=[call])))
    r = await client.chat.completions.create(model="gpt-4o-mini", messages=HI, tools=tools)
    assert r.choices[0].message.tool_calls[0].function.arguments == '{"city":"Paris"}'
    assert fake.requests[-1].json()["tools"] == tools
    vision = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        }
    ]
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=vision, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello from the fake!"
    assert fake.requests[-1].json()["messages"] == vision


async def test_models_list_and_embeddings(client, fake: FakeUpstream):
    models = {m.id: m.owned_by for m in (await client.models.list()).data}
    assert models["gpt-4o-mini"] == "openai"
    assert "gpt-5*" not in models  # globs are not model names
    emb = await client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert emb.data[0].embedding == [0.1, 0.2, 0.3]


async def test_models_list_respects_the_key_allowlist(relay: Relay, http):
    secret = relay.new_key("restricted", models=["gpt-4o*"])
    await _wait_for_key(relay, http, secret)
    async with http.get(
        relay.url + "/v1/models", headers={"Authorization": f"Bearer {secret}"}
    ) as r:
        ids = [m["id"] for m in (await r.json())["data"]]
    assert ids == ["gpt-4o-mini"]


async def test_model_map_and_params_rules(client, fake: FakeUpstream):
    await client.chat.completions.create(
        model="gpt-5-alias", messages=HI, max_tokens=5, temperature=0.5
    )
    sent = fake.requests[-1].json()
    assert sent["model"] == "gpt-5-2025-08-07"
    assert sent["max_completion_tokens"] == 5 and "max_tokens" not in sent
    assert sent["temperature"] == 0.5


async def test_request_id_is_echoed_or_made(relay: Relay, http):
    auth = {"Authorization": f"Bearer {relay.key}"}
    body = {"model": "gpt-4o-mini", "messages": HI}
    async with http.post(
        relay.url + "/v1/chat/completions", json=body, headers={**auth, "x-request-id": "abc-123:x"}
    ) as r:
        assert r.headers["x-request-id"] == "abc-123:x"
    async with http.post(
        relay.url + "/v1/chat/completions",
        json=body,
        headers={**auth, "x-request-id": "bad id\u00e9"},
    ) as r:
        made = r.headers["x-request-id"]
        assert made != "bad id\u00e9" and re.fullmatch(r"[0-9a-f]{24,}", made)
    async with http.get(relay.url + "/nope") as r:
        assert r.status == 404


async def test_only_allowed_client_headers_reach_the_upstream(
    relay: Relay, fake: FakeUpstream, http
):
    headers = {
        "Authorization": f"Bearer {relay.key}",
        "OpenAI-Beta": "assistants=v2",
        "Cookie": "session=1",
        "X-Forwarded-For": "1.2.3.4",
        "x-api-key": "sk-other",
    }
    async with http.post(
        relay.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": HI},
        headers=headers,
    ) as r:
        assert r.status == 200
    sent = {k.lower(): v for k, v in fake.requests[-1].headers.items()}
    assert sent["openai-beta"] == "assistants=v2"
    assert "cookie" not in sent and "x-forwarded-for" not in sent and "x-api-key" not in sent


async def test_x_api_key_auth_and_authorization_wins(relay: Relay, http):
    body = {"model": "gpt-4o-mini", "messages": HI}
    async with http.post(
        relay.url + "/v1/chat/completions", json=body, headers={"x-api-key": relay.key}
    ) as r:
        assert r.status == 200
    both = {"Authorization": "Bearer sk-" + "x" * 44, "x-api-key": relay.key}
    async with http.post(relay.url + "/v1/chat/completions", json=body, headers=both) as r:
        assert r.status == 401


async def test_other_openai_endpoints_pass_through(client, fake: FakeUpstream, relay: Relay, http):
    speech = await client.audio.speech.create(model="tts-1", voice="alloy", input="hello")
    assert speech.content == b"ID3fake-mp3-bytes" * 100
    tr = await client.audio.transcriptions.create(
        model="whisper-1", file=("a.wav", b"RIFFfakewav", "audio/wav")
    )
    assert tr.text == "hello world"
    assert fake.requests[-1].path == "/v1/audio/transcriptions"
    assert b"RIFFfakewav" in fake.requests[-1].body
    fake.push(Json({"id": "modr-1", "results": [{"flagged": False}]}))
    mod = await client.moderations.create(model="omni-moderation-latest", input="hi")
    assert mod.results[0].flagged is False
    fake.push(Json({"created": 1, "data": [{"url": "https://example.invalid/x.png"}]}))
    img = await client.images.generate(model="dall-e-3", prompt="a cat")
    assert img.data[0].url.endswith("x.png")
    assert [r.path for r in fake.requests] == [
        "/v1/audio/speech",
        "/v1/audio/transcriptions",
        "/v1/moderations",
        "/v1/images/generations",
    ]


async def test_openai_only_endpoints_are_not_routed_to_other_kinds(relay: Relay, http):
    async with http.post(
        relay.url + "/v1/embeddings",
        json={"model": "claude-x", "input": "a"},
        headers={"Authorization": f"Bearer {relay.key}"},
    ) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "model_not_found"


async def test_upstream_4xx_is_passed_on_scrubbed(relay: Relay, fake: FakeUpstream, http):
    leak = f"bad request; key {UPSTREAM_KEY} at {fake.url}/v1"
    fake.push(
        Json(
            {"error": {"message": leak, "type": "invalid_request_error", "code": "bad"}}, status=400
        )
    )
    async with http.post(
        relay.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": HI},
        headers={"Authorization": f"Bearer {relay.key}"},
    ) as r:
        assert r.status == 400
        text = await r.text()
    assert UPSTREAM_KEY not in text and fake.url not in text and "bad request" in text
    assert len(fake.requests) == 1  # a client error is not retried


async def test_upstream_401_is_never_shown_and_retried(relay: Relay, fake: FakeUpstream, http):
    fake.push(Json({"error": {"message": f"Incorrect API key {UPSTREAM_KEY}"}}, status=401))
    fake.push(Json({"error": {"message": "still bad"}}, status=401))
    async with http.post(
        relay.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": HI},
        headers={"Authorization": f"Bearer {relay.key}"},
    ) as r:
        text = await r.text()
    assert UPSTREAM_KEY not in text and "Incorrect" not in text
    assert r.status in (502, 503)


async def test_health_endpoints(relay: Relay, http):
    async with http.get(relay.url + "/healthz") as r:
        assert r.status == 200
    async with http.get(relay.url + "/readyz") as r:
        assert r.status == 200, await r.text()


async def _wait_for_key(relay: Relay, http: aiohttp.ClientSession, secret: str) -> None:
    """A key made through the database reaches the relay within 2 s (SPEC §1)."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0
    while loop.time() < deadline:
        async with http.get(
            relay.url + "/v1/models", headers={"Authorization": f"Bearer {secret}"}
        ) as r:
            if r.status == 200:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the key did not reach the running relay within 2 s")


async def test_key_changes_reach_the_running_relay_within_two_seconds(relay: Relay, http):
    from edgeproxy import db

    secret = relay.new_key("bob")
    await _wait_for_key(relay, http, secret)
    db.set_disabled(relay.db_path, "bob", True)
    import asyncio

    body = {"model": "gpt-4o-mini", "messages": HI}
    for _ in range(40):
        async with http.post(
            relay.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {secret}"},
        ) as r:
            if r.status == 403:
                assert (await r.json())["error"]["code"] == "key_disabled"
                break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("disabling did not reach the relay within 2 s")


# --- bad input: raw HTTP --------------------------------------------------------------

BAD_BODIES = [
    (b"{not json", 400, "invalid_json", None),
    (b'{"model": NaN, "messages": []}', 400, "invalid_json", None),
    (b'{"model": "x", "messages": ["\\ud800"]}', 400, "invalid_json", None),
    (b"\xff\xfe{}", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_request", None),
    (b'{"messages": []}', 400, "model_required", "model"),
    (b'{"model": "gpt-4o-mini"}', 400, "messages_required", "messages"),
    (b'{"model": 5, "messages": []}', 400, "invalid_request", "model"),
    (b'{"model": "' + b"m" * 300 + b'", "messages": []}', 400, "invalid_request", "model"),
    (b'{"model": "gpt-4o-mini", "messages": {}}', 400, "invalid_request", "messages"),
    (
        b'{"model": "gpt-4o-mini", "messages": [], "stream": "yes"}',
        400,
        "invalid_request",
        "stream",
    ),
    (b'{"model": "gpt-4o-mini", "messages": [], "n": 0}', 400, "invalid_request", "n"),
    (
        b'{"model": "gpt-4o-mini", "messages": [], "max_tokens": 1.5}',
        400,
        "invalid_request",
        "max_tokens",
    ),
    (
        b'{"model": "gpt-4o-mini", "messages": [], "max_completion_tokens": true}',
        400,
        "invalid_request",
        "max_completion_tokens",
    ),
    (b'{"model": "no-such-model", "messages": []}', 404, "model_not_found", "model"),
]


@pytest.mark.parametrize(("raw", "status", "code", "param"), BAD_BODIES)
async def test_bad_bodies_get_openai_shaped_errors(
    relay: Relay, fake: FakeUpstream, http, raw, status, code, param
):
    async with http.post(
        relay.url + "/v1/chat/completions",
        data=raw,
        headers={"Authorization": f"Bearer {relay.key}", "Content-Type": "application/json"},
    ) as r:
        assert r.status == status
        error = (await r.json())["error"]
    assert error["code"] == code and error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}
    assert fake.requests == []
    await relay.settle()
    assert ledger_rows(relay)[-1]["status"] == status  # refused, but recorded (key checked first)


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "invalid_api_key"),
        ({"Authorization": "Bearer nope"}, "invalid_api_key"),
        ({"Authorization": "Bearer sk-" + "A" * 44}, "invalid_api_key"),
        ({"Authorization": "Basic abc"}, "invalid_api_key"),
        ({"Authorization": "Bearer ' OR 1=1 --" + "x" * 5000}, "invalid_api_key"),
    ],
)
async def test_bad_keys_get_401(relay: Relay, fake: FakeUpstream, http, headers, code):
    async with http.post(
        relay.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": HI},
        headers=headers,
    ) as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == code
    assert fake.requests == []


async def test_key_in_query_string_is_ignored(relay: Relay, http):
    async with http.post(
        relay.url + f"/v1/chat/completions?api_key={relay.key}&key={relay.key}",
        json={"model": "gpt-4o-mini", "messages": HI},
    ) as r:
        assert r.status == 401


async def test_key_state_refusals(relay: Relay, http):
    from edgeproxy import db

    secrets = {
        "expired": relay.new_key("old", expires="2020-01-01"),
        "disabled": relay.new_key("off"),
        "model": relay.new_key("narrow", models=["claude-*"]),
    }
    db.set_disabled(relay.db_path, "off", True)
    await relay.worker.svc.keys.reload()
    expected = {"expired": "key_expired", "disabled": "key_disabled", "model": "model_not_allowed"}
    for which, secret in secrets.items():
        async with http.post(
            relay.url + "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": HI},
            headers={"Authorization": f"Bearer {secret}"},
        ) as r:
            assert r.status == 403
            assert (await r.json())["error"]["code"] == expected[which]


async def test_body_limits_and_encodings(tmp_path, fake: FakeUpstream, http):
    from edgeproxy import db
    from tests.conftest import relay_dict, start_relay, write_config

    config = relay_dict(fake.url)
    config["max_request_body"] = "2KiB"
    path = write_config(tmp_path / "relay.yaml", config)
    db.init_db(str(tmp_path / "relay.db"))
    _, secret = db.create_key(str(tmp_path / "relay.db"), "k")
    worker, port = await start_relay(path)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    try:
        small = orjson.dumps({"model": "gpt-4o-mini", "messages": HI})
        async with http.post(
            url, data=gzip.compress(small), headers={**auth, "Content-Encoding": "gzip"}
        ) as r:
            assert r.status == 200
        assert fake.requests[-1].body == small
        big = orjson.dumps({"model": "gpt-4o-mini", "messages": HI, "pad": "x" * 4000})
        async with http.post(url, data=big, headers=auth) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "request_too_large"
        bomb = gzip.compress(b'{"pad": "' + b"0" * 50_000_000 + b'"}')
        async with http.post(url, data=bomb, headers={**auth, "Content-Encoding": "gzip"}) as r:
            assert r.status == 413
        async with http.post(url, data=small, headers={**auth, "Content-Encoding": "br"}) as r:
            assert r.status == 415
        async with http.post(
            url, data=b"\x1f\x8bnot-gzip", headers={**auth, "Content-Encoding": "gzip"}
        ) as r:
            assert r.status == 400
    finally:
        await worker.stop()


async def test_unknown_paths_and_wrong_methods(relay: Relay, http):
    async with http.get(relay.url + "/v1/chat/completions") as r:
        assert r.status == 405
        assert (await r.json())["error"]["code"] == "method_not_allowed"
    async with http.post(relay.url + "/v1/unknown", json={}) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "unknown_endpoint"


async def test_a_key_works_the_moment_it_is_created(relay: Relay, http):
    """The README's flow: KEY=$(edgeproxy keys create x), then a request at once."""
    for i in range(3):
        secret = relay.new_key(f"instant-{i}")
        async with http.post(
            relay.url + "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": HI},
            headers={"Authorization": f"Bearer {secret}"},
        ) as r:
            assert r.status == 200

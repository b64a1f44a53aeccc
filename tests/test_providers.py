"""Issue 6, providers, end to end: the official openai and anthropic SDKs as clients, the
relay and the scripted fake upstream (OpenAI, Anthropic and Gemini paths) on real
127.0.0.1 sockets.

Every test asserts both sides: what the client received, and what the fake upstream
received (path, query, headers, body). The translators have their own socket-free tests
(``test_dialect_*.py``); these prove the proxy wires them up: URLs, headers, the commit
point, usage and errors, metering.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest

from edgeproxy.config import Price
from edgeproxy.usage import Usage, cost_usd
from tests.conftest import UPSTREAM_KEY, Relay, relay_dict, write_config
from tests.fakes import (
    FakeUpstream,
    Json,
    Recorded,
    Sse,
    anthropic_event,
    anthropic_message,
    anthropic_stream,
    gemini_response,
    openai_chunk,
    openai_completion,
)

CLAUDE = "claude-opus-4-8"  # served by fake-anthropic ("claude-*")
CLAUDE_ALIAS = "claude-alias"  # model_map'd by fake-anthropic in this module's config
CLAUDE_MAPPED = "claude-opus-4-8-20260101"
GEMINI = "gemini-2.5-flash"  # served by fake-gemini ("gemini-*")
GPT = "gpt-4o-mini"  # served by fake-openai
ANTHROPIC_KEY = UPSTREAM_KEY + "-anthropic"
GEMINI_KEY = UPSTREAM_KEY + "-gemini"
HI = [{"role": "user", "content": "hi"}]
PNG = "data:image/png;base64,iVBORw0KGgo="
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
    },
}
CLAUDE_TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": WEATHER["function"]["parameters"],
    },
    {"name": "get_time", "input_schema": TIME["function"]["parameters"]},
]


@pytest.fixture
def relay_config(tmp_path: Path, fake: FakeUpstream) -> Path:
    """The shared config, plus a model_map on the Anthropic upstream."""
    config = relay_dict(fake.url)
    config["upstreams"][1]["model_map"] = {CLAUDE_ALIAS: CLAUDE_MAPPED}
    return write_config(tmp_path / "relay.yaml", config)


@pytest.fixture
async def oai(relay: Relay) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=relay.url + "/v1", api_key=relay.key, max_retries=0)
    yield client
    await client.close()


class Sent:
    """The request bodies the anthropic SDK put on the wire (an httpx request hook)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, request: httpx2.Request) -> None:
        self.bodies.append(request.content)


@pytest.fixture
def client_sent() -> Sent:
    return Sent()


@pytest.fixture
async def claude(relay: Relay, client_sent: Sent) -> AsyncIterator[anthropic.AsyncAnthropic]:
    http_client = httpx2.AsyncClient(event_hooks={"request": [client_sent]})
    client = anthropic.AsyncAnthropic(
        base_url=relay.url, api_key=relay.key, max_retries=0, http_client=http_client
    )
    yield client
    await client.close()
    await http_client.aclose()


def headers_of(recorded: Recorded) -> dict[str, str]:
    return {k.lower(): v for k, v in recorded.headers.items()}


RELAYED_HEADERS = {
    "host", "user-agent", "accept", "accept-encoding", "content-type", "content-length",
    "authorization", "x-api-key", "x-goog-api-key", "anthropic-version", "anthropic-beta",
}  # fmt: skip


def assert_upstream_auth(recorded: Recorded, kind: str, relay: Relay) -> None:
    """The upstream's own key in the upstream's own header; the client's key nowhere."""
    headers = headers_of(recorded)
    if kind == "anthropic":
        assert headers["x-api-key"] == ANTHROPIC_KEY
        assert headers["anthropic-version"]
        assert "authorization" not in headers and "x-goog-api-key" not in headers
    elif kind == "gemini":
        assert headers["x-goog-api-key"] == GEMINI_KEY
        assert "authorization" not in headers and "x-api-key" not in headers
        assert not any(name.startswith("anthropic-") for name in headers)
    else:
        assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert "x-api-key" not in headers
        assert not any(name.startswith("anthropic-") for name in headers)
    assert set(headers) <= RELAYED_HEADERS  # no client headers beyond SPEC §10's
    assert relay.key not in str(recorded.headers)
    assert relay.key.encode() not in recorded.body
    assert recorded.query in ("", "alt=sse")


def claude_reply(
    content: list[dict[str, Any]],
    stop_reason: str = "end_turn",
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    reply = anthropic_message()
    reply["content"] = content
    reply["stop_reason"] = stop_reason
    if usage is not None:
        reply["usage"] = usage
    return reply


def claude_sse(
    blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]],
    stop_reason: str = "end_turn",
    output_tokens: int = 5,
) -> list[bytes]:
    """An Anthropic stream: message_start, each (block, deltas), message_delta, message_stop."""
    start = anthropic_message("")
    start["content"] = []
    start["usage"] = {"input_tokens": 20, "output_tokens": 1, "cache_read_input_tokens": 4,
                      "cache_creation_input_tokens": 2}  # fmt: skip
    out = [anthropic_event("message_start", {"type": "message_start", "message": start})]
    for index, (block, deltas) in enumerate(blocks):
        out.append(anthropic_event("content_block_start",
                                   {"type": "content_block_start", "index": index, "content_block": block}))  # fmt: skip
        for delta in deltas:
            out.append(anthropic_event("content_block_delta",
                                       {"type": "content_block_delta", "index": index, "delta": delta}))  # fmt: skip
        out.append(
            anthropic_event("content_block_stop", {"type": "content_block_stop", "index": index})
        )
    out.append(anthropic_event("message_delta", {"type": "message_delta",
                                                 "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                                 "usage": {"output_tokens": output_tokens}}))  # fmt: skip
    out.append(anthropic_event("message_stop", {"type": "message_stop"}))
    return out


def gemini_reply(parts: list[dict[str, Any]], finish: str = "STOP", **usage: int) -> dict[str, Any]:
    reply = gemini_response()
    reply["candidates"][0]["content"]["parts"] = parts
    reply["candidates"][0]["finishReason"] = finish
    reply["usageMetadata"].update(usage)
    return reply


def gemini_sse(events: list[dict[str, Any]]) -> list[bytes]:
    return [b"data: " + orjson.dumps(e) + b"\r\n\r\n" for e in events]


def gemini_event(
    parts: list[dict[str, Any]], finish: str | None = None, usage: bool = False
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    event: dict[str, Any] = {"candidates": [candidate], "modelVersion": "gemini-fake"}
    if usage:
        event["usageMetadata"] = gemini_response()["usageMetadata"]
    return event


async def collect(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def finish_of(chunks: list[Any]) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def tool_calls_of(chunks: list[Any]) -> list[dict[str, Any]]:
    """Streamed tool-call fragments accumulated by index, as the SDK docs show."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for fragment in choice.delta.tool_calls or ():
                call = calls.setdefault(fragment.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = fragment.id or call["id"]
                if fragment.function is not None:
                    call["name"] += fragment.function.name or ""
                    call["arguments"] += fragment.function.arguments or ""
    return [calls[i] for i in sorted(calls)]


def ledger_rows(relay: Relay) -> list[dict[str, Any]]:
    conn = sqlite3.connect(relay.db_path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY ts")]
    finally:
        conn.close()


# === 1. OpenAI SDK -> Anthropic upstream ====================================================

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "developer", "content": "Answer in French."},
    {"role": "user", "content": "Bonjour?"},
    {"role": "assistant", "content": "Bonjour."},
    {"role": "user", "content": "Encore?"},
]


async def test_openai_sdk_to_anthropic_json(oai, relay: Relay, fake: FakeUpstream):
    fake.push(Json(claude_reply([{"type": "text", "text": "Oui. FIN"}], "stop_sequence")))
    r = await oai.chat.completions.create(
        model=CLAUDE, messages=CONVERSATION, stop=["FIN", "STOP"], max_completion_tokens=300,
        temperature=0.5, user="u-42",
    )  # fmt: skip
    assert r.object == "chat.completion"
    assert r.model == "claude-fake"  # the upstream's own model name, as OpenAI does for aliases
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "Oui. FIN"
    assert r.choices[0].finish_reason == "stop"
    # SPEC §4: prompt = input 20 + cache read 4 + cache creation 2; cached = cache read
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (26, 5, 31)
    assert r.usage.prompt_tokens_details.cached_tokens == 4

    sent = fake.requests[-1]
    assert (sent.method, sent.path, sent.query) == ("POST", "/v1/messages", "")
    assert_upstream_auth(sent, "anthropic", relay)
    assert headers_of(sent)["anthropic-version"] == "2023-06-01"
    assert sent.json() == {
        "model": CLAUDE,
        "max_tokens": 300,
        "messages": [
            {"role": "user", "content": "Bonjour?"},
            {"role": "assistant", "content": "Bonjour."},
            {"role": "user", "content": "Encore?"},
        ],
        "system": "You are terse.\n\nAnswer in French.",
        "temperature": 0.5,
        "stop_sequences": ["FIN", "STOP"],
        "metadata": {"user_id": "u-42"},
    }


@pytest.mark.parametrize(
    ("limits", "expected"),
    [({}, 4096), ({"max_tokens": 77}, 77), ({"max_completion_tokens": 99, "max_tokens": 77}, 99)],
)
async def test_openai_sdk_to_anthropic_max_tokens(oai, fake: FakeUpstream, limits, expected):
    await oai.chat.completions.create(model=CLAUDE, messages=HI, **limits)
    assert fake.requests[-1].json()["max_tokens"] == expected


async def test_openai_sdk_to_anthropic_model_map(oai, fake: FakeUpstream, relay: Relay):
    await oai.chat.completions.create(model=CLAUDE_ALIAS, messages=HI)
    assert fake.requests[-1].json()["model"] == CLAUDE_MAPPED
    await relay.settle()
    assert ledger_rows(relay)[-1]["model"] == CLAUDE_ALIAS  # the ledger keeps the public name


async def test_openai_sdk_to_anthropic_images(oai, fake: FakeUpstream):
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Compare these."},
        {"type": "image_url", "image_url": {"url": PNG}},
        {"type": "image_url", "image_url": {"url": "https://images.example.com/cat.jpg", "detail": "high"}},
    ]}]  # fmt: skip
    r = await oai.chat.completions.create(model=CLAUDE, messages=messages)
    assert r.choices[0].message.content == "Hello from Claude!"
    assert fake.requests[-1].json()["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "Compare these."},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://images.example.com/cat.jpg"}},
    ]}]  # fmt: skip


async def test_openai_sdk_to_anthropic_parallel_tool_calls_and_results(
    oai, relay: Relay, fake: FakeUpstream
):
    fake.push(Json(claude_reply([
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {"tz": "CET"}},
    ], "tool_use")))  # fmt: skip
    ask = [{"role": "user", "content": "Weather and time in Paris?"}]
    r = await oai.chat.completions.create(
        model=CLAUDE,
        messages=ask,
        tools=[WEATHER, TIME],
        tool_choice="auto",
        parallel_tool_calls=True,
    )
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me check."
    assert [
        (c.id, c.type, c.function.name, orjson.loads(c.function.arguments))
        for c in message.tool_calls
    ] == [
        ("toolu_1", "function", "get_weather", {"city": "Paris"}),
        ("toolu_2", "function", "get_time", {"tz": "CET"}),
    ]
    first = fake.requests[-1].json()
    assert first["tools"] == CLAUDE_TOOLS
    assert first["tool_choice"] == {"type": "auto"}

    # the follow-up turn: the SDK's own message object echoed back, then both results
    follow = [
        *ask,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": "toolu_1", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "12:00"},
    ]
    fake.push(Json(claude_reply([{"type": "text", "text": "21 degrees, noon."}])))
    r = await oai.chat.completions.create(
        model=CLAUDE, messages=follow, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    assert r.choices[0].message.content == "21 degrees, noon."
    assert r.choices[0].finish_reason == "stop"
    second = fake.requests[-1].json()
    assert second["tool_choice"] == {"type": "tool", "name": "get_weather"}
    assert second["messages"] == [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {"tz": "CET"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"temp": 21}'},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "12:00"},
        ]},
    ]  # fmt: skip
    assert_upstream_auth(fake.requests[-1], "anthropic", relay)


async def test_openai_sdk_to_anthropic_tool_choice_required_and_serial(oai, fake: FakeUpstream):
    await oai.chat.completions.create(
        model=CLAUDE,
        messages=HI,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    assert fake.requests[-1].json()["tool_choice"] == {
        "type": "any",
        "disable_parallel_tool_use": True,
    }
    await oai.chat.completions.create(
        model=CLAUDE, messages=HI, tools=[WEATHER], tool_choice="none"
    )
    assert fake.requests[-1].json()["tool_choice"] == {"type": "none"}


CLAUDE_TOOL_STREAM = claude_sse(
    [
        ({"type": "text", "text": ""}, [{"type": "text_delta", "text": "Checking."}]),
        ({"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
         [{"type": "input_json_delta", "partial_json": '{"city":'},
          {"type": "input_json_delta", "partial_json": ' "Paris"}'}]),
        ({"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
         [{"type": "input_json_delta", "partial_json": '{"tz": "CET"}'}]),
    ],
    "tool_use",
    output_tokens=30,
)  # fmt: skip


async def test_openai_sdk_to_anthropic_stream_parallel_tool_calls(oai, fake: FakeUpstream):
    fake.push(Sse(CLAUDE_TOOL_STREAM))
    stream = await oai.chat.completions.create(
        model=CLAUDE, messages=HI, tools=[WEATHER, TIME], stream=True
    )
    chunks = await collect(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text_of(chunks) == "Checking."
    assert tool_calls_of(chunks) == [
        {"id": "toolu_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"id": "toolu_2", "name": "get_time", "arguments": '{"tz": "CET"}'},
    ]
    assert finish_of(chunks) == ["tool_calls"]
    assert all(c.usage is None for c in chunks)  # include_usage was not asked for
    sent = fake.requests[-1].json()
    assert sent["stream"] is True and "stream_options" not in sent
    assert sent["tools"] == CLAUDE_TOOLS


@pytest.mark.parametrize("include_usage", [True, False])
async def test_openai_sdk_to_anthropic_stream_usage_only_when_asked(
    oai, fake: FakeUpstream, include_usage
):
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = await oai.chat.completions.create(model=CLAUDE, messages=HI, stream=True, **options)
    chunks = await collect(stream)
    assert text_of(chunks) == "Hello from Claude!"
    assert finish_of(chunks) == ["stop"]
    with_usage = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert with_usage == [chunks[-1]] and chunks[-1].choices == []
        usage = chunks[-1].usage
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (26, 5, 31)
        assert usage.prompt_tokens_details.cached_tokens == 4
    else:
        assert with_usage == []
    sent = fake.requests[-1]
    assert (sent.path, sent.query) == ("/v1/messages", "")
    assert "stream_options" not in sent.json()  # Anthropic always reports usage


async def test_openai_sdk_to_anthropic_stream_max_tokens_is_length(oai, fake: FakeUpstream):
    fake.push(Sse(claude_sse([({"type": "text", "text": ""}, [{"type": "text_delta", "text": "Once upon"}])],
                             "max_tokens", output_tokens=2)))  # fmt: skip
    chunks = await collect(
        await oai.chat.completions.create(model=CLAUDE, messages=HI, stream=True, max_tokens=2)
    )
    assert text_of(chunks) == "Once upon"
    assert finish_of(chunks) == ["length"]
    assert fake.requests[-1].json()["max_tokens"] == 2


async def test_openai_sdk_to_anthropic_json_max_tokens_is_length(oai, fake: FakeUpstream):
    fake.push(Json(claude_reply([{"type": "text", "text": "Once upon"}], "max_tokens")))
    r = await oai.chat.completions.create(model=CLAUDE, messages=HI, max_tokens=2)
    assert r.choices[0].finish_reason == "length"


async def test_openai_sdk_to_anthropic_reasoning(oai, fake: FakeUpstream):
    fake.push(Json(claude_reply([
        {"type": "thinking", "thinking": "Two and two...", "signature": "sig"},
        {"type": "text", "text": "4"},
    ])))  # fmt: skip
    r = await oai.chat.completions.create(
        model=CLAUDE, messages=HI, reasoning_effort="medium", temperature=0.2
    )
    assert r.choices[0].message.content == "4"
    assert r.choices[0].message.model_extra["reasoning_content"] == "Two and two..."
    sent = fake.requests[-1].json()
    # medium = a 4096-token budget; no client cap, so max_tokens = budget + the default
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 4096}
    assert sent["max_tokens"] == 4096 + 4096
    assert "temperature" not in sent  # Anthropic rejects temperature with thinking

    fake.push(Sse(claude_sse([
        ({"type": "thinking", "thinking": "", "signature": ""},
         [{"type": "thinking_delta", "thinking": "Two and "}, {"type": "thinking_delta", "thinking": "two..."},
          {"type": "signature_delta", "signature": "sig"}]),
        ({"type": "text", "text": ""}, [{"type": "text_delta", "text": "4"}]),
    ])))  # fmt: skip
    chunks = await collect(
        await oai.chat.completions.create(
            model=CLAUDE, messages=HI, reasoning_effort="low", max_tokens=3000, stream=True
        )
    )
    reasoning = "".join(
        c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices
    )
    assert reasoning == "Two and two..."
    assert text_of(chunks) == "4"
    sent = fake.requests[-1].json()
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert sent["max_tokens"] == 3000


# === 1. OpenAI SDK -> Gemini upstream =======================================================


async def test_openai_sdk_to_gemini_json(oai, relay: Relay, fake: FakeUpstream):
    fake.push(Json(gemini_reply([{"text": "Oui."}], "STOP")))
    r = await oai.chat.completions.create(
        model=GEMINI,
        messages=CONVERSATION,
        stop="FIN",
        max_completion_tokens=300,
        temperature=0.5,
        seed=7,
    )
    assert r.choices[0].message.content == "Oui."
    assert r.choices[0].finish_reason == "stop"
    assert r.model == "gemini-fake"
    # usageMetadata: prompt 9, candidates 4 + thoughts 2 = completion 6 (SPEC §4)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (9, 6, 15)
    assert r.usage.completion_tokens_details.reasoning_tokens == 2

    sent = fake.requests[-1]
    assert (sent.method, sent.path, sent.query) == (
        "POST",
        f"/v1beta/models/{GEMINI}:generateContent",
        "",
    )
    assert_upstream_auth(sent, "gemini", relay)
    assert sent.json() == {
        "contents": [
            {"role": "user", "parts": [{"text": "Bonjour?"}]},
            {"role": "model", "parts": [{"text": "Bonjour."}]},
            {"role": "user", "parts": [{"text": "Encore?"}]},
        ],
        "systemInstruction": {"parts": [{"text": "You are terse."}, {"text": "Answer in French."}]},
        "generationConfig": {
            "temperature": 0.5,
            "seed": 7,
            "maxOutputTokens": 300,
            "stopSequences": ["FIN"],
        },
    }


@pytest.mark.parametrize(
    ("limits", "expected"),
    [({}, None), ({"max_tokens": 77}, 77), ({"max_completion_tokens": 99, "max_tokens": 77}, 99)],
)
async def test_openai_sdk_to_gemini_max_tokens(oai, fake: FakeUpstream, limits, expected):
    await oai.chat.completions.create(model=GEMINI, messages=HI, **limits)
    config = fake.requests[-1].json().get("generationConfig", {})
    assert config.get("maxOutputTokens") == expected  # no default: Gemini has its own


async def test_openai_sdk_to_gemini_inline_image(oai, fake: FakeUpstream):
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": PNG}},
    ]}]  # fmt: skip
    r = await oai.chat.completions.create(model=GEMINI, messages=messages)
    assert r.choices[0].message.content == "Hello from Gemini!"
    assert fake.requests[-1].json()["contents"] == [{"role": "user", "parts": [
        {"text": "What is this?"}, {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
    ]}]  # fmt: skip


async def test_openai_sdk_to_gemini_image_url_on_a_private_address_is_refused(
    oai, relay: Relay, fake: FakeUpstream
):
    """SPEC §10: the relay fetches image URLs for Gemini, never from its own network."""
    url = f"{fake.url}/cat.png"
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.chat.completions.create(model=GEMINI, messages=messages)
    error = caught.value.response.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == "messages"
    assert "private or reserved address" in error["message"]
    assert fake.requests == []  # neither the image nor the model request went out


async def test_openai_sdk_to_gemini_parallel_tool_calls_and_results(
    oai, relay: Relay, fake: FakeUpstream
):
    fake.push(Json(gemini_reply([
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2lnMQ=="},
        {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}},
    ], "STOP")))  # fmt: skip
    ask = [{"role": "user", "content": "Weather and time in Paris?"}]
    r = await oai.chat.completions.create(
        model=GEMINI, messages=ask, tools=[WEATHER, TIME], tool_choice="required"
    )
    message = r.choices[0].message
    assert (
        r.choices[0].finish_reason == "tool_calls"
    )  # Gemini says STOP; the calls make it tool_calls
    assert message.content is None
    calls = message.tool_calls
    assert [(c.function.name, orjson.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"}),
    ]  # fmt: skip
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    first = fake.requests[-1].json()
    assert first["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    assert first["tools"] == [{"functionDeclarations": [
        {"name": "get_weather", "description": "Weather for a city",
         "parametersJsonSchema": WEATHER["function"]["parameters"]},
        {"name": "get_time", "parametersJsonSchema": TIME["function"]["parameters"]},
    ]}]  # fmt: skip

    follow = [
        *ask,
        message.model_dump(exclude_none=True),  # carries extra_content.google.thought_signature
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": calls[1].id, "content": "12:00"},
    ]
    fake.push(Json(gemini_reply([{"text": "21 degrees, noon."}])))
    r = await oai.chat.completions.create(
        model=GEMINI, messages=follow, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    assert r.choices[0].message.content == "21 degrees, noon."
    second = fake.requests[-1].json()
    assert second["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }
    assert second["contents"] == [
        {"role": "user", "parts": [{"text": "Weather and time in Paris?"}]},
        {"role": "model", "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2lnMQ=="},
            {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}},
        ]},
        {"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
            {"functionResponse": {"name": "get_time", "response": {"content": "12:00"}}},
        ]},
    ]  # fmt: skip


async def test_openai_sdk_to_gemini_stream_parallel_tool_calls(
    oai, relay: Relay, fake: FakeUpstream
):
    fake.push(Sse(gemini_sse([
        gemini_event([{"text": "Checking."}]),
        gemini_event([
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
            {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}},
        ], "STOP", usage=True),
    ])))  # fmt: skip
    chunks = await collect(
        await oai.chat.completions.create(
            model=GEMINI, messages=HI, tools=[WEATHER, TIME], stream=True
        )
    )
    assert text_of(chunks) == "Checking."
    calls = tool_calls_of(chunks)
    assert [(c["name"], orjson.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"}),
    ]  # fmt: skip
    assert finish_of(chunks) == ["tool_calls"]
    sent = fake.requests[-1]
    assert (sent.path, sent.query) == (f"/v1beta/models/{GEMINI}:streamGenerateContent", "alt=sse")
    assert_upstream_auth(sent, "gemini", relay)


@pytest.mark.parametrize("include_usage", [True, False])
async def test_openai_sdk_to_gemini_stream_usage_only_when_asked(
    oai, fake: FakeUpstream, include_usage
):
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = await collect(
        await oai.chat.completions.create(model=GEMINI, messages=HI, stream=True, **options)
    )
    assert text_of(chunks) == "Hello from Gemini!"
    assert finish_of(chunks) == ["stop"]
    with_usage = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert with_usage == [chunks[-1]] and chunks[-1].choices == []
        usage = chunks[-1].usage
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (9, 6, 15)
        assert usage.completion_tokens_details.reasoning_tokens == 2
    else:
        assert with_usage == []
    assert "stream_options" not in fake.requests[-1].json()


@pytest.mark.parametrize(
    ("gemini_finish", "openai_finish"), [("MAX_TOKENS", "length"), ("SAFETY", "content_filter")]
)
async def test_openai_sdk_to_gemini_finish_reasons(
    oai, fake: FakeUpstream, gemini_finish, openai_finish
):
    fake.push(Json(gemini_reply([{"text": "Once upon"}], gemini_finish)))
    r = await oai.chat.completions.create(model=GEMINI, messages=HI)
    assert r.choices[0].finish_reason == openai_finish
    fake.push(
        Sse(
            gemini_sse(
                [
                    gemini_event([{"text": "Once"}]),
                    gemini_event([{"text": " upon"}], gemini_finish, usage=True),
                ]
            )
        )
    )
    chunks = await collect(
        await oai.chat.completions.create(model=GEMINI, messages=HI, stream=True)
    )
    assert text_of(chunks) == "Once upon"
    assert finish_of(chunks) == [openai_finish]


async def test_openai_sdk_to_gemini_reasoning(oai, fake: FakeUpstream):
    fake.push(Json(gemini_reply([{"text": "Two and two...", "thought": True}, {"text": "4"}])))
    r = await oai.chat.completions.create(model=GEMINI, messages=HI, reasoning_effort="low")
    assert r.choices[0].message.content == "4"
    assert r.choices[0].message.model_extra["reasoning_content"] == "Two and two..."
    config = fake.requests[-1].json()["generationConfig"]
    assert config["thinkingConfig"] == {"thinkingBudget": 1024, "includeThoughts": True}

    fake.push(Sse(gemini_sse([
        gemini_event([{"text": "Two and ", "thought": True}]),
        gemini_event([{"text": "two...", "thought": True}]),
        gemini_event([{"text": "4"}], "STOP", usage=True),
    ])))  # fmt: skip
    chunks = await collect(
        await oai.chat.completions.create(
            model=GEMINI, messages=HI, reasoning_effort="none", stream=True
        )
    )
    reasoning = "".join(
        c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices
    )
    assert reasoning == "Two and two..."
    assert text_of(chunks) == "4"
    assert fake.requests[-1].json()["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 0}


# === 2. Anthropic SDK on /v1/messages -> Anthropic upstream: passed through ==================

CLAUDE_BETA = {"anthropic-version": "2023-06-01", "anthropic-beta": "prompt-caching-2024-07-31"}


async def test_anthropic_sdk_to_anthropic_json_is_passed_through(
    claude, client_sent: Sent, relay: Relay, fake: FakeUpstream
):
    msg = await claude.messages.create(
        model=CLAUDE, max_tokens=100, system="You are terse.", messages=[{"role": "user", "content": "hi"}],
        stop_sequences=["FIN"], extra_headers=CLAUDE_BETA, extra_body={"x_unknown": [1, 2]},
    )  # fmt: skip
    assert msg.id == "msg_fake" and msg.model == "claude-fake"
    assert msg.content[0].text == "Hello from Claude!"
    assert msg.usage.input_tokens == 20 and msg.usage.cache_read_input_tokens == 4
    sent = fake.requests[-1]
    assert (sent.path, sent.query) == ("/v1/messages", "")
    assert sent.body == client_sent.bodies[-1]  # the client's bytes, untouched
    assert_upstream_auth(sent, "anthropic", relay)
    headers = headers_of(sent)
    assert headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert headers["anthropic-version"] == "2023-06-01"


async def test_anthropic_sdk_to_anthropic_forwards_the_clients_version(claude, fake: FakeUpstream):
    await claude.messages.create(
        model=CLAUDE, max_tokens=5, messages=HI, extra_headers={"anthropic-version": "2099-01-01"}
    )
    assert headers_of(fake.requests[-1])["anthropic-version"] == "2099-01-01"


async def test_anthropic_sdk_to_anthropic_model_map_is_the_only_change(
    claude, client_sent: Sent, fake: FakeUpstream
):
    await claude.messages.create(
        model=CLAUDE_ALIAS,
        max_tokens=100,
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"temperature": 0.3},
    )
    client_body = orjson.loads(client_sent.bodies[-1])
    upstream_body = fake.requests[-1].json()
    assert upstream_body["model"] == CLAUDE_MAPPED
    assert upstream_body == {**client_body, "model": CLAUDE_MAPPED}


async def test_anthropic_sdk_to_anthropic_stream_is_byte_identical(
    claude, client_sent: Sent, relay: Relay, fake: FakeUpstream
):
    events = anthropic_stream(["Hel", "lo", " world"])
    fake.push(Sse(events))
    async with claude.messages.with_streaming_response.create(
        model=CLAUDE, max_tokens=100, messages=HI, stream=True, extra_headers=CLAUDE_BETA
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        received = b"".join([chunk async for chunk in response.iter_bytes()])
    assert received == b"".join(events)
    sent = fake.requests[-1]
    assert sent.body == client_sent.bodies[-1]
    assert headers_of(sent)["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert_upstream_auth(sent, "anthropic", relay)

    # and the SDK's own stream helper reads it
    fake.push(Sse(CLAUDE_TOOL_STREAM))
    async with claude.messages.stream(
        model=CLAUDE, max_tokens=100, messages=HI, tools=CLAUDE_TOOLS
    ) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "input", None)) for b in final.content] == [
        ("text", None), ("tool_use", {"city": "Paris"}), ("tool_use", {"tz": "CET"}),
    ]  # fmt: skip
    assert fake.requests[-1].body == client_sent.bodies[-1]


# === 2. Anthropic SDK on /v1/messages -> OpenAI upstream: translated =========================


async def test_anthropic_sdk_to_openai_json(claude, relay: Relay, fake: FakeUpstream):
    fake.push(Json(openai_completion("Bonjour!", model="gpt-4o-mini-2024-07-18")))
    msg = await claude.messages.create(
        model=GPT, max_tokens=300, system="You are terse.", extra_body={"temperature": 0.5}, stop_sequences=["FIN"],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": "iVBORw0KGgo="}}]},
            {"role": "assistant", "content": "A pixel."},
            {"role": "user", "content": "Say hi in French."},
        ],
        metadata={"user_id": "u-42"}, extra_headers=CLAUDE_BETA,
    )  # fmt: skip
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.model == "gpt-4o-mini-2024-07-18"
    assert [(b.type, b.text) for b in msg.content] == [("text", "Bonjour!")]
    assert msg.stop_reason == "end_turn"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (11, 7)

    sent = fake.requests[-1]
    assert (sent.path, sent.query) == ("/v1/chat/completions", "")
    assert_upstream_auth(sent, "openai", relay)  # anthropic-* headers are not for OpenAI
    assert sent.json() == {
        "model": GPT,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                         {"type": "image_url", "image_url": {"url": PNG}}]},
            {"role": "assistant", "content": "A pixel."},
            {"role": "user", "content": "Say hi in French."},
        ],
        "max_tokens": 300,
        "temperature": 0.5,
        "stop": ["FIN"],
        "user": "u-42",
    }  # fmt: skip


OPENAI_TOOL_CALLS = [
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    },
    {
        "id": "call_2",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
    },
]


async def test_anthropic_sdk_to_openai_tools_and_results(claude, fake: FakeUpstream):
    reply = openai_completion("Let me check.", tool_calls=OPENAI_TOOL_CALLS)
    reply["choices"][0]["finish_reason"] = "tool_calls"
    fake.push(Json(reply))
    ask = [{"role": "user", "content": "Weather and time in Paris?"}]
    msg = await claude.messages.create(
        model=GPT, max_tokens=300, messages=ask, tools=CLAUDE_TOOLS, tool_choice={"type": "any"}
    )
    assert msg.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "id", None), getattr(b, "input", None)) for b in msg.content] == [
        ("text", None, None), ("tool_use", "call_1", {"city": "Paris"}), ("tool_use", "call_2", {"tz": "CET"}),
    ]  # fmt: skip
    first = fake.requests[-1].json()
    assert first["tools"] == [WEATHER, TIME]
    assert first["tool_choice"] == "required"

    follow = [
        *ask,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": '{"temp": 21}'},
            {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "12:00"}]},
        ]},
    ]  # fmt: skip
    await claude.messages.create(
        model=GPT, max_tokens=300, messages=follow, tools=CLAUDE_TOOLS,
        tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
    )  # fmt: skip
    second = fake.requests[-1].json()
    assert second["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    assert second["parallel_tool_calls"] is False
    assert second["messages"] == [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"tz":"CET"}'},
                },
            ],
        },  # the input objects serialised again: same JSON, compact
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    ]


async def test_anthropic_sdk_to_openai_stream(claude, fake: FakeUpstream):
    async with claude.messages.stream(model=GPT, max_tokens=300, messages=HI) as stream:
        texts = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(texts) == "Hello from the fake!"
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (11, 7)
    sent = fake.requests[-1].json()
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}  # asked for, to meter and report


async def test_anthropic_sdk_to_openai_stream_tools_and_reasoning(claude, fake: FakeUpstream):
    fake.push(Sse([
        openai_chunk({"role": "assistant", "content": ""}),
        openai_chunk({"reasoning_content": "Hmm."}),
        openai_chunk({"content": "Checking."}),
        openai_chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": ""}}]}),
        openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]}),
        openai_chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                                      "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}]}),
        openai_chunk({}, "tool_calls"),
        openai_chunk(None, usage={"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}),
        b"data: [DONE]\n\n",
    ]))  # fmt: skip
    async with claude.messages.stream(
        model=GPT, max_tokens=20000, messages=HI, tools=CLAUDE_TOOLS,
        thinking={"type": "enabled", "budget_tokens": 10000},
    ) as stream:  # fmt: skip
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert final.content[0].thinking == "Hmm." and final.content[1].text == "Checking."
    assert [(b.id, b.name, b.input) for b in final.content[2:]] == [
        ("call_1", "get_weather", {"city": "Paris"}), ("call_2", "get_time", {"tz": "CET"}),
    ]  # fmt: skip
    assert final.usage.output_tokens == 12
    sent = fake.requests[-1].json()
    assert sent["reasoning_effort"] == "medium"  # a 10000-token budget
    assert sent["tools"] == [WEATHER, TIME]


# === 2. Anthropic SDK on /v1/messages -> Gemini upstream: translated =========================


async def test_anthropic_sdk_to_gemini_json(claude, relay: Relay, fake: FakeUpstream):
    msg = await claude.messages.create(
        model=GEMINI, max_tokens=300, system="You are terse.", stop_sequences=["FIN"],
        messages=[{"role": "user", "content": "hi"}], extra_headers=CLAUDE_BETA,
    )  # fmt: skip
    assert msg.model == "gemini-fake"
    assert [(b.type, b.text) for b in msg.content] == [("text", "Hello from Gemini!")]
    assert msg.stop_reason == "end_turn"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (9, 6)  # output includes thoughts
    sent = fake.requests[-1]
    assert (sent.path, sent.query) == (f"/v1beta/models/{GEMINI}:generateContent", "")
    assert_upstream_auth(sent, "gemini", relay)
    assert sent.json() == {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "systemInstruction": {"parts": [{"text": "You are terse."}]},
        "generationConfig": {"maxOutputTokens": 300, "stopSequences": ["FIN"]},
    }


async def test_anthropic_sdk_to_gemini_images(claude, fake: FakeUpstream):
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
    }
    msg = await claude.messages.create(
        model=GEMINI, max_tokens=300,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}],
    )  # fmt: skip
    assert msg.content[0].text == "Hello from Gemini!"
    assert fake.requests[-1].json()["contents"] == [{"role": "user", "parts": [
        {"text": "What is this?"}, {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
    ]}]  # fmt: skip


async def test_anthropic_sdk_to_gemini_tools(claude, fake: FakeUpstream):
    fake.push(Json(gemini_reply([
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
        {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}},
    ])))  # fmt: skip
    ask = [{"role": "user", "content": "Weather and time in Paris?"}]
    msg = await claude.messages.create(
        model=GEMINI, max_tokens=300, messages=ask, tools=CLAUDE_TOOLS, tool_choice={"type": "auto"}
    )
    assert msg.stop_reason == "tool_use"
    calls = [b for b in msg.content if b.type == "tool_use"]
    assert [(b.name, b.input) for b in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "CET"}),
    ]
    assert fake.requests[-1].json()["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}

    follow = [
        *ask,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": calls[0].id, "content": '{"temp": 21}'},
            {"type": "tool_result", "tool_use_id": calls[1].id, "content": "12:00"},
        ]},
    ]  # fmt: skip
    await claude.messages.create(model=GEMINI, max_tokens=300, messages=follow, tools=CLAUDE_TOOLS)
    assert fake.requests[-1].json()["contents"][1:] == [
        {"role": "model", "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
             "thoughtSignature": "skip_thought_signature_validator"},
            {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}},
        ]},
        {"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
            {"functionResponse": {"name": "get_time", "response": {"content": "12:00"}}},
        ]},
    ]  # fmt: skip


async def test_anthropic_sdk_to_gemini_stream_tools(claude, relay: Relay, fake: FakeUpstream):
    fake.push(Sse(gemini_sse([
        gemini_event([{"text": "Hmm.", "thought": True}]),
        gemini_event([{"text": "Checking."}]),
        gemini_event([
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
            {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}},
        ], "STOP", usage=True),
    ])))  # fmt: skip
    async with claude.messages.stream(
        model=GEMINI, max_tokens=20000, messages=HI, tools=CLAUDE_TOOLS,
        thinking={"type": "enabled", "budget_tokens": 2048},
    ) as stream:  # fmt: skip
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert [(b.name, b.input) for b in final.content[2:]] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"}),
    ]  # fmt: skip
    assert (final.usage.input_tokens, final.usage.output_tokens) == (9, 6)
    sent = fake.requests[-1]
    assert (sent.path, sent.query) == (f"/v1beta/models/{GEMINI}:streamGenerateContent", "alt=sse")
    assert_upstream_auth(sent, "gemini", relay)
    assert sent.json()["generationConfig"]["thinkingConfig"] == {
        "thinkingBudget": 1024,
        "includeThoughts": True,
    }


async def test_anthropic_sdk_to_gemini_stream_text(claude, fake: FakeUpstream):
    async with claude.messages.stream(model=GEMINI, max_tokens=300, messages=HI) as stream:
        texts = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(texts) == "Hello from Gemini!"
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (9, 6)


# === 3. Errors ===============================================================================


def leaky(fake: FakeUpstream, key: str) -> str:
    return f"max_tokens is too large (key {key}, endpoint {fake.url}/v1/messages)"


def assert_scrubbed(text: str, fake: FakeUpstream) -> None:
    assert "CANARY" not in text  # tests.conftest.UPSTREAM_KEY and the keys derived from it
    assert fake.url not in text and "127.0.0.1" not in text


def upstream_400(kind: str, fake: FakeUpstream) -> Json:
    if kind == "anthropic":
        error = {"type": "invalid_request_error", "message": leaky(fake, ANTHROPIC_KEY)}
        return Json({"type": "error", "error": error}, status=400)
    if kind == "gemini":
        error = {"code": 400, "message": leaky(fake, GEMINI_KEY), "status": "INVALID_ARGUMENT"}
        return Json({"error": error}, status=400)
    error = {
        "message": leaky(fake, UPSTREAM_KEY),
        "type": "invalid_request_error",
        "param": None,
        "code": "bad_max",
    }
    return Json({"error": error}, status=400)


MODEL_OF = {"anthropic": CLAUDE, "gemini": GEMINI, "openai": GPT}


@pytest.mark.parametrize(
    ("kind", "code"), [("anthropic", "invalid_request_error"), ("gemini", "invalid_argument")]
)
async def test_upstream_400_reaches_an_openai_client_in_the_openai_shape(
    oai, fake: FakeUpstream, kind, code
):
    fake.push(upstream_400(kind, fake))
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.chat.completions.create(model=MODEL_OF[kind], messages=HI, max_tokens=10**9)
    assert caught.value.status_code == 400
    body = caught.value.response.json()
    assert_scrubbed(caught.value.response.text, fake)
    assert body == {"error": {"message": body["error"]["message"], "type": "invalid_request_error",
                              "param": None, "code": code}}  # fmt: skip
    assert body["error"]["message"].startswith("max_tokens is too large (key [redacted]")
    assert len(fake.requests) == 1  # describes the client's request: not retried


@pytest.mark.parametrize(
    ("kind", "code"), [("anthropic", None), ("openai", "bad_max"), ("gemini", "invalid_argument")]
)
async def test_upstream_400_reaches_an_anthropic_client_in_the_anthropic_shape(
    claude, fake: FakeUpstream, kind, code
):
    fake.push(upstream_400(kind, fake))
    with pytest.raises(anthropic.BadRequestError) as caught:
        await claude.messages.create(model=MODEL_OF[kind], max_tokens=4096, messages=HI)
    assert caught.value.status_code == 400
    assert_scrubbed(caught.value.response.text, fake)
    body = caught.value.response.json()
    error = body["error"]
    assert body == {"type": "error", "error": error}
    assert error["type"] == "invalid_request_error"
    assert error.get("code") == code
    assert error["message"].startswith("max_tokens is too large (key [redacted]")
    assert len(fake.requests) == 1


async def test_relay_errors_on_messages_are_in_the_anthropic_shape(
    claude, relay: Relay, fake: FakeUpstream, http
):
    async with anthropic.AsyncAnthropic(
        base_url=relay.url, api_key="sk-" + "x" * 44, max_retries=0
    ) as stranger:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await stranger.messages.create(model=CLAUDE, max_tokens=5, messages=HI)
    assert caught.value.response.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": "invalid API key", "code": "invalid_api_key"}}  # fmt: skip

    with pytest.raises(anthropic.NotFoundError) as caught:
        await claude.messages.create(model="no-such-model", max_tokens=5, messages=HI)
    error = caught.value.response.json()["error"]
    assert (error["type"], error["code"]) == ("not_found_error", "model_not_found")
    assert caught.value.response.json() == {"type": "error", "error": error}

    with pytest.raises(anthropic.BadRequestError) as caught:
        await claude.messages.create(model=CLAUDE, max_tokens=0, messages=HI)
    error = caught.value.response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_request")
    assert "max_tokens" in error["message"]

    async with http.post(relay.url + "/v1/messages", data=b"{nope",
                         headers={"x-api-key": relay.key, "Content-Type": "application/json"}) as r:  # fmt: skip
        assert r.status == 400
        assert await r.json() == {"type": "error", "error": {
            "type": "invalid_request_error", "message": "request body is not valid JSON", "code": "invalid_json"}}  # fmt: skip
    assert fake.requests == []


def midstream_error(kind: str, fake: FakeUpstream) -> Sse:
    """Content first (past the commit point), then the upstream's own error event."""
    if kind == "anthropic":
        events = claude_sse(
            [({"type": "text", "text": ""}, [{"type": "text_delta", "text": "Hel"}])]
        )[:3]
        error = {"type": "overloaded_error", "message": f"Overloaded ({fake.url}, {ANTHROPIC_KEY})"}
        return Sse([*events, anthropic_event("error", {"type": "error", "error": error})])
    if kind == "gemini":
        error = {
            "code": 500,
            "message": f"Internal ({fake.url}, {GEMINI_KEY})",
            "status": "INTERNAL",
        }
        return Sse(gemini_sse([gemini_event([{"text": "Hel"}]), {"error": error}]))
    error = {"message": f"Internal ({fake.url}/v1, {UPSTREAM_KEY})", "type": "server_error"}
    return Sse([openai_chunk({"role": "assistant", "content": ""}), openai_chunk({"content": "Hel"}),
                b"data: " + orjson.dumps({"error": error}) + b"\n\n"])  # fmt: skip


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.split(b"\n\n"):
        name, data = "", b""
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        if data:
            out.append((name, orjson.loads(data)))
    return out


@pytest.mark.parametrize("kind", ["anthropic", "openai", "gemini"])
async def test_midstream_error_ends_an_anthropic_clients_stream_with_an_error_event(
    claude, fake: FakeUpstream, kind
):
    fake.push(midstream_error(kind, fake))
    async with claude.messages.with_streaming_response.create(
        model=MODEL_OF[kind], max_tokens=100, messages=HI, stream=True
    ) as response:
        assert response.status_code == 200  # committed at the first content
        raw = b"".join([chunk async for chunk in response.iter_bytes()])
    events = sse_events(raw)
    names = [name for name, _ in events]
    assert names[0] == "message_start"
    assert ("content_block_delta", "Hel") in [
        (n, d.get("delta", {}).get("text")) for n, d in events
    ]
    assert "message_stop" not in names
    name, data = events[-1]
    assert name == "error"
    assert data["type"] == "error" and set(data["error"]) >= {"type", "message"}
    assert_scrubbed(raw.decode(), fake)
    if kind != "anthropic":  # translated: the relay's own event, carrying the upstream's text
        assert data["error"]["type"] == "api_error"
        assert data["error"]["message"].startswith("Internal ([redacted]")
    assert len(fake.requests) == 1  # nothing is retried after the commit point

    fake.push(midstream_error(kind, fake))
    with pytest.raises(anthropic.APIStatusError):
        async with claude.messages.stream(
            model=MODEL_OF[kind], max_tokens=100, messages=HI
        ) as stream:
            await stream.get_final_message()


@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
async def test_midstream_error_ends_an_openai_clients_stream(
    oai, relay: Relay, fake: FakeUpstream, http, kind
):
    fake.push(midstream_error(kind, fake))
    body = {"model": MODEL_OF[kind], "messages": HI, "stream": True}
    async with http.post(relay.url + "/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {relay.key}"}) as r:  # fmt: skip
        assert r.status == 200
        raw = await r.read()
    events = sse_events(raw)
    assert [d["choices"][0]["delta"].get("content") for _, d in events[:-1]] == ["", "Hel"]
    assert events[-1][1]["error"]["code"] == "upstream_error"
    assert b"[DONE]" not in raw
    assert_scrubbed(raw.decode(), fake)

    fake.push(midstream_error(kind, fake))
    with pytest.raises(openai.APIError):
        await collect(
            await oai.chat.completions.create(model=MODEL_OF[kind], messages=HI, stream=True)
        )


async def test_a_passed_through_midstream_error_is_scrubbed(claude, fake: FakeUpstream):
    fake.push(midstream_error("anthropic", fake))
    async with claude.messages.with_streaming_response.create(
        model=CLAUDE, max_tokens=100, messages=HI, stream=True
    ) as response:
        raw = b"".join([chunk async for chunk in response.iter_bytes()])
    assert sse_events(raw)[-1][0] == "error"
    assert_scrubbed(raw.decode(), fake)


async def test_a_stream_error_before_content_is_retried_then_scrubbed(claude, fake: FakeUpstream):
    error = {"type": "overloaded_error", "message": f"Overloaded ({fake.url}, {ANTHROPIC_KEY})"}
    failing = Sse(
        [*claude_sse([])[:1], anthropic_event("error", {"type": "error", "error": error})]
    )
    fake.push(failing, failing, failing)
    with pytest.raises(anthropic.APIStatusError) as caught:
        await claude.messages.create(model=CLAUDE, max_tokens=100, messages=HI, stream=True)
    assert len(fake.requests) == 3  # retried invisibly: nothing had reached the client
    assert caught.value.status_code == 502
    assert caught.value.response.json()["error"]["type"] == "api_error"
    assert_scrubbed(caught.value.response.text, fake)


@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
async def test_a_translated_stream_cut_before_its_end_does_not_look_complete(
    oai, claude, relay: Relay, fake: FakeUpstream, http, kind
):
    """A clean EOF before the upstream's finish reason: an error event, not a made-up end."""
    cut = (
        Sse(
            claude_sse([({"type": "text", "text": ""}, [{"type": "text_delta", "text": "Hel"}])])[
                :3
            ]
        )
        if kind == "anthropic"
        else Sse(gemini_sse([gemini_event([{"text": "Hel"}])]))
    )
    fake.push(cut)
    body = {"model": MODEL_OF[kind], "messages": HI, "stream": True}
    async with http.post(relay.url + "/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {relay.key}"}) as r:  # fmt: skip
        raw = await r.read()
    events = sse_events(raw)
    assert text_of_events(events) == "Hel"
    assert events[-1][1]["error"]["message"] == "upstream closed the stream before its end"
    assert b"[DONE]" not in raw and b'"finish_reason":"stop"' not in raw

    fake.push(cut)
    async with claude.messages.with_streaming_response.create(
        model=MODEL_OF[kind], max_tokens=100, messages=HI, stream=True
    ) as response:
        raw = b"".join([chunk async for chunk in response.iter_bytes()])
    names = [name for name, _ in sse_events(raw)]
    assert "message_delta" not in names and "message_stop" not in names
    assert names[-1] == "error"


def text_of_events(events: list[tuple[str, dict[str, Any]]]) -> str:
    return "".join(
        (d["choices"][0]["delta"].get("content") or "") for _, d in events if d.get("choices")
    )


# === 4. Metering, per direction ================================================================

# Prices from tests.conftest.relay_dict, USD per 1M tokens.
# claude-*: input 3, output 15, cached_input 0.3, cache_write 3.75. The fake's Anthropic usage:
# input 20, cache read 4, cache creation 2, output 5 -> prompt 26, cached 4, completion 5.
CLAUDE_COST = (20 * 3 + 4 * 0.3 + 2 * 3.75 + 5 * 15) / 1e6
# gemini-*: input 1, output 2. The fake's usageMetadata: prompt 9, candidates 4, thoughts 2
# -> completion 6 (thoughts are completion tokens).
GEMINI_COST = (9 * 1 + (4 + 2) * 2) / 1e6
# gpt-4o-mini: input 0.15, output 0.60, cached_input 0.075; usage 11 prompt of which 4 cached, 7 out.
GPT_USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
             "prompt_tokens_details": {"cached_tokens": 4}}  # fmt: skip
GPT_COST = ((11 - 4) * 0.15 + 4 * 0.075 + 7 * 0.60) / 1e6

PRICES = {
    "claude": Price(input=3, output=15, cached_input=0.3, cache_write=3.75),
    "gemini": Price(input=1, output=2),
    "gpt": Price(input=0.15, output=0.60, cached_input=0.075),
}


async def _request(client: str, kind: str, stream: bool, oai, claude, fake: FakeUpstream) -> None:
    model = MODEL_OF[kind]
    if kind == "openai":
        if stream:
            fake.push(Sse([openai_chunk({"role": "assistant", "content": ""}, usage=None),
                           openai_chunk({"content": "Hi"}, usage=None), openai_chunk({}, "stop", usage=None),
                           openai_chunk(None, usage=GPT_USAGE), b"data: [DONE]\n\n"]))  # fmt: skip
        else:
            fake.push(Json({**openai_completion("Hi"), "usage": GPT_USAGE}))
    if client == "openai":
        if stream:
            await collect(await oai.chat.completions.create(model=model, messages=HI, stream=True))
        else:
            await oai.chat.completions.create(model=model, messages=HI)
    elif stream:
        async with claude.messages.stream(model=model, max_tokens=100, messages=HI) as s:
            await s.get_final_message()
    else:
        await claude.messages.create(model=model, max_tokens=100, messages=HI)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("client", "kind", "tokens", "cost", "price", "cache_write"),
    [
        ("openai", "anthropic", (26, 5, 4), CLAUDE_COST, "claude", 2),
        ("openai", "gemini", (9, 6, 0), GEMINI_COST, "gemini", 0),
        ("anthropic", "anthropic", (26, 5, 4), CLAUDE_COST, "claude", 2),
        ("anthropic", "openai", (11, 7, 4), GPT_COST, "gpt", 0),
        ("anthropic", "gemini", (9, 6, 0), GEMINI_COST, "gemini", 0),
    ],
)
async def test_metering_per_direction(
    oai,
    claude,
    relay: Relay,
    fake: FakeUpstream,
    client,
    kind,
    tokens,
    cost,
    price,
    cache_write,
    stream,
):
    await _request(client, kind, stream, oai, claude, fake)
    await relay.settle()
    (row,) = ledger_rows(relay)
    endpoint = "/v1/chat/completions" if client == "openai" else "/v1/messages"
    assert (row["model"], row["upstream"], row["endpoint"]) == (
        MODEL_OF[kind],
        f"fake-{kind}",
        endpoint,
    )
    assert (row["status"], row["attempts"], row["estimated"]) == (200, 1, 0)
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == tokens
    assert row["cost_usd"] == pytest.approx(cost, rel=1e-12)
    prompt, completion, cached = tokens
    usage = Usage(prompt=prompt, completion=completion, cached=cached, cache_write=cache_write)
    assert cost_usd(PRICES[price], usage) == pytest.approx(cost, rel=1e-12)  # the cross-check


async def test_metering_gemini_cached_content_is_priced_at_input(
    oai, relay: Relay, fake: FakeUpstream
):
    """gemini-* has no cached_input price: cached tokens cost the input price (SPEC §4)."""
    fake.push(
        Json(gemini_reply([{"text": "Hi"}], cachedContentTokenCount=5, toolUsePromptTokenCount=3))
    )
    r = await oai.chat.completions.create(model=GEMINI, messages=HI)
    # prompt = promptTokenCount 9 + toolUsePromptTokenCount 3; completion = 4 + thoughts 2
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (12, 6)
    assert r.usage.prompt_tokens_details.cached_tokens == 5
    await relay.settle()
    (row,) = ledger_rows(relay)
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (12, 6, 5)
    assert row["cost_usd"] == pytest.approx(((12 - 5) * 1 + 5 * 1 + 6 * 2) / 1e6, rel=1e-12)


# === 5. Byte boundaries end to end ===============================================================

GEMINI_RICH_STREAM = gemini_sse([
    gemini_event([{"text": "Hmm, ", "thought": True}]),
    gemini_event([{"text": "weather.", "thought": True}]),
    gemini_event([{"text": "Checking "}]),
    gemini_event([{"text": "é€😀 now."}]),  # multi-byte UTF-8, split mid-character below
    gemini_event([
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2lnMQ=="},
        {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}},
    ], "STOP", usage=True),
])  # fmt: skip
CLAUDE_RICH_STREAM = claude_sse(
    [
        ({"type": "thinking", "thinking": "", "signature": ""},
         [{"type": "thinking_delta", "thinking": "Hmm, "}, {"type": "thinking_delta", "thinking": "weather."},
          {"type": "signature_delta", "signature": "sig"}]),
        ({"type": "text", "text": ""},
         [{"type": "text_delta", "text": "Checking "}, {"type": "text_delta", "text": "é€😀 now."}]),
        ({"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
         [{"type": "input_json_delta", "partial_json": '{"city":'},
          {"type": "input_json_delta", "partial_json": ' "Paris"}'}]),
        ({"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
         [{"type": "input_json_delta", "partial_json": '{"tz": "CET"}'}]),
    ],
    "tool_use",
)  # fmt: skip


def pieces(events: list[bytes], size: int) -> list[bytes]:
    whole = b"".join(events)
    return [whole[i : i + size] for i in range(0, len(whole), size)]


def normalised_chunks(chunks: list[Any]) -> list[dict[str, Any]]:
    """The client-visible chunks without what differs per response (ids, timestamps)."""
    out = []
    for chunk in chunks:
        dumped = chunk.model_dump(exclude={"id", "created"})
        for choice in dumped["choices"]:
            for call in choice["delta"].get("tool_calls") or ():
                call["id"] = "ID" if call.get("id") else None
        out.append(dumped)
    return out


def normalised_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = sse_events(raw)
    for name, data in events:
        if name == "message_start":
            data["message"]["id"] = "ID"
        if name == "content_block_start" and data["content_block"].get("type") == "tool_use":
            data["content_block"]["id"] = "ID"
    return events


def split_ways(events: list[bytes]) -> list[Sse]:
    """The stream whole, in 1-byte and in 7-byte pieces. The pause between pieces matters:
    without it TCP hands the relay the whole stream in one or two reads; with it the relay
    really reads 1 and 7 bytes at a time."""
    return [Sse(events), Sse(pieces(events, 1), delay=0.0001), Sse(pieces(events, 7), delay=0.0001)]


@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
async def test_streams_split_at_any_byte_translate_the_same_for_openai_clients(
    oai, relay: Relay, fake: FakeUpstream, kind
):
    events = CLAUDE_RICH_STREAM if kind == "anthropic" else GEMINI_RICH_STREAM
    asks = {"messages": HI, "stream": True, "stream_options": {"include_usage": True},
            "tools": [WEATHER, TIME], "reasoning_effort": "low"}  # fmt: skip
    results = []
    for sse in split_ways(events):
        fake.push(sse)
        chunks = await collect(await oai.chat.completions.create(model=MODEL_OF[kind], **asks))
        results.append(normalised_chunks(chunks))
    whole, one, seven = results
    assert one == whole and seven == whole
    assert text_of_dumps(whole) == "Checking é€😀 now."
    assert [c["function"]["name"] for d in whole if d["choices"]
            for c in d["choices"][0]["delta"].get("tool_calls") or () if c["function"]["name"]] == ["get_weather", "get_time"]  # fmt: skip
    assert whole[-1]["usage"] is not None and whole[-1]["choices"] == []
    assert len(fake.requests) == 3  # one try each: the first content committed every time
    await relay.settle()
    assert (
        len(
            {
                (r["prompt_tokens"], r["completion_tokens"], r["estimated"])
                for r in ledger_rows(relay)
            }
        )
        == 1
    )


async def test_a_gemini_stream_split_at_any_byte_translates_the_same_for_anthropic_clients(
    claude, relay: Relay, fake: FakeUpstream
):
    results = []
    for sse in split_ways(GEMINI_RICH_STREAM):
        fake.push(sse)
        async with claude.messages.with_streaming_response.create(
            model=GEMINI, max_tokens=20000, messages=HI, stream=True, tools=CLAUDE_TOOLS
        ) as response:
            raw = b"".join([chunk async for chunk in response.iter_bytes()])
        results.append(normalised_events(raw))
    whole, one, seven = results
    assert one == whole and seven == whole
    names = [name for name, _ in whole]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert len(fake.requests) == 3
    await relay.settle()
    assert {
        (r["prompt_tokens"], r["completion_tokens"], r["estimated"]) for r in ledger_rows(relay)
    } == {(9, 6, 0)}


async def test_an_anthropic_stream_split_at_any_byte_passes_through_unchanged(
    claude, relay: Relay, fake: FakeUpstream
):
    for sse in split_ways(CLAUDE_RICH_STREAM):
        fake.push(sse)
        async with claude.messages.with_streaming_response.create(
            model=CLAUDE, max_tokens=20000, messages=HI, stream=True, tools=CLAUDE_TOOLS
        ) as response:
            raw = b"".join([chunk async for chunk in response.iter_bytes()])
        assert raw == b"".join(CLAUDE_RICH_STREAM)
    assert len(fake.requests) == 3  # one try each
    await relay.settle()
    assert {
        (r["prompt_tokens"], r["completion_tokens"], r["estimated"]) for r in ledger_rows(relay)
    } == {(26, 5, 0)}


def text_of_dumps(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


GEMINI_BLOCKED = {"promptFeedback": {"blockReason": "SAFETY"},
                  "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9}}  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "stream", "refusal"),
    [
        ("gemini", False, Json(GEMINI_BLOCKED)),
        ("gemini", True, Sse(gemini_sse([GEMINI_BLOCKED]))),
        ("anthropic", False, Json(claude_reply([], "refusal"))),
    ],
    ids=["gemini-json", "gemini-stream", "anthropic-json"],
)
async def test_a_safety_refusal_is_an_answer_not_a_failure(
    oai, fake: FakeUpstream, kind, stream, refusal
):
    fake.push(refusal)  # the next try would get the fake's default answer
    if stream:
        chunks = await collect(
            await oai.chat.completions.create(model=MODEL_OF[kind], messages=HI, stream=True)
        )
        assert (text_of(chunks), finish_of(chunks)) == ("", ["content_filter"])
    else:
        r = await oai.chat.completions.create(model=MODEL_OF[kind], messages=HI)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("", "content_filter")
    assert len(fake.requests) == 1

"""OpenAI <-> Anthropic translation: goldens from the providers' documented shapes, SSE
streams cut at every byte, round trips, usage and cost, and the thinking rules."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from edgeproxy.config import Price
from edgeproxy.dialects import anthropic
from edgeproxy.dialects.openai import RAW_ARGUMENTS_KEY, carries_content
from edgeproxy.usage import Usage, cost_usd
from tests.dialect_support import assert_same_for_every_split, load, normalise, raw, scan

MODEL = "claude-sonnet-4-5-20250929"


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "claude", "messages": list(messages), **fields}


USER = {"role": "user", "content": "hi"}


# --- OpenAI request -> Anthropic request ---------------------------------------------------


@pytest.mark.parametrize(
    ("source", "golden"),
    [
        ("openai_request.json", "anthropic_request_from_openai.json"),
        ("openai_request_reasoning.json", "anthropic_request_from_openai_reasoning.json"),
    ],
)
def test_request_from_openai_matches_golden(source: str, golden: str) -> None:
    assert anthropic.request_from_openai(load(source), MODEL) == load(golden)


def test_max_tokens_defaults_when_absent() -> None:
    out = anthropic.request_from_openai(chat(USER), MODEL)
    assert out["max_tokens"] == anthropic.DEFAULT_MAX_TOKENS
    assert anthropic.request_from_openai(chat(USER, max_tokens=77), MODEL)["max_tokens"] == 77


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    body = chat(USER, max_tokens=10, max_completion_tokens=20)
    assert anthropic.request_from_openai(body, MODEL)["max_tokens"] == 20


def test_system_parts_keep_blocks_and_cache_control() -> None:
    system = {
        "role": "system",
        "content": [{"type": "text", "text": "rules", "cache_control": {"type": "ephemeral"}}],
    }
    out = anthropic.request_from_openai(chat(system, USER), MODEL)
    assert out["system"] == [
        {"type": "text", "text": "rules", "cache_control": {"type": "ephemeral"}}
    ]
    assert out["messages"] == [{"role": "user", "content": "hi"}]


def test_consecutive_same_role_messages_merge() -> None:
    body = chat(
        USER,
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "a"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "b"},
    )
    assert anthropic.request_from_openai(body, MODEL)["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "again"}],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        },
    ]


def test_pdf_file_part_becomes_document_block() -> None:
    part = {
        "type": "file",
        "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBE"},
    }
    out = anthropic.request_from_openai(chat({"role": "user", "content": [part]}), MODEL)
    assert out["messages"][0]["content"] == [
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
        }
    ]


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
        (None, None, None),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ],
)
def test_tool_choice(choice: object, parallel: object, expected: object) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    fields: dict[str, Any] = {"tools": tools}
    if choice is not None:
        fields["tool_choice"] = choice
    if parallel is not None:
        fields["parallel_tool_calls"] = parallel
    out = anthropic.request_from_openai(chat(USER, **fields), MODEL)
    assert out.get("tool_choice") == expected


def test_tool_choice_without_tools_is_dropped() -> None:
    out = anthropic.request_from_openai(chat(USER, tool_choice="required"), MODEL)
    assert "tool_choice" not in out and "tools" not in out


def test_temperature_is_clamped_to_anthropics_range() -> None:
    assert anthropic.request_from_openai(chat(USER, temperature=2), MODEL)["temperature"] == 1.0
    assert anthropic.request_from_openai(chat(USER, temperature=0.3), MODEL)["temperature"] == 0.3


@pytest.mark.parametrize("effort", ["minimal", "none", "bogus"])
def test_low_or_unknown_effort_means_no_thinking(effort: str) -> None:
    out = anthropic.request_from_openai(chat(USER, reasoning_effort=effort), MODEL)
    assert "thinking" not in out and out["max_tokens"] == anthropic.DEFAULT_MAX_TOKENS


def test_thinking_budget_fits_under_the_clients_cap() -> None:
    out = anthropic.request_from_openai(chat(USER, reasoning_effort="high", max_tokens=5000), MODEL)
    assert out["thinking"] == {"type": "enabled", "budget_tokens": 4999}
    assert out["max_tokens"] == 5000


def test_thinking_dropped_when_cap_leaves_no_room() -> None:
    out = anthropic.request_from_openai(chat(USER, reasoning_effort="low", max_tokens=1024), MODEL)
    assert "thinking" not in out


def test_thinking_without_cap_adds_answer_room() -> None:
    out = anthropic.request_from_openai(chat(USER, reasoning_effort="high", top_p=0.97), MODEL)
    assert out["thinking"]["budget_tokens"] == anthropic.THINKING_BUDGETS["high"]
    assert out["max_tokens"] == anthropic.THINKING_BUDGETS["high"] + anthropic.DEFAULT_MAX_TOKENS
    assert out["top_p"] == 0.97  # within the range Anthropic accepts with thinking


def test_thinking_dropped_when_a_tool_is_forced() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    body = chat(USER, tools=tools, tool_choice="required", reasoning_effort="high")
    assert "thinking" not in anthropic.request_from_openai(body, MODEL)


def test_thinking_dropped_mid_tool_loop() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = chat(
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        reasoning_effort="high",
    )
    assert "thinking" not in anthropic.request_from_openai(body, MODEL)


def test_json_object_becomes_a_system_instruction() -> None:
    body = chat(USER, response_format={"type": "json_object"})
    assert anthropic.request_from_openai(body, MODEL)["system"] == anthropic.JSON_INSTRUCTION


def test_dropped_fields_do_not_leak() -> None:
    body = chat(USER, n=3, logprobs=True, top_logprobs=2, seed=1, presence_penalty=1.5, store=True)
    out = anthropic.request_from_openai(body, MODEL)
    assert set(out) == {"model", "max_tokens", "messages"}


def test_empty_arguments_are_an_empty_object() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
    out = anthropic.request_from_openai(
        chat(USER, {"role": "assistant", "tool_calls": [call]}), MODEL
    )
    assert out["messages"][1]["content"][0]["input"] == {}


# --- round trips ---------------------------------------------------------------------------


def test_openai_request_survives_a_round_trip_through_anthropic() -> None:
    original = load("openai_request.json")
    back = anthropic.request_to_openai(anthropic.request_from_openai(original, MODEL))
    roles = [m["role"] for m in back["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool"]
    assert (
        back["messages"][0]["content"] == "You are a weather assistant.\n\nAnswer in one sentence."
    )
    user_parts = back["messages"][1]["content"]
    assert [p["type"] for p in user_parts] == ["text", "image_url", "image_url", "text"]
    assert user_parts[1]["image_url"]["url"] == "data:image/png;base64,iVBORw0KGgo="
    assert user_parts[2]["image_url"]["url"] == "https://example.com/paris.jpg"
    calls = back["messages"][2]["tool_calls"]
    assert [c["id"] for c in calls] == ["call_abc", "call_def"]
    assert orjson.loads(calls[0]["function"]["arguments"]) == {"location": "Paris, France"}
    # invalid JSON went over as RAW_ARGUMENTS_KEY and comes back byte for byte
    assert (
        calls[1]["function"]["arguments"]
        == original["messages"][4]["tool_calls"][1]["function"]["arguments"]
    )
    assert back["messages"][3] == {
        "role": "tool",
        "tool_call_id": "call_abc",
        "content": original["messages"][5]["content"],
    }
    assert [t["function"]["name"] for t in back["tools"]] == ["get_weather", "get_time"]
    assert (
        back["tools"][0]["function"]["parameters"] == original["tools"][0]["function"]["parameters"]
    )
    assert back["tool_choice"] == "auto" and back["parallel_tool_calls"] is False
    assert back["stop"] == original["stop"]
    assert back["user"] == original["user"]
    assert back["max_tokens"] == original["max_completion_tokens"]


def test_raw_arguments_key_is_used_for_invalid_json() -> None:
    request = load("anthropic_request_from_openai.json")
    assert request["messages"][1]["content"][1]["input"] == {
        RAW_ARGUMENTS_KEY: '{"timezone": "Europe/Paris"'
    }


# --- Anthropic response -> OpenAI ----------------------------------------------------------


def test_response_to_openai_matches_golden() -> None:
    out = anthropic.response_to_openai(load("anthropic_response.json"), "claude-sonnet-4-5")
    assert normalise(out) == load("openai_response_from_anthropic.json")


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        ("model_context_window_exceeded", "length"),
    ],
)
def test_finish_reasons(stop_reason: str, finish: str) -> None:
    body = {"content": [{"type": "text", "text": "x"}], "stop_reason": stop_reason, "usage": {}}
    assert anthropic.response_to_openai(body, MODEL)["choices"][0]["finish_reason"] == finish


def test_response_model_falls_back_to_the_requested_name() -> None:
    body = {"content": [], "stop_reason": "end_turn"}
    out = anthropic.response_to_openai(body, "claude-x")
    assert out["model"] == "claude-x"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": ""}


# --- usage and cost ------------------------------------------------------------------------


def test_usage_normalised_per_spec() -> None:
    usage = anthropic.usage_from(load("anthropic_response.json")["usage"])
    assert usage == Usage(prompt=472 + 2048 + 100, completion=89, cached=2048, cache_write=100)


def test_cost_prices_cache_reads_and_writes() -> None:
    usage = anthropic.usage_from(
        {
            "input_tokens": 1_000_000,
            "cache_read_input_tokens": 2_000_000,
            "cache_creation_input_tokens": 1_000_000,
            "output_tokens": 1_000_000,
        }
    )
    price = Price(input=3, output=15, cached_input=0.3, cache_write=3.75)
    assert cost_usd(price, usage) == pytest.approx(3 + 0.6 + 3.75 + 15)


# --- Anthropic stream -> OpenAI chunks -------------------------------------------------------


def _to_openai(events: list[tuple[str, bytes]], include_usage: bool = True) -> list[dict[str, Any]]:
    translator = anthropic.StreamToOpenAI("claude-sonnet-4-5", include_usage)
    chunks: list[dict[str, Any]] = []
    for name, data in events:
        chunks += translator.feed(name, orjson.loads(data))
    return chunks


def test_stream_to_openai_golden_at_every_split() -> None:
    expected = load("openai_chunks_from_anthropic_stream.json")
    assert_same_for_every_split(raw("anthropic_stream.sse"), _to_openai, expected)


def test_stream_to_openai_state() -> None:
    translator = anthropic.StreamToOpenAI("claude", include_usage=False)
    chunks: list[dict[str, Any]] = []
    for name, data in scan([raw("anthropic_stream.sse")]):
        chunks += translator.feed(name, orjson.loads(data))
        if name == "message_start":
            assert not translator.content_seen
            assert translator.usage == Usage(
                prompt=2620, completion=2, cached=2048, cache_write=100
            )
    assert translator.content_seen
    assert translator.usage == Usage(prompt=2620, completion=89, cached=2048, cache_write=100)
    assert all(chunk["choices"] for chunk in chunks)  # no usage-only chunk
    assert not carries_content(chunks[0]) and carries_content(chunks[1])
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"


def test_stream_ping_and_unknown_events_yield_nothing() -> None:
    translator = anthropic.StreamToOpenAI("claude", include_usage=True)
    assert translator.feed("ping", {"type": "ping"}) == []
    assert translator.feed("future_event", {"type": "future_event"}) == []
    assert translator.usage is None


def test_stream_error_event_raises() -> None:
    translator = anthropic.StreamToOpenAI("claude", include_usage=True)
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(anthropic.UpstreamStreamError) as caught:
        translator.feed("error", error)
    assert caught.value.message == "Overloaded" and caught.value.type == "overloaded_error"


# --- Anthropic request (Claude clients) -> OpenAI --------------------------------------------


def test_request_to_openai_matches_golden() -> None:
    assert anthropic.request_to_openai(load("anthropic_request.json")) == load(
        "openai_request_from_anthropic.json"
    )


@pytest.mark.parametrize(
    ("thinking", "effort"),
    [
        ({"type": "enabled", "budget_tokens": 1024}, "low"),
        ({"type": "enabled", "budget_tokens": 8000}, "medium"),
        ({"type": "enabled", "budget_tokens": 31999}, "high"),
        ({"type": "disabled"}, None),
        ({"type": "adaptive"}, None),
    ],
)
def test_thinking_budget_to_effort(thinking: dict[str, Any], effort: str | None) -> None:
    body = {"model": "m", "max_tokens": 10, "messages": [USER], "thinking": thinking}
    assert anthropic.request_to_openai(body).get("reasoning_effort") == effort


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
    ],
)
def test_tool_choice_back_to_openai(choice: dict[str, Any], expected: object) -> None:
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [USER],
        "tools": tools,
        "tool_choice": choice,
    }
    out = anthropic.request_to_openai(body)
    assert out["tool_choice"] == expected and "parallel_tool_calls" not in out


def test_tool_result_images_move_to_the_next_user_message() -> None:
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
    }
    result = {
        "type": "tool_result",
        "tool_use_id": "t1",
        "content": [{"type": "text", "text": "shot"}, image],
    }
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [result]}]}
    assert anthropic.request_to_openai(body)["messages"] == [
        {"role": "tool", "tool_call_id": "t1", "content": "shot"},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}],
        },
    ]


def test_non_streaming_request_asks_for_no_stream_options() -> None:
    out = anthropic.request_to_openai({"model": "m", "max_tokens": 5, "messages": [USER]})
    assert "stream" not in out and "stream_options" not in out


# --- OpenAI response -> Anthropic --------------------------------------------------------------


def test_response_from_openai_matches_golden() -> None:
    out = anthropic.response_from_openai(load("openai_response.json"), "gpt-4o")
    assert normalise(out) == load("anthropic_response_from_openai.json")


@pytest.mark.parametrize(
    ("finish", "stop_reason"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("content_filter", "refusal"),
        (None, "end_turn"),
    ],
)
def test_stop_reasons_back(finish: str | None, stop_reason: str) -> None:
    body = {"id": "x", "choices": [{"message": {"content": "hi"}, "finish_reason": finish}]}
    assert anthropic.response_from_openai(body, "m")["stop_reason"] == stop_reason


# --- OpenAI chunks -> Anthropic stream ---------------------------------------------------------


def _from_openai(events: list[tuple[str, bytes]]) -> list[Any]:
    translator = anthropic.StreamFromOpenAI("gpt-4o")
    out: list[tuple[str, dict[str, Any]]] = []
    for _, data in events:
        out += translator.finish() if data == b"[DONE]" else translator.feed(orjson.loads(data))
    return [list(event) for event in out]


def test_stream_from_openai_golden_at_every_split() -> None:
    expected = load("anthropic_events_from_openai_stream.json")
    assert_same_for_every_split(raw("openai_stream.sse"), _from_openai, expected)


def test_stream_from_openai_waits_for_usage_then_stops_once() -> None:
    translator = anthropic.StreamFromOpenAI("gpt-4o")
    delta = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
    names = [name for name, _ in translator.feed(delta) + translator.feed(finish)]
    assert names == ["message_start", "content_block_start", "content_block_delta"]
    tail = translator.feed({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}})
    assert [name for name, _ in tail] == ["content_block_stop", "message_delta", "message_stop"]
    assert tail[1][1]["delta"]["stop_reason"] == "max_tokens"
    assert tail[1][1]["usage"]["input_tokens"] == 9 and tail[1][1]["usage"]["output_tokens"] == 4
    assert translator.finish() == [] and translator.usage == Usage(prompt=9, completion=4)


def test_stream_from_openai_finish_without_any_chunk_is_a_whole_message() -> None:
    events = anthropic.StreamFromOpenAI("gpt-4o").finish()
    assert [name for name, _ in events] == ["message_start", "message_delta", "message_stop"]


def test_stream_from_openai_whole_tool_calls_in_one_chunk() -> None:
    calls = [
        {"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"index": 1, "id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    translator = anthropic.StreamFromOpenAI("gemini")
    events = translator.feed({"choices": [{"index": 0, "delta": {"tool_calls": calls}}]})
    starts = [d["content_block"]["id"] for n, d in events if n == "content_block_start"]
    assert starts == ["a", "b"] and translator.content_seen


def test_stream_from_openai_error_chunk_raises() -> None:
    with pytest.raises(anthropic.UpstreamStreamError):
        anthropic.StreamFromOpenAI("m").feed({"error": {"message": "boom", "type": "server_error"}})


# --- error bodies ----------------------------------------------------------------------------


def test_error_to_openai() -> None:
    assert orjson.loads(anthropic.error_to_openai(raw("anthropic_error.json")) or b"") == {
        "error": {
            "message": "Overloaded",
            "type": "server_error",
            "param": None,
            "code": "overloaded_error",
        }
    }


def test_error_from_openai() -> None:
    assert orjson.loads(anthropic.error_from_openai(raw("openai_error.json")) or b"") == {
        "type": "error",
        "error": {
            "type": "rate_limit_error",
            "message": load("openai_error.json")["error"]["message"],
            "code": "rate_limit_exceeded",
        },
    }


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"detail": "x"}'])
def test_unparseable_errors_give_none(body: bytes) -> None:
    assert anthropic.error_to_openai(body) is None and anthropic.error_from_openai(body) is None

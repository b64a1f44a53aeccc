"""OpenAI <-> Gemini translation: goldens from the documented shapes, the SSE stream cut at
every byte, schema cleaning, thought signatures, usage and cost, errors."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from edgeproxy.config import Price
from edgeproxy.dialects import gemini
from edgeproxy.dialects.openai import carries_content
from edgeproxy.usage import Usage, cost_usd
from tests.dialect_support import assert_same_for_every_split, load, normalise, raw, scan

MODEL = "gemini-2.5-flash"
USER = {"role": "user", "content": "hi"}
FETCHED = {"https://example.com/paris.jpg": ("image/jpeg", b"\xff\xd8\xff\xe0JFIF")}


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "gemini", "messages": list(messages), **fields}


# --- request ---------------------------------------------------------------------------------


def test_image_urls_lists_http_urls_once_and_skips_data_urls() -> None:
    body = load("openai_request.json")
    body["messages"].append(
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": "https://example.com/paris.jpg"}],
        }
    )
    assert gemini.image_urls(body) == ["https://example.com/paris.jpg"]
    assert gemini.image_urls(chat(USER)) == []


@pytest.mark.parametrize(
    ("source", "golden", "images"),
    [
        ("openai_request.json", "gemini_request_from_openai.json", FETCHED),
        ("openai_request_reasoning.json", "gemini_request_from_openai_reasoning.json", None),
    ],
)
def test_request_from_openai_matches_golden(
    source: str, golden: str, images: dict[str, tuple[str, bytes]] | None
) -> None:
    assert gemini.request_from_openai(load(source), MODEL, images) == load(golden)


def test_unfetched_image_url_falls_back_to_file_data() -> None:
    part = {"type": "image_url", "image_url": {"url": "https://cdn.example.com/a/b.webp?x=1"}}
    out = gemini.request_from_openai(chat({"role": "user", "content": [part]}), MODEL)
    assert out["contents"][0]["parts"] == [
        {"fileData": {"mimeType": "image/webp", "fileUri": "https://cdn.example.com/a/b.webp?x=1"}}
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"mode": "AUTO"}),
        ("required", {"mode": "ANY"}),
        ("none", {"mode": "NONE"}),
        (
            {"type": "function", "function": {"name": "f"}},
            {"mode": "ANY", "allowedFunctionNames": ["f"]},
        ),
    ],
)
def test_tool_choice(choice: object, expected: dict[str, Any]) -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    out = gemini.request_from_openai(chat(USER, tools=tools, tool_choice=choice), MODEL)
    assert out["toolConfig"] == {"functionCallingConfig": expected}
    assert out["tools"] == [{"functionDeclarations": [{"name": "f"}]}]


@pytest.mark.parametrize(
    ("effort", "config"),
    [
        ("none", {"thinkingBudget": 0}),
        ("minimal", {"thinkingBudget": 512, "includeThoughts": True}),
        ("high", {"thinkingBudget": 24576, "includeThoughts": True}),
    ],
)
def test_reasoning_effort(effort: str, config: dict[str, Any]) -> None:
    out = gemini.request_from_openai(chat(USER, reasoning_effort=effort), MODEL)
    assert out["generationConfig"]["thinkingConfig"] == config


def test_json_object_sets_the_mime_type_only() -> None:
    out = gemini.request_from_openai(chat(USER, response_format={"type": "json_object"}), MODEL)
    assert out["generationConfig"] == {"responseMimeType": "application/json"}


def test_dropped_fields_do_not_leak() -> None:
    body = chat(
        USER, user="u", logprobs=True, presence_penalty=1.5, parallel_tool_calls=False, stream=True
    )
    assert gemini.request_from_openai(body, MODEL) == {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}]
    }


def test_clean_schema() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "kind": {"const": "a", "type": "string"},
            "ref": {
                "$ref": "#/definitions/Item",
                "description": "dropped: $ref allows no siblings",
            },
            "list": {"type": "array", "items": {"type": "string", "minLength": 1}},
            "either": {"anyOf": [{"type": "string", "pattern": "x"}, {"type": "null"}]},
        },
        "definitions": {
            "Item": {"type": "object", "additionalProperties": {"type": "integer", "default": 1}}
        },
        "default": {},
    }
    assert gemini.clean_schema(schema) == {
        "type": "object",
        "properties": {
            "kind": {"type": "string", "enum": ["a"]},
            "ref": {"$ref": "#/$defs/Item"},
            "list": {"type": "array", "items": {"type": "string"}},
            "either": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "$defs": {"Item": {"type": "object", "additionalProperties": {"type": "integer"}}},
    }


def test_function_response_name_and_non_json_content() -> None:
    call = {"id": "c9", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    body = chat(
        USER,
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c9", "content": [{"type": "text", "text": "[1, 2]"}]},
    )
    parts = gemini.request_from_openai(body, MODEL)["contents"][2]["parts"]
    assert parts == [{"functionResponse": {"name": "lookup", "response": {"content": "[1, 2]"}}}]


def test_thought_signature_round_trips_through_a_client() -> None:
    response = gemini.response_to_openai(load("gemini_response.json"), MODEL)
    message = response["choices"][0]["message"]
    history = chat(
        USER,
        {"role": "assistant", "content": message["content"], "tool_calls": message["tool_calls"]},
    )
    parts = gemini.request_from_openai(history, MODEL)["contents"][1]["parts"]
    assert parts[0] == {"text": "I will look up the weather in Paris."}
    assert parts[1]["thoughtSignature"] == "CiQB0e2Kb6hPAnVwqyJb"
    assert "thoughtSignature" not in parts[2]  # only the first parallel call carries one
    assert parts[1]["functionCall"] == {
        "name": "get_weather",
        "args": {"location": "Paris, France", "unit": "celsius"},
    }


# --- response --------------------------------------------------------------------------------


def test_response_to_openai_matches_golden() -> None:
    out = gemini.response_to_openai(load("gemini_response.json"), MODEL)
    assert normalise(out) == load("openai_response_from_gemini.json")


def test_blocked_prompt_is_a_content_filter_choice() -> None:
    out = gemini.response_to_openai(load("gemini_response_blocked.json"), "gemini-x")
    assert out["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": "content_filter",
        }
    ]
    assert out["usage"]["prompt_tokens"] == 12 and out["model"] == MODEL


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("MALFORMED_FUNCTION_CALL", "stop"),
        ("OTHER", "stop"),
    ],
)
def test_finish_reasons(reason: str, finish: str) -> None:
    body = {"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": reason}]}
    assert gemini.response_to_openai(body, MODEL)["choices"][0]["finish_reason"] == finish


def test_candidates_become_choices() -> None:
    body = {
        "candidates": [
            {"content": {"parts": [{"text": "a"}]}, "finishReason": "STOP", "index": 0},
            {"content": {"parts": [{"text": "b"}]}, "finishReason": "MAX_TOKENS", "index": 1},
        ]
    }
    choices = gemini.response_to_openai(body, MODEL)["choices"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in choices] == [
        (0, "a", "stop"),
        (1, "b", "length"),
    ]


# --- usage and cost --------------------------------------------------------------------------


def test_usage_counts_thoughts_as_completion() -> None:
    usage = gemini.usage_from(load("gemini_response.json")["usageMetadata"])
    assert usage == Usage(prompt=57, completion=21 + 58, cached=32)
    price = Price(input=0.3, output=2.5, cached_input=0.03)
    expected = (25 * 0.3 + 32 * 0.03 + 79 * 2.5) / 1_000_000
    assert cost_usd(price, usage) == pytest.approx(expected)


def test_usage_from_empty_metadata() -> None:
    assert gemini.usage_from({}) == Usage()


# --- stream ----------------------------------------------------------------------------------


def _to_openai(events: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    translator = gemini.StreamToOpenAI(MODEL, include_usage=True)
    chunks: list[dict[str, Any]] = []
    for _, data in events:
        chunks += translator.feed(orjson.loads(data))
    return chunks + translator.finish()


def test_stream_golden_at_every_split() -> None:
    expected = load("openai_chunks_from_gemini_stream.json")
    assert_same_for_every_split(raw("gemini_stream.sse"), _to_openai, expected)


def test_stream_state() -> None:
    translator = gemini.StreamToOpenAI(MODEL, include_usage=False)
    events = scan([raw("gemini_stream.sse")])
    first = translator.feed(orjson.loads(events[0][1]))
    assert [carries_content(c) for c in first] == [False, True]
    assert translator.content_seen
    assert translator.usage == Usage(prompt=57, completion=48)
    for _, data in events[1:]:
        translator.feed(orjson.loads(data))
    assert translator.usage == Usage(prompt=57, completion=21 + 58, cached=32)
    assert translator.finish() == []  # include_usage off


def test_stream_blocked_prompt() -> None:
    translator = gemini.StreamToOpenAI(MODEL, include_usage=False)
    chunks = translator.feed(load("gemini_response_blocked.json"))
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "content_filter"]
    assert not translator.content_seen


def test_stream_error_event_raises() -> None:
    translator = gemini.StreamToOpenAI(MODEL, include_usage=True)
    with pytest.raises(gemini.UpstreamStreamError) as caught:
        translator.feed(orjson.loads(raw("gemini_error.json")))
    assert caught.value.type == "invalid_request_error"


# --- errors ----------------------------------------------------------------------------------


def test_error_to_openai() -> None:
    assert orjson.loads(gemini.error_to_openai(raw("gemini_error.json")) or b"") == {
        "error": {
            "message": "API key not valid. Please pass a valid API key.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_argument",
        }
    }


def test_error_in_a_list_and_unknown_status() -> None:
    body = b'[{"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}]'
    assert orjson.loads(gemini.error_to_openai(body) or b"")["error"]["type"] == "server_error"


@pytest.mark.parametrize("body", [b"", b"<html>", b"{}", b'{"error": "x"}'])
def test_unparseable_errors_give_none(body: bytes) -> None:
    assert gemini.error_to_openai(body) is None

"""The shared OpenAI helpers and the field table: every row of FIELD_MAPPING and
MESSAGES_FIELD_MAPPING is checked by running a request through the translators, and
docs/mapping.md must carry the table as generated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from edgeproxy.dialects import anthropic, gemini
from edgeproxy.dialects.openai import (
    FIELD_MAPPING,
    MESSAGES_FIELD_MAPPING,
    RAW_ARGUMENTS_KEY,
    carries_content,
    dump_arguments,
    mapping_markdown,
    parse_arguments,
    split_data_url,
)

Check = Callable[[dict[str, Any]], bool]


def has(*markers: str) -> Check:
    """True when any marker appears anywhere in the translated body."""
    return lambda out: any(m in orjson.dumps(out).decode() for m in markers)


def path(*keys: str | int) -> Check:
    def check(out: dict[str, Any]) -> bool:
        value: Any = out
        for key in keys:
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                return False
        return value is not None

    return check


def no_key(key: str) -> Check:
    """For targets outside the body (the URL, always-on behaviour): the body stays clean."""
    return lambda out: key not in out


def parts_of(out: dict[str, Any], role_key: str, content_key: str) -> list[Any]:
    items = []
    for turn in out.get(role_key) or ():
        content = turn.get(content_key)
        items += content if isinstance(content, list) else [content]
    return items


def anthropic_block(kind: str) -> Check:
    return lambda out: any(
        isinstance(b, dict) and b.get("type") == kind for b in parts_of(out, "messages", "content")
    )


def gemini_part(kind: str, mime_prefix: str = "") -> Check:
    return lambda out: any(
        kind in p and str(p[kind].get("mimeType", "")).startswith(mime_prefix)
        for p in parts_of(out, "contents", "parts")
    )


@dataclass(frozen=True)
class Case:
    request: dict[str, Any]  # fields added to a minimal request
    anthropic: Check  # True when the field reached the Anthropic body
    gemini: Check


USER = {"role": "user", "content": "hi"}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
PDF = "data:application/pdf;base64,JVBE"


def with_messages(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [USER, *messages]}


CASES: dict[str, Case] = {
    "model": Case({}, path("model"), no_key("model")),
    "messages[system|developer]": Case(
        with_messages({"role": "developer", "content": "rules"}),
        path("system"),
        path("systemInstruction", "parts", 0, "text"),
    ),
    "messages[user|assistant]": Case(
        with_messages({"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}),
        lambda a: [t["role"] for t in a["messages"]] == ["user", "assistant", "user"],
        lambda g: [c["role"] for c in g["contents"]] == ["user", "model", "user"],
    ),
    "messages[].content[image_url]": Case(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
                    ],
                }
            ]
        },
        anthropic_block("image"),
        gemini_part("inlineData", "image/"),
    ),
    "messages[].content[file]": Case(
        {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": PDF}}]}]},
        anthropic_block("document"),
        gemini_part("inlineData", "application/pdf"),
    ),
    "messages[].content[input_audio]": Case(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_audio", "input_audio": {"data": "zzaudio", "format": "wav"}}
                    ],
                }
            ]
        },
        has("zzaudio"),
        gemini_part("inlineData", "audio/wav"),
    ),
    "messages[assistant].tool_calls": Case(
        with_messages({"role": "assistant", "tool_calls": [CALL]}),
        anthropic_block("tool_use"),
        gemini_part("functionCall"),
    ),
    "messages[tool]": Case(
        with_messages(
            {"role": "assistant", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ),
        anthropic_block("tool_result"),
        gemini_part("functionResponse"),
    ),
    "messages[assistant].reasoning_content": Case(
        with_messages({"role": "assistant", "content": "a", "reasoning_content": "zzthought"}),
        has("zzthought"),
        has("zzthought"),
    ),
    "messages[].name": Case(
        {"messages": [{"role": "user", "content": "hi", "name": "zzname"}]},
        has("zzname"),
        has("zzname"),
    ),
    "tools": Case(
        {"tools": TOOLS},
        path("tools", 0, "input_schema"),
        path("tools", 0, "functionDeclarations", 0, "parametersJsonSchema"),
    ),
    "tool_choice": Case(
        {"tools": TOOLS, "tool_choice": "required"},
        lambda a: a["tool_choice"] == {"type": "any"},
        lambda g: g["toolConfig"]["functionCallingConfig"] == {"mode": "ANY"},
    ),
    "parallel_tool_calls": Case(
        {"tools": TOOLS, "parallel_tool_calls": False},
        path("tool_choice", "disable_parallel_tool_use"),
        has("arallel"),
    ),
    "stop": Case(
        {"stop": "zzstop"},
        lambda a: a["stop_sequences"] == ["zzstop"],
        lambda g: g["generationConfig"]["stopSequences"] == ["zzstop"],
    ),
    "max_completion_tokens|max_tokens": Case(
        {"max_completion_tokens": 321},
        lambda a: a["max_tokens"] == 321,
        lambda g: g["generationConfig"]["maxOutputTokens"] == 321,
    ),
    "temperature": Case(
        {"temperature": 0.7},
        lambda a: a["temperature"] == 0.7,
        lambda g: g["generationConfig"]["temperature"] == 0.7,
    ),
    "top_p": Case(
        {"top_p": 0.8},
        lambda a: a["top_p"] == 0.8,
        lambda g: g["generationConfig"]["topP"] == 0.8,
    ),
    "top_k": Case(
        {"top_k": 7}, lambda a: a["top_k"] == 7, lambda g: g["generationConfig"]["topK"] == 7
    ),
    "n": Case({"n": 2}, lambda a: "n" in a, lambda g: g["generationConfig"]["candidateCount"] == 2),
    "seed": Case(
        {"seed": 4242}, has("4242", "seed"), lambda g: g["generationConfig"]["seed"] == 4242
    ),
    "response_format": Case(
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"zzprop": {"type": "string"}}},
                },
            }
        },
        lambda a: "zzprop" in a["system"],
        path("generationConfig", "responseJsonSchema", "properties", "zzprop"),
    ),
    "reasoning_effort": Case(
        {"reasoning_effort": "high"},
        path("thinking", "budget_tokens"),
        path("generationConfig", "thinkingConfig", "thinkingBudget"),
    ),
    "user": Case({"user": "zzuser"}, lambda a: a["metadata"]["user_id"] == "zzuser", has("zzuser")),
    "stream": Case({"stream": True}, lambda a: a["stream"] is True, no_key("stream")),
    "stream_options.include_usage": Case(
        {"stream": True, "stream_options": {"include_usage": True}},
        no_key("stream_options"),
        no_key("stream_options"),
    ),
    "presence_penalty, frequency_penalty": Case(
        {"presence_penalty": 0.123, "frequency_penalty": 0.456},
        has("0.123", "0.456", "enalty"),
        has("0.123", "0.456", "enalty"),
    ),
    "logprobs, top_logprobs, logit_bias": Case(
        {"logprobs": True, "top_logprobs": 3, "logit_bias": {"zzbias": 5}},
        has("zzbias", "ogprobs"),
        has("zzbias", "ogprobs"),
    ),
    "metadata, store, service_tier, modalities, audio, prediction, web_search_options": Case(
        {
            "metadata": {"zzmeta": "1"},
            "store": True,
            "service_tier": "zztier",
            "modalities": ["zzmod"],
            "audio": {"voice": "zzvoice"},
            "prediction": {"type": "content", "content": "zzpred"},
            "web_search_options": {"zzweb": 1},
        },
        has("zzmeta", "store", "zztier", "zzmod", "zzvoice", "zzpred", "zzweb"),
        has("zzmeta", "store", "zztier", "zzmod", "zzvoice", "zzpred", "zzweb"),
    ),
    "functions, function_call (legacy)": Case(
        {"functions": [{"name": "zzlegacy"}], "function_call": {"name": "zzlegacy"}},
        has("zzlegacy"),
        has("zzlegacy"),
    ),
}


def test_every_table_row_has_a_case() -> None:
    assert set(CASES) == {row.openai for row in FIELD_MAPPING}


@pytest.mark.parametrize("row", FIELD_MAPPING, ids=lambda row: row.openai)
def test_field_mapping_row_holds(row: Any) -> None:
    case = CASES[row.openai]
    body = {"model": "public-model", "messages": [USER], **case.request}
    to_anthropic = anthropic.request_from_openai(body, "upstream-model")
    to_gemini = gemini.request_from_openai(body, "upstream-model")
    assert case.anthropic(to_anthropic) is (row.anthropic_status != "dropped"), to_anthropic
    assert case.gemini(to_gemini) is (row.gemini_status != "dropped"), to_gemini


IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
DOCUMENT = {
    "type": "document",
    "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
}
USE = {"type": "tool_use", "id": "t1", "name": "f", "input": {}}
TOOL = {"name": "f", "input_schema": {"type": "object"}}


def turns(*content: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": list(content)}]}


def openai_roles(out: dict[str, Any]) -> list[str]:
    return [m["role"] for m in out["messages"]]


MESSAGES_CASES: dict[str, tuple[dict[str, Any], Check]] = {
    "model": ({}, lambda o: o["model"] == "claude-x"),
    "system": ({"system": "rules"}, lambda o: openai_roles(o)[0] == "system"),
    "messages[].content[text|image]": (turns(IMAGE), has("data:image/png;base64,AA==")),
    "messages[].content[document]": (turns(DOCUMENT), has("data:application/pdf;base64,JVBE")),
    "messages[].content[tool_use]": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [USE]}]},
        path("messages", 1, "tool_calls", 0, "function", "name"),
    ),
    "messages[].content[tool_result]": (
        turns({"type": "tool_result", "tool_use_id": "t1", "content": "ok"}),
        lambda o: openai_roles(o) == ["tool"],
    ),
    "messages[].content[thinking]": (
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": [{"type": "thinking", "thinking": "zzthink", "signature": "s"}],
                }
            ]
        },
        has("zzthink"),
    ),
    "tools": ({"tools": [TOOL]}, path("tools", 0, "function", "parameters")),
    "tool_choice": (
        {"tools": [TOOL], "tool_choice": {"type": "any"}},
        lambda o: o["tool_choice"] == "required",
    ),
    "tool_choice.disable_parallel_tool_use": (
        {"tools": [TOOL], "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}},
        lambda o: o["parallel_tool_calls"] is False,
    ),
    "stop_sequences": (
        {"stop_sequences": ["a", "b", "c", "d", "e"]},
        lambda o: o["stop"] == ["a", "b", "c", "d"],
    ),
    "max_tokens": ({"max_tokens": 77}, lambda o: o["max_tokens"] == 77),
    "temperature": ({"temperature": 0.3}, lambda o: o["temperature"] == 0.3),
    "top_p": ({"top_p": 0.6}, lambda o: o["top_p"] == 0.6),
    "top_k": ({"top_k": 5}, has("top_k")),
    "thinking": (
        {"thinking": {"type": "enabled", "budget_tokens": 2048}},
        lambda o: o["reasoning_effort"] == "low",
    ),
    "output_config.effort": (
        {"output_config": {"effort": "medium"}},
        lambda o: o["reasoning_effort"] == "medium",
    ),
    "metadata.user_id": ({"metadata": {"user_id": "zzu"}}, lambda o: o["user"] == "zzu"),
    "stream": (
        {"stream": True},
        lambda o: o["stream"] is True and o["stream_options"] == {"include_usage": True},
    ),
    "cache_control": (
        {"system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}]},
        has("ephemeral", "cache_control"),
    ),
}


def test_every_messages_table_row_has_a_case() -> None:
    assert set(MESSAGES_CASES) == {row.anthropic for row in MESSAGES_FIELD_MAPPING}


@pytest.mark.parametrize("row", MESSAGES_FIELD_MAPPING, ids=lambda row: row.anthropic)
def test_messages_field_mapping_row_holds(row: Any) -> None:
    fields, check = MESSAGES_CASES[row.anthropic]
    body = {"model": "claude-x", "max_tokens": 100, "messages": [USER], **fields}
    out = anthropic.request_to_openai(body)
    assert check(out) is (row.status != "dropped"), out


def test_docs_carry_the_generated_table() -> None:
    docs = Path(__file__).resolve().parent.parent / "docs" / "mapping.md"
    assert mapping_markdown() in docs.read_text(encoding="utf-8")


# --- helpers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delta", "carries"),
    [
        ({"role": "assistant", "content": ""}, False),
        ({}, False),
        ({"content": "x"}, True),
        ({"reasoning_content": "x"}, True),
        ({"tool_calls": [{"index": 0}]}, True),
        ({"tool_calls": []}, False),
    ],
)
def test_carries_content(delta: dict[str, Any], carries: bool) -> None:
    assert carries_content({"choices": [{"index": 0, "delta": delta}]}) is carries


def test_usage_only_chunk_carries_no_content() -> None:
    assert carries_content({"choices": [], "usage": {"prompt_tokens": 1}}) is False


@pytest.mark.parametrize(
    ("arguments", "parsed"),
    [
        ('{"a": 1}', {"a": 1}),
        ("", {}),
        ("  ", {}),
        (None, {}),
        ("[1, 2]", {RAW_ARGUMENTS_KEY: "[1, 2]"}),
        ('{"a": ', {RAW_ARGUMENTS_KEY: '{"a": '}),
    ],
)
def test_parse_arguments(arguments: object, parsed: dict[str, Any]) -> None:
    assert parse_arguments(arguments) == parsed


def test_dump_arguments_undoes_the_raw_wrap() -> None:
    assert dump_arguments({RAW_ARGUMENTS_KEY: '{"a": '}) == '{"a": '
    assert dump_arguments({"a": 1}) == '{"a":1}'
    assert dump_arguments(None) == "{}"


@pytest.mark.parametrize(
    ("url", "parts"),
    [
        ("data:image/png;base64,AAAA", ("image/png", "AAAA")),
        ("data:image/jpeg;name=x.jpg;base64,QQ==", ("image/jpeg", "QQ==")),
        ("data:text/plain,hello", None),
        ("https://example.com/a.png", None),
    ],
)
def test_split_data_url(url: str, parts: tuple[str, str] | None) -> None:
    assert split_data_url(url) == parts

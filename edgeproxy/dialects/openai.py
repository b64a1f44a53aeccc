"""OpenAI chat-completions helpers shared by the translating dialects, and the field table.

Job: the commit-point test (``carries_content``), builders for ``chat.completion.chunk`` and
``usage`` objects, tool-call argument parsing, the ``UpstreamStreamError`` the stream
translators raise, and ``FIELD_MAPPING``: which OpenAI request field becomes which
Anthropic / Gemini field (the README and ``docs/mapping.md`` are generated from it).

It must not: do I/O, rewrite pass-through OpenAI bodies (the proxy owns that path), or
import the other dialect modules (they import this one).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from edgeproxy.usage import Usage

# When a client echoes back tool-call arguments that are not a JSON object (a call cut off
# by max_tokens, say), Anthropic and Gemini still need an object. Wrapping the raw text
# keeps the conversation going and lets the model see what it produced; ``{}`` would
# silently lie about the call.
RAW_ARGUMENTS_KEY = "_raw_arguments"


class UpstreamStreamError(Exception):
    """The upstream reported an error inside a stream that already started.

    ``message`` is the upstream's text (the proxy scrubs it before a client sees it);
    ``type`` is the upstream's error type when it sent one.
    """

    def __init__(self, message: str, type_: str = "api_error") -> None:
        super().__init__(message)
        self.message = message
        self.type = type_


def carries_content(chunk: dict[str, Any]) -> bool:
    """True when a chunk's delta has non-empty content, reasoning or tool calls (SPEC §3),
    or the provider refused on safety grounds: a refusal is an answer, and retrying it
    elsewhere could hand the client what the filter withheld."""
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict) and (
            delta.get("content")
            or delta.get("reasoning_content")
            or delta.get("tool_calls")
            or delta.get("refusal")
        ):
            return True
        if choice.get("finish_reason") == "content_filter" or choice.get("text"):
            return True
    return False


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def make_chunk(
    chunk_id: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with a single choice."""
    return {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ],
    }


def make_usage_chunk(
    chunk_id: str, model: str, created: int, usage: Usage, reasoning_tokens: int | None = None
) -> dict[str, Any]:
    """The final usage-only chunk (``choices: []``) sent when include_usage was asked for."""
    return {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_dict(usage, reasoning_tokens),
    }


def usage_dict(usage: Usage, reasoning_tokens: int | None = None) -> dict[str, Any]:
    """An OpenAI ``usage`` object from a normalised ``Usage``."""
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt,
        "completion_tokens": usage.completion,
        "total_tokens": usage.prompt + usage.completion,
        "prompt_tokens_details": {"cached_tokens": usage.cached},
    }
    if reasoning_tokens:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return out


def parse_arguments(arguments: object) -> dict[str, Any]:
    """Tool-call ``arguments`` (a JSON string) as the object Anthropic and Gemini want.

    Empty text means no arguments; anything that is not a JSON object is kept verbatim
    under ``RAW_ARGUMENTS_KEY`` (see there for why).
    """
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {RAW_ARGUMENTS_KEY: arguments}
    return parsed if isinstance(parsed, dict) else {RAW_ARGUMENTS_KEY: arguments}


def dump_arguments(value: object) -> str:
    """Tool input (an object) as OpenAI's ``arguments`` JSON string; undoes the raw wrap."""
    if isinstance(value, dict) and set(value) == {RAW_ARGUMENTS_KEY}:
        raw = value[RAW_ARGUMENTS_KEY]
        if isinstance(raw, str):
            return raw
    return orjson.dumps(value if value is not None else {}).decode()


def stop_list(stop: object) -> list[str]:
    """OpenAI ``stop`` (a string or a list) as a list of non-empty strings."""
    items = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    return [s for s in items if isinstance(s, str) and s]


def text_of(content: object, sep: str = "\n") -> str:
    """The text of an OpenAI ``content`` (a string, or a list of text/refusal parts)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") in ("text", "refusal"):
            value = part.get("text", part.get("refusal"))
            if isinstance(value, str) and value:
                texts.append(value)
    return sep.join(texts)


def split_data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 payload) of a ``data:<type>;base64,<payload>`` URL, else None."""
    if not url.startswith("data:"):
        return None
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        return None
    media_type = header[: -len(";base64")].split(";")[0] or "application/octet-stream"
    return media_type, payload


# --- the field table --------------------------------------------------------------------

Status = Literal["mapped", "approximated", "dropped"]


@dataclass(frozen=True, slots=True)
class FieldMapping:
    """One OpenAI request field and what each translating upstream receives.

    A target starting with ``(`` is not a body field (the URL, or always-on behaviour).
    """

    openai: str
    anthropic: str
    anthropic_status: Status
    gemini: str
    gemini_status: Status
    note: str = ""


_M, _A, _D = "mapped", "approximated", "dropped"
FIELD_MAPPING: tuple[FieldMapping, ...] = (
    FieldMapping("model", "model", _M, "(URL) models/{model}", _M, "upstream name after model_map"),
    FieldMapping(
        "messages[system|developer]",
        "system",
        _M,
        "systemInstruction",
        _M,
        "hoisted from any position, joined in order",
    ),
    FieldMapping(
        "messages[user|assistant]",
        "messages",
        _M,
        "contents",
        _M,
        "consecutive same-role turns merged",
    ),
    FieldMapping(
        "messages[].content[image_url]",
        "messages[].content[image]",
        _M,
        "contents[].parts[inlineData|fileData]",
        _M,
        "Gemini: http(s) images fetched by the relay and inlined",
    ),
    FieldMapping(
        "messages[].content[file]",
        "messages[].content[document]",
        _M,
        "contents[].parts[inlineData]",
        _M,
        "base64 file_data only; file_id dropped",
    ),
    FieldMapping(
        "messages[].content[input_audio]",
        "",
        _D,
        "contents[].parts[inlineData]",
        _M,
    ),
    FieldMapping(
        "messages[assistant].tool_calls",
        "messages[].content[tool_use]",
        _M,
        "contents[].parts[functionCall]",
        _M,
        f"non-object arguments kept under {RAW_ARGUMENTS_KEY}",
    ),
    FieldMapping(
        "messages[tool]",
        "messages[].content[tool_result]",
        _M,
        "contents[].parts[functionResponse]",
        _M,
        "Gemini: function name found from the tool_call_id",
    ),
    FieldMapping(
        "messages[assistant].reasoning_content",
        "",
        _D,
        "",
        _D,
        "no signature to replay",
    ),
    FieldMapping("messages[].name", "", _D, "", _D),
    FieldMapping(
        "tools", "tools", _M, "tools[].functionDeclarations", _M, "Gemini: schema cleaned"
    ),
    FieldMapping("tool_choice", "tool_choice", _M, "toolConfig.functionCallingConfig", _M),
    FieldMapping(
        "parallel_tool_calls",
        "tool_choice.disable_parallel_tool_use",
        _M,
        "",
        _D,
    ),
    FieldMapping("stop", "stop_sequences", _M, "generationConfig.stopSequences", _M),
    FieldMapping(
        "max_completion_tokens|max_tokens",
        "max_tokens",
        _M,
        "generationConfig.maxOutputTokens",
        _M,
        "Anthropic requires it: a default when absent",
    ),
    FieldMapping(
        "temperature",
        "temperature",
        _A,
        "generationConfig.temperature",
        _M,
        "Anthropic: clamped to 0..1, dropped with thinking",
    ),
    FieldMapping("top_p", "top_p", _M, "generationConfig.topP", _M),
    FieldMapping("top_k", "top_k", _M, "generationConfig.topK", _M, "not OpenAI; passed if sent"),
    FieldMapping("n", "", _D, "generationConfig.candidateCount", _M),
    FieldMapping("seed", "", _D, "generationConfig.seed", _M),
    FieldMapping(
        "response_format",
        "system",
        _A,
        "generationConfig.responseJsonSchema",
        _M,
        "Anthropic: a system instruction carrying the schema",
    ),
    FieldMapping(
        "reasoning_effort",
        "thinking",
        _A,
        "generationConfig.thinkingConfig",
        _A,
        "effort level -> a token budget",
    ),
    FieldMapping("user", "metadata.user_id", _M, "", _D),
    FieldMapping("stream", "stream", _M, "(URL) :streamGenerateContent?alt=sse", _M),
    FieldMapping(
        "stream_options.include_usage",
        "(always sent by Anthropic)",
        _M,
        "(always sent by Gemini)",
        _M,
        "the usage-only chunk is built by the relay",
    ),
    FieldMapping("presence_penalty, frequency_penalty", "", _D, "", _D),
    FieldMapping("logprobs, top_logprobs, logit_bias", "", _D, "", _D),
    FieldMapping(
        "metadata, store, service_tier, modalities, audio, prediction, web_search_options",
        "",
        _D,
        "",
        _D,
    ),
    FieldMapping("functions, function_call (legacy)", "", _D, "", _D),
)


@dataclass(frozen=True, slots=True)
class MessagesFieldMapping:
    """One Anthropic Messages request field (``/v1/messages`` in) and its OpenAI field."""

    anthropic: str
    openai: str
    status: Status
    note: str = ""


MESSAGES_FIELD_MAPPING: tuple[MessagesFieldMapping, ...] = (
    MessagesFieldMapping("model", "model", _M),
    MessagesFieldMapping("system", "messages[system]", _M, "text blocks joined"),
    MessagesFieldMapping("messages[].content[text|image]", "messages[].content", _M),
    MessagesFieldMapping(
        "messages[].content[document]", "messages[].content[file]", _A, "base64 PDF only"
    ),
    MessagesFieldMapping("messages[].content[tool_use]", "messages[assistant].tool_calls", _M),
    MessagesFieldMapping(
        "messages[].content[tool_result]",
        "messages[tool]",
        _A,
        "is_error marked in the text; images moved to the next user turn",
    ),
    MessagesFieldMapping("messages[].content[thinking]", "", _D, "OpenAI has no input for it"),
    MessagesFieldMapping("tools", "tools", _M, "server tools (typed) dropped"),
    MessagesFieldMapping("tool_choice", "tool_choice", _M),
    MessagesFieldMapping("tool_choice.disable_parallel_tool_use", "parallel_tool_calls", _M),
    MessagesFieldMapping("stop_sequences", "stop", _A, "first 4 (OpenAI's limit)"),
    MessagesFieldMapping("max_tokens", "max_tokens", _M),
    MessagesFieldMapping("temperature", "temperature", _M),
    MessagesFieldMapping("top_p", "top_p", _M),
    MessagesFieldMapping("top_k", "", _D, "OpenAI rejects it"),
    MessagesFieldMapping("thinking", "reasoning_effort", _A, "budget -> effort level"),
    MessagesFieldMapping("output_config.effort", "reasoning_effort", _A),
    MessagesFieldMapping("metadata.user_id", "user", _M),
    MessagesFieldMapping("stream", "stream, stream_options.include_usage", _M),
    MessagesFieldMapping("cache_control", "", _D),
)


def mapping_markdown() -> str:
    """The two field tables as Markdown (``docs/mapping.md`` embeds this verbatim)."""

    def code(field: str) -> str:
        # A pipe splits a table cell even inside backticks (GitHub Markdown): escape it.
        field = field.replace("|", "\\|")
        return field if field.startswith("(") else f"`{field}`"

    def cell(field: str, status: str) -> str:
        return f"{code(field)} ({status})" if field else f"— ({status})"

    lines = [
        "| OpenAI request field | Anthropic | Gemini | note |",
        "|---|---|---|---|",
    ]
    for row in FIELD_MAPPING:
        lines.append(
            f"| {code(row.openai)} | {cell(row.anthropic, row.anthropic_status)} "
            f"| {cell(row.gemini, row.gemini_status)} | {row.note} |"
        )
    lines += ["", "| Anthropic request field (`/v1/messages`) | OpenAI | note |", "|---|---|---|"]
    for m in MESSAGES_FIELD_MAPPING:
        lines.append(f"| {code(m.anthropic)} | {cell(m.openai, m.status)} | {m.note} |")
    return "\n".join(lines) + "\n"

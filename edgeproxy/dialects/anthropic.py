"""OpenAI chat completions <-> Anthropic Messages, both directions, streams included.

Job: pure translation of request bodies, response bodies, stream events, usage and error
bodies between the two wire formats. The OpenAI -> Anthropic direction serves OpenAI
clients on an ``anthropic`` upstream; the Anthropic -> OpenAI direction serves Claude
clients (``POST /v1/messages``) on ``openai`` and ``gemini`` upstreams, with OpenAI chat as
the pivot.

It must not: do I/O, look at configuration, decide retries, or reject requests (the proxy
validates; fields this module cannot express are dropped, as ``FIELD_MAPPING`` lists).

Decisions, each documented in ``docs/mapping.md``:

- ``max_tokens`` is required by Anthropic: ``DEFAULT_MAX_TOKENS`` when the client gave none.
- ``reasoning_effort`` becomes a thinking budget (``THINKING_BUDGETS``). Thinking is left off
  when the request forces a tool (Anthropic rejects that combination), when the client's
  token cap leaves no room for the minimum budget, and when the last assistant message
  made tool calls: Anthropic then demands that message's signed thinking block, which
  OpenAI clients cannot replay.
- ``response_format`` becomes a system instruction (``output_config.format`` would be exact
  but older Claude models reject it).
- Tool-call arguments that are not a JSON object are kept under ``RAW_ARGUMENTS_KEY``.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from edgeproxy.dialects.openai import (
    UpstreamStreamError,
    dump_arguments,
    make_chunk,
    make_usage_chunk,
    new_id,
    parse_arguments,
    split_data_url,
    stop_list,
    text_of,
    usage_dict,
)
from edgeproxy.usage import Usage, from_openai, token_count

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "THINKING_BUDGETS",
    "StreamFromOpenAI",
    "StreamToOpenAI",
    "UpstreamStreamError",
    "error_from_openai",
    "error_to_openai",
    "request_from_openai",
    "request_to_openai",
    "response_from_openai",
    "response_to_openai",
    "usage_from",
]

# Anthropic requires max_tokens and OpenAI does not. 4096 is within every Claude model's
# output limit (Claude 3 Haiku's, 4096, is the smallest), so the default never makes a
# request invalid; clients that want longer answers send max_tokens themselves.
DEFAULT_MAX_TOKENS = 4096

# reasoning_effort -> thinking.budget_tokens. 1024 is Anthropic's minimum budget. With no
# client cap, max_tokens becomes budget + DEFAULT_MAX_TOKENS, so the largest budget keeps
# that under 32000, Claude Opus 4's output limit. "minimal" and "none" mean no thinking.
THINKING_BUDGETS = {"low": 1024, "medium": 4096, "high": 16384, "xhigh": 24576}
MIN_THINKING_BUDGET = 1024

# The reverse, for Claude clients on OpenAI upstreams: a budget below the bound maps to
# the effort. Above the last bound: "high".
EFFORT_BY_BUDGET = ((4096, "low"), (16384, "medium"))

MAX_TEMPERATURE = 1.0  # Anthropic's range is 0..1, OpenAI's 0..2
MIN_TOP_P_WITH_THINKING = 0.95  # with thinking, Anthropic accepts top_p only in 0.95..1
MAX_OPENAI_STOP = 4  # OpenAI rejects more than 4 stop sequences

JSON_INSTRUCTION = (
    "Respond with a single valid JSON object only: no prose before or after it and no "
    "Markdown code fences."
)

FINISH_FROM_ANTHROPIC = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
STOP_FROM_OPENAI = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

# Error types across the two shapes. Unknown types fall back to a server error.
OPENAI_ERROR_TYPE = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "invalid_request_error",
    "request_too_large": "invalid_request_error",
    "rate_limit_error": "rate_limit_error",
    "api_error": "server_error",
    "overloaded_error": "server_error",
}
ANTHROPIC_ERROR_TYPE = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    "rate_limit_error": "rate_limit_error",
    "insufficient_quota": "rate_limit_error",
    "tokens": "rate_limit_error",
    "requests": "rate_limit_error",
    "server_error": "api_error",
    "overloaded_error": "overloaded_error",
}


# === OpenAI request -> Anthropic request ================================================


def request_from_openai(body: dict[str, Any], model: str) -> dict[str, Any]:
    """An OpenAI chat request as an Anthropic Messages request for upstream ``model``."""
    messages = [m for m in body.get("messages") or () if isinstance(m, dict)]
    asked_max = _asked_max_tokens(body)
    out: dict[str, Any] = {
        "model": model,
        "max_tokens": asked_max or DEFAULT_MAX_TOKENS,
        "messages": _messages_from_openai(messages),
    }
    system = _system_from_openai(messages, _json_instruction(body.get("response_format")))
    if system:
        out["system"] = system
    _copy_sampling(body, out)
    if stops := stop_list(body.get("stop")):
        out["stop_sequences"] = stops
    if tools := _tools_from_openai(body.get("tools")):
        out["tools"] = tools
        choice = _tool_choice_from_openai(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice:
            out["tool_choice"] = choice
    _apply_thinking(body.get("reasoning_effort"), asked_max, messages, out)
    if isinstance(body.get("user"), str) and body["user"]:
        out["metadata"] = {"user_id": body["user"]}
    if body.get("stream") is True:
        out["stream"] = True
    return out


def _asked_max_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _system_from_openai(messages: list[dict[str, Any]], extra: str | None) -> Any:
    """System and developer messages, from any position, as Anthropic's ``system``.

    Plain strings join into one string; if any message used content parts the result is
    a list of text blocks, so ``cache_control`` marks on them survive.
    """
    blocks: list[dict[str, Any]] = []
    all_strings = True
    for message in messages:
        if message.get("role") not in ("system", "developer"):
            continue
        content = message.get("content")
        if isinstance(content, str):
            if content:
                blocks.append({"type": "text", "text": content})
        else:
            all_strings = False
            blocks += [b for b in map(_block_from_part, content or ()) if b and b["type"] == "text"]
    if extra:
        blocks.append({"type": "text", "text": extra})
    if not blocks:
        return None
    return "\n\n".join(b["text"] for b in blocks) if all_strings else blocks


def _json_instruction(response_format: object) -> str | None:
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_object":
        return JSON_INSTRUCTION
    if response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is not None:
            return (
                f"{JSON_INSTRUCTION} It must conform to this JSON Schema:\n"
                + orjson.dumps(schema).decode()
            )
        return JSON_INSTRUCTION
    return None


def _messages_from_openai(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """user/assistant/tool messages as alternating Anthropic turns (same roles merged)."""
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "user":
            blocks = _user_blocks(message.get("content"))
        elif role == "assistant":
            blocks = _assistant_blocks(message)
        elif role == "tool":
            role, blocks = "user", [_tool_result_block(message)]
        else:
            continue  # system/developer are hoisted; legacy "function" is dropped
        if not blocks:
            continue  # Anthropic rejects empty turns
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:  # a lone plain text block reads better as a string
        content = turn["content"]
        if len(content) == 1 and content[0]["type"] == "text" and len(content[0]) == 2:
            turn["content"] = content[0]["text"]
    return turns


def _user_blocks(content: object) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return [b for b in map(_block_from_part, content or ()) if b]


def _block_from_part(part: object) -> dict[str, Any] | None:
    """One OpenAI content part as an Anthropic block; None when Anthropic has no match."""
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    block: dict[str, Any] | None = None
    if kind == "text" and isinstance(part.get("text"), str) and part["text"]:
        block = {"type": "text", "text": part["text"]}
    elif kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        block = _image_block(url) if isinstance(url, str) else None
    elif kind == "file":
        block = _document_block(part.get("file"))
    if block is not None and isinstance(part.get("cache_control"), dict):
        block["cache_control"] = part["cache_control"]
    return block


def _image_block(url: str) -> dict[str, Any] | None:
    if data := split_data_url(url):
        media_type, payload = data
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": payload},
        }
    if url.lower().startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    return None


def _document_block(file: object) -> dict[str, Any] | None:
    if not isinstance(file, dict) or not isinstance(file.get("file_data"), str):
        return None  # file_id refers to OpenAI's file store: nothing to send
    data = split_data_url(file["file_data"])
    if data is None:
        return None
    media_type, payload = data
    return {
        "type": "document",
        "source": {"type": "base64", "media_type": media_type, "data": payload},
    }


def _assistant_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if text := text_of(message.get("content"), sep="\n\n"):
        blocks.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or ():
        if not isinstance(call, dict):
            continue
        function = call.get("function") or {}
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id") or new_id("toolu_"),
                "name": function.get("name") or "",
                "input": parse_arguments(function.get("arguments")),
            }
        )
    return blocks


def _tool_result_block(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, str):
        content = [b for b in map(_block_from_part, content or ()) if b] or ""
    return {
        "type": "tool_result",
        "tool_use_id": message.get("tool_call_id") or "",
        "content": content,
    }


def _copy_sampling(body: dict[str, Any], out: dict[str, Any]) -> None:
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        out["temperature"] = min(max(float(temperature), 0.0), MAX_TEMPERATURE)
    for key in ("top_p", "top_k"):
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = value


def _tools_from_openai(tools: object) -> list[dict[str, Any]]:
    out = []
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            continue
        function = tool.get("function")
        if not isinstance(function, dict):
            continue  # custom and built-in OpenAI tools have no Anthropic match
        schema = function.get("parameters") or {"type": "object", "properties": {}}
        item: dict[str, Any] = {"name": function.get("name") or "", "input_schema": schema}
        if function.get("description"):
            item["description"] = function["description"]
        out.append(item)
    return out


def _tool_choice_from_openai(choice: object, parallel: object) -> dict[str, Any] | None:
    if choice == "none":
        return {"type": "none"}
    if choice == "required":
        out: dict[str, Any] = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name") or ""}
    elif choice in (None, "auto"):
        out = {"type": "auto"}
    else:
        return None
    if parallel is False:
        out["disable_parallel_tool_use"] = True
    elif choice is None:
        return None  # nothing asked: leave Anthropic's default
    return out


def _apply_thinking(
    effort: object, asked_max: int | None, messages: list[dict[str, Any]], out: dict[str, Any]
) -> None:
    """``reasoning_effort`` -> ``thinking``, when Anthropic will accept it (module docstring)."""
    budget = THINKING_BUDGETS.get(effort) if isinstance(effort, str) else None
    forced = out.get("tool_choice", {}).get("type") in ("any", "tool")
    if budget is None or forced or _last_assistant_called_tools(messages):
        return
    if asked_max is None:
        out["max_tokens"] = budget + DEFAULT_MAX_TOKENS
    else:
        budget = min(budget, asked_max - 1)  # budget_tokens must stay below max_tokens
        if budget < MIN_THINKING_BUDGET:
            return
    out["thinking"] = {"type": "enabled", "budget_tokens": budget}
    out.pop("temperature", None)  # Anthropic rejects temperature and top_k with thinking
    out.pop("top_k", None)
    if out.get("top_p", 1.0) < MIN_TOP_P_WITH_THINKING:
        out.pop("top_p")


def _last_assistant_called_tools(messages: list[dict[str, Any]]) -> bool:
    for message in reversed(messages):
        if message.get("role") == "assistant":
            return bool(message.get("tool_calls"))
    return False


# === Anthropic response -> OpenAI response ==============================================


def response_to_openai(body: dict[str, Any], model: str) -> dict[str, Any]:
    """A Messages response as a ``chat.completion``; ``model`` is used if the body has none."""
    texts, thoughts, calls = [], [], []
    for block in body.get("content") or ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "thinking":
            thoughts.append(block.get("thinking") or "")
        elif kind == "tool_use":
            calls.append(_tool_call(block))
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if thoughts:
        message["reasoning_content"] = "".join(thoughts)
    if calls:
        message["tool_calls"] = calls
        message["content"] = message["content"] or None
    usage = usage_from(body.get("usage") or {})
    return {
        "id": body.get("id") or new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": FINISH_FROM_ANTHROPIC.get(body.get("stop_reason"), "stop"),
            }
        ],
        "usage": usage_dict(usage),
    }


def _tool_call(block: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic ``tool_use`` block as an OpenAI tool call."""
    return {
        "id": block.get("id") or new_id("call_"),
        "type": "function",
        "function": {
            "name": block.get("name") or "",
            "arguments": dump_arguments(block.get("input")),
        },
    }


def usage_from(usage: dict[str, Any]) -> Usage:
    """Anthropic usage normalised per SPEC §4: prompt counts cache reads and writes."""

    cached = token_count(usage.get("cache_read_input_tokens"))
    written = token_count(usage.get("cache_creation_input_tokens"))
    return Usage(
        prompt=token_count(usage.get("input_tokens")) + cached + written,
        completion=token_count(usage.get("output_tokens")),
        cached=cached,
        cache_write=written,
    )


# === Anthropic stream -> OpenAI chunks ===================================================


class StreamToOpenAI:
    """Anthropic stream events, one by one, as ``chat.completion.chunk`` dicts."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.content_seen = False
        self._id = new_id("chatcmpl-")
        self._created = int(time.time())
        self._usage: dict[str, Any] | None = None
        self._tool_index: dict[int, int] = {}  # Anthropic block index -> OpenAI tool index

    @property
    def usage(self) -> Usage | None:
        return usage_from(self._usage) if self._usage is not None else None

    def feed(self, event_name: str, data: dict[str, Any]) -> list[dict[str, Any]]:
        kind = data.get("type") or event_name
        if kind == "error":
            error = data.get("error") or {}
            raise UpstreamStreamError(
                str(error.get("message") or "upstream stream error"),
                str(error.get("type") or "api_error"),
            )
        match kind:
            case "message_start":
                return self._message_start(data)
            case "content_block_start":
                return self._block_start(data)
            case "content_block_delta":
                return self._block_delta(data)
            case "message_delta":
                return self._message_delta(data)
            case "message_stop":
                return self._message_stop()
        return []  # ping, content_block_stop, and event types added later

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
            self.content_seen = True
        return make_chunk(self._id, self.model, self._created, delta, finish)

    def _message_start(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        message = data.get("message") or {}
        self._id = message.get("id") or self._id
        self.model = message.get("model") or self.model
        self._usage = dict(message.get("usage") or {})
        return [self._chunk({"role": "assistant", "content": ""})]

    def _block_start(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        block = data.get("content_block") or {}
        if block.get("type") == "tool_use":
            index = self._tool_index.setdefault(data.get("index", 0), len(self._tool_index))
            call = _tool_call(block)
            call["function"]["arguments"] = ""  # the input arrives as input_json_delta
            return [self._chunk({"tool_calls": [{"index": index, **call}]})]
        if block.get("type") == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if block.get("type") == "thinking" and block.get("thinking"):
            return [self._chunk({"reasoning_content": block["thinking"]})]
        return []

    def _block_delta(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        delta = data.get("delta") or {}
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        if kind == "thinking_delta" and delta.get("thinking"):
            return [self._chunk({"reasoning_content": delta["thinking"]})]
        if kind == "input_json_delta" and delta.get("partial_json"):
            index = self._tool_index.get(data.get("index", 0))
            if index is not None:
                fragment = {"index": index, "function": {"arguments": delta["partial_json"]}}
                return [self._chunk({"tool_calls": [fragment]})]
        return []  # signature_delta, citations_delta: nothing OpenAI can carry

    def _message_delta(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        usage = data.get("usage")
        if isinstance(usage, dict):  # cumulative counts: the latest wins
            self._usage = {**(self._usage or {}), **usage}
        reason = (data.get("delta") or {}).get("stop_reason")
        if reason is None:
            return []
        return [self._chunk({}, FINISH_FROM_ANTHROPIC.get(reason, "stop"))]

    def _message_stop(self) -> list[dict[str, Any]]:
        usage = self.usage
        if not self.include_usage or usage is None:
            return []
        return [make_usage_chunk(self._id, self.model, self._created, usage)]


# === Anthropic request (Claude clients) -> OpenAI request ================================


def request_to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """A Messages request from a Claude client as an OpenAI chat request (same model name)."""
    out: dict[str, Any] = {"model": body.get("model"), "messages": _messages_to_openai(body)}
    if isinstance(body.get("max_tokens"), int):
        out["max_tokens"] = body["max_tokens"]
    for key in ("temperature", "top_p"):
        if isinstance(body.get(key), int | float):
            out[key] = body[key]
    if stops := stop_list(body.get("stop_sequences")):
        out["stop"] = stops[:MAX_OPENAI_STOP]
    if tools := _tools_to_openai(body.get("tools")):
        out["tools"] = tools
        _tool_choice_to_openai(body.get("tool_choice"), out)
    if effort := _effort_from(body.get("thinking"), body.get("output_config")):
        out["reasoning_effort"] = effort
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _messages_to_openai(body: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = body.get("system")
    system_text = system if isinstance(system, str) else _texts(system, "\n\n")
    if system_text:
        out.append({"role": "system", "content": system_text})
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if message.get("role") == "assistant":
            out.append(_assistant_to_openai(content))
        elif isinstance(content, str):
            out.append({"role": "user", "content": content})
        else:
            out += _user_to_openai(content if isinstance(content, list) else [])
    return out


def _texts(blocks: object, sep: str) -> str:
    if not isinstance(blocks, list):
        return ""
    return sep.join(
        b["text"] for b in blocks if isinstance(b, dict) and isinstance(b.get("text"), str)
    )


def _assistant_to_openai(content: object) -> dict[str, Any]:
    """An assistant turn: text joined, tool_use as tool_calls, thinking dropped."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    blocks = [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
    text = _texts([b for b in blocks if b.get("type") == "text"], "")
    calls = [_tool_call(b) for b in blocks if b.get("type") == "tool_use"]
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": calls}


def _user_to_openai(blocks: list[Any]) -> list[dict[str, Any]]:
    """A user turn: tool results become role tool messages first, then the rest."""
    tool_messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in blocks:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "tool_result":
            text, images = _tool_result_content(block)
            tool_messages.append(
                {"role": "tool", "tool_call_id": block.get("tool_use_id") or "", "content": text}
            )
            parts += images  # OpenAI tool messages carry text only
        elif part := _part_from_block(block):
            parts.append(part)
    if parts and all(p["type"] == "text" for p in parts):
        # Plain text as a string: some OpenAI-compatible servers take no part lists.
        tool_messages.append({"role": "user", "content": "\n".join(p["text"] for p in parts)})
    elif parts:
        tool_messages.append({"role": "user", "content": parts})
    return tool_messages


def _tool_result_content(block: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    content = block.get("content")
    if isinstance(content, str):
        text, images = content, []
    else:
        items = (
            [b for b in content or () if isinstance(b, dict)] if isinstance(content, list) else []
        )
        text = _texts([b for b in items if b.get("type") == "text"], "\n")
        images = [p for b in items if b.get("type") == "image" and (p := _part_from_block(b))]
    if block.get("is_error"):
        text = f"[tool error] {text}"
    return text, images


def _part_from_block(block: dict[str, Any]) -> dict[str, Any] | None:
    kind = block.get("type")
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if kind == "text" and isinstance(block.get("text"), str):
        return {"type": "text", "text": block["text"]}
    if kind == "image" and source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "image" and source.get("type") == "url":
        return {"type": "image_url", "image_url": {"url": source.get("url")}}
    if kind == "document" and source.get("type") == "base64":
        data = f"data:{source.get('media_type')};base64,{source.get('data')}"
        return {"type": "file", "file": {"file_data": data, "filename": "document.pdf"}}
    return None  # thinking, redacted_thinking, server tool blocks


def _tools_to_openai(tools: object) -> list[dict[str, Any]]:
    out = []
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
            continue  # Anthropic server tools (web_search_..., bash_...) run at Anthropic only
        function: dict[str, Any] = {
            "name": tool.get("name") or "",
            "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
        }
        if tool.get("description"):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice_to_openai(choice: object, out: dict[str, Any]) -> None:
    if not isinstance(choice, dict):
        return
    kind = choice.get("type")
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name") or ""}}
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        out["parallel_tool_calls"] = False


def _effort_from(thinking: object, output_config: object) -> str | None:
    if isinstance(output_config, dict) and output_config.get("effort") in ("low", "medium"):
        return output_config["effort"]
    if isinstance(output_config, dict) and output_config.get("effort") in ("high", "xhigh", "max"):
        return "high"
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
        return None  # disabled, or adaptive: the upstream model's own default
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int):
        return None
    for bound, effort in EFFORT_BY_BUDGET:
        if budget < bound:
            return effort
    return "high"


# === OpenAI response -> Anthropic response ================================================


def response_from_openai(body: dict[str, Any], model: str) -> dict[str, Any]:
    """A ``chat.completion`` as a Messages response (first choice)."""
    choices = body.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if text := text_of(message.get("content"), sep=""):
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or new_id("toolu_"),
                "name": function.get("name") or "",
                "input": parse_arguments(function.get("arguments")),
            }
        )
    return {
        "id": _message_id(body.get("id")),
        "type": "message",
        "role": "assistant",
        "model": body.get("model") or model,
        "content": content,
        "stop_reason": STOP_FROM_OPENAI.get(choice.get("finish_reason"), "end_turn"),
        "stop_sequence": None,
        "usage": _anthropic_usage(from_openai(body.get("usage"))),
    }


def _message_id(upstream_id: object) -> str:
    if isinstance(upstream_id, str) and upstream_id:
        return upstream_id if upstream_id.startswith("msg_") else f"msg_{upstream_id}"
    return new_id("msg_")


def _anthropic_usage(usage: Usage | None) -> dict[str, int]:
    usage = usage or Usage()
    return {
        "input_tokens": max(0, usage.prompt - usage.cached),
        "output_tokens": usage.completion,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached,
    }


# === OpenAI chunks -> Anthropic stream ===================================================


class StreamFromOpenAI:
    """OpenAI chunks, one by one, as Anthropic ``(event name, data)`` pairs.

    ``message_delta`` and ``message_stop`` wait for the usage, which may come in a
    usage-only chunk after the finish reason: they are sent when that chunk arrives, or by
    ``finish()`` at the upstream's end.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self.content_seen = False
        self._openai_usage: dict[str, Any] | None = None
        self._started = self._stopped = False
        self._id = new_id("msg_")
        self._next_index = 0
        self._open: tuple[str, int] | None = None  # (kind, OpenAI tool index or -1)
        self._tool_id: str | None = None  # id of the open tool_use block
        self._finish: str | None = None

    @property
    def usage(self) -> Usage | None:
        return from_openai(self._openai_usage)

    def feed(self, chunk: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if isinstance(chunk.get("error"), dict):
            error = chunk["error"]
            raise UpstreamStreamError(
                str(error.get("message") or "upstream stream error"),
                str(error.get("type") or "api_error"),
            )
        if self._stopped:
            return []
        events = self._start(chunk)
        choices = chunk.get("choices") or ()
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        events += self._delta(choice.get("delta") or {})
        if choice.get("finish_reason"):
            self._finish = choice["finish_reason"]
        if isinstance(chunk.get("usage"), dict):
            self._openai_usage = chunk["usage"]
            if self._finish is not None:
                events += self._stop()
        return events

    def finish(self) -> list[tuple[str, dict[str, Any]]]:
        if self._stopped:
            return []
        return self._start({}) + self._stop()

    def _start(self, chunk: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if self._started:
            return []
        self._started = True
        if isinstance(chunk.get("id"), str):
            self._id = _message_id(chunk["id"])
        self.model = chunk.get("model") or self.model
        message = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [("message_start", {"type": "message_start", "message": message})]

    def _delta(self, delta: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            block = {"type": "thinking", "thinking": "", "signature": ""}
            events += self._open_block("thinking", -1, block)
            events.append(self._block_delta({"type": "thinking_delta", "thinking": reasoning}))
        if isinstance(delta.get("content"), str) and delta["content"]:
            events += self._open_block("text", -1, {"type": "text", "text": ""})
            events.append(self._block_delta({"type": "text_delta", "text": delta["content"]}))
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                events += self._tool_delta(call)
        return events

    def _tool_delta(self, call: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """A tool-call fragment: a new index or a new id starts a ``tool_use`` block."""
        index = call.get("index", 0)
        function = call.get("function") or {}
        events: list[tuple[str, dict[str, Any]]] = []
        call_id = call.get("id")
        if self._open != ("tool", index) or (call_id and call_id != self._tool_id):
            self._tool_id = call_id or new_id("toolu_")
            block = {
                "type": "tool_use",
                "id": self._tool_id,
                "name": function.get("name") or "",
                "input": {},
            }
            events += self._open_block("tool", index, block)
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            delta = {"type": "input_json_delta", "partial_json": arguments}
            events.append(self._block_delta(delta))
        return events

    def _open_block(
        self, kind: str, tool_index: int, block: dict[str, Any]
    ) -> list[tuple[str, dict[str, Any]]]:
        """Start a block of ``kind`` unless one is open; a tool block always starts anew."""
        if self._open == (kind, tool_index) and kind != "tool":
            return []
        events = self._close_block()
        self._open = (kind, tool_index)
        self.content_seen = True
        data = {"type": "content_block_start", "index": self._next_index, "content_block": block}
        return [*events, ("content_block_start", data)]

    def _block_delta(self, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "content_block_delta", {
            "type": "content_block_delta",
            "index": self._next_index,
            "delta": delta,
        }

    def _close_block(self) -> list[tuple[str, dict[str, Any]]]:
        if self._open is None:
            return []
        self._open = None
        index, self._next_index = self._next_index, self._next_index + 1
        return [("content_block_stop", {"type": "content_block_stop", "index": index})]

    def _stop(self) -> list[tuple[str, dict[str, Any]]]:
        self._stopped = True
        usage = _anthropic_usage(self.usage)
        delta = {
            "type": "message_delta",
            "delta": {
                "stop_reason": STOP_FROM_OPENAI.get(self._finish or "stop", "end_turn"),
                "stop_sequence": None,
            },
            "usage": usage,
        }
        return [
            *self._close_block(),
            ("message_delta", delta),
            ("message_stop", {"type": "message_stop"}),
        ]


# === error bodies =========================================================================


def error_to_openai(body: bytes) -> bytes | None:
    """An Anthropic error body as OpenAI error JSON; None when it is not one."""
    error = _error_object(body)
    if error is None:
        return None
    kind = str(error.get("type") or "api_error")
    return orjson.dumps(
        {
            "error": {
                "message": str(error.get("message") or kind),
                "type": OPENAI_ERROR_TYPE.get(kind, "server_error"),
                "param": None,
                "code": kind,
            }
        }
    )


def error_from_openai(body: bytes) -> bytes | None:
    """An OpenAI-shaped error body as Anthropic error JSON; None when it is not one."""
    error = _error_object(body)
    if error is None:
        return None
    kind = str(error.get("type") or "")
    out: dict[str, Any] = {
        "type": ANTHROPIC_ERROR_TYPE.get(kind, "api_error"),
        "message": str(error.get("message") or kind or "upstream error"),
    }
    if error.get("code") is not None:
        out["code"] = error["code"]
    return orjson.dumps({"type": "error", "error": out})


def _error_object(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, str):
        return {"message": error}
    return error if isinstance(error, dict) else None

"""OpenAI chat completions <-> Gemini ``generateContent``, streams included.

Job: pure translation of an OpenAI chat request into a Gemini request body, and of Gemini
responses, stream events, usage and errors back into OpenAI shapes. The proxy builds the
URL (``/v1beta/models/{model}:generateContent`` or ``:streamGenerateContent?alt=sse``) and
the ``x-goog-api-key`` header, and fetches http(s) images first (``image_urls``;
``edgeproxy.image_fetch``) because Gemini only takes image bytes inline.

It must not: do I/O, look at configuration, or reject requests (fields Gemini cannot
express are dropped, as ``FIELD_MAPPING`` lists).

Decisions, each documented in ``docs/mapping.md``:

- JSON Schemas (tool parameters, ``response_format``) go to ``parametersJsonSchema`` and
  ``responseJsonSchema``, which take JSON Schema rather than OpenAPI's subset; keys outside
  the subset Gemini documents for them are stripped (``SCHEMA_KEYS``), ``const`` becomes a
  one-value ``enum`` and draft-07 ``definitions`` become ``$defs``.
- An http(s) image the proxy did not fetch becomes a ``fileData`` part with the URL, so
  Gemini may still fetch public URLs itself.
- Gemini 3 rejects replayed function calls without their ``thoughtSignature``. Responses
  carry it as ``tool_calls[].extra_content.google.thought_signature`` (Gemini's own OpenAI
  layer does the same); requests send it back, and when a client dropped it, the first
  call of each turn gets ``SKIP_SIGNATURE``, the value Gemini documents for histories it
  did not produce.
"""

from __future__ import annotations

import base64
import mimetypes
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
from edgeproxy.usage import Usage, token_count

__all__ = [
    "THINKING_BUDGETS",
    "StreamToOpenAI",
    "UpstreamStreamError",
    "error_to_openai",
    "image_urls",
    "request_from_openai",
    "response_to_openai",
    "usage_from",
]

# reasoning_effort -> thinkingConfig.thinkingBudget. 24576 is Gemini 2.5 Flash's largest
# budget; 512 is Flash-Lite's smallest non-zero one (Pro's is 128), so "minimal" is valid on
# every model. "none" turns thinking off, which Gemini Pro models refuse with a clear 400.
# Gemini 3 models still accept thinkingBudget in place of thinkingLevel.
THINKING_BUDGETS = {
    "none": 0,
    "minimal": 512,
    "low": 1024,
    "medium": 8192,
    "high": 24576,
    "xhigh": 24576,
}

# The JSON Schema keys Gemini documents for responseJsonSchema / parametersJsonSchema.
SCHEMA_KEYS = frozenset(
    {
        "$id",
        "$defs",
        "$ref",
        "$anchor",
        "type",
        "format",
        "title",
        "description",
        "enum",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "minimum",
        "maximum",
        "anyOf",
        "oneOf",
        "properties",
        "additionalProperties",
        "required",
        "propertyOrdering",
    }
)

# Documented fallback signature for function calls Gemini did not produce (thought-signatures
# guide, FAQ).
SKIP_SIGNATURE = "skip_thought_signature_validator"

# An image URL without a recognisable extension is most likely a JPEG.
DEFAULT_IMAGE_TYPE = "image/jpeg"

FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}

ERROR_TYPES = {
    "INVALID_ARGUMENT": "invalid_request_error",
    "FAILED_PRECONDITION": "invalid_request_error",
    "OUT_OF_RANGE": "invalid_request_error",
    "NOT_FOUND": "invalid_request_error",
    "UNAUTHENTICATED": "authentication_error",
    "PERMISSION_DENIED": "permission_error",
    "RESOURCE_EXHAUSTED": "rate_limit_error",
}


# === request ===============================================================================


def image_urls(body: dict[str, Any]) -> list[str]:
    """The http(s) image URLs of an OpenAI chat request, first-seen order, no repeats."""
    urls: dict[str, None] = {}
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            url = _image_url(part)
            if url and url.lower().startswith(("http://", "https://")):
                urls[url] = None
    return list(urls)


def _image_url(part: object) -> str | None:
    if not isinstance(part, dict) or part.get("type") != "image_url":
        return None
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    return url if isinstance(url, str) else None


def request_from_openai(
    body: dict[str, Any],
    model: str,
    images: dict[str, tuple[str, bytes]] | None = None,
) -> dict[str, Any]:
    """An OpenAI chat request as a Gemini request body for ``model`` (the URL names it).

    ``images`` maps an http(s) URL to the (mime type, bytes) the proxy fetched for it.
    """
    messages = [m for m in body.get("messages") or () if isinstance(m, dict)]
    out: dict[str, Any] = {"contents": _contents(messages, images or {})}
    if system := _system_instruction(messages):
        out["systemInstruction"] = system
    if declarations := _declarations(body.get("tools")):
        out["tools"] = [{"functionDeclarations": declarations}]
        if config := _function_calling_config(body.get("tool_choice")):
            out["toolConfig"] = {"functionCallingConfig": config}
    if generation := _generation_config(body):
        out["generationConfig"] = generation
    return out


def _system_instruction(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    parts = [
        {"text": text}
        for m in messages
        if m.get("role") in ("system", "developer") and (text := text_of(m.get("content")))
    ]
    return {"parts": parts} if parts else None


def _contents(
    messages: list[dict[str, Any]], images: dict[str, tuple[str, bytes]]
) -> list[dict[str, Any]]:
    """user/assistant/tool messages as alternating user/model contents."""
    names = _tool_names(messages)
    contents: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "user":
            role, parts = "user", _user_parts(message.get("content"), images)
        elif role == "assistant":
            role, parts = "model", _model_parts(message)
        elif role == "tool":
            role, parts = "user", [_function_response(message, names)]
        else:
            continue
        if not parts:
            continue  # Gemini rejects contents without parts
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"] += parts
        else:
            contents.append({"role": role, "parts": parts})
    return contents


def _tool_names(messages: list[dict[str, Any]]) -> dict[str, str]:
    """tool_call id -> function name, from the assistant messages' tool_calls."""
    names = {}
    for message in messages:
        if message.get("role") != "assistant":
            continue
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                names[str(call.get("id"))] = call["function"].get("name") or ""
    return names


def _user_parts(content: object, images: dict[str, tuple[str, bytes]]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str) and part["text"]:
            parts.append({"text": part["text"]})
        elif kind == "image_url" and (url := _image_url(part)):
            parts.append(_image_part(url, images))
        elif kind == "file" and (inline := _file_part(part.get("file"))):
            parts.append(inline)
        elif kind == "input_audio" and isinstance(part.get("input_audio"), dict):
            audio = part["input_audio"]
            mime = f"audio/{audio.get('format') or 'wav'}"
            parts.append({"inlineData": {"mimeType": mime, "data": audio.get("data") or ""}})
    return parts


def _image_part(url: str, images: dict[str, tuple[str, bytes]]) -> dict[str, Any]:
    if data := split_data_url(url):
        return {"inlineData": {"mimeType": data[0], "data": data[1]}}
    if url in images:
        mime, raw = images[url]
        return {"inlineData": {"mimeType": mime, "data": base64.b64encode(raw).decode("ascii")}}
    guessed = mimetypes.guess_type(url.split("?", 1)[0])[0]
    mime = guessed if guessed and guessed.startswith("image/") else DEFAULT_IMAGE_TYPE
    return {"fileData": {"mimeType": mime, "fileUri": url}}


def _file_part(file: object) -> dict[str, Any] | None:
    if not isinstance(file, dict) or not isinstance(file.get("file_data"), str):
        return None  # file_id refers to OpenAI's file store
    data = split_data_url(file["file_data"])
    return {"inlineData": {"mimeType": data[0], "data": data[1]}} if data else None


def _model_parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    if text := text_of(message.get("content"), sep="\n\n"):
        parts.append({"text": text})
    first_call = True
    for call in message.get("tool_calls") or ():
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            continue
        function = call["function"]
        part: dict[str, Any] = {
            "functionCall": {
                "name": function.get("name") or "",
                "args": parse_arguments(function.get("arguments")),
            }
        }
        signature = _signature(call)
        if signature or first_call:
            part["thoughtSignature"] = signature or SKIP_SIGNATURE
        first_call = False
        parts.append(part)
    return parts


def _signature(call: dict[str, Any]) -> str | None:
    extra = call.get("extra_content")
    google = extra.get("google") if isinstance(extra, dict) else None
    signature = google.get("thought_signature") if isinstance(google, dict) else None
    return signature if isinstance(signature, str) and signature else None


def _function_response(message: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """A tool message; the function name comes from the call it answers (Gemini wants it)."""
    call_id = str(message.get("tool_call_id"))
    name = names.get(call_id) or message.get("name") or call_id
    text = text_of(message.get("content"))
    try:
        parsed = orjson.loads(text) if text.lstrip().startswith("{") else None
    except orjson.JSONDecodeError:
        parsed = None
    response = parsed if isinstance(parsed, dict) else {"content": text}
    return {"functionResponse": {"name": name, "response": response}}


def _declarations(tools: object) -> list[dict[str, Any]]:
    out = []
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            continue
        function = tool.get("function")
        if not isinstance(function, dict):
            continue
        item: dict[str, Any] = {"name": function.get("name") or ""}
        if function.get("description"):
            item["description"] = function["description"]
        if isinstance(function.get("parameters"), dict):
            item["parametersJsonSchema"] = clean_schema(function["parameters"])
        out.append(item)
    return out


def clean_schema(schema: object) -> object:
    """A JSON Schema restricted to the keys Gemini documents (see the module docstring)."""
    if isinstance(schema, list):
        return [clean_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = dict(schema)
    if "definitions" in schema and "$defs" not in schema:
        schema["$defs"] = schema.pop("definitions")
    if "const" in schema and "enum" not in schema:
        schema["enum"] = [schema["const"]]
    if isinstance(schema.get("$ref"), str):
        # Gemini allows no sibling keys next to $ref except $-prefixed ones.
        ref = schema["$ref"].replace("#/definitions/", "#/$defs/")
        return {k: v for k, v in schema.items() if k.startswith("$") and k in SCHEMA_KEYS} | {
            "$ref": ref
        }
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key not in SCHEMA_KEYS:
            continue
        if key in ("properties", "$defs") and isinstance(value, dict):
            out[key] = {name: clean_schema(sub) for name, sub in value.items()}
        elif key in ("items", "prefixItems", "anyOf", "oneOf", "additionalProperties"):
            out[key] = clean_schema(value)
        else:
            out[key] = value
    return out


def _function_calling_config(choice: object) -> dict[str, Any] | None:
    if choice == "auto":
        return {"mode": "AUTO"}
    if choice == "required":
        return {"mode": "ANY"}
    if choice == "none":
        return {"mode": "NONE"}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"mode": "ANY", "allowedFunctionNames": [choice["function"].get("name") or ""]}
    return None


def _generation_config(body: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for source, target in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("top_k", "topK"),
        ("seed", "seed"),
        ("n", "candidateCount"),
    ):
        value = body.get(source)
        if isinstance(value, int | float) and not isinstance(value, bool):
            config[target] = value
    for key in ("max_completion_tokens", "max_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool):
            config["maxOutputTokens"] = body[key]
            break
    if stops := stop_list(body.get("stop")):
        config["stopSequences"] = stops
    config |= _response_format(body.get("response_format"))
    effort = body.get("reasoning_effort")
    if isinstance(effort, str) and effort in THINKING_BUDGETS:
        budget = THINKING_BUDGETS[effort]
        config["thinkingConfig"] = (
            {"thinkingBudget": budget, "includeThoughts": True} if budget else {"thinkingBudget": 0}
        )
    return config


def _response_format(response_format: object) -> dict[str, Any]:
    if not isinstance(response_format, dict):
        return {}
    if response_format.get("type") == "json_object":
        return {"responseMimeType": "application/json"}
    if response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        out: dict[str, Any] = {"responseMimeType": "application/json"}
        if isinstance(schema, dict):
            out["responseJsonSchema"] = clean_schema(schema)
        return out
    return {}


# === response ==============================================================================


def response_to_openai(body: dict[str, Any], model: str) -> dict[str, Any]:
    """A GenerateContentResponse as a ``chat.completion``."""
    choices = [
        _choice(c, i) for i, c in enumerate(body.get("candidates") or ()) if isinstance(c, dict)
    ]
    if not choices:  # the prompt itself was blocked (promptFeedback.blockReason)
        choices = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": "content_filter" if _blocked(body) else "stop",
            }
        ]
    metadata = body.get("usageMetadata") or {}
    return {
        "id": _response_id(body),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("modelVersion") or model,
        "choices": choices,
        "usage": usage_dict(usage_from(metadata), _count(metadata, "thoughtsTokenCount")),
    }


def _choice(candidate: dict[str, Any], position: int) -> dict[str, Any]:
    texts, thoughts, calls = [], [], []
    for part in (candidate.get("content") or {}).get("parts") or ():
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("functionCall"), dict):
            calls.append(_tool_call(part))
        elif isinstance(part.get("text"), str):
            (thoughts if part.get("thought") is True else texts).append(part["text"])
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if thoughts:
        message["reasoning_content"] = "".join(thoughts)
    if calls:
        message["tool_calls"] = calls
        message["content"] = message["content"] or None
    return {
        "index": candidate.get("index", position),
        "message": message,
        "logprobs": None,
        "finish_reason": _finish(candidate.get("finishReason"), bool(calls)) or "stop",
    }


def _tool_call(part: dict[str, Any]) -> dict[str, Any]:
    """A functionCall part as an OpenAI tool call, its thought signature kept aside."""
    function_call = part["functionCall"]
    call: dict[str, Any] = {
        "id": function_call.get("id") or new_id("call_"),
        "type": "function",
        "function": {
            "name": function_call.get("name") or "",
            "arguments": dump_arguments(function_call.get("args") or {}),
        },
    }
    if isinstance(part.get("thoughtSignature"), str):
        call["extra_content"] = {"google": {"thought_signature": part["thoughtSignature"]}}
    return call


def _finish(reason: object, has_calls: bool) -> str | None:
    if not isinstance(reason, str) or reason == "FINISH_REASON_UNSPECIFIED":
        return None
    if reason == "STOP" and has_calls:
        return "tool_calls"
    return FINISH_REASONS.get(reason, "stop")


def _blocked(body: dict[str, Any]) -> bool:
    feedback = body.get("promptFeedback")
    return isinstance(feedback, dict) and bool(feedback.get("blockReason"))


def _response_id(body: dict[str, Any]) -> str:
    response_id = body.get("responseId")
    return f"chatcmpl-{response_id}" if isinstance(response_id, str) else new_id("chatcmpl-")


def _count(metadata: dict[str, Any], key: str) -> int:
    return token_count(metadata.get(key))


def usage_from(usage_metadata: dict[str, Any]) -> Usage:
    """usageMetadata per SPEC §4: thoughts are completion tokens, tool-use prompts prompt."""
    return Usage(
        prompt=_count(usage_metadata, "promptTokenCount")
        + _count(usage_metadata, "toolUsePromptTokenCount"),
        completion=_count(usage_metadata, "candidatesTokenCount")
        + _count(usage_metadata, "thoughtsTokenCount"),
        cached=_count(usage_metadata, "cachedContentTokenCount"),
    )


# === stream ================================================================================


class StreamToOpenAI:
    """Gemini stream events (each a whole GenerateContentResponse) as OpenAI chunks."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.content_seen = False
        self._id: str | None = None
        self._created = int(time.time())
        self._metadata: dict[str, Any] | None = None
        self._tool_counts: dict[int, int] = {}  # candidate index -> tool calls sent

    @property
    def usage(self) -> Usage | None:
        return usage_from(self._metadata) if self._metadata is not None else None

    def feed(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        if isinstance(data.get("error"), dict):
            error = data["error"]
            raise UpstreamStreamError(
                str(error.get("message") or "upstream stream error"),
                ERROR_TYPES.get(str(error.get("status")), "server_error"),
            )
        if self._id is None:
            self._id = _response_id(data)
        self.model = data.get("modelVersion") or self.model
        if isinstance(data.get("usageMetadata"), dict):
            self._metadata = data["usageMetadata"]  # cumulative: the latest wins
        chunks: list[dict[str, Any]] = []
        candidates = [c for c in data.get("candidates") or () if isinstance(c, dict)]
        for position, candidate in enumerate(candidates):
            chunks += self._candidate(candidate, candidate.get("index", position))
        if not candidates and _blocked(data):
            chunks += [*self._role(0), self._chunk({}, 0, "content_filter")]
        return chunks

    def finish(self) -> list[dict[str, Any]]:
        usage = self.usage
        if not self.include_usage or usage is None:
            return []
        chunk_id = self._id or new_id("chatcmpl-")
        thoughts = _count(self._metadata or {}, "thoughtsTokenCount")
        return [make_usage_chunk(chunk_id, self.model, self._created, usage, thoughts)]

    def _chunk(
        self, delta: dict[str, Any], index: int, finish: str | None = None
    ) -> dict[str, Any]:
        if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
            self.content_seen = True
        chunk_id = self._id or new_id("chatcmpl-")
        return make_chunk(chunk_id, self.model, self._created, delta, finish, index)

    def _role(self, index: int) -> list[dict[str, Any]]:
        if index in self._tool_counts:
            return []
        self._tool_counts[index] = 0
        return [self._chunk({"role": "assistant", "content": ""}, index)]

    def _candidate(self, candidate: dict[str, Any], index: int) -> list[dict[str, Any]]:
        chunks = self._role(index)
        for part in (candidate.get("content") or {}).get("parts") or ():
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("functionCall"), dict):
                call = {"index": self._tool_counts[index], **_tool_call(part)}
                self._tool_counts[index] += 1
                chunks.append(self._chunk({"tool_calls": [call]}, index))
            elif isinstance(part.get("text"), str) and part["text"]:
                key = "reasoning_content" if part.get("thought") is True else "content"
                chunks.append(self._chunk({key: part["text"]}, index))
        finish = _finish(candidate.get("finishReason"), self._tool_counts[index] > 0)
        if finish is not None:
            chunks.append(self._chunk({}, index, finish))
        return chunks


# === errors ================================================================================


def error_to_openai(body: bytes) -> bytes | None:
    """A Gemini error body (``{"error": {"code", "message", "status"}}``) as OpenAI JSON."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(parsed, list) and parsed:  # the non-SSE stream endpoint wraps it in a list
        parsed = parsed[0]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return None
    status = str(error.get("status") or "")
    return orjson.dumps(
        {
            "error": {
                "message": str(error.get("message") or status or "upstream error"),
                "type": ERROR_TYPES.get(status, "server_error"),
                "param": None,
                "code": status.lower() or None,
            }
        }
    )

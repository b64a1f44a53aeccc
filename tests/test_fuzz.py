"""Property-based fuzzing (hypothesis) of the pure parsers a hostile or careless input
reaches: the config loader, the SSE scanner, and the request translation.

- ``load_config``: any text, YAML-ish or a mutation of the shipped relay.yaml, gives a
  ``Config`` or a one-line ``ConfigError``, never another exception.
- ``SSEScanner``: bytes split anywhere give the same events as the whole; ``complete_len``
  and ``split`` agree on where complete events end.
- ``outbound.build``: a body that passes ``inbound`` checks translates for every upstream
  kind, or is refused with a ``ProxyError``; it never crashes the relay.

Example counts are bounded so the file runs in a few seconds; raise them with
``HYPOTHESIS_EXAMPLES=5000`` for a longer hunt.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from edgeproxy import errors, inbound, outbound, sse
from edgeproxy.config import ConfigError, Params, Upstream, load_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the work tree; failures print their example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --- the config loader -----------------------------------------------------------------

# secrets the shipped file expands: a ConfigError must never show one
ENV = {
    "OPENAI_API_KEY": "sk-FUZZ-openai-secret",
    "ANTHROPIC_API_KEY": "sk-FUZZ-anthropic-secret",
    "GEMINI_API_KEY": "FUZZ-gemini-secret",
    "EDGEPROXY_ADMIN_TOKEN": "FUZZ-admin-token",
}
YAML_TOKENS = [
    "\n", "  ", "- ", ": ", ":", "#", "[", "]", "{", "}", ",", "&a ", "*a", "<<: *a", "!!str ",
    "!!binary ", "!!python/object ", "|", ">", "'", '"', "%YAML 1.1\n", "---\n", "...\n", "?",
    "listen", "upstreams", "models", "timeouts", "retry", "health", "workers", "api_keys",
    "base_url", "kind", "openai", "gemini", "weight", "price", "input", "on", "off", "yes",
    "null", "~", "true", "-1", "0", "1e309", "9" * 30, "0x1F", "1:2:3", "30s", "5ms", "2GiB",
    "${X}", "${X:-y}", "${", "http://", "127.0.0.1:8080", "[::1]:0", "\t", "\ufeff", "\x00",
    "é", "\U0001f600", "name", "gpt-*", "*",
]  # fmt: skip
yamlish = st.lists(st.sampled_from(YAML_TOKENS) | st.text(max_size=8), max_size=40).map("".join)
SHIPPED = (REPO / "relay.yaml").read_text()
SCALARS = ["-1", "0", "null", "[]", "{}", '""', "abc", "1e309", "true", "5000ms", "[1, [2]]",
           "${UNSET_VAR}", "*nope", "!!int x", "99999999999999999999999", "'\\x00'"]  # fmt: skip


@st.composite
def mutated_relay_yaml(draw: st.DrawFn) -> str:
    """The shipped relay.yaml with a few lines deleted, duplicated, cut, re-indented, or
    with a value replaced."""
    lines = SHIPPED.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["delete", "duplicate", "cut", "indent", "value", "junk"]))
        line = lines[i]
        if action == "delete":
            del lines[i]
        elif action == "duplicate":
            lines.insert(i, line)
        elif action == "cut":
            lines[i] = line[: draw(st.integers(0, len(line)))]
        elif action == "indent":
            lines[i] = " " * draw(st.integers(0, 6)) + line.lstrip()
        elif action == "value" and ":" in line:
            key, _, _ = line.partition(":")
            lines[i] = f"{key}: {draw(st.sampled_from(SCALARS))}"
        else:
            lines[i] = line + draw(st.sampled_from(YAML_TOKENS))
        if not lines:
            break
    return "\n".join(lines)


def assert_loads_or_config_error(path: Path, text: str | bytes) -> None:
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(text)
    try:
        load_config(path, env=ENV)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(str(path)) and "\n" not in message, message
        for secret in ENV.values():
            assert secret not in message


def test_the_shipped_relay_yaml_loads(tmp_path: Path):
    assert_loads_or_config_error(tmp_path / "relay.yaml", SHIPPED)
    load_config(tmp_path / "relay.yaml", env=ENV)


@FUZZ
@given(text=yamlish)
@example(text="[" * 10_000)
@example(text="a: &a [*a]")
@example(text="a: &a {b: *a}\nlisten: *a")
@example(text="listen: " + "9" * 5000)
@example(text="x: !!timestamp 2020-13-45")
@example(text="\ufeff\ufefflisten: 1")
def test_yamlish_text_loads_or_is_a_config_error(tmp_path: Path, text: str):
    assert_loads_or_config_error(tmp_path / "relay.yaml", text)


@FUZZ
@given(data=st.binary(max_size=200))
@example(data=b"\xff\xfe\x00l\x00i")
@example(data=SHIPPED.encode()[:500] + b"\x80")
def test_arbitrary_bytes_load_or_are_a_config_error(tmp_path: Path, data: bytes):
    assert_loads_or_config_error(tmp_path / "relay.yaml", data)


@FUZZ
@given(text=mutated_relay_yaml())
def test_a_mutated_shipped_relay_yaml_loads_or_is_a_config_error(tmp_path: Path, text: str):
    assert_loads_or_config_error(tmp_path / "relay.yaml", text)


# --- the SSE scanner -------------------------------------------------------------------

SSE_PIECES = [b"\r", b"\n", b"\r\n", b"\n\n", b"data: ", b"data:", b"event: x", b": ping",
              b'{"a":1}', b"[DONE]", b"\xff", b"\x00", b"x", b"id: 1", b" "]  # fmt: skip
sse_bytes = st.lists(st.sampled_from(SSE_PIECES) | st.binary(max_size=4), max_size=40).map(b"".join)


def scan(pieces: list[bytes]) -> tuple[list[bytes], bytes]:
    scanner = sse.SSEScanner()
    events = [event for piece in pieces for event in scanner.feed(piece)]
    return events, scanner.flush()


@FUZZ
@given(data=sse_bytes, cuts=st.lists(st.integers(0, 200), max_size=8))
@example(data=b"data: a\r\n\r\ndata: b\r\r", cuts=[9, 10, 11])
@example(data=b"data: a\n\r\n", cuts=[8])
def test_the_scanner_gives_the_same_events_however_the_bytes_are_split(
    data: bytes, cuts: list[int]
):
    bounds = [0, *sorted({c for c in cuts if c <= len(data)}), len(data)]
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    events, tail = scan(pieces)
    assert (events, tail) == scan([data])
    assert b"".join(events) + tail == data  # nothing lost, nothing added


@FUZZ
@given(data=sse_bytes)
@example(data=b"data: a\n\r\ndata: b\r\n\r")  # the boundary fixed in 1dcbad3
def test_complete_len_never_ends_inside_an_event(data: bytes):
    """What ``PassThrough`` relays at once (``data[:complete_len]``) holds exactly the
    events ``split`` finds in all of ``data``; the rest is an unfinished event."""
    cut = sse.complete_len(data)
    assert sse.split(data[:cut]) == sse.split(data)
    assert not re.search(rb"[^\r\n]", data[sum(map(len, sse.split(data))) : cut])


@FUZZ
@given(data=sse_bytes)
@example(data=b'data: {"usage":{}}\n\n\n')
def test_complete_len_agrees_with_split_to_the_byte(data: bytes):
    assert sum(map(len, sse.split(data))) == sse.complete_len(data)


# --- translating requests --------------------------------------------------------------

LEAF = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(
    max_size=4
) | st.sampled_from(["user", "assistant", "system", "tool", "text", "image_url", "function",
                      "tool_use", "tool_result", "auto", "required", "json_schema",
                      "data:image/png;base64,AAAA", "https://example.invalid/x.png"])  # fmt: skip
KEYS = st.sampled_from(["role", "content", "type", "text", "image_url", "url", "tool_calls",
                        "function", "name", "arguments", "id", "tool_call_id", "parameters",
                        "input", "source", "data", "tool_use_id", "json_schema", "schema",
                        "budget_tokens", "file", "input_audio", "properties", "items",
                        "reasoning_content", "cache_control", "anyOf"])  # fmt: skip
JSON = st.recursive(
    LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=15,
)  # fmt: skip
PART = JSON | st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "image", "tool_use", "tool_result", "file",
                              "input_audio", "thinking", "document"])},
    optional={k: JSON for k in ["text", "image_url", "source", "input", "content", "file", "id",
                                "name", "tool_use_id", "thinking"]},
)  # fmt: skip
CALL = st.fixed_dictionaries(
    {}, optional={"id": JSON, "type": JSON, "function": JSON | st.dictionaries(KEYS, JSON)}
)
MESSAGE = JSON | st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", 5])},
    optional={"content": JSON | st.lists(PART, max_size=3),
              "tool_calls": JSON | st.lists(CALL, max_size=2),
              "tool_call_id": JSON, "name": JSON, "reasoning_content": JSON},
)  # fmt: skip
TOP = st.sampled_from(["tools", "tool_choice", "stop", "temperature", "top_p", "top_k",
                       "response_format", "reasoning_effort", "user", "seed", "system",
                       "parallel_tool_calls", "thinking", "stop_sequences", "metadata",
                       "max_tokens", "n", "stream_options"])  # fmt: skip
UPSTREAMS = {
    kind: Upstream(name=kind, kind=kind, base_url="http://u", api_keys=("k",), models=("*",))  # type: ignore[arg-type]
    for kind in ("openai", "anthropic", "gemini")
}


@FUZZ
@given(
    messages=st.lists(MESSAGE, max_size=4),
    extra=st.dictionaries(TOP, JSON, max_size=4),
    dialect=st.sampled_from(["openai", "anthropic"]),
    stream=st.booleans(),
)
@example(messages=[{"role": "user", "content": 5}], extra={}, dialect="openai", stream=False)
@example(
    messages=[{"role": "assistant", "tool_calls": [{"function": 5}]}],
    extra={}, dialect="openai", stream=True,
)  # fmt: skip
def test_a_body_that_passes_inbound_checks_translates_for_every_upstream_kind(
    messages: list[Any], extra: dict[str, Any], dialect: str, stream: bool
):
    body = {**extra, "model": "m", "messages": messages, "stream": stream}
    try:
        inbound.check_fields(body, needs_messages=True)
    except errors.ProxyError:
        return  # refused with a 400 before any upstream: fine
    path = "/chat/completions" if dialect == "openai" else "/messages"
    req = outbound.ClientRequest(
        dialect=dialect,  # type: ignore[arg-type]
        path=path,
        raw=b"{}",
        body=body,
        content_type="application/json",
        stream=stream,
        client_headers=CIMultiDict(),
    )
    for upstream in UPSTREAMS.values():
        try:
            out = outbound.build(req, upstream, {}, Params(), {})
        except errors.ProxyError:
            continue
        assert isinstance(out.body, bytes)

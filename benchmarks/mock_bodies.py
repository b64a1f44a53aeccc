"""The fixed upstream answers and client requests every benchmark target sees.

Job: build, once and deterministically, the OpenAI chat completion JSON body, the 50-event
SSE body (48 chat.completion.chunk events, a usage-only chunk and ``data: [DONE]``) and the
two request bodies. nginx serves the answers as static files (a ``return 200 '...'`` body
is capped at 4 KB by nginx's config parser; the SSE body is 13 KB).

It must not: import anything of edgeproxy's, or depend on the clock.
"""

from __future__ import annotations

import orjson

CREATED = 1_700_000_000
# fmt: off
WORDS = ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "the",
         "relay", "counts", "every", "token", "it", "forwards", "and", "keeps", "the", "stream",
         "intact", "from", "the", "first", "byte", "to", "the", "last", "one"]
# fmt: on
SSE_CONTENT_EVENTS = 48  # + a usage chunk + [DONE] = 50 events
USAGE = {
    "prompt_tokens": 17,
    "completion_tokens": SSE_CONTENT_EVENTS,
    "total_tokens": 17 + SSE_CONTENT_EVENTS,
}
PROMPT = [{"role": "user", "content": "Write fifty words about a fox, please."}]


def request_body(model: str, *, stream: bool) -> bytes:
    """What the load generators send: a small chat request, as an SDK would."""
    return orjson.dumps({"model": model, "messages": PROMPT, "max_tokens": 64, "stream": stream})


def json_body() -> bytes:
    text = " ".join(WORDS[i % len(WORDS)] for i in range(SSE_CONTENT_EVENTS))
    return orjson.dumps(
        {
            "id": "chatcmpl-bench0000000000000000000001",
            "object": "chat.completion",
            "created": CREATED,
            "model": "bench-upstream-model-2025-01-01",
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        }
    )


def sse_chunk(index: int, *, delta: dict, finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-bench0000000000000000000002",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "bench-upstream-model-2025-01-01",
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def usage_chunk() -> bytes:
    chunk = {
        "id": "chatcmpl-bench0000000000000000000002",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "bench-upstream-model-2025-01-01",
        "system_fingerprint": "fp_bench",
        "choices": [],
        "usage": USAGE,
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def content_event(index: int) -> bytes:
    """Content event ``index`` (0-based) of a stream; the first one carries the role."""
    word = WORDS[index % len(WORDS)] + " "
    delta = {"role": "assistant", "content": word} if index == 0 else {"content": word}
    return sse_chunk(index, delta=delta)


def sse_body() -> bytes:
    events = [content_event(i) for i in range(SSE_CONTENT_EVENTS - 1)]
    events.append(sse_chunk(SSE_CONTENT_EVENTS - 1, delta={}, finish="stop"))
    events.append(usage_chunk())
    events.append(DONE)
    return b"".join(events)

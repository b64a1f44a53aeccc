"""An offline, OpenAI-compatible mock upstream for first runs and demos.

``python -m edgeproxy.demo_upstream [--port 8079]`` serves ``/v1/chat/completions`` (JSON
and SSE, echoing the last user message, calling a tool when tools are offered),
``/v1/embeddings`` (deterministic vectors) and ``/v1/models``, with real-looking usage so
metering is visible. Every answer says it comes from the demo. It never contacts anything.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time
from typing import Any

import orjson
from aiohttp import web

MODEL = "demo-chat"


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                texts = [
                    p.get("text", "")
                    for p in content
                    if isinstance(p, dict) and p.get("type") == "text"
                ]
                images = sum(
                    1 for p in content if isinstance(p, dict) and p.get("type") == "image_url"
                )
                return " ".join(texts) + (f" [+{images} image(s)]" if images else "")
    return ""


def _reply(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    tools = body.get("tools") or []
    messages = body.get("messages") or []
    if tools and not (messages and messages[-1].get("role") == "tool"):
        name = tools[0].get("function", {}).get("name", "tool")
        return "", [{"id": "call_demo1", "type": "function",
                     "function": {"name": name, "arguments": orjson.dumps({"demo": True}).decode()}}]  # fmt: skip
    return f"[edgeproxy demo upstream] you said: {_last_user_text(messages)}", []


def _usage(body: dict[str, Any], text: str) -> dict[str, int]:
    prompt = max(1, len(orjson.dumps(body.get("messages") or [])) // 4)
    completion = max(1, len(text) // 4)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def chat(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    text, tool_calls = _reply(body)
    usage = _usage(body, text)
    created = int(time.time())
    base = {"id": "chatcmpl-demo", "created": created, "model": body.get("model", MODEL)}
    finish = "tool_calls" if tool_calls else "stop"
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return web.json_response(
            {**base, "object": "chat.completion", "usage": usage,
             "choices": [{"index": 0, "message": message, "finish_reason": finish}]},
            dumps=lambda o: orjson.dumps(o).decode(),
        )  # fmt: skip
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    include_usage = (body.get("stream_options") or {}).get("include_usage") is True

    async def send(delta: dict[str, Any], finish_reason: str | None = None) -> None:
        chunk = {**base, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}  # fmt: skip
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")

    try:
        await send({"role": "assistant", "content": ""})
        if tool_calls:
            await send({"tool_calls": [{"index": 0, **tool_calls[0]}]})
        for word in text.split(" "):
            await send({"content": word + " "})
            await asyncio.sleep(0.01)
        await send({}, finish)
        if include_usage:
            chunk = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
    except ConnectionError:
        pass  # the client (the relay) went away: nothing to finish
    return response


async def embeddings(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    inputs = body.get("input")
    inputs = inputs if isinstance(inputs, list) else [inputs]
    data = []
    for i, item in enumerate(inputs):
        digest = hashlib.sha256(str(item).encode()).digest()
        data.append({"object": "embedding", "index": i, "embedding": [b / 255 for b in digest[:8]]})
    tokens = sum(max(1, len(str(x)) // 4) for x in inputs)
    return web.json_response(
        {"object": "list", "data": data, "model": body.get("model"),
         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
        dumps=lambda o: orjson.dumps(o).decode(),
    )  # fmt: skip


async def models(request: web.Request) -> web.Response:
    return web.json_response(
        {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "demo"}]}
    )


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="edgeproxy's offline demo upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8079)
    args = parser.parse_args()
    print(
        f"edgeproxy demo upstream (offline mock) on http://{args.host}:{args.port}/v1", flush=True
    )
    web.run_app(
        make_app(),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        handler_cancellation=True,
    )


if __name__ == "__main__":
    main()

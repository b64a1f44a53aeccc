"""Wire formats of the upstream kinds, translated through one pivot: OpenAI chat completions.

Every function here is pure (dicts in, dicts out; no sockets, no loop). The proxy does the
I/O: it splits SSE with ``edgeproxy.sse``, ``orjson.loads`` each event's data, hands the
dict to a stream translator, and ``orjson.dumps`` what comes back.

``openai.py``    the OpenAI request rules the relay applies on the pass-through path.
``anthropic.py`` OpenAI chat <-> Anthropic Messages, both directions, streams included:

    request_from_openai(body, model) -> dict          chat request  -> Messages request
    response_to_openai(body, model) -> dict           Messages resp -> chat.completion
    StreamToOpenAI(model, include_usage).feed(event_name, data) -> list[chunk dict]
    request_to_openai(body) -> dict                   Messages request (Claude clients) -> chat request
    response_from_openai(body, model) -> dict         chat.completion -> Messages resp
    StreamFromOpenAI(model).feed(chunk) -> list[(event_name, data)]; .finish()
    usage_from(usage) -> Usage                        normalised per SPEC §4
    error_to_openai(body) / error_from_openai(body)   error bodies across the two shapes

``gemini.py``    OpenAI chat <-> Gemini generateContent, the same coverage one way round:

    request_from_openai(body, model, images) -> dict  ``images`` = fetched http(s) image URLs
    image_urls(body) -> list[str]                     the http(s) URLs the relay must fetch
    response_to_openai(body, model) -> dict
    StreamToOpenAI(model, include_usage).feed(data) -> list[chunk dict]
    usage_from(usage_metadata) -> Usage

The proxy picks a module from a plain dict keyed by ``kind``.
"""

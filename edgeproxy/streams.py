"""Response body filters for SSE: pass-through and translated.

Job: a filter takes upstream bytes as they arrive (``feed``) and returns the bytes to send
the client, while tracking what the proxy needs to know: has the first content event
arrived (the commit point), is the stream done, did the upstream send an error event, and
the usage it reported.

``PassThrough`` is the OpenAI-to-OpenAI (and Anthropic-to-Anthropic) path: once content has
been seen, a chunk that ends on an event boundary and carries no usage object is returned
as the very same object, untouched. Only chunks holding a ``"usage":{`` object are split
into events, to read the usage and to withhold the usage-only chunk from a client that did
not ask for it. Bytes of an unfinished event wait for the rest of it, so a client never
sees half an event and a withheld event is never half sent.

``Translated`` parses every event, runs it through the dialect translators and serialises
the result for the client's dialect.

Pure: no sockets, no loop.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson

from edgeproxy import sse
from edgeproxy.dialects import anthropic, gemini
from edgeproxy.dialects.openai import carries_content
from edgeproxy.errors import scrub_bytes
from edgeproxy.usage import Usage, from_openai

DONE = b"data: [DONE]\n\n"
Flavor = Literal["openai", "anthropic", "generic"]


class StreamError(Exception):
    """The upstream reported an error inside its stream."""


class PassThrough:
    """Relays SSE bytes untouched. ``flavor`` says how to read content and usage:
    ``openai`` chat/completions chunks, ``anthropic`` Messages events, ``generic`` other
    OpenAI streams (responses API) where every data event counts as content."""

    __slots__ = (
        "_anthropic_usage",
        "_end_marker",
        "_resume",
        "_secrets",
        "_tail",
        "content_seen",
        "done",
        "error",
        "events",
        "flavor",
        "stop_at_commit",
        "usage",
        "withhold_usage",
    )

    def __init__(
        self,
        flavor: Flavor,
        *,
        withhold_usage: bool = False,
        secrets: tuple[bytes, ...] = (),
        stop_at_commit: bool = False,
    ) -> None:
        self.flavor = flavor
        # feed() returns at the first content event and keeps the rest of that read for a
        # feed(b"") (``pending``): the relay sends the status line without waiting for it
        self.stop_at_commit = stop_at_commit
        self._secrets = secrets  # an upstream's error event may name its URL or key
        self.withhold_usage = withhold_usage
        self.content_seen = False
        self.done = False
        self.error: str | None = None
        self.usage: Usage | None = None
        self.events = 0  # content events relayed, for estimating tokens when no usage came
        self._tail = b""
        self._resume: tuple[bytes, int] | None = None
        self._end_marker = b"message_stop" if flavor == "anthropic" else b"data: [DONE]"
        self._anthropic_usage: dict[str, Any] = {}

    def feed(self, chunk: bytes) -> bytes:
        if self._resume is not None:  # the rest of the read the commit point came in
            held, pos = self._resume
            self._resume = None
            out = self._inspect(held, pos)
            return out + self.feed(chunk) if chunk else out
        data = self._tail + chunk if self._tail else chunk
        cut = sse.complete_len(data)
        if cut == 0:
            self._tail = data
            return b""
        if cut == len(data):
            complete, self._tail = data, b""
        else:
            complete, self._tail = data[:cut], data[cut:]
        return self._inspect(complete, 0)

    @property
    def pending(self) -> bool:
        """Events of the last read wait for a ``feed(b"")`` (see ``_inspect``)."""
        return self._resume is not None

    def finish(self) -> bytes:
        """At upstream EOF: an unterminated last event, relayed as it is."""
        held = self.feed(b"") if self._resume is not None else b""
        tail, self._tail = self._tail, b""
        if self.flavor == "generic":
            self.done = True
        return held + tail

    def _inspect(self, complete: bytes, pos: int) -> bytes:
        """Read the events of ``complete[pos:]`` that matter and relay all but a withheld
        usage event. Until the commit point every event is read; after it only the events
        at a marker (``_next_marker``): the plain events between them go on as they are,
        unread, and a chunk without a marker is returned as the very same object."""
        first = pos
        kept: list[bytes | memoryview] = []
        view = memoryview(complete)  # unread runs are joined from it: one copy, not two
        changed = False
        size = len(complete)
        while pos < size:
            if self.content_seen:
                marker = self._next_marker(complete, pos)
                if marker < 0:
                    kept.append(view[pos:])
                    break
                start = sse.event_start(complete, pos, marker)
                if start > pos:
                    kept.append(view[pos:start])
                pos = start
            end = sse.event_end(complete, pos)
            event = complete[pos:end]
            pos = end
            committing = not self.content_seen
            if not self._read_event(event):
                changed = True  # withheld
                continue
            if b'"error"' in event:
                scrubbed = scrub_bytes(event, self._secrets)
                changed = changed or scrubbed is not event
                event = scrubbed
            kept.append(event)
            if committing and self.content_seen and pos < size and self.stop_at_commit:
                # The commit point: return what goes out with the status line now, and
                # keep the rest of this read for the next feed(), so that the first
                # content does not wait for the inspection of everything after it.
                self._resume = (complete, pos)
                self._count_events(complete, first, pos)
                return b"".join(kept)
        self._count_events(complete, first, size)
        if not changed:
            return complete if first == 0 else complete[first:]
        return b"".join(kept)

    def _count_events(self, data: bytes, start: int, end: int) -> None:
        """``events`` estimates the completion when no usage comes: once usage is known,
        counting (a scan of every byte) is no longer needed."""
        if self.usage is None:
            self.events += data.count(b"data:", start, end)

    def _next_marker(self, data: bytes, pos: int) -> int:
        """Index of the first thing after ``pos`` that an event must be read for: a usage
        object, an error, or the end of the stream; -1 if there is none.

        Each search is a pass over the chunk, and a stream's whole answer can come in one
        read (13 KB for 50 events): usage and the end come last in a stream, so they are
        searched from the end. Only the last usage object of a read is read (usage is
        cumulative; the usage-only chunk a client may not get is a stream's last), and
        the last end marker. An error can be anywhere and is searched from ``pos``."""
        first = -1
        for index in (
            self._last_usage(data, pos),
            data.find(b'"error"', pos),
            data.rfind(self._end_marker, pos),
        ):
            if index >= 0 and (first < 0 or index < first):
                first = index
        return first

    @staticmethod
    def _last_usage(data: bytes, pos: int) -> int:
        last = data.rfind(b'"usage"', pos)
        if last < 0 or sse.object_at(data, b"usage", last):
            return last
        # the last is ``"usage":null`` (OpenAI's include_usage puts one in every chunk)
        return sse.find_object(data, b"usage", pos)

    def _read_event(self, event: bytes) -> bool:
        """Update state from one event; False when the event must be withheld."""
        name, payload = sse.fields(event)
        if not payload:
            return True
        if payload == b"[DONE]":
            self.done = True
            return True
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(obj, dict):
            return True
        if self.flavor == "anthropic":
            self._read_anthropic(name or str(obj.get("type", "")), obj)
            return True
        if "error" in obj:
            if self.content_seen:
                self.done = True  # the upstream ended the stream with its own error event
            else:
                self.error = _error_message(obj.get("error"))
        if self.flavor == "generic":
            self.content_seen = True
            usage = obj.get("usage") or (obj.get("response") or {}).get("usage")
            self.usage = from_openai(usage) or self.usage
            return True
        if not self.content_seen and carries_content(obj):
            self.content_seen = True
        usage = from_openai(obj.get("usage"))
        if usage is not None:
            self.usage = usage
            if self.withhold_usage and not obj.get("choices"):
                return False
        return True

    def _read_anthropic(self, name: str, obj: dict[str, Any]) -> None:
        if name == "message_start":
            self._anthropic_usage.update((obj.get("message") or {}).get("usage") or {})
        elif name == "message_delta":
            self._anthropic_usage.update(obj.get("usage") or {})
        elif name == "content_block_delta" or (
            name == "content_block_start"
            and (obj.get("content_block") or {}).get("type") == "tool_use"
        ):
            self.content_seen = True
        elif name == "message_stop":
            self.done = True
        elif name == "error":
            if self.content_seen:
                self.done = True  # relayed as it came (scrubbed): the client needs no second one
            else:
                self.error = _error_message(obj.get("error"))
        if self._anthropic_usage and name in ("message_start", "message_delta"):
            self.usage = anthropic.usage_from(self._anthropic_usage)


class Translated:
    """Upstream events of ``upstream_kind`` -> OpenAI chunks -> the client's dialect."""

    __slots__ = (
        "_ended",
        "_from_openai",
        "_pending",
        "_scanner",
        "_to_openai",
        "client",
        "content_seen",
        "done",
        "error",
        "events",
        "upstream_kind",
        "usage",
    )

    def __init__(
        self,
        upstream_kind: str,
        client: Literal["openai", "anthropic"],
        model: str,
        *,
        include_usage: bool,
    ) -> None:
        self.upstream_kind = upstream_kind
        self.client = client
        self._scanner = sse.SSEScanner()
        self._to_openai: Any = None
        if upstream_kind == "anthropic":
            self._to_openai = anthropic.StreamToOpenAI(model, include_usage)
        elif upstream_kind == "gemini":
            self._to_openai = gemini.StreamToOpenAI(model, include_usage)
        self._from_openai = anthropic.StreamFromOpenAI(model) if client == "anthropic" else None
        self.content_seen = False
        self.done = False
        self.error: str | None = None
        self.usage: Usage | None = None
        self.events = 0
        self._ended = False  # the upstream said its answer is complete (a finish reason)
        self._pending: StreamError | None = None  # an error that came after content

    def feed(self, chunk: bytes) -> bytes:
        """Translated bytes; raises ``StreamError`` for an upstream error event.

        An error event that follows content in the same read does not raise here: the
        content is returned (it is the commit point, SPEC §3) and ``done`` is set, so the
        error is raised by ``finish()`` and ends the stream after that content.
        """
        if self._pending is not None:
            return b""
        out: list[bytes] = []
        for event in self._scanner.feed(chunk):
            if not self._guarded(event, out):
                break
        return b"".join(out)

    def finish(self) -> bytes:
        """At upstream EOF: the end of the client's stream, if the upstream's had one.

        ``done`` stays False when the upstream stopped before its finish reason (a cut
        stream must not look complete): the proxy then ends the stream with an error event.
        """
        out: list[bytes] = []
        tail = self._scanner.flush()
        if self._pending is None and tail.strip():
            self._guarded(tail, out)
        if self._pending is not None:
            raise self._pending
        if self._to_openai is not None and hasattr(self._to_openai, "finish"):
            self._emit(self._to_openai.finish(), out)
        self._take_usage()
        if not self._ended:
            self.done = False
            return b"".join(out)
        if self._from_openai is not None:
            out.extend(_anthropic_event(n, d) for n, d in self._from_openai.finish())
        else:
            out.append(DONE)
        self.done = True
        return b"".join(out)

    def _guarded(self, event: bytes, out: list[bytes]) -> bool:
        """Translate one event into ``out``; False once an error waits for ``finish()``."""
        try:
            self._event(event, out)
        except StreamError as exc:
            if not (self.content_seen and out):
                raise  # nothing of this read would reach the client: fail it now
            self._pending = exc
            self.done = True
            return False
        return True

    def _event(self, event: bytes, out: list[bytes]) -> None:
        name, payload = sse.fields(event)
        if not payload:
            return
        if payload == b"[DONE]":
            self.done = self._ended = True
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        self.events += 1
        if self._to_openai is None:  # an OpenAI upstream: the event already is a chunk
            if "error" in obj:
                raise StreamError(_error_message(obj.get("error")))
            usage = from_openai(obj.get("usage"))
            if usage is not None:
                self.usage = usage
            self._emit([obj], out)
            return
        try:
            if self.upstream_kind == "anthropic":
                chunks = self._to_openai.feed(name or str(obj.get("type", "")), obj)
            else:
                chunks = self._to_openai.feed(obj)
        except anthropic.UpstreamStreamError as exc:
            raise StreamError(str(exc)) from None
        except (TypeError, AttributeError, KeyError, ValueError, IndexError):
            raise StreamError("upstream sent a malformed event") from None
        self._emit(chunks, out)
        self._take_usage()

    def _emit(self, chunks: list[dict[str, Any]], out: list[bytes]) -> None:
        for chunk in chunks:
            if not self.content_seen and carries_content(chunk):
                self.content_seen = True
            if not self._ended and _finished(chunk):
                self._ended = True
            if self._from_openai is None:
                out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
            else:
                out.extend(_anthropic_event(n, d) for n, d in self._from_openai.feed(chunk))

    def _take_usage(self) -> None:
        if self._to_openai is not None and self._to_openai.usage is not None:
            self.usage = self._to_openai.usage


def _finished(chunk: dict[str, Any]) -> bool:
    return any(isinstance(c, dict) and c.get("finish_reason") for c in chunk.get("choices") or ())


def _anthropic_event(name: str, data: dict[str, Any]) -> bytes:
    return sse.encode(orjson.dumps(data), name)


def _error_message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "upstream stream error")[:500]
    return str(error or "upstream stream error")[:500]

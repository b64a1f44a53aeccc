"""Split a Server-Sent Events byte stream into events, without decoding it.

Job: ``SSEScanner.feed(chunk)`` returns the complete events found so far as ``bytes``
(each including its terminating blank line), keeping an incomplete tail for the next
call. Event boundaries are a blank line: ``\\n\\n``, ``\\r\\n\\r\\n`` or ``\\r\\r``.

It must not: decode text, parse JSON, or copy bytes it does not need to (the OpenAI-to-
OpenAI path only scans chunks that might end a usage event). ``field()`` and ``data()``
read one event's fields for the callers that translate.
"""

from __future__ import annotations

import re

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r|\r\n\n|\n\r\n")


class SSEScanner:
    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._tail + chunk if self._tail else chunk
        events: list[bytes] = []
        start = 0
        for match in _BOUNDARY.finditer(data):
            events.append(data[start : match.end()])
            start = match.end()
        self._tail = data[start:]
        return events

    def flush(self) -> bytes:
        """The bytes after the last complete event (an unterminated final event)."""
        tail, self._tail = self._tail, b""
        return tail

    @property
    def pending(self) -> int:
        return len(self._tail)


def fields(event: bytes) -> tuple[str, bytes]:
    """(event name, joined data) of one raw event; name is "" when absent.

    Comment lines (``:``) and other fields are ignored; several ``data:`` lines join with
    ``\\n`` as the SSE spec says.
    """
    last_line = len(event) - 2
    if event.startswith(b"data: ") and event.find(b"\n") == last_line and b"\r" not in event:
        return "", event[6:last_line]  # one "data: " line and its "\n\n": most events
    name = ""
    data: list[bytes] = []
    for line in event.splitlines():
        if not line or line.startswith(b":"):
            continue
        key, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if key == b"data":
            data.append(value)
        elif key == b"event":
            name = value.decode("utf-8", "replace")
    return name, b"\n".join(data)


def is_comment_only(event: bytes) -> bool:
    """True for keep-alive events made only of comment lines (they carry no content)."""
    return all(not line or line.startswith(b":") for line in event.splitlines())


def encode(data: bytes, event: str | None = None) -> bytes:
    """One SSE event for a single-line JSON payload."""
    if event:
        return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"


def complete_len(data: bytes) -> int:
    """Length of the prefix of ``data`` made of complete events (0 if none).

    ``rfind`` calls in C: cheap enough to run on every chunk of a stream.
    """
    if data.endswith(b"\n\n") and data[-3:-2] not in (b"\n", b"\r"):
        return len(data)  # ends on a lone "\n\n": the common case, no search at all
    if b"\r" not in data:  # the common case: one reverse search, not three full scans
        found = data.rfind(b"\n\n")
        end = found + 2 if found >= 0 else 0
    else:
        ends = (data.rfind(b"\n\n"), data.rfind(b"\n\r\n"), data.rfind(b"\r\r"))
        end = max(
            ends[0] + 2 if ends[0] >= 0 else 0,
            ends[1] + 3 if ends[1] >= 0 else 0,
            ends[2] + 2 if ends[2] >= 0 else 0,
        )
    if end == 0:
        return 0
    # Within a run of line breaks ("\n\n\n") boundaries do not overlap: let the same
    # pattern as split() decide where the last one ends, so the two agree to the byte.
    start, stop = end - 1, end
    while start > 0 and data[start - 1] in b"\r\n":
        start -= 1
    while stop < len(data) and data[stop] in b"\r\n":
        stop += 1
    last = end
    for match in _BOUNDARY.finditer(data, start, stop):
        last = match.end()
    return last


def split(data: bytes) -> list[bytes]:
    """Complete events of ``data`` (which must end on an event boundary)."""
    events: list[bytes] = []
    start = 0
    for match in _BOUNDARY.finditer(data):
        events.append(data[start : match.end()])
        start = match.end()
    return events


def find_object(data: bytes, name: bytes, start: int = 0) -> int:
    """Where ``"name"`` first appears with an object value at or after ``start``; -1 if
    nowhere. OpenAI sends ``"usage":null`` in every chunk once include_usage is on: a find
    and two counts in C rule a chunk of those out before any regex runs over it."""
    quoted = b'"' + name + b'"'
    first = data.find(quoted, start)
    if first < 0 or data.count(quoted, first) == data.count(quoted + b":null", first):
        return -1
    match = _object_pattern(name).search(data, first)
    return match.start() if match else -1


def object_at(data: bytes, name: bytes, index: int) -> bool:
    """True when the ``"name"`` at ``index`` has an object value."""
    return _object_pattern(name).match(data, index) is not None


_OBJECT_PATTERNS: dict[bytes, re.Pattern[bytes]] = {}


def _object_pattern(name: bytes) -> re.Pattern[bytes]:
    """``"name"`` followed by an object value, compiled once per name."""
    pattern = _OBJECT_PATTERNS.get(name)
    if pattern is None:
        pattern = re.compile(b'"' + re.escape(name) + rb'"[ \t\r\n:]*\{')
        _OBJECT_PATTERNS[name] = pattern
    return pattern


def event_end(data: bytes, start: int) -> int:
    """Where the event that begins at ``start`` ends (after its boundary), as ``split``
    would cut it; ``len(data)`` if it has no boundary."""
    blank = data.find(b"\n\n", start)
    if blank >= 0 and data.find(b"\r", start, blank) < 0:
        return blank + 2  # no "\r" before it: the same boundary the pattern finds, sooner
    match = _BOUNDARY.search(data, start)
    return match.end() if match else len(data)


def event_start(data: bytes, low: int, index: int) -> int:
    """Where the event holding ``data[index]`` begins: after the last boundary in
    ``data[low:index]`` (``low`` if there is none)."""
    start = low
    boundaries = (b"\n\n", b"\r\r", b"\n\r\n") if b"\r" in data else (b"\n\n",)
    for boundary in boundaries:
        found = data.rfind(boundary, low, index)
        if found >= 0 and found + len(boundary) > start:
            start = found + len(boundary)
    return start

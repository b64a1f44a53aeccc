"""Helpers for the dialect tests: golden fixtures, id normalisation, SSE split feeding."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

from edgeproxy.sse import SSEScanner, fields

FIXTURES = Path(__file__).parent / "fixtures"

# Ids the translators invent (uuid based) and timestamps vary per run; goldens hold "*"/0.
_RANDOM_ID = re.compile(r"^(call_|toolu_|msg_|chatcmpl-)[0-9a-f]{24}$")


def load(name: str) -> Any:
    return orjson.loads((FIXTURES / name).read_bytes())


def raw(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def normalise(value: Any) -> Any:
    """Replace ``created`` timestamps with 0 and generated ids with ``prefix*``."""
    if isinstance(value, dict):
        return {key: 0 if key == "created" else normalise(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [normalise(item) for item in value]
    if isinstance(value, str):
        return _RANDOM_ID.sub(r"\1*", value)
    return value


def splits(data: bytes) -> Iterable[list[bytes]]:
    """The stream cut in two at every byte boundary, then fed one byte at a time."""
    for cut in range(len(data) + 1):
        yield [data[:cut], data[cut:]]
    yield [data[i : i + 1] for i in range(len(data))]


def scan(pieces: list[bytes]) -> list[tuple[str, bytes]]:
    """Feed ``pieces`` through one SSEScanner; (event name, data) of each complete event."""
    scanner = SSEScanner()
    events = []
    for piece in pieces:
        events += [fields(event) for event in scanner.feed(piece)]
    assert scanner.flush() == b""
    return events


def assert_same_for_every_split(
    data: bytes, translate: Callable[[list[tuple[str, bytes]]], Any], expected: Any
) -> None:
    """``translate(events)`` gives ``expected`` however the bytes were cut."""
    for pieces in splits(data):
        got = normalise(translate(scan(pieces)))
        if got != expected:
            cut = len(pieces[0]) if len(pieces) == 2 else "every byte"
            raise AssertionError(f"translation differs when the stream is cut at {cut}")

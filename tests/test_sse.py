"""sse.py and streams.PassThrough without sockets: every split of a stream, byte by byte."""

from __future__ import annotations

import pytest

from edgeproxy import sse
from edgeproxy.streams import PassThrough
from tests.fakes import OPENAI_USAGE, anthropic_stream, openai_chunk, openai_stream

EVENTS = [
    b"data: one\n\n",
    b"event: x\ndata: two\ndata: lines\n\n",
    b": keep-alive\n\n",
    b"data: [DONE]\n\n",
]


def scan(pieces: list[bytes]) -> tuple[list[bytes], bytes]:
    scanner = sse.SSEScanner()
    events = [e for piece in pieces for e in scanner.feed(piece)]
    return events, scanner.flush()


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_scanner_finds_the_same_events_at_every_split(newline: bytes):
    events = [e.replace(b"\n", newline) for e in EVENTS]
    whole = b"".join(events)
    for cut in range(len(whole) + 1):
        for cut2 in range(cut, len(whole) + 1, 7):
            got, tail = scan([whole[:cut], whole[cut:cut2], whole[cut2:]])
            assert b"".join(got) == whole and tail == b""
            # a CR at the very end of a piece may be the start of CRLF: never a boundary on its own
            assert got == events, (cut, cut2)


def test_scanner_one_byte_at_a_time_and_unterminated_tail():
    whole = b"".join(EVENTS) + b"data: partial"
    got, tail = scan([whole[i : i + 1] for i in range(len(whole))])
    assert got == EVENTS and tail == b"data: partial"


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_complete_len_agrees_with_split(newline: bytes):
    whole = b"".join([*EVENTS, b"data: after a blank\n\n\n"]).replace(b"\n", newline)
    for end in range(len(whole) + 1):
        data = whole[:end]
        cut = sse.complete_len(data)
        assert b"".join(sse.split(data[:cut])) == data[:cut]
        assert sse.split(data[cut:]) == []  # nothing complete is left behind
    assert sse.complete_len(b"data: no boundary") == 0


def test_fields_and_comments():
    assert sse.fields(b'event: message_start\ndata: {"a":1}\n\n') == ("message_start", b'{"a":1}')
    assert sse.fields(b"data:x\ndata: y\n\n") == ("", b"x\ny")
    assert sse.fields(b": ping\n\n") == ("", b"")
    # one "data: " line is read without splitting; anything else takes the general way
    assert sse.fields(b"data: {}\n\n") == ("", b"{}")
    assert sse.fields(b"data: \n\n") == ("", b"")
    assert sse.fields(b"data: a\rdata: b\n\n") == ("", b"a\nb")
    assert sse.fields(b"data: a\r\n\r\n") == ("", b"a")
    assert sse.fields(b"data: a\ndata: b\n\n") == ("", b"a\nb")
    assert sse.is_comment_only(b": ping\n\n") and not sse.is_comment_only(b"data: 1\n\n")


def test_find_object_ignores_null_usage():
    assert sse.find_object(b'{"usage":null}', b"usage") < 0
    assert sse.find_object(b'{"usage": {"prompt_tokens": 1}}', b"usage") >= 0
    assert sse.find_object(b'{"usage":null,"x":{"usage" :\n{}}}', b"usage") >= 0


def run(flt: PassThrough, pieces: list[bytes]) -> bytes:
    out = b"".join(flt.feed(p) for p in pieces)
    return out + flt.finish()


def test_passthrough_is_byte_identical_at_every_split():
    chunks = openai_stream(["Hel", "lo"], with_usage=True)
    whole = b"".join(chunks)
    for cut in range(len(whole) + 1):
        flt = PassThrough("openai")
        assert run(flt, [whole[:cut], whole[cut:]]) == whole
        assert flt.content_seen and flt.done
        assert (flt.usage.prompt, flt.usage.completion) == (
            OPENAI_USAGE["prompt_tokens"],
            OPENAI_USAGE["completion_tokens"],
        )


@pytest.mark.parametrize("with_usage", [True, False])
def test_stop_at_commit_returns_at_the_first_content_and_keeps_the_rest(with_usage):
    """The relay sends the status line with the first content event at once; the rest of
    the same read comes from feed(b"") after it, and nothing is lost or counted twice."""
    chunks = openai_stream(["Hel", "lo"], with_usage=with_usage)
    whole = b"".join(chunks)
    flt = PassThrough("openai", stop_at_commit=True)
    first = flt.feed(whole)
    assert first == chunks[0] + chunks[1]  # the role chunk and the first content chunk
    assert flt.content_seen and flt.pending and not flt.done
    rest = flt.feed(b"")
    assert first + rest + flt.finish() == whole
    assert flt.done and not flt.pending
    if with_usage:
        assert flt.usage is not None and flt.usage.prompt == OPENAI_USAGE["prompt_tokens"]
    else:  # events are what a missing usage is estimated from
        assert flt.usage is None and flt.events == whole.count(b"data:")


def test_a_pending_read_is_not_lost_at_eof():
    chunks = openai_stream(["Hel", "lo"], with_usage=True)
    whole = b"".join(chunks)
    flt = PassThrough("openai", stop_at_commit=True)
    first = flt.feed(whole)
    assert flt.pending
    assert first + flt.finish() == whole and flt.done


def test_passthrough_hands_back_the_same_chunk_objects_after_content():
    chunks = openai_stream(["a", "b", "c"], with_usage=False)
    flt = PassThrough("openai")
    outs = [flt.feed(c) for c in chunks]
    assert flt.content_seen
    assert all(out is chunk for out, chunk in zip(outs[2:], chunks[2:], strict=True))


def test_withheld_usage_chunk_at_every_split():
    chunks = openai_stream(["x", "y"], with_usage=True)
    usage_chunk = chunks[-2]
    whole = b"".join(chunks)
    expected = whole.replace(usage_chunk, b"")
    for cut in range(len(whole) + 1):
        flt = PassThrough("openai", withhold_usage=True)
        assert run(flt, [whole[:cut], whole[cut:]]) == expected, cut
        assert flt.usage is not None and flt.usage.prompt == OPENAI_USAGE["prompt_tokens"]


def test_usage_earlier_in_a_read_than_a_null_usage_is_still_read():
    """Usage is searched from the end of a read; a last "usage":null sends the search
    back to the start, so a usage object before it is not missed."""
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    chunks = [
        openai_chunk({"role": "assistant", "content": "Hi"}, usage=None),
        openai_chunk({"content": " there"}, usage=usage),
        openai_chunk({}, "stop", usage=None),
        b"data: [DONE]\n\n",
    ]
    whole = b"".join(chunks)
    flt = PassThrough("openai")
    assert flt.feed(chunks[0]) == chunks[0] and flt.content_seen
    assert flt.feed(b"".join(chunks[1:])) == b"".join(chunks[1:])
    assert flt.done and flt.usage is not None and flt.usage.prompt == 7
    assert run(PassThrough("openai"), [whole]) == whole


def test_anthropic_passthrough_reads_usage_and_the_end():
    events = anthropic_stream(["Hi", " there"])
    whole = b"".join(events)
    for cut in range(0, len(whole) + 1, 3):
        flt = PassThrough("anthropic")
        assert run(flt, [whole[:cut], whole[cut:]]) == whole
        assert flt.content_seen and flt.done
        assert (flt.usage.prompt, flt.usage.completion, flt.usage.cached) == (26, 5, 4)


def test_error_events_are_scrubbed_and_end_the_stream():
    secret = b"sk-upstream-secret-123456"
    chunks = openai_stream(["a"], with_usage=False)[:2]
    error = b'data: {"error": {"message": "bad key ' + secret + b'"}}\n\n'
    flt = PassThrough("openai", secrets=(secret,))
    out = run(flt, [*chunks, error])
    assert secret not in out and b"[redacted]" in out and flt.done


def test_an_error_before_content_is_reported_not_relayed_as_content():
    flt = PassThrough("openai")
    flt.feed(b'data: {"error": {"message": "overloaded"}}\n\n')
    assert flt.error == "overloaded" and not flt.content_seen

"""Property tests for ``herd.LineRelay``: NDJSON / SSE streams split at random byte boundaries.

For any stream and any way the network cuts it into reads, the relay must

* reproduce the input exactly (``b"".join(feed(c) for c in chunks) + tail() == input``),
* never emit a partial record (every ``feed`` output ends on a record terminator),
* emit a complete record as soon as its terminator has arrived (nothing held back too long),
* find the final object: the last ``"done": true`` NDJSON line, or the SSE ``usage`` chunk.

The generators are shared with ``bench/attack.py``, which runs the same checks in a plain loop
for the ≥ 100k-inputs figure; here hypothesis explores (and shrinks) the interesting corners.
"""

from __future__ import annotations

import json
import random
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import herd

FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---------------------------------------------------------------------------------------
# Stream builders (also used by bench/attack.py with a random.Random instead of hypothesis)
# ---------------------------------------------------------------------------------------

# Text fragments that look like record syntax but sit inside JSON strings, where they must
# not confuse the relay: escaped newlines, "done":true inside content, SSE-looking text.
TRICKY = [
    "",
    "a",
    "héllo ✓",
    "\n",
    "\n\n",
    "data: x",
    '"done":true',
    '{"done": true}',
    "usage",
    '"usage"',
    "\r\n",
    "\\",
    "[DONE]",
    "\u2028",
    "🦙" * 3,
]


def ndjson_stream(
    texts: list[str], *, trailing_newline: bool = True, spaced: bool = False
) -> bytes:
    """An Ollama /api/generate stream: done:false lines then one done:true line."""
    sep = (", ", ": ") if spaced else (",", ":")
    lines = [
        json.dumps(
            {"model": "m", "created_at": "2025-01-01T00:00:00Z", "response": t, "done": False},
            separators=sep,
        )
        for t in texts
    ]
    final = json.dumps(
        {
            "model": "m",
            "created_at": "2025-01-01T00:00:01Z",
            "response": "",
            "done": True,
            "done_reason": "stop",
            "eval_count": len(texts),
            "eval_duration": 1000 * len(texts),
        },
        separators=sep,
    )
    lines.append(final)
    body = "\n".join(lines)
    if trailing_newline:
        body += "\n"
    return body.encode()


def sse_events(texts: list[str], *, comments: bool = False) -> list[bytes]:
    """An OpenAI /v1/chat/completions stream's content events (no usage, no [DONE])."""
    out: list[bytes] = []
    for i, t in enumerate(texts):
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}],
        }
        if comments and i % 3 == 0:
            out.append(b": keep-alive\n\n")
        out.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    return out


USAGE: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "choices": [],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
}
USAGE_EVENT = b"data: " + json.dumps(USAGE).encode() + b"\n\n"
DONE_EVENT = b"data: [DONE]\n\n"


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, duplicates allowed → empty chunks)."""
    points = sorted(min(max(c, 0), len(data)) for c in cuts)
    chunks, prev = [], 0
    for p in [*points, len(data)]:
        chunks.append(data[prev:p])
        prev = p
    return chunks


def run_relay(framing: herd.Framing, chunks: list[bytes]) -> tuple[list[bytes], bytes, Any]:
    relay = herd.LineRelay(framing)
    outs = [relay.feed(c) for c in chunks]
    tail = relay.tail()
    return outs, tail, relay.final_object()


def check_exact(framing: herd.Framing, data: bytes, chunks: list[bytes]) -> Any:
    """The invariants every split must satisfy; returns final_object() for further checks."""
    sep = b"\n\n" if framing == "sse" else b"\n"
    relay = herd.LineRelay(framing)
    received = b""
    emitted = b""
    for c in chunks:
        out = relay.feed(c)
        received += c
        emitted += out
        # never a partial record
        assert out == b"" or out.endswith(sep), (framing, out[-40:])
        # output is a prefix of the input, and nothing complete is held back: what is
        # still buffered contains no record terminator
        assert received.startswith(emitted)
        assert sep not in received[len(emitted) :]
    emitted += relay.tail()
    assert emitted == data
    return relay.final_object()


# ---------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------

texts_st = st.lists(
    st.one_of(st.sampled_from(TRICKY), st.text(max_size=12)), min_size=0, max_size=30
)
cuts_st = st.lists(st.integers(min_value=0, max_value=20_000), max_size=40)


# ---------------------------------------------------------------------------------------
# NDJSON
# ---------------------------------------------------------------------------------------


@FUZZ
@given(texts=texts_st, cuts=cuts_st, trailing=st.booleans(), spaced=st.booleans())
def test_ndjson_split_anywhere_is_exact_and_finds_done(
    texts: list[str], cuts: list[int], trailing: bool, spaced: bool
) -> None:
    data = ndjson_stream(texts, trailing_newline=trailing, spaced=spaced)
    final = check_exact("ndjson", data, split_at(data, cuts))
    assert final is not None
    assert final["done"] is True
    assert final["eval_count"] == len(texts)


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=2000),
        st.lists(st.sampled_from([b"\n", b"\n\n", b"data: ", b"{}", b"x", b"\r"])).map(b"".join),
    ),
    cuts=cuts_st,
    framing=st.sampled_from(["ndjson", "sse"]),
)
def test_arbitrary_bytes_are_exact(data: bytes, cuts: list[int], framing: herd.Framing) -> None:
    """Garbage from a broken node (binary, runs of newlines) still passes through exactly."""
    check_exact(framing, data, split_at(data, cuts))


@FUZZ
@given(texts=texts_st, cuts=cuts_st, byte_by_byte=st.booleans())
def test_ndjson_cut_off_midstream_never_emits_half_a_record(
    texts: list[str], cuts: list[int], byte_by_byte: bool
) -> None:
    """A node dying mid-line: whatever was emitted is whole lines that each parse."""
    data = ndjson_stream(texts)
    stop = (sum(cuts) % max(1, len(data))) if cuts else len(data) // 2
    truncated = data[:stop]
    chunks = [bytes([b]) for b in truncated] if byte_by_byte else split_at(truncated, cuts)
    relay = herd.LineRelay("ndjson")
    emitted = b"".join(relay.feed(c) for c in chunks)
    # (no tail(): the router only flushes the tail on a clean end of stream)
    assert emitted == data[: truncated.rfind(b"\n") + 1]
    for line in emitted.splitlines():
        json.loads(line)


# ---------------------------------------------------------------------------------------
# SSE
# ---------------------------------------------------------------------------------------


@FUZZ
@given(texts=texts_st, cuts=cuts_st, comments=st.booleans())
def test_sse_split_anywhere_is_exact(texts: list[str], cuts: list[int], comments: bool) -> None:
    data = b"".join([*sse_events(texts, comments=comments), USAGE_EVENT, DONE_EVENT])
    check_exact("sse", data, split_at(data, cuts))


@FUZZ
@given(texts=texts_st, cuts=cuts_st, comments=st.booleans())
def test_sse_usage_found_when_done_arrives_in_a_later_read(
    texts: list[str], cuts: list[int], comments: bool
) -> None:
    """The usage chunk is the final object when ``[DONE]`` comes in a read of its own."""
    head = b"".join([*sse_events(texts, comments=comments), USAGE_EVENT])
    chunks = [*split_at(head, cuts), DONE_EVENT]
    final = check_exact("sse", head + DONE_EVENT, chunks)
    assert final == USAGE


@FUZZ
@given(
    texts=st.lists(st.sampled_from(["", "a", "ok", "data: x", "\n\n"]), max_size=20), cuts=cuts_st
)
def test_sse_without_usage_has_no_final(texts: list[str], cuts: list[int]) -> None:
    data = b"".join([*sse_events(texts), DONE_EVENT])
    assert check_exact("sse", data, split_at(data, cuts)) is None


def test_sse_content_saying_usage_is_not_the_usage_chunk() -> None:
    data = b"".join([*sse_events(["the", "usage"]), DONE_EVENT])
    assert check_exact("sse", data, split_at(data, [len(data) - len(DONE_EVENT)])) is None


@settings(max_examples=300, deadline=None)
@example(texts=["hi"], cuts=[])
@given(texts=texts_st, cuts=cuts_st)
def test_sse_usage_found_across_any_split(texts: list[str], cuts: list[int]) -> None:
    data = b"".join([*sse_events(texts), USAGE_EVENT, DONE_EVENT])
    assert check_exact("sse", data, split_at(data, cuts)) == USAGE


def test_raw_framing_passes_everything_through() -> None:
    rng = random.Random(7)
    data = rng.randbytes(5000)
    relay = herd.LineRelay("raw")
    out = b"".join(relay.feed(c) for c in split_at(data, [rng.randrange(5000) for _ in range(9)]))
    assert out + relay.tail() == data


@FUZZ
@given(texts=texts_st, cuts=cuts_st, extra=st.integers(min_value=1, max_value=3))
def test_ndjson_final_object_is_always_a_done_line(
    texts: list[str], cuts: list[int], extra: int
) -> None:
    """Lines after the done line (a misbehaving node) never pass for the final object: it is
    the done line when it ends a read, else nothing (each read's last line is looked at, not
    every line of it)."""
    data = ndjson_stream(texts) + b'{"model":"x","response":"late","done":false}\n' * extra
    final = check_exact("ndjson", data, split_at(data, cuts))
    assert final is None or final["done"] is True

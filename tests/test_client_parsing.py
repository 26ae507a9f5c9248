"""Parsers on the SDK side never trust their input: provider usage, stream items, supervisor lines."""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tokenwatch.client.body import JsonBody, SseEvents
from tokenwatch.client.openai_usage import Counted, StreamReading, counted
from tokenwatch.client.reporter import Identity, Reporter
from tokenwatch.core import protocol

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
KEYS = [
    "choices",
    "delta",
    "usage",
    "type",
    "model",
    "content",
    "text",
    "tool_calls",
    "function",
    "arguments",
    "response",
    "prompt_tokens",
    "input_tokens",
    "refusal",
    "name",
]
stream_items = st.recursive(
    st.none()
    | st.integers(-5, 5)
    | st.text(max_size=4)
    | st.sampled_from(["response.output_text.delta", "response.completed", "response.created"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)
    ),
    max_leaves=25,
)
counts = st.integers(min_value=0, max_value=10**9)


@given(prompt=counts, completion=counts, cached=counts, reasoning=counts)
def test_chat_usage_is_already_normalised(
    prompt: int, completion: int, cached: int, reasoning: int
) -> None:
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }
    assert counted(usage) == Counted(prompt, completion, cached, reasoning)


@given(inp=counts, out=counts, cached=counts, reasoning=counts)
def test_responses_usage_is_already_normalised(
    inp: int, out: int, cached: int, reasoning: int
) -> None:
    usage = {
        "input_tokens": inp,
        "output_tokens": out,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens_details": {"reasoning_tokens": reasoning},
    }
    assert counted(usage) == Counted(inp, out, cached, reasoning)


@given(stream_items)
def test_garbage_usage_never_raises_or_goes_negative(usage: Any) -> None:
    found = counted(usage)
    if found is not None:
        assert min(found.input_tokens, found.output_tokens, found.cache_read_tokens) >= 0


@given(st.lists(stream_items, max_size=6))
def test_garbage_stream_items_never_raise(items: list[Any]) -> None:
    reading = StreamReading()
    firsts = [reading.see(item) for item in items]
    assert sum(firsts) <= 1, "only the first content-bearing item marks the first token"
    assert isinstance(reading.text, str)


def test_stream_reading_collects_text_tool_calls_and_final_usage() -> None:
    reading = StreamReading()
    chunks: list[dict[str, Any]] = [
        {"model": "m-1", "choices": [{"delta": {"role": "assistant"}}]},
        {"choices": [{"delta": {"content": "Hel"}}]},
        {"choices": [{"delta": {"content": "lo"}}]},
        {"choices": [{"delta": {"tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}},
    ]
    assert [reading.see(c) for c in chunks] == [False, True, False, False, False]
    assert reading.text == "Hellof{}"
    assert reading.usage == Counted(9, 4)
    assert reading.model == "m-1"


@given(st.binary(max_size=200))
def test_reporter_ignores_unreadable_lines(line: bytes) -> None:
    rep = Reporter("/nonexistent", Identity(name="a", pid=os.getpid()))
    rep.send_nowait("usage", event={"call_id": "x"})
    rep._handle(line)
    assert rep.statistics().pending == 1, "noise never acknowledges a report"
    assert rep.throttle_wait() == 0
    rep.close()


@given(st.dictionaries(st.sampled_from(["type", "re", "ok", "kind", "data", "error"]), json_values))
def test_reporter_survives_any_message_shape(msg: dict[str, Any]) -> None:
    rep = Reporter("/nonexistent", Identity(name="a", pid=os.getpid()))
    mid = rep.send_nowait("usage", event={"call_id": "x"})
    rep._handle(protocol.dumps(msg))
    stats = rep.statistics()
    rep.close()
    assert stats.pending in (0, 1)
    if msg.get("type") == "reply" and msg.get("re") == mid and msg.get("ok"):
        assert stats.pending == 0


@given(
    docs=st.lists(st.dictionaries(st.text(max_size=6), json_values, max_size=4), max_size=6),
    crlf=st.booleans(),
    cuts=st.lists(st.integers(0, 4000), max_size=12),
)
def test_sse_events_are_the_same_however_the_body_is_cut(
    docs: list[dict[str, Any]], crlf: bool, cuts: list[int]
) -> None:
    eol = b"\r\n" if crlf else b"\n"
    wire = (
        b"".join(b"event: x" + eol + b"data: " + json.dumps(d).encode() + eol + eol for d in docs)
        + b"data: [DONE]"
        + eol
        + eol
    )
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    events = SseEvents()
    got = [doc for a, b in itertools.pairwise(points) for doc in events.feed(wire[a:b])]
    assert got == docs


def test_a_json_body_over_the_limit_is_not_kept(monkeypatch: Any) -> None:
    monkeypatch.setattr("tokenwatch.client.body.MAX_JSON_BYTES", 10)
    small, big = JsonBody(), JsonBody()
    small.feed(b'{"a":')
    small.feed(b"1}")
    big.feed(b'{"usage": {"prompt_tokens": 5}}')
    assert small.document() == {"a": 1}
    assert big.document() is None

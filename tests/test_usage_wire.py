"""The fast usage-line decoder accepts exactly what the generic path accepts (or declines), and
yields the same event; ordinary SDK and proxy lines take it."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.test_server_fuzz import event_fields, json_values
from tokenwatch.core import protocol
from tokenwatch.core.models import MAX_CALL_TOKENS, UsageEvent
from tokenwatch.core.protocol import ProtocolError
from tokenwatch.core.usage_wire import decode_usage_line, usage_from_wire

usage_messages = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 1, 2, 1.0, None, "1"]),
        "type": st.sampled_from(["usage", "usage", "heartbeat", "usage "]),
        "event": st.one_of(
            event_fields,
            st.dictionaries(st.sampled_from(UsageEvent.field_names()), json_values, max_size=8),
            json_values,
        ),
    },
    optional={"id": st.one_of(st.integers(), st.text(max_size=5), st.none(), st.booleans())},
)


def generic(line: bytes) -> tuple[Any, UsageEvent] | str:
    """What the server did before the fast path: decode, validate, check each field."""
    try:
        msg = protocol.decode(line)
        if msg["type"] != "usage":
            return "not usage"
        return msg.get("id"), usage_from_wire(msg["event"])
    except ProtocolError as exc:
        return f"refused: {exc.code}"


def same_event(a: UsageEvent, b: UsageEvent, given_ts: bool) -> bool:
    left, right = a.to_dict(), b.to_dict()
    if not given_ts:  # both default to the time of decoding
        assert abs(left.pop("ts") - right.pop("ts")) < 60
    return left == right


@given(msg=usage_messages)
def test_the_fast_path_agrees_with_the_generic_one(msg: dict[str, Any]) -> None:
    line = json.dumps(msg).encode()
    fast, slow = decode_usage_line(line), generic(line)
    if fast is None:
        return  # declined: the generic path decides (and words any refusal)
    assert not isinstance(slow, str), f"fast path accepted what the generic one {slow}"
    assert fast[0] == slow[0]
    given_ts = isinstance(msg["event"], dict) and "ts" in msg["event"]
    assert same_event(fast[1], slow[1], given_ts)


@given(
    tokens=st.integers(0, MAX_CALL_TOKENS),
    cost=st.none() | st.floats(0, 1e6),
    mid=st.integers(0, 2**40) | st.text(max_size=8),
    ts=st.floats(1.0, 1.7e9),  # up to 2023: any time already past
)
def test_well_formed_usage_lines_take_the_fast_path(
    tokens: int, cost: float | None, mid: int | str, ts: float
) -> None:
    event = UsageEvent(ts=ts, agent="a", model="gpt-4o-mini", input_tokens=tokens,
                       output_tokens=tokens // 2, cost_usd=cost, call_id="c", latency_ms=12.5)  # fmt: skip
    line = protocol.dumps(protocol.request("usage", mid, event=event.to_dict()))
    decoded = decode_usage_line(line.rstrip(b"\n"))
    assert decoded is not None
    assert decoded == (mid, event)


def test_a_call_time_in_the_future_is_refused_in_words() -> None:
    ahead = time.time() + 2 * 86_400  # a day of clock skew is allowed, not more
    for ts in (ahead, 1e12, 1e18):  # 1e12: milliseconds sent as seconds
        with pytest.raises(ProtocolError, match="'ts' is in the future"):
            usage_from_wire({"ts": ts, "input_tokens": 1})
    assert usage_from_wire({"ts": time.time() + 60, "input_tokens": 1}).input_tokens == 1


def test_a_usage_line_without_ts_is_stamped_now() -> None:
    line = protocol.dumps(protocol.request("usage", 1, event={"agent": "a", "input_tokens": 3}))
    before = time.time()
    decoded = decode_usage_line(line)
    assert decoded is not None
    assert before <= decoded[1].ts <= time.time()
    assert decoded[1].input_tokens == 3


def test_faulty_usage_lines_are_left_to_the_generic_path() -> None:
    for event in ({"input_tokens": -1}, {"input_tokens": True}, {"ts": 0}, {"agent": None},
                  {"input_tokens": 2**63}, {"ts": 1e12}):  # fmt: skip
        line = protocol.dumps(protocol.request("usage", 1, event=event))
        assert decode_usage_line(line) is None
        assert isinstance(generic(line), str)


@given(mids=st.lists(st.integers(-(2**63), 2**63) | st.text(max_size=6) | st.none(), max_size=5))
def test_usage_acks_are_the_ordinary_replies(mids: list[int | str | None]) -> None:
    assert protocol.acks(mids) == [protocol.dumps(protocol.reply_ok(mid)) for mid in mids]


@pytest.mark.parametrize("mid", [-(2**63) - 1, 2**64])
def test_an_id_the_generic_decoder_reads_as_a_float_is_left_to_it(mid: int) -> None:
    line = json.dumps({"v": 1, "type": "usage", "event": {}, "id": mid}).encode()
    assert decode_usage_line(line) is None
    assert generic(line) == "refused: bad_message"

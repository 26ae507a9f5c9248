"""Deeply nested JSON: measured on its bytes as a decoder would see it, and answered on every
decode path with a clear error instead of a RecursionError."""

from __future__ import annotations

import json
from datetime import UTC
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.test_usage_wire import generic
from tokenwatch.core.nesting import MAX_NESTING, nested_deeper_than
from tokenwatch.core.usage_wire import decode_usage_line
from tokenwatch.ledger.importer import LineError, parse_lines

# Strings full of what could be mistaken for structure: brackets, quotes, backslashes.
tricky_text = st.text(alphabet='[]{}"\\ab\n', max_size=8)
documents = st.recursive(
    st.none() | st.integers() | tricky_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky_text, inner, max_size=3),
    max_leaves=30,
)


def depth(value: Any) -> int:
    """Levels of arrays and objects, counted on the decoded value."""
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


@given(doc=documents, limit=st.integers(0, 6))
def test_the_depth_read_from_bytes_is_the_decoded_depth(doc: Any, limit: int) -> None:
    raw = json.dumps(doc).encode()
    assert nested_deeper_than(raw, limit) == (depth(doc) > limit)
    assert nested_deeper_than(raw.decode(), limit) == (depth(doc) > limit)


def nested(levels: int, kind: str) -> str:
    if kind == "array":
        return "[" * levels + "]" * levels
    return '{"a":' * levels + "1" + "}" * levels


def usage_line(levels: int, kind: str, where: str) -> tuple[bytes, int]:
    """A usage line with a value `levels` deep at `where`; (the line, its whole depth)."""
    value = nested(levels, kind)
    event = '{"input_tokens":1}'
    if where == "event":
        return f'{{"v":1,"type":"usage","event":{{"x":{value}}}}}'.encode(), levels + 2
    if where == "field":
        return f'{{"v":1,"type":"usage","event":{{"input_tokens":{value}}}}}'.encode(), levels + 2
    if where == "id":
        return f'{{"v":1,"type":"usage","id":{value},"event":{event}}}'.encode(), max(levels, 1) + 1
    return f'{{"v":1,"type":"usage","x":{value},"event":{event}}}'.encode(), max(levels, 1) + 1


@given(
    levels=st.integers(0, 3000),
    kind=st.sampled_from(["array", "object"]),
    where=st.sampled_from(["event", "field", "id", "top"]),
)
def test_a_usage_line_nested_at_any_depth_is_answered_not_raised(
    levels: int, kind: str, where: str
) -> None:
    line, whole = usage_line(levels, kind, where)
    fast = decode_usage_line(line)  # never raises
    slow = generic(line)  # never raises: an event, or a refusal with its code
    if whole > MAX_NESTING:
        assert fast is None
        assert slow == "refused: bad_message"


def test_the_line_from_the_fault_run_is_a_bad_message() -> None:
    line = b'{"v":1,"type":"usage","event":{"x":' + b"[" * 1000 + b"]" * 1000 + b"}}"
    assert decode_usage_line(line) is None
    assert generic(line) == "refused: bad_message"


@pytest.mark.parametrize("levels", [MAX_NESTING + 1, 1000, 100_000])
def test_an_import_line_nested_too_deep_is_a_bad_line(levels: int) -> None:
    line = '{"ts": 1000000000, "agent": ' + nested(levels, "array") + "}"
    [(number, item)] = list(parse_lines([line], UTC))
    assert number == 1
    assert isinstance(item, LineError)
    assert str(item) == f"line 1: nested deeper than {MAX_NESTING} levels"

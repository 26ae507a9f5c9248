"""The wire format: every line either decodes to a valid message or is refused with a named code."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwatch.core import protocol
from tokenwatch.core.protocol import MAX_LINE_BYTES, SCHEMAS, ErrorCode, ProtocolError, decode

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


def outcome(line: bytes) -> dict[str, object] | ErrorCode:
    """The decoded message, or the code it was refused with."""
    try:
        return decode(line)
    except ProtocolError as exc:
        return exc.code


def code_of(line: bytes) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        decode(line)
    return info.value.code


def test_a_valid_request_round_trips() -> None:
    msg = protocol.request("pause", 7, agent="looper", who="key")
    assert decode(protocol.dumps(msg)) == {
        "v": 1,
        "type": "pause",
        "id": 7,
        "agent": "looper",
        "who": "key",
    }
    assert protocol.dumps(msg).endswith(b"\n")


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json", ErrorCode.BAD_JSON),
        (b"[1, 2]", ErrorCode.BAD_MESSAGE),
        (b'{"type": "list"}', ErrorCode.UNSUPPORTED_VERSION),
        (b'{"v": 2, "type": "list"}', ErrorCode.UNSUPPORTED_VERSION),
        (b'{"v": 1, "type": "teleport"}', ErrorCode.UNKNOWN_TYPE),
        (b'{"v": 1, "type": "pause"}', ErrorCode.BAD_MESSAGE),
        (b'{"v": 1, "type": "pause", "agent": 3}', ErrorCode.BAD_MESSAGE),
        (b'{"v": 1, "type": "attach", "pid": true}', ErrorCode.BAD_MESSAGE),
        (b'{"v": 1, "type": "list", "id": [1]}', ErrorCode.BAD_MESSAGE),
    ],
)
def test_bad_lines_are_refused_by_name(line: bytes, code: ErrorCode) -> None:
    assert code_of(line) is code


def test_an_oversized_line_is_too_large() -> None:
    assert (
        code_of(b'{"v":1,"type":"list","pad":"' + b"x" * MAX_LINE_BYTES + b'"}')
        is ErrorCode.TOO_LARGE
    )


def test_a_null_optional_field_means_not_given() -> None:
    msg = decode(b'{"v": 1, "type": "alerts", "id": 0, "limit": null, "since": null}')
    assert "limit" not in msg
    assert "since" not in msg
    assert msg.get("limit", 200) == 200


def test_replies_carry_the_request_id_and_a_code() -> None:
    assert protocol.reply_ok(3, {"a": 1}) == {
        "v": 1,
        "type": "reply",
        "re": 3,
        "ok": True,
        "data": {"a": 1},
    }
    err = protocol.reply_error(4, ErrorCode.UNKNOWN_AGENT, "no agent named x")
    assert err["error"] == {"code": "unknown_agent", "message": "no agent named x"}
    assert err["ok"] is False


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_a_protocol_error(line: bytes) -> None:
    got = outcome(line)
    assert got in set(ErrorCode) if isinstance(got, ErrorCode) else got["type"] in SCHEMAS


@given(
    st.sampled_from(sorted(SCHEMAS)), st.dictionaries(st.text(max_size=12), json_values, max_size=6)
)
def test_decoded_messages_have_their_required_fields_with_the_right_types(
    kind: str, fields: dict[str, object]
) -> None:
    msg = outcome(json.dumps({**fields, "v": 1, "type": kind}).encode())
    if isinstance(msg, ErrorCode):
        # integers past 64 bits are not JSON this protocol accepts
        assert msg in {ErrorCode.BAD_MESSAGE, ErrorCode.BAD_JSON, ErrorCode.TOO_LARGE}
        return
    for name, (types, required) in SCHEMAS[kind].items():
        if required:
            assert isinstance(msg[name], types)
        if name in msg:
            assert msg[name] is not None
            assert isinstance(msg[name], types)

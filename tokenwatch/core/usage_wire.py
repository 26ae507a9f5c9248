"""Usage events from the wire: a typed fast path for whole usage lines, and the field-by-field
check that words every refusal."""

from __future__ import annotations

import dataclasses
import time
import typing
from typing import Annotated, Any, Final, Literal

import msgspec

from tokenwatch.core.models import MAX_CALL_TOKENS, MAX_CLOCK_SKEW, UsageEvent, over_call_limit
from tokenwatch.core.protocol import VERSION, ErrorCode, ProtocolError

MAX_WIRE_INT: Final = 2**62
"""Largest integer a usage field may carry (SQLite stores 64-bit integers)."""
COUNT_FIELDS: Final = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)

_EXACT_TYPES: Final[dict[str, frozenset[type]]] = {
    "int": frozenset({int}),
    "int | None": frozenset({int, type(None)}),
    "float": frozenset({int, float}),
    "float | None": frozenset({int, float, type(None)}),
    "bool": frozenset({bool}),
    "str": frozenset({str}),
}
_EVENT_TYPES: Final[dict[str, frozenset[type]]] = {
    f.name: _EXACT_TYPES[str(f.type)] for f in dataclasses.fields(UsageEvent)
}


def usage_from_wire(data: dict[str, Any]) -> UsageEvent:
    """A usage event from a message's `event` object, type-checked field by field (exact types:
    a bool is not a count, a string is not a number); unknown keys are ignored."""
    fields: dict[str, Any] = {}
    types = _EVENT_TYPES
    for name, value in data.items():
        accepted = types.get(name)
        if accepted is None:
            continue  # derived or future fields (total_tokens) are not ours to keep
        kind = type(value)
        if kind not in accepted:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"usage: '{name}' has the wrong type")
        if kind is int and not -MAX_WIRE_INT <= value <= MAX_WIRE_INT:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"usage: '{name}' is out of range")
        fields[name] = value
    for name in COUNT_FIELDS:
        count = fields.get(name, 0)
        if count < 0:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"usage: '{name}' cannot be negative")
        if count > MAX_CALL_TOKENS:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"usage: {over_call_limit(name, count)}")
    event = UsageEvent(**fields)
    if event.ts <= 0 or event.ts != event.ts:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "usage: 'ts' must be positive Unix seconds")
    if event.ts > time.time() + MAX_CLOCK_SKEW:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "usage: 'ts' is in the future (milliseconds?)")
    return event


# -- the fast path --------------------------------------------------------------------------------

_Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_CALL_TOKENS)]
_Int = Annotated[int, msgspec.Meta(ge=-MAX_WIRE_INT, le=MAX_WIRE_INT)]
# A float field given as a huge integer is left to the slow path, which refuses it.
_Float = Annotated[float, msgspec.Meta(ge=-MAX_WIRE_INT, le=MAX_WIRE_INT)]
_TS = "ts"


def _wire_type(name: str, hint: Any) -> Any:
    if name in COUNT_FIELDS:
        return _Count
    if name == _TS:
        return _Float | msgspec.UnsetType  # absent means now; null is refused
    base = {int: _Int, float: _Float}
    args = typing.get_args(hint)
    if type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return base.get(inner, inner) | None
    return base.get(hint, hint)


def _wire_event() -> type[msgspec.Struct]:
    """UsageEvent's fields, in order, as a msgspec Struct (so it can never drift from the model),
    then `total_tokens` (derived: sent by `to_dict`, ignored)."""
    hints = typing.get_type_hints(UsageEvent)
    fields: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(UsageEvent):
        default = msgspec.UNSET if f.name == _TS else f.default
        fields.append((f.name, _wire_type(f.name, hints[f.name]), default))
    fields.append(("total_tokens", int | None, None))
    # Any other key is left to the generic path: skipping an unknown value, msgspec recurses
    # into it (RecursionError near 1,000 levels), while typed fields refuse a nested value at once.
    return msgspec.defstruct("WireUsageEvent", fields, forbid_unknown_fields=True)


_WireEvent = _wire_event()
_FIELD_COUNT: Final = len(dataclasses.fields(UsageEvent))


# Integers orjson reads as integers (the generic path; past -2**63 it reads a float, no id);
# msgspec bounds stop at int64, so ids up to 2**64 - 1 are left to the generic path.
_Id = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _UsageLine(msgspec.Struct, forbid_unknown_fields=True):
    v: int
    type: Literal["usage"]
    event: _WireEvent  # type: ignore[valid-type]
    id: _Id | str | None = None


_decoder: Final = msgspec.json.Decoder(_UsageLine)
_MARK: Final = b'"usage"'
_ID_MIN: Final = -(2**63)
_ID_MAX: Final = 2**64 - 1
"""The integers the generic (orjson) decoder reads as integers."""


def decode_usage_line(line: bytes) -> tuple[int | str | None, UsageEvent] | None:
    """(id, event) of a well-formed usage line, decoded and type-checked in C; None for anything
    else (another message, or a usage line with a fault), which the generic path then handles
    and words. Accepts exactly what `protocol.decode` and `usage_from_wire` accept, or less."""
    if _MARK not in line:
        return None
    try:
        msg = _decoder.decode(line)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    if msg.v != VERSION:
        return None
    if isinstance(msg.id, int) and not _ID_MIN <= msg.id <= _ID_MAX:
        return None  # the generic decoder reads such a number as a float and refuses it
    values = msgspec.structs.astuple(msg.event)[:_FIELD_COUNT]
    if values[0] is msgspec.UNSET:
        values = (time.time(), *values[1:])
    elif not 0 < values[0] <= time.time() + MAX_CLOCK_SKEW:
        return None  # the generic path words the problem
    return msg.id, UsageEvent(*values)

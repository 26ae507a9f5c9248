"""Usage events from JSON lines (the normalised shape of DESIGN.md), validated field by field."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import time
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tokenwatch.core.models import (
    FIELD_ALIASES,
    MAX_CALL_TOKENS,
    MAX_CLOCK_SKEW,
    Source,
    Status,
    UsageEvent,
    over_call_limit,
)
from tokenwatch.core.nesting import MAX_NESTING, nested_deeper_than

_HINTS = typing.get_type_hints(UsageEvent)
_FIELDS = {f.name for f in dataclasses.fields(UsageEvent)}
_ALIASES = {alias: name for name, aliases in FIELD_ALIASES.items() for alias in aliases}
_DERIVED = {"total_tokens"}
_STATUSES = {s.value for s in Status}
_COUNTS = {name for name in _FIELDS if name.endswith("_tokens")}
_MAX_UNIX_SECONDS = 1e11
"""Beyond year 5000: such a `ts` is almost surely milliseconds, which we refuse to guess."""


class BadLine(ValueError):
    """A line that is not a usage event; the message says which field and what was expected."""


@dataclass(frozen=True, slots=True)
class LineError:
    number: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.number}: {self.reason}"


def parse_ts(value: object, tz: datetime.tzinfo) -> float:
    """Unix seconds, or ISO 8601 (a time without offset is in `tz`); never in the future."""
    ts = _parse_ts(value, tz)
    if ts > time.time() + MAX_CLOCK_SKEW:
        raise BadLine(f"ts: {value!r} is in the future")
    return ts


def _parse_ts(value: object, tz: datetime.tzinfo) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        ts = float(value)
        if not math.isfinite(ts) or ts < 0:
            raise BadLine(f"ts: expected Unix seconds or ISO 8601, got {value!r}")
        if ts > _MAX_UNIX_SECONDS:
            raise BadLine(f"ts: {value!r} is too large for Unix seconds (milliseconds?)")
        return ts
    if isinstance(value, str):
        try:
            parsed = datetime.datetime.fromisoformat(value.strip())
        except ValueError:
            raise BadLine(f"ts: not ISO 8601 or Unix seconds: {value!r}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=tz)
        return parsed.timestamp()
    raise BadLine(f"ts: expected Unix seconds or ISO 8601, got {value!r}")


def _kind(hint: Any) -> tuple[type, bool]:
    """(base type, nullable) of a UsageEvent field's annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0], True) if args else (hint, False)


_KINDS = {name: _kind(hint) for name, hint in _HINTS.items()}


def _checked(name: str, value: object) -> object:
    base, nullable = _KINDS[name]
    if value is None:
        if nullable:
            return None
        raise BadLine(f"{name}: must not be null")
    if base is bool:
        if not isinstance(value, bool):
            raise BadLine(f"{name}: expected true or false, got {value!r}")
        return value
    if base is str:
        if not isinstance(value, str):
            raise BadLine(f"{name}: expected a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadLine(f"{name}: expected a number, got {value!r}")
    if base is int:
        if not float(value).is_integer():
            raise BadLine(f"{name}: expected a whole number, got {value!r}")
        value = int(value)
        if abs(value) >= 2**63:
            raise BadLine(f"{name}: too large: {value}")
    if value < 0 and name != "pid":
        raise BadLine(f"{name}: must not be negative, got {value!r}")
    if name in _COUNTS and value > MAX_CALL_TOKENS:
        raise BadLine(over_call_limit(name, int(value)))
    return base(value)


def event_from_json(data: object, tz: datetime.tzinfo) -> UsageEvent:
    """One usage event from a decoded JSON object; missing fields take their defaults."""
    if not isinstance(data, dict):
        raise BadLine(f"expected a JSON object, got {type(data).__name__}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = _ALIASES.get(key, key)
        if name in _DERIVED:
            continue
        if name not in _FIELDS:
            raise BadLine(f"unknown field {key!r}")
        values[name] = parse_ts(value, tz) if name == "ts" else _checked(name, value)
    if "ts" not in values:
        raise BadLine("ts: missing (Unix seconds or ISO 8601)")
    values.setdefault("source", Source.IMPORT.value)
    event = UsageEvent(**values)
    _check_consistency(event)
    return event


def _check_consistency(event: UsageEvent) -> None:
    if event.status not in _STATUSES:
        raise BadLine(
            f"status: expected one of {', '.join(sorted(_STATUSES))}, got {event.status!r}"
        )
    if event.cache_read_tokens + event.cache_write_tokens > event.input_tokens:
        raise BadLine(
            "cache_read_tokens + cache_write_tokens exceed input_tokens "
            "(input_tokens counts every prompt token, cached ones included)"
        )
    if event.reasoning_tokens > event.output_tokens:
        raise BadLine("reasoning_tokens exceed output_tokens (output includes reasoning)")


def line_call_id(text: str) -> str:
    """A stable id for a line without `call_id`, so importing a file twice stores it once."""
    canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    return "import:" + hashlib.sha256(canonical.encode()).hexdigest()[:24]


def parse_lines(
    lines: Iterable[str], tz: datetime.tzinfo
) -> Iterator[tuple[int, UsageEvent | LineError]]:
    """(line number, event or error) for every non-blank line, numbered from 1."""
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        if nested_deeper_than(text):
            # the standard library's decoder would recurse until RecursionError
            yield number, LineError(number, f"nested deeper than {MAX_NESTING} levels")
            continue
        try:
            data = json.loads(text)
            event = event_from_json(data, tz)
        except json.JSONDecodeError as exc:
            yield number, LineError(number, f"not JSON: {exc.msg} at column {exc.colno}")
            continue
        except BadLine as exc:
            yield number, LineError(number, str(exc))
            continue
        if not event.call_id:
            event.call_id = line_call_id(text)
        yield number, event

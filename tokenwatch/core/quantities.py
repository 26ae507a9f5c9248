"""Parsing what people type: token counts (`200k`), money (`$2`), durations (`1h`), rates (`20k/min`)."""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Final

_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "b": 1_000_000_000}
_NUMBER = r"(\d+(?:\.\d+)?|\.\d+)"
_DURATION_UNITS = {
    "s": 1,
    "sec": 1,
    "min": 60,
    "m": 60,
    "h": 3600,
    "hr": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
    "w": 604800,
    "week": 604800,
}


class QuantityError(ValueError):
    """Text that is not the quantity asked for; the message says what was expected."""


class Unit(enum.StrEnum):
    TOKENS = "tokens"
    USD = "usd"


@dataclass(frozen=True, slots=True)
class Amount:
    """A limit: some tokens or some dollars."""

    value: float
    unit: Unit

    def __str__(self) -> str:
        """As it can be typed back: `$2`, `200k`, `60tokens` (a bare `60` is refused)."""
        if self.unit is Unit.USD:
            return f"${self.value:g}"
        text = format_tokens(self.value)
        return text if text[-1].isalpha() else f"{text}tokens"


class RateKind(enum.StrEnum):
    TOKENS_PER_MIN = "tokens/min"
    USD_PER_HOUR = "usd/hour"
    FRACTION = "fraction"
    """Run this fraction of the time (duty cycle) or of the agent's own pace."""
    OFF = "off"


@dataclass(frozen=True, slots=True)
class Rate:
    """A throttle rate: `20k/min`, `$1/h`, `50%` or `off`."""

    kind: RateKind
    value: float = 0.0

    @property
    def per_second(self) -> float:
        """Tokens or dollars per second (fraction rates return the fraction)."""
        if self.kind is RateKind.TOKENS_PER_MIN:
            return self.value / 60.0
        if self.kind is RateKind.USD_PER_HOUR:
            return self.value / 3600.0
        return self.value

    def __str__(self) -> str:
        if self.kind is RateKind.OFF:
            return "off"
        if self.kind is RateKind.FRACTION:
            return f"{self.value * 100:g}%"
        if self.kind is RateKind.USD_PER_HOUR:
            return f"${self.value:g}/h"
        return f"{format_tokens(self.value)}/min"


def parse_tokens(text: str | int | float) -> int:
    """`200k` -> 200000, `1.5M` -> 1500000, `12,000` -> 12000."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0:
            raise QuantityError(f"a token count cannot be negative: {text}")
        return int(_finite(float(text), text))
    raw = str(text).strip().lower().replace(",", "").replace("_", "")
    raw = raw.removesuffix("tokens").removesuffix("tok").strip()
    m = re.fullmatch(_NUMBER + r"\s*([kmb]?)", raw)
    if not m:
        raise QuantityError(f"not a token count: {text!r} (try 200000, 200k or 1.5M)")
    return round(_finite(float(m.group(1)) * _SUFFIX[m.group(2)], text))


def parse_usd(text: str | int | float) -> float:
    """`$2`, `2.50`, `$1.5k` -> dollars."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return _finite(float(text), text)
    raw = str(text).strip().lower().replace(",", "")
    raw = raw.removeprefix("$").removesuffix("usd").strip()
    m = re.fullmatch(_NUMBER + r"\s*([kmb]?)", raw)
    if not m:
        raise QuantityError(f"not an amount of dollars: {text!r} (try $2 or $0.50)")
    return _finite(float(m.group(1)) * _SUFFIX[m.group(2)], text)


def parse_amount(text: str | int | float) -> Amount:
    """A budget limit: `$2` is dollars, `200k` (or a bare number) is tokens."""
    if isinstance(text, str) and (
        text.strip().startswith("$") or text.strip().lower().endswith("usd")
    ):
        return Amount(parse_usd(text), Unit.USD)
    try:
        return Amount(float(parse_tokens(text)), Unit.TOKENS)
    except QuantityError:
        raise QuantityError(
            f"not a limit: {text!r} (tokens like 200k, or dollars like $2)"
        ) from None


def parse_typed_limit(text: str) -> Amount:
    """A limit typed on a command line or in a dialog: like `parse_amount`, but a bare number
    is refused, since people mean dollars by `5` as often as tokens."""
    raw = text.strip().replace(",", "").replace("_", "")
    if not re.fullmatch(_NUMBER, raw):
        return parse_amount(text)
    value = float(raw)
    if value < 1000:
        tokens = f"{raw}k ({value * 1000:,.0f} tokens)"
    elif parse_tokens(compact := format_tokens(value)) == value:
        tokens = f"{compact} ({value:,.0f} tokens)"
    else:
        tokens = f"{raw}tokens"
    raise QuantityError(f"{text!r} has no unit: did you mean {tokens} or ${raw} (dollars)?")


def parse_duration(text: str | int | float) -> float:
    """`90s`, `5min`, `1h`, `7d`, `2w` or a number of seconds -> seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return _finite(float(text), text)
    raw = str(text).strip().lower()
    m = re.fullmatch(_NUMBER + r"\s*([a-z]*)", raw)
    if not m or m.group(2) not in _DURATION_UNITS | {"": 1}:
        raise QuantityError(f"not a duration: {text!r} (try 30s, 5min, 1h, 7d)")
    return _finite(float(m.group(1)) * (_DURATION_UNITS.get(m.group(2), 1)), text)


def _finite(value: float, text: object) -> float:
    # NaN slips past every comparison and infinity past every limit; both break the sums
    if not math.isfinite(value):
        raise QuantityError(f"not a finite number: {text!r}")
    return value


def parse_rate(text: str) -> Rate:
    """`20k/min`, `1000/s`, `$1/h`, `$0.5/min`, `50%`, `0.5`, `off`."""
    raw = text.strip().lower().replace(" ", "")
    if raw in {"off", "none", "0", "no"}:
        return Rate(RateKind.OFF)
    if raw.endswith("%"):
        pct = float(_checked_number(raw[:-1], text))
        if not 0 < pct <= 100:
            raise QuantityError(f"a percentage must be above 0 and at most 100: {text!r}")
        return Rate(RateKind.FRACTION, pct / 100)
    if "/" not in raw:
        frac = float(_checked_number(raw, text))
        if 0 < frac < 1:
            return Rate(RateKind.FRACTION, frac)
        raise QuantityError(f"not a rate: {text!r} (try 20k/min, $1/h, 50% or off)")
    amount, _, per = raw.partition("/")
    per_s = parse_duration("1" + per if per and per[0].isalpha() else per)
    if per_s <= 0:
        raise QuantityError(f"not a rate: {text!r}")
    if amount.startswith("$"):
        rate = Rate(RateKind.USD_PER_HOUR, parse_usd(amount) * 3600 / per_s)
    else:
        rate = Rate(RateKind.TOKENS_PER_MIN, parse_tokens(amount) * 60 / per_s)
    if rate.value <= 0:
        # a bucket that never fills stops the agent for good: that is pause, not a throttle
        raise QuantityError(f"a rate must be above zero: {text!r} (to stop the agent, pause it)")
    return rate


def _checked_number(raw: str, original: str) -> str:
    if not re.fullmatch(_NUMBER, raw):
        raise QuantityError(f"not a rate: {original!r} (try 20k/min, $1/h, 50% or off)")
    return raw


def format_tokens(n: float) -> str:
    """12345 -> `12.3k`; 2_500_000 -> `2.5M` (three significant digits, never exponent notation)."""
    n = float(n)
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            scaled = n / div
            decimals = 0 if abs(scaled) >= 100 else 1 if abs(scaled) >= 10 else 2
            text = f"{scaled:.{decimals}f}"
            if "." in text:
                text = text.rstrip("0").rstrip(".")
            return text + suffix
    return f"{n:.0f}"


PARTIAL_MARK = "*"
"""After a dollar figure that holds calls to models no price table knows (priced by estimate)."""
SMALL_USD: Final = 0.001
"""Below this, dollars are shown with two significant digits (`$0.00042`) instead of four decimals."""
TINY_USD: Final = 0.000001
"""Below this (and above zero) a cost is shown as `<$0.000001`."""


def format_usd(value: float | None, partial: bool = False) -> str:
    """Dollars with sensible precision; `unpriced` for None, never a silent $0; marked with
    PARTIAL_MARK when `partial` (some of it is an estimate)."""
    mark = PARTIAL_MARK if partial else ""
    if value is None:
        return "unpriced" + mark
    if abs(value) >= 100:
        return f"${value:,.0f}{mark}"
    if abs(value) >= 1:
        return f"${value:,.2f}{mark}"
    if value == 0 or abs(value) >= SMALL_USD:
        return f"${value:.4f}{mark}"
    if abs(value) < TINY_USD:
        return f"<${TINY_USD:.6f}{mark}"
    # a call of a few hundred tokens costs $0.00004: two significant digits, not `$0.0000`
    rounded = float(f"{abs(value):.2g}")  # 0.0000995 rounds to 0.0001: `$0.00010`, not `$0.000100`
    decimals = 1 - math.floor(math.log10(rounded))
    return f"${value:.{decimals}f}{mark}"


def estimate_note(estimated_usd: float, estimated_from: str = "", subject: str = "") -> str:
    """The footnote of a partial total: how much of it is an estimate, and from what."""
    source = f" (price: estimated from {estimated_from})" if estimated_from else ""
    who = f" {subject}" if subject else ""
    return (
        f"{PARTIAL_MARK}{who} includes {format_usd(estimated_usd)} for models no price table knows, "
        f'at an estimated price{source}; declare them in tokenwatch.toml [prices."MODEL"]'
    )

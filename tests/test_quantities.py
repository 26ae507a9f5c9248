"""What people type for limits, durations and throttle rates parses to what they meant."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwatch.core.quantities import (
    QuantityError,
    RateKind,
    Unit,
    format_tokens,
    format_usd,
    parse_amount,
    parse_duration,
    parse_rate,
    parse_tokens,
    parse_typed_limit,
)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("200k", 200_000), ("1.5M", 1_500_000), ("12,000", 12_000), ("7", 7), (" 2K ", 2_000)],
)
def test_token_counts(text: str, tokens: int) -> None:
    assert parse_tokens(text) == tokens


def test_dollar_limits_and_token_limits_are_told_apart() -> None:
    assert parse_amount("$2").unit is Unit.USD
    assert parse_amount("$2").value == 2.0
    assert parse_amount("200k").unit is Unit.TOKENS
    assert parse_amount(5000).value == 5000


@pytest.mark.parametrize(
    ("text", "kind", "per_second"),
    [
        ("20k/min", RateKind.TOKENS_PER_MIN, 20_000 / 60),
        ("1000/s", RateKind.TOKENS_PER_MIN, 1000.0),
        ("$1/h", RateKind.USD_PER_HOUR, 1 / 3600),
        ("$0.5/min", RateKind.USD_PER_HOUR, 0.5 / 60),
        ("50%", RateKind.FRACTION, 0.5),
        ("0.25", RateKind.FRACTION, 0.25),
    ],
)
def test_rates(text: str, kind: RateKind, per_second: float) -> None:
    rate = parse_rate(text)
    assert rate.kind is kind
    assert rate.per_second == pytest.approx(per_second)


def test_off_turns_a_throttle_off() -> None:
    assert parse_rate("off").kind is RateKind.OFF


@pytest.mark.parametrize("bad", ["fast", "120%", "-3/min", "$x/h", "5/fortnight", ""])
def test_bad_rates_say_what_is_expected(bad: str) -> None:
    with pytest.raises(QuantityError, match=r"rate|percentage|duration|token|dollars"):
        parse_rate(bad)


BIG = "9" * 400  # a float of it is infinite


@pytest.mark.parametrize(
    "bad", ["nan%", "0%", "inf%", f"{BIG}%", f"{BIG}k/min", f"${BIG}/h", f"1k/{BIG}w", "0/min"]
)
def test_rates_that_would_never_or_always_throttle_are_refused(bad: str) -> None:
    with pytest.raises(QuantityError, match=r"not a rate|percentage|finite|above zero"):
        parse_rate(bad)


@pytest.mark.parametrize("huge", [float("inf"), float("nan"), BIG, f"{BIG}k"])
def test_limits_must_be_finite(huge: float | str) -> None:
    with pytest.raises(QuantityError, match=r"not a limit"):
        parse_amount(huge)
    with pytest.raises(QuantityError, match=r"finite|not a token count"):
        parse_tokens(huge)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("5min", 300), ("1h", 3600), ("7d", 604800)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_unpriced_is_never_shown_as_zero() -> None:
    assert format_usd(None) == "unpriced"
    assert format_usd(0.0) == "$0.0000"
    assert format_usd(1234.5) == "$1,234"


@pytest.mark.parametrize(
    ("usd", "shown"),
    [(0.0312, "$0.0312"), (0.0042, "$0.0042"), (0.00042, "$0.00042"), (0.000037, "$0.000037"),
     (0.0000995, "$0.00010"), (0.0009996, "$0.0010"), (1e-9, "<$0.000001")],
)  # fmt: skip
def test_small_costs_keep_two_significant_digits(usd: float, shown: str) -> None:
    assert format_usd(usd) == shown


@given(st.integers(min_value=0, max_value=10**12))
def test_token_counts_round_trip_through_their_display(n: int) -> None:
    shown = format_tokens(n)
    # Three significant digits: the display is within 0.5% of the count.
    assert parse_tokens(shown) == pytest.approx(n, rel=5e-3, abs=1)


@given(st.text(max_size=20))
def test_parsers_raise_only_quantity_errors(text: str) -> None:
    for parser in (parse_tokens, parse_duration, parse_rate, parse_amount):
        try:
            parser(text)
        except QuantityError:
            pass


@given(st.integers(0, 10**12).map(str) | st.floats(0, 1e9).map(lambda v: f"{v:.3f}"))
def test_a_typed_bare_number_is_refused_naming_both_meanings(text: str) -> None:
    with pytest.raises(QuantityError) as refused:
        parse_typed_limit(text)
    message = str(refused.value)
    assert f"${text} (dollars)" in message
    spelled = message.split("did you mean ")[1].split(" ")[0]
    assert parse_amount(spelled).unit is Unit.TOKENS  # the token spelling it offers works


@pytest.mark.parametrize("text", ["5k", "$5", "5tokens", "1.5M", "$0.01", "5 USD"])
def test_a_typed_limit_with_a_unit_is_what_it_says(text: str) -> None:
    assert parse_typed_limit(text) == parse_amount(text)


@given(st.integers(min_value=1, max_value=10**12))
def test_a_token_limit_prints_as_something_that_can_be_typed_back(tokens: int) -> None:
    from tokenwatch.core.quantities import Amount

    shown = str(Amount(float(tokens), Unit.TOKENS))
    assert parse_typed_limit(shown).unit is Unit.TOKENS

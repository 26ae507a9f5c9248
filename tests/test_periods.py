"""Calendar periods start and end where a person in that time zone expects, DST included."""

from __future__ import annotations

import datetime as dt

import pytest

from tokenwatch.core.periods import parse_since, parse_start, period_end, period_start, zone
from tokenwatch.core.quantities import QuantityError

PARIS = zone("Europe/Paris")


def at(*args: int, tz: dt.tzinfo = PARIS) -> float:
    return dt.datetime(*args, tzinfo=tz).timestamp()  # type: ignore[misc]


def test_day_is_local_midnight_to_midnight() -> None:
    ts = at(2026, 11, 23, 15, 30)
    assert period_start(ts, "day", PARIS) == at(2026, 11, 23)
    assert period_end(ts, "day", PARIS) == at(2026, 11, 24)


def test_the_day_clocks_go_back_has_25_hours() -> None:
    ts = at(2026, 10, 25, 12)
    assert period_end(ts, "day", PARIS) - period_start(ts, "day", PARIS) == 25 * 3600


def test_the_day_clocks_go_forward_has_23_hours() -> None:
    ts = at(2026, 3, 29, 12)
    assert period_end(ts, "day", PARIS) - period_start(ts, "day", PARIS) == 23 * 3600


def test_weeks_start_on_monday() -> None:
    sunday = at(2026, 11, 29, 23, 59)
    assert period_start(sunday, "week", PARIS) == at(2026, 11, 23)
    assert period_end(sunday, "week", PARIS) == at(2026, 11, 30)


def test_month_boundaries_including_december() -> None:
    ts = at(2026, 12, 31, 23, 59)
    assert period_start(ts, "month", PARIS) == at(2026, 12, 1)
    assert period_end(ts, "month", PARIS) == at(2027, 1, 1)


def test_same_instant_falls_in_different_days_in_different_zones() -> None:
    tokyo = zone("Asia/Tokyo")
    ts = at(2026, 11, 23, 20, tz=dt.UTC)  # 05:00 next day in Tokyo
    assert period_start(ts, "day", tokyo) == at(2026, 11, 24, tz=tokyo)
    assert period_start(ts, "day", zone("UTC")) == at(2026, 11, 23, tz=dt.UTC)


def test_since_accepts_durations_today_and_dates() -> None:
    now = at(2026, 11, 23, 12)
    assert parse_since("1h", now, PARIS) == now - 3600
    assert parse_since("today", now, PARIS) == at(2026, 11, 23)
    assert parse_since("2026-11-01", now, PARIS) == at(2026, 11, 1)


def test_unknown_zone_and_bad_since_are_clear_errors() -> None:
    with pytest.raises(QuantityError, match="time zone"):
        zone("Mars/Olympus")
    with pytest.raises(QuantityError, match="not a time"):
        parse_since("yesterday-ish")


@pytest.mark.parametrize(
    "text", ["9999999999999999999999h", "1000000000000000000000s", "99999999999d", "0001-01-01"]
)
def test_since_before_1970_is_out_of_range(text: str) -> None:
    with pytest.raises(QuantityError, match=r"out of range: .* \(a time from 1970-01-01"):
        parse_since(text, at(2026, 11, 23, 12), PARIS)


def test_a_start_in_the_future_is_refused() -> None:
    now = at(2026, 11, 23, 12)
    assert parse_since("9999-12-31", now, PARIS) > now  # an end may be in the future
    with pytest.raises(QuantityError, match="'9999-12-31' is in the future"):
        parse_start("9999-12-31", now, PARIS)
    assert parse_start("1h", now, PARIS) == now - 3600

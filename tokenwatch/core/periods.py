"""Calendar periods (hour, day, week, month) aligned in a time zone, and `--since` parsing."""

from __future__ import annotations

import datetime as dt
import time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tokenwatch.core.quantities import QuantityError, parse_duration

CALENDAR_PERIODS = ("hour", "day", "week", "month")
ALL_PERIODS = ("request", "task", "hour", "day", "week", "month", "total")
ROLLING_SECONDS = {"hour": 3600.0, "day": 86400.0, "week": 604800.0, "month": 30 * 86400.0}
MAX_TS = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC).timestamp()
"""The last second a date can show: later (or before 1970) is not a time the ledger can mean."""


def zone(name: str) -> dt.tzinfo:
    """`local` (the machine's zone), `UTC`, or an IANA name like `Europe/Paris`."""
    if name in ("", "local"):
        tz = dt.datetime.now().astimezone().tzinfo
        assert tz is not None
        return tz
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise QuantityError(f"unknown time zone {name!r} (try UTC or Europe/Paris)") from None


def period_start(ts: float, period: str, tz: dt.tzinfo) -> float:
    """Start of the calendar period containing `ts` (weeks start on Monday)."""
    local = dt.datetime.fromtimestamp(ts, tz)
    if period == "hour":
        start = local.replace(minute=0, second=0, microsecond=0)
    elif period == "day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    elif period == "week":
        day = local.replace(hour=0, minute=0, second=0, microsecond=0)
        start = day - dt.timedelta(days=day.weekday())
    elif period == "month":
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    else:
        raise ValueError(f"not a calendar period: {period!r}")
    return _aware(start, tz).timestamp()


def period_end(ts: float, period: str, tz: dt.tzinfo) -> float:
    """End (exclusive) of the calendar period containing `ts`, exact across DST changes."""
    start = dt.datetime.fromtimestamp(period_start(ts, period, tz), tz)
    if period == "hour":
        return period_start(ts, "hour", tz) + 3600.0
    if period == "day":
        nxt = (start + dt.timedelta(days=1, hours=3)).replace(hour=0)
    elif period == "week":
        nxt = (start + dt.timedelta(days=7, hours=3)).replace(hour=0)
    else:
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        nxt = start.replace(year=year, month=month, day=1)
    return _aware(nxt.replace(tzinfo=None), tz).timestamp()


def _aware(naive_or_aware: dt.datetime, tz: dt.tzinfo) -> dt.datetime:
    # Re-localise wall-clock times so a DST change inside the period is accounted for.
    naive = naive_or_aware.replace(tzinfo=None)
    if isinstance(tz, ZoneInfo):
        return naive.replace(tzinfo=tz)
    return naive.replace(tzinfo=tz)


def parse_since(text: str, now: float | None = None, tz: dt.tzinfo | None = None) -> float:
    """`1h`, `24h`, `7d` (ago), `today`, or a date / ISO timestamp -> Unix seconds, from 1970 to
    the end of year 9999."""
    now = time.time() if now is None else now
    ts = _parse_time(text, now, tz or zone("local"))
    if not 0 <= ts <= MAX_TS:
        raise QuantityError(f"out of range: {text!r} (a time from 1970-01-01 to 9999-12-31)")
    return ts


def parse_start(text: str, now: float | None = None, tz: dt.tzinfo | None = None) -> float:
    """`parse_since` for the start of a window ending now or earlier: a future time is refused."""
    now = time.time() if now is None else now
    ts = parse_since(text, now, tz)
    if ts > now:
        raise QuantityError(f"{text!r} is in the future (a start must be now or earlier)")
    return ts


def _parse_time(text: str, now: float, tz: dt.tzinfo) -> float:
    raw = text.strip()
    if raw == "today":
        return period_start(now, "day", tz)
    try:
        return now - parse_duration(raw)
    except QuantityError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise QuantityError(
            f"not a time: {text!r} (try 1h, 24h, 7d, today, 2026-11-01 or 2026-11-01T09:00)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=tz)
    return parsed.timestamp()

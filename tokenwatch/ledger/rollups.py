"""Rollup-aware SQL for ledger sums: a time range cut into hour, minute and raw-event pieces."""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping, Sequence
from typing import Any

from tokenwatch.core.periods import period_end, period_start
from tokenwatch.ledger.schema import ESTIMATED_PRICE_SQL, MEASURES, ROLLUP_DIMS, ROLLUPS, quoted

# How a raw event row contributes to each rollup measure (one row, so a count of 1).
_RAW_MEASURES = {
    "requests": "1",
    "cost_usd": "COALESCE(cost_usd, 0)",
    "unpriced": f"cost_usd IS NULL OR {ESTIMATED_PRICE_SQL}",
    "estimated_usd": f"CASE WHEN {ESTIMATED_PRICE_SQL} THEN cost_usd ELSE 0 END",
    "errors": "status = 'error'",
    "denied": "status = 'denied'",
    "estimated": "estimated != 0",
}
_GLOB_CHARS = frozenset("*?[")
MAX_TERMS = 400
"""SELECTs one summary query unions: SQLite refuses more than 500 (SQLITE_MAX_COMPOUND_SELECT)."""


def segments(since: float, until: float, now: float) -> list[tuple[str | None, float, float]]:
    """Split [since, until) into hour-rollup, minute-rollup and raw-event pieces.

    Whole hours come from `rollup_hour`, whole minutes at the edges from `rollup_minute`, and
    the remaining seconds from the events themselves (table None).
    """
    if until <= since:
        return []
    if math.isinf(until):
        # Rollups up to a bound past now; anything stamped later is read raw.
        finite = (math.floor(max(now, since) / 3600) + 2) * 3600.0
        return [*segments(since, finite, now), (None, finite, math.inf)]
    out: list[tuple[str | None, float, float]] = []
    _split(since, until, 0, out)
    return out


def _split(lo: float, hi: float, level: int, out: list[tuple[str | None, float, float]]) -> None:
    if lo >= hi:
        return
    if level == len(ROLLUPS):
        out.append((None, lo, hi))
        return
    table, width = ROLLUPS[level]
    first = math.ceil(lo / width) * width
    first += width if first < lo else 0  # division can round down (tiny or huge floats)
    last = math.floor(hi / width) * width
    last -= width if last > hi else 0
    if first >= last:
        _split(lo, hi, level + 1, out)
        return
    _split(lo, first, level + 1, out)
    out.append((table, float(first), float(last)))
    _split(last, hi, level + 1, out)


def filter_sql(filters: Mapping[str, str]) -> tuple[str, list[str]]:
    parts: list[str] = []
    params: list[str] = []
    for name, value in sorted(filters.items()):
        if name not in ROLLUP_DIMS:
            raise ValueError(f"cannot filter on {name!r} (one of: {', '.join(ROLLUP_DIMS)})")
        op = "GLOB" if _GLOB_CHARS & set(value) else "="
        parts.append(f" AND {quoted(name)} {op} ?")
        params.append(str(value))
    return "".join(parts), params


def summary_sql(
    key: str | None,
    windows: Sequence[tuple[str, float, float]],
    filters: Mapping[str, str],
    now: float,
) -> tuple[str, list[Any]]:
    """One query summing every window's pieces; grouped by `key` when given.

    `key` is a quoted dimension, `label` (the window's label) or None for one total row. Each
    piece projects only the key and `task` (for the distinct count): fewer columns to carry.
    """
    where, filter_params = filter_sql(filters)
    key_col = key if key not in (None, "label") else "''"
    cols = f"? AS label, {key_col} AS k, task"
    rollup_cols = ", ".join(name for name, _ in MEASURES)
    raw_cols = ", ".join(f"{_RAW_MEASURES.get(name, name)} AS {name}" for name, _ in MEASURES)
    parts: list[str] = []
    params: list[Any] = []
    for label, lo, hi in windows:
        for table, a, b in segments(lo, hi, now):
            if table is None:
                parts.append(
                    # The time range is always the selective part: never let a filter on
                    # agent pick the (agent, id) index and walk all of that agent's history.
                    f"SELECT {cols}, {raw_cols} FROM events INDEXED BY events_ts "
                    f"WHERE ts >= ? AND ts < ?{where}"
                )
            else:
                parts.append(
                    f"SELECT {cols}, {rollup_cols} FROM {table} "
                    f"WHERE bucket >= ? AND bucket < ?{where}"
                )
            params += [label, a, b, *filter_params]
    if not parts:
        parts.append(f"SELECT '' AS label, '' AS k, task, {rollup_cols} FROM rollup_hour WHERE 0")
    sums = ", ".join(f"TOTAL({name})" for name, _ in MEASURES)
    group_col = None if key is None else "label" if key == "label" else "k"
    select_key = group_col or "''"
    group = f" GROUP BY {group_col}" if group_col else ""
    sql = (
        f"SELECT {sums}, COUNT(DISTINCT NULLIF(task, '')), {select_key} "
        f"FROM ({' UNION ALL '.join(parts)}){group}"
    )
    return sql, params


def window_batches(
    windows: Sequence[tuple[str, float, float]], now: float
) -> list[list[tuple[str, float, float]]]:
    """`windows` cut into runs whose pieces fit one query (a window is never split, so each
    label's sums come from one query)."""
    batches: list[list[tuple[str, float, float]]] = [[]]
    terms = 0
    for window in windows:
        n = len(segments(window[1], window[2], now))
        if batches[-1] and terms + n > MAX_TERMS:
            batches.append([])
            terms = 0
        batches[-1].append(window)
        terms += n
    return batches


def period_windows(
    since: float, until: float, period: str, tz: datetime.tzinfo, now: float
) -> list[tuple[str, float, float]]:
    """One window per local day, week (from Monday) or month of [since, until), none past
    `now`: the window holding `now` (or the last one) runs to `until`, so events stamped later
    still add up to the total without a ledger's far-future event making a window for every
    period up to it."""
    end = min(until, now)
    windows: list[tuple[str, float, float]] = []
    lo = since
    while lo < end:
        hi = min(period_end(lo, period, tz), end)
        windows.append((period_label(lo, period, tz), lo, hi))
        lo = hi
    if until > end:
        if windows:
            label, lo = windows[-1][0], windows[-1][1]
        else:
            label, lo = period_label(since, period, tz), since
        windows[-1:] = [(label, lo, until)]
    return windows


def period_label(ts: float, period: str, tz: datetime.tzinfo) -> str:
    """`2026-12-05` for a day, the Monday `2026-11-30` for its week, `2026-12` for a month."""
    start = datetime.datetime.fromtimestamp(period_start(ts, period, tz), tz).date()
    return start.isoformat()[:7] if period == "month" else start.isoformat()


def session_sql(since: float, until: float, filters: Mapping[str, str]) -> tuple[str, list[Any]]:
    """Sums per run of an agent (`agent`, `run_id`) over raw events, with its first and last
    call: runs are not a rollup dimension."""
    where, params = filter_sql(filters)
    sums = ", ".join(expr for _, expr in MEASURES)
    sql = (
        f"SELECT {sums}, COUNT(DISTINCT NULLIF(task, '')), agent, run_id, MIN(ts), MAX(ts) "
        f"FROM events INDEXED BY events_ts WHERE ts >= ? AND ts < ?{where} GROUP BY agent, run_id"
    )
    return sql, [since, until, *params]

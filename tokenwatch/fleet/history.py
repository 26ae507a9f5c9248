"""The team's ledger in PostgreSQL read like a local one: the totals, groups and sessions that
`tokenwatch report --fleet` builds its report from (ledger/report.py renders it)."""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import anyio

from tokenwatch.config import FleetSettings
from tokenwatch.fleet.connection import FleetUnreachable, connect, describe, where
from tokenwatch.ledger.rollups import period_windows
from tokenwatch.ledger.totals import GroupTotals, SessionTotals, Totals, as_totals

if TYPE_CHECKING:
    from tokenwatch.fleet.link import Row
    from tokenwatch.ledger.report import Report

FILTERS: Final = ("agent", "task", "model", "user", "provider", "host")
"""Columns a report can be narrowed to (glob patterns allowed, as locally)."""
_ESTIMATED: Final = "price_source LIKE 'estimated:%%'"
_SUMS: Final = (
    "COUNT(*), coalesce(SUM(input_tokens), 0), coalesce(SUM(cache_read_tokens), 0), "
    "coalesce(SUM(cache_write_tokens), 0), coalesce(SUM(output_tokens), 0), "
    "coalesce(SUM(reasoning_tokens), 0), coalesce(SUM(cost_usd), 0), "
    f"COUNT(*) FILTER (WHERE cost_usd IS NULL OR {_ESTIMATED}), "
    "COUNT(*) FILTER (WHERE status = 'error'), COUNT(*) FILTER (WHERE status = 'denied'), "
    f"COUNT(*) FILTER (WHERE estimated), coalesce(SUM(cost_usd) FILTER (WHERE {_ESTIMATED}), 0), "
    "COUNT(DISTINCT NULLIF(task, ''))"
)
"""The measures in as_totals' order (requests ... tasks), then the group key."""
_SIMILAR_SPECIAL: Final = frozenset("|+{}()%_\\")


def similar_pattern(glob: str) -> str:
    """A glob (`*`, `?`, `[...]`, as SQLite's GLOB reads it) as a SIMILAR TO pattern."""
    out = []
    for char in glob:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in _SIMILAR_SPECIAL:
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def filter_sql(filters: Mapping[str, str]) -> tuple[str, list[str]]:
    """` AND column = %s ...` for each filter (SIMILAR TO for a glob), and its parameters."""
    parts, params = [], []
    for name, value in sorted(filters.items()):
        if name not in FILTERS:
            raise ValueError(f"cannot filter on {name!r} (one of: {', '.join(FILTERS)})")
        glob = any(c in value for c in "*?[")
        parts.append(f' AND "{name}" {"SIMILAR TO" if glob else "="} %s')
        params.append(similar_pattern(value) if glob else value)
    return "".join(parts), params


class TeamLedger:
    """Reads of `fleet_events` shaped as the local Store's (Totals, GroupTotals, SessionTotals),
    so one report builder serves both."""

    def __init__(self, conn: Any, clock: Any = time.time) -> None:
        self._conn = conn
        """An open psycopg AsyncConnection."""
        self._clock = clock

    async def totals(self, since: float, until: float | None = None, **filters: str) -> Totals:
        rows = await self._grouped(None, since, until, filters)
        return as_totals(Totals, rows[0] if rows else None)

    async def aggregate(
        self,
        by: str,
        since: float,
        until: float | None = None,
        *,
        top: int | None = None,
        tz: datetime.tzinfo | None = None,
        **filters: str,
    ) -> list[GroupTotals]:
        """Totals per host, agent, task, model, user, provider, or local day, week or month."""
        if by in ("day", "week", "month"):
            groups = await self._periods(by, since, until, tz, filters)
            groups.sort(key=lambda g: g.key)
        else:
            if by not in FILTERS:
                raise ValueError(f"cannot group by {by!r}")
            rows = await self._grouped(f'"{by}"', since, until, filters)
            groups = [as_totals(GroupTotals, row) for row in rows]
            groups.sort(key=lambda g: (-g.cost_usd, -g.total_tokens, g.key))
        return groups[:top] if top is not None else groups

    async def sessions(
        self, since: float, until: float | None = None, **filters: str
    ) -> list[SessionTotals]:
        """Totals per run of an agent (run ids are unique across hosts), oldest first."""
        where, params = filter_sql(filters)
        sql = (
            f"SELECT {_SUMS}, agent, run_id, MIN(ts), MAX(ts) FROM fleet_events "
            f"WHERE ts >= %s AND ts < %s{where} GROUP BY agent, run_id"
        )
        found = []
        for row in await self._rows(sql, [since, _upper(until), *params]):
            *sums, agent, run_id, first, last = row
            totals = as_totals(SessionTotals, (*sums, f"{agent} {run_id}".strip()))
            totals.agent, totals.run_id = agent, run_id
            totals.first_ts, totals.last_ts = first, last
            found.append(totals)
        return sorted(found, key=lambda s: (s.first_ts, s.key))

    async def _periods(
        self,
        by: str,
        since: float,
        until: float | None,
        tz: datetime.tzinfo | None,
        filters: Mapping[str, str],
    ) -> list[GroupTotals]:
        """One group per local period, cut exactly as the local report cuts them."""
        zone = tz or datetime.datetime.now().astimezone().tzinfo or datetime.UTC
        windows = period_windows(since, _upper(until), by, zone, self._clock())
        if not windows:
            return []
        where, params = filter_sql(filters)
        labels, lows, highs = (list(column) for column in zip(*windows, strict=True))
        sql = (
            f"SELECT {_SUMS}, w.label FROM fleet_events e JOIN unnest(%s::text[], "
            "%s::double precision[], %s::double precision[]) AS w(label, lo, hi) "
            f"ON e.ts >= w.lo AND e.ts < w.hi WHERE true{where} GROUP BY w.label"
        )
        rows = await self._rows(sql, [labels, lows, highs, *params])
        return [as_totals(GroupTotals, row) for row in rows]

    async def _grouped(
        self, key: str | None, since: float, until: float | None, filters: Mapping[str, str]
    ) -> list[Row]:
        """Rows of sums per `key` (a quoted column), or the one total row (key None)."""
        where, params = filter_sql(filters)
        group = f" GROUP BY {key}" if key else ""
        column = key or "''"
        sql = f"SELECT {_SUMS}, {column} FROM fleet_events WHERE ts >= %s AND ts < %s{where}{group}"
        return await self._rows(sql, [since, _upper(until), *params])

    async def _rows(self, sql: str, params: Sequence[Any]) -> list[Row]:
        cur = await self._conn.execute(sql, params)
        return list(await cur.fetchall())


def _upper(until: float | None) -> float:
    return math.inf if until is None else until


async def team_report(
    settings: FleetSettings,
    *,
    by: str,
    since: float,
    until: float | None,
    top: int | None,
    tz: datetime.tzinfo,
    filters: Mapping[str, str],
) -> Report:
    """The report over the team's ledger; FleetUnreachable (one line, no password) when the
    server cannot be reached, refuses us, or holds no team ledger yet."""
    import psycopg

    from tokenwatch.ledger.report import build_report

    async with await connect(settings) as conn:
        try:
            # the server ends a query waiting longer (on a lock too) cleanly; the client's own
            # deadline, a little later, is for a server that stopped answering at all
            timeout = f"{math.ceil(settings.report_timeout * 1000)}ms"
            await conn.execute("SELECT set_config('statement_timeout', %s, false)", (timeout,))
            with anyio.fail_after(settings.report_timeout + settings.connect_timeout):
                return await build_report(
                    TeamLedger(conn), by=by, since=since, until=until, top=top, tz=tz, **filters
                )
        except (TimeoutError, psycopg.errors.QueryCanceled):
            raise FleetUnreachable(
                f"the fleet database {where(settings)} did not answer in "
                f"{settings.report_timeout:g} s ([fleet] report_timeout)"
            ) from None
        except psycopg.errors.UndefinedTable:
            raise FleetUnreachable(
                f"the fleet database {where(settings)} has no team ledger yet (no supervisor "
                "with [fleet] has connected to it)"
            ) from None
        except psycopg.Error as exc:
            raise FleetUnreachable(
                f"cannot read the fleet database {where(settings)}: {describe(exc)}"
            ) from None

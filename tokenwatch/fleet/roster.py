"""Who is spending where: the other hosts of the team, each with its agents' spend and calls
today, when each was last seen, and when the host last shipped, read from the team's ledger."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import anyio

from tokenwatch.config import FleetSettings
from tokenwatch.core.periods import period_start
from tokenwatch.fleet.connection import FleetUnreachable, connect, describe, where

RECENT: Final = 7 * 86400.0
"""Seconds back an agent's last call may be and the agent still listed (a week)."""

QUERY: Final = """
SELECT host, agent,
       coalesce(sum(cost_usd) FILTER (WHERE ts >= %(day)s), 0),
       count(*) FILTER (WHERE ts >= %(day)s AND (cost_usd IS NULL OR estimated)),
       count(*) FILTER (WHERE ts >= %(day)s),
       max(ts),
       extract(epoch FROM max(shipped_at))
FROM fleet_events
WHERE ts >= %(since)s AND host <> %(me)s
GROUP BY host, agent
ORDER BY host, 3 DESC, agent
"""
"""One pass over the last week's rows (fleet_events_ts index) per read."""


@dataclass(frozen=True, slots=True)
class RemoteAgent:
    """One agent of another host, as that host's shipped ledger tells it."""

    agent: str
    spend_today_usd: float
    """Dollars of its calls since the start of today (the reader's day, as budgets count it)."""
    estimated_today: int
    """Today's calls priced by estimate (models no price table knows), or not at all: the
    spend above is then partial."""
    calls_today: int
    last_seen: float
    """Unix time of its latest call the team's table holds."""


@dataclass(frozen=True, slots=True)
class RemoteHost:
    host: str
    last_shipment: float
    """Unix time the server stored this host's latest batch (of the rows read)."""
    agents: list[RemoteAgent] = field(default_factory=list)

    @property
    def spend_today_usd(self) -> float:
        return sum(a.spend_today_usd for a in self.agents)


@dataclass(frozen=True, slots=True)
class Roster:
    """The other hosts, busiest first, as read at `read_at`; `host` is this supervisor's."""

    host: str
    read_at: float
    day_start: float
    hosts: list[RemoteHost] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def read_roster(settings: FleetSettings, *, tz: dt.tzinfo, now: float) -> Roster:
    """The team's other hosts now; raises FleetUnreachable (no password in it) when the server
    cannot be reached or does not answer within connect_timeout."""
    import psycopg

    day = period_start(now, "day", tz)
    params = {"day": day, "since": now - RECENT, "me": settings.host}
    conn = await connect(settings)
    try:
        with anyio.fail_after(settings.connect_timeout):
            cur = await conn.execute(QUERY, params)
            rows = await cur.fetchall()
    except TimeoutError:
        raise FleetUnreachable(
            f"the fleet database {where(settings)} did not answer in {settings.connect_timeout:g} s"
        ) from None
    except psycopg.errors.UndefinedTable:
        rows = []  # no supervisor has prepared the team's tables yet: nobody has shipped
    except psycopg.Error as exc:
        raise FleetUnreachable(f"cannot read the team's ledger: {describe(exc)}") from None
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(1):
            await conn.close()
    return Roster(settings.host, now, day, _hosts(rows))


def _hosts(rows: list[tuple[Any, ...]]) -> list[RemoteHost]:
    """Rows (host, agent, ...) grouped by host, the host that spent most today first."""
    agents: dict[str, list[RemoteAgent]] = {}
    shipped: dict[str, float] = {}
    for host, agent, usd, estimated, calls, seen, last_shipment in rows:
        agents.setdefault(host, []).append(
            RemoteAgent(str(agent), float(usd), int(estimated), int(calls), float(seen))
        )
        shipped[host] = max(shipped.get(host, 0.0), float(last_shipment or 0))
    hosts = [RemoteHost(str(h), shipped[h], listed) for h, listed in agents.items()]
    return sorted(hosts, key=lambda h: (-h.spend_today_usd, h.host))

"""`tokenwatch status --fleet`: the team's other hosts and their agents, read from the team's
database (fleet/roster.py) by this process, with or without a supervisor running."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from tokenwatch.cli.errors import CliError


def run_fleet_status(args: argparse.Namespace) -> int:
    import anyio

    from tokenwatch.core.periods import zone
    from tokenwatch.fleet.connection import FleetUnreachable
    from tokenwatch.fleet.roster import read_roster
    from tokenwatch.supervisor.policy import load_config

    config = load_config()
    fleet = config.fleet
    if fleet is None:
        raise CliError(
            f"no [fleet] in {config.source or 'the config'}: this machine is not part of a team "
            "(docs/fleet.md sets one up)"
        )
    tz = zone(config.supervisor.timezone)
    try:
        roster = anyio.run(lambda: read_roster(fleet, tz=tz, now=time.time()))
    except FleetUnreachable as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(roster.to_dict(), indent=2, sort_keys=True))
    else:
        print(render_hosts(roster.to_dict()))
    return 0


def render_hosts(roster: dict[str, Any]) -> str:
    """A table per host, busiest first: the `fleet_hosts` reply (docs/protocol.md) as text."""
    from tokenwatch.core.quantities import PARTIAL_MARK, format_usd
    from tokenwatch.tui.figures import age

    now = float(roster["read_at"])
    if not roster["hosts"]:
        return f"no other host than {roster['host']} has shipped calls in the last 7 days"
    blocks = []
    for host in roster["hosts"]:
        agents = host["agents"]
        spent = sum(a["spend_today_usd"] for a in agents)
        partial = any(a["estimated_today"] for a in agents)
        rows = [("AGENT", "SPEND TODAY", "CALLS TODAY", "LAST CALL")]
        rows += [
            (a["agent"] or "-", format_usd(a["spend_today_usd"], a["estimated_today"] > 0),
             str(a["calls_today"]), age(now - a["last_seen"]) + " ago")
            for a in agents
        ]  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            f"host {host['host']} · {format_usd(spent, partial)} today · last shipment "
            f"{age(now - host['last_shipment'])} ago"
        ]
        lines += [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        blocks.append("\n".join(lines))
    if any(a["estimated_today"] for h in roster["hosts"] for a in h["agents"]):
        blocks.append(f"{PARTIAL_MARK} some of today's calls are priced by estimate, or not at all")
    return "\n\n".join(blocks)

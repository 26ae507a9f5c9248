"""`tokenwatch report --savings`: what each lever saved, per agent, from the ledger."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from tokenwatch.core.quantities import format_usd


def savings_sql(since: float, until: float) -> tuple[str, tuple[float, ...]]:
    """Per agent and lever: calls, tokens and dollars saved, and all the agent's calls."""
    sql = (
        "WITH window AS (SELECT agent, lever, saved_tokens, saved_usd FROM events "
        "WHERE ts >= ? AND ts < ?), "
        "calls AS (SELECT agent, COUNT(*) AS n FROM window GROUP BY agent) "
        "SELECT w.agent, w.lever, COUNT(*), SUM(w.saved_tokens), TOTAL(w.saved_usd), c.n "
        "FROM window w JOIN calls c ON c.agent = w.agent WHERE w.lever != '' "
        "GROUP BY w.agent, w.lever ORDER BY TOTAL(w.saved_usd) DESC, w.agent, w.lever"
    )
    return sql, (since, until)


@dataclass(frozen=True, slots=True)
class SavingsRow:
    """One lever's effect on one agent's calls in the window."""

    lever: str
    agent: str
    calls: int
    """Calls the lever touched (for the cache: answered locally)."""
    saved_tokens: int
    saved_usd: float
    agent_calls: int
    """Every call of the agent in the window, so the share (the cache hit rate) can be read."""

    @property
    def share(self) -> float:
        return self.calls / self.agent_calls if self.agent_calls else 0.0


def savings_rows(rows: list[tuple[Any, ...]]) -> list[SavingsRow]:
    return [
        SavingsRow(str(lever), str(agent), int(n), int(tokens or 0), float(usd or 0.0), int(total))
        for agent, lever, n, tokens, usd, total in rows
    ]


def render_savings(rows: list[SavingsRow], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{**asdict(r), "share": r.share} for r in rows], indent=2) + "\n"
    header = ["LEVER", "AGENT", "CALLS", "SHARE", "TOKENS SAVED", "SAVED"]
    body = [
        [
            r.lever,
            r.agent,
            f"{r.calls:,}",
            f"{r.share:.0%}",
            f"{r.saved_tokens:,}",
            format_usd(r.saved_usd),
        ]
        for r in rows
    ]
    total = [
        "TOTAL",
        "",
        f"{sum(r.calls for r in rows):,}",
        "",
        f"{sum(r.saved_tokens for r in rows):,}",
        format_usd(sum(r.saved_usd for r in rows)),
    ]
    table = [header, *body, total]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        left = [c.ljust(w) for c, w in zip(cells[:2], widths[:2], strict=True)]
        right = [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
        return "  ".join(left + right).rstrip()

    lines = [
        line(header),
        *(line(r) for r in body),
        "  ".join("-" * w for w in widths),
        line(total),
    ]
    if not rows:
        lines.insert(1, "(no lever saved anything in this window: see docs/optimize.md)")
    lines.append("SHARE: the agent's calls the lever touched (for cache: the hit rate)")
    return "\n".join(lines) + "\n"

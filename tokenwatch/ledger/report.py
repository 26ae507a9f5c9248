"""Usage reports from the ledger: grouped rows plus a total, rendered as a table, JSON or CSV."""

from __future__ import annotations

import csv
import datetime
import io
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tokenwatch.core.quantities import PARTIAL_MARK, format_usd

if TYPE_CHECKING:
    from tokenwatch.ledger.store import GroupTotals, SessionTotals, Totals

FORMATS = ("table", "json", "csv")

# JSON/CSV columns after the group key: the usage event's own field names, then derived figures.
COLUMNS: tuple[str, ...] = (
    "requests",
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost_usd",
    "unpriced_requests",
    "estimated_usd",
    "avg_tokens_per_call",
    "output_input_ratio",
    "tasks",
    "cost_per_task",
    "errors",
    "denied",
    "estimated_requests",
)

# Table columns: (header, value for a Totals); money and ratios keep their markers.
_TABLE: tuple[tuple[str, str], ...] = (
    ("REQ", "requests"),
    ("INPUT", "input_tokens"),
    ("CACHED", "cache_read_tokens"),
    ("WRITE", "cache_write_tokens"),
    ("OUTPUT", "output_tokens"),
    ("REASON", "reasoning_tokens"),
    ("COST", "cost_usd"),
    ("TOK/CALL", "avg_tokens_per_call"),
    ("OUT/IN", "output_input_ratio"),
    ("$/TASK", "cost_per_task"),
    ("ERR", "errors"),
)
UNPRICED_MARK = PARTIAL_MARK
"""After a cost holding calls to models no price table knows (estimated, or with no cost)."""
ESTIMATED_TOKENS_MARK = "~"
"""After token counts holding calls whose tokens were counted locally (no usage reported)."""
_TOKEN_CELLS = frozenset({"input_tokens", "output_tokens"})


@dataclass(slots=True)
class Report:
    """Rows of one `by` grouping over [since, until), with their total."""

    by: str
    since: float
    until: float | None
    rows: list[GroupTotals]
    total: Totals
    unpriced_models: list[str] = field(default_factory=list)
    """Models seen in the window that the price table does not know."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "since": _iso(self.since),
            "until": _iso(self.until) if self.until is not None else None,
            "groups": [
                {self.by: row.key, **_session_fields(row), **_figures(row)} for row in self.rows
            ],
            "total": _figures(self.total),
            "unpriced_models": self.unpriced_models,
        }


class ReportSource(Protocol):
    """What a report reads: the local Store, or the team's ledger (fleet/history.py)."""

    async def totals(self, since: float, until: float | None = None, **filters: str) -> Totals: ...

    async def aggregate(
        self,
        by: str,
        since: float,
        until: float | None = None,
        *,
        top: int | None = None,
        tz: datetime.tzinfo | None = None,
        **filters: str,
    ) -> list[GroupTotals]: ...

    async def sessions(
        self, since: float, until: float | None = None, **filters: str
    ) -> list[SessionTotals]: ...


async def build_report(
    store: ReportSource,
    *,
    by: str,
    since: float,
    until: float | None = None,
    top: int | None = None,
    tz: datetime.tzinfo | None = None,
    **filters: str,
) -> Report:
    """Group rows (largest cost first, or by date; sessions by start), the window's total, and
    unpriced models."""
    rows: list[GroupTotals]
    if by == "session":
        rows = _labelled(await store.sessions(since, until, **filters), top, tz)
    else:
        # mypy cannot tell that no filter is named `top` or `tz` (the store refuses such filters).
        rows = await store.aggregate(by, since, until, top=top, tz=tz, **filters)  # type: ignore[arg-type]
    total = await store.totals(since, until, **filters)
    unpriced: list[str] = []
    if total.unpriced_requests:
        models = await store.aggregate("model", since, until, **filters)  # type: ignore[arg-type]
        unpriced = sorted(m.key or "(no model)" for m in models if m.unpriced_requests)
    return Report(by, since, until, rows, total, unpriced)


def _labelled(
    sessions: list[SessionTotals], top: int | None, tz: datetime.tzinfo | None
) -> list[GroupTotals]:
    """Sessions oldest first (the `top` costliest of them), each named for a person:
    `researcher 3f2a9c1e 2026-12-05 09:12-09:40`."""
    if top is not None:
        costliest = sorted(sessions, key=lambda s: (-s.cost_usd, -s.total_tokens))[:top]
        sessions = [s for s in sessions if s in costliest]
    for s in sessions:
        first = datetime.datetime.fromtimestamp(s.first_ts, tz)
        last = datetime.datetime.fromtimestamp(s.last_ts, tz)
        until = f"{last:%H:%M}" if last.date() == first.date() else f"{last:%Y-%m-%d %H:%M}"
        s.key = (
            f"{s.agent or '(no agent)'} {s.run_id[:8] or '(no run)'} {first:%Y-%m-%d %H:%M}-{until}"
        )
    return list(sessions)


def _session_fields(row: GroupTotals) -> dict[str, Any]:
    from tokenwatch.ledger.store import SessionTotals

    if not isinstance(row, SessionTotals):
        return {}
    return {
        "agent": row.agent,
        "run_id": row.run_id,
        "started": _iso(row.first_ts),
        "last_activity": _iso(row.last_ts),
    }


def _figures(totals: Totals) -> dict[str, Any]:
    data = totals.to_dict()
    if _all_unpriced(totals):
        data["cost_usd"] = data["cost_per_task"] = None  # unknown, not zero
    return {name: data[name] for name in COLUMNS}


def _all_unpriced(totals: Totals) -> bool:
    """Every call is to a model no table priced, and none has even an estimate (stored before
    tokenwatch had a fallback): the cost is unknown, not zero."""
    return (
        totals.requests > 0
        and totals.unpriced_requests == totals.requests
        and totals.estimated_usd == 0
    )


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat()


def render(report: Report, fmt: str) -> str:
    if fmt == "json":
        return render_json(report)
    if fmt == "csv":
        return render_csv(report)
    return render_table(report)


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2) + "\n"


def render_csv(report: Report) -> str:
    """One row per group, no total row (spreadsheets sum); empty cells for undefined ratios."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([report.by, *COLUMNS])
    for row in report.rows:
        figures = _figures(row)
        writer.writerow([row.key, *("" if figures[c] is None else figures[c] for c in COLUMNS)])
    return out.getvalue()


def render_table(report: Report) -> str:
    """Aligned columns, a TOTAL row, and a footnote when some calls could not be priced."""
    header = [report.by.upper(), *(h for h, _ in _TABLE)]
    body = [[row.key or "(none)", *_cells(row)] for row in report.rows]
    total = ["TOTAL", *_cells(report.total)]
    widths = [max(len(r[i]) for r in [header, *body, total]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [line(header), *(line(r) for r in body), rule, line(total)]
    if not report.rows:
        lines.insert(1, "(no usage in this window)")
    lines += _footnotes(report)
    return "\n".join(lines) + "\n"


def _footnotes(report: Report) -> list[str]:
    t = report.total
    notes = []
    if t.unpriced_requests:
        models = ", ".join(report.unpriced_models)
        count = f"{t.unpriced_requests:,} call{'s' if t.unpriced_requests != 1 else ''}"
        if t.estimated_usd > 0:
            how = (
                f"COST includes {format_usd(t.estimated_usd)} at an estimated price "
                "(`tokenwatch prices MODEL` shows from what)"
            )
        else:
            how = "not in COST"
        notes.append(
            f"{UNPRICED_MARK} {count} unpriced (unknown model: {models}): {how}. "
            'Price them with [prices."MODEL"] in tokenwatch.toml.'
        )
    if t.estimated_requests:
        count = f"{t.estimated_requests:,} call{'s' if t.estimated_requests != 1 else ''}"
        notes.append(
            f"{ESTIMATED_TOKENS_MARK} {count} with tokens counted locally (the provider "
            "reported no usage): an estimate"
        )
    return notes


def _cells(t: Totals) -> list[str]:
    cells: list[str] = []
    for _, name in _TABLE:
        value = getattr(t, name)
        if name == "cost_usd":
            shown = format_usd(None if _all_unpriced(t) else value)
            cells.append(shown + (UNPRICED_MARK if t.unpriced_requests else ""))
        elif name == "cost_per_task":
            cells.append("-" if value is None or _all_unpriced(t) else format_usd(value))
        elif name == "output_input_ratio":
            cells.append("-" if value is None else f"{value:.2f}")
        elif name == "avg_tokens_per_call":
            cells.append(f"{value:,.0f}")
        elif name in _TOKEN_CELLS and t.estimated_requests:
            cells.append(f"{value:,}{ESTIMATED_TOKENS_MARK}")
        else:
            cells.append(f"{value:,}")
    return cells

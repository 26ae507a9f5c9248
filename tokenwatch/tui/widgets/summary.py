"""The main screen's top bar: burn rates, today's spend against the daily budget, agent counts."""

from __future__ import annotations

from collections import Counter

from rich.text import Text
from textual.widgets import Static

from tokenwatch.core.models import AgentState, BudgetStatus, Snapshot
from tokenwatch.tui.figures import clock_time, format_tokens, format_usd, gauge, sparkline

COUNTED = (
    (AgentState.RUNNING, "green"),
    (AgentState.PAUSED, "yellow"),
    (AgentState.THROTTLED, "magenta"),
)


class SummaryBar(Static):
    """Two lines: what is being spent now and by how many agents; today against the budget."""

    DEFAULT_CSS = """
    SummaryBar { height: 2; padding: 0 1; background: $boost; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def __init__(self, address: str = "", **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.address = address
        self.connection = "connecting…"

    def show(self, snap: Snapshot) -> None:
        self.connection = ""
        self.update(self._render_snapshot(snap))

    def show_disconnected(self, why: str) -> None:
        self.connection = why
        self.update(Text(f"supervisor: {why}", style="bold red"))

    def _render_snapshot(self, snap: Snapshot) -> Text:
        text = Text()
        text.append(format_tokens(snap.tokens_per_min), style="bold")
        text.append(" tok/min (1m)  ")
        text.append(format_usd(snap.usd_per_hour), style="bold")
        text.append("/h (10m)  ")
        text.append(sparkline(snap.burn, width=16 if self.size.width >= 120 else 8), style="cyan")
        counts = Counter(v.agent.state for v in snap.agents)
        for state, style in COUNTED:  # a zero is said for running only
            if counts.get(state.value) or state is AgentState.RUNNING:
                text.append(f"  {counts.get(state.value, 0)} {state.value}", style=style)
        text.append("\n")
        text.append("today ")
        partial = snap.unpriced_today > 0
        text.append(format_usd(snap.spend_today_usd, partial), style="bold")
        if snap.daily_budget_usd:
            text.append(f" of {format_usd(snap.daily_budget_usd)} ")
            fraction = snap.spend_today_usd / snap.daily_budget_usd
            text.append_text(gauge(fraction, width=10, partial=partial))
        text.append_text(_runs_out(snap.budgets, snap.ts))
        # before the address: on a narrow terminal the line's end is cut
        for note in dict.fromkeys(b.fleet_note for b in snap.budgets if b.fleet_note):
            text.append(f" · {note}", style="bold red")
        address = snap.supervisor or self.address
        if address:
            text.append(f" · supervisor {address}", style="dim")
        return text


def _runs_out(budgets: list[BudgetStatus], now: float) -> Text:
    """` · runs out 14:32` for the budget forecast to run out first (named unless it is the
    global daily one the gauge shows), or ` · agent:coder:day reached`; empty when none will."""
    soon = [b for b in budgets if b.forecast_exhausted_at is not None]
    if not soon:
        return Text()
    first = min(soon, key=lambda b: (b.used < b.limit, b.forecast_exhausted_at or 0.0))
    shown = first.scope == "global" and first.period == "day" and first.unit == "usd"
    name = "" if shown else f"{first.name} "
    if first.used >= first.limit:
        return Text(f" · {name}reached", style="bold red")
    when = clock_time(first.forecast_exhausted_at or now, now)
    return Text(f" · {name}runs out {when}", style="bold yellow")

"""The main screen's top bar: burn rates, today's spend against the daily budget, agent counts."""

from __future__ import annotations

from collections import Counter

from rich.text import Text
from textual.widgets import Static

from tokenwatch.core.models import AgentState, Snapshot
from tokenwatch.tui.figures import format_tokens, format_usd, gauge, sparkline


class SummaryBar(Static):
    """Two lines: what is being spent now, and who is spending it."""

    DEFAULT_CSS = """
    SummaryBar { height: 2; padding: 0 1; background: $boost; text-wrap: nowrap; text-overflow: clip; }
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
        text.append(" tok/min  ")
        text.append(format_usd(snap.usd_per_hour), style="bold")
        text.append("/h  today ")
        partial = snap.unpriced_today > 0
        text.append(format_usd(snap.spend_today_usd, partial), style="bold")
        if snap.daily_budget_usd:
            text.append(f" of {format_usd(snap.daily_budget_usd)} ")
            fraction = snap.spend_today_usd / snap.daily_budget_usd
            text.append_text(gauge(fraction, width=10, partial=partial))
        text.append("  ")
        text.append(sparkline(snap.burn, width=16), style="cyan")
        text.append("\n")
        counts = Counter(v.agent.state for v in snap.agents)
        for state, style in (
            (AgentState.RUNNING, "green"),
            (AgentState.PAUSED, "yellow"),
            (AgentState.THROTTLED, "magenta"),
        ):
            text.append(f"{counts.get(state.value, 0)} {state.value}", style=style)
            text.append("  ")
        address = snap.supervisor or self.address
        if address:
            text.append(f"supervisor {address}", style="dim")
        return text

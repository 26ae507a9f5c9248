"""The report screen: usage over the last hour, day or week, grouped like `tokenwatch report`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from tokenwatch.tui.figures import format_tokens, format_usd
from tokenwatch.tui.messages import CommandDone

if TYPE_CHECKING:
    from tokenwatch.tui.app import TokenwatchApp

WINDOWS: dict[str, float] = {"1h": 3600.0, "24h": 86400.0, "7d": 7 * 86400.0}
GROUPS = ("agent", "model", "task", "user", "provider", "day")
_GROUP_KEYS = ("key", "group", "name")

# (label, field, is_money)
FIGURES: tuple[tuple[str, str, bool], ...] = (
    ("requests", "requests", False),
    ("input", "input_tokens", False),
    ("cached", "cache_read_tokens", False),
    ("write", "cache_write_tokens", False),
    ("output", "output_tokens", False),
    ("reasoning", "reasoning_tokens", False),
    ("cost", "cost_usd", True),
    ("tasks", "tasks", False),
)


def group_name(row: dict[str, Any], by: str) -> str:
    """A report row's group: the supervisor keys it by the grouping (`{"agent": "coder", ...}`)."""
    for key in (by, *_GROUP_KEYS):
        if row.get(key) not in (None, ""):
            return str(row[key])
    return "(none)"


def figure(row: dict[str, Any], field: str, money: bool) -> str:
    value = row.get(field)
    if value is None:
        return "unpriced" if money else "-"
    if money:  # marked when some of it is priced by estimate (models no table knows)
        return format_usd(float(value), bool(row.get("unpriced_requests")))
    return format_tokens(float(value))


class ReportScreen(Screen[None]):
    BINDINGS = [
        Binding("escape,backspace", "app.pop_screen", "Back"),
        Binding("1", "window('1h')", "1 hour"),
        Binding("2", "window('24h')", "24 hours"),
        Binding("3", "window('7d')", "7 days"),
        Binding("g", "group", "Group by"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.window = "24h"
        self.group = "agent"

    @property
    def tw(self) -> TokenwatchApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Static(id="report-title")
        yield DataTable(id="report", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#report", DataTable)
        table.add_column(self.group, key="group")
        for label, field, _ in FIGURES:
            table.add_column(label, key=field)
        self._request()

    def action_window(self, window: str) -> None:
        self.window = window
        self._request()

    def action_group(self) -> None:
        self.group = GROUPS[(GROUPS.index(self.group) + 1) % len(GROUPS)]
        self._request()

    def _request(self) -> None:
        since = self.tw.clock() - WINDOWS[self.window]
        self.query_one("#report-title", Static).update(
            Text(f"last {self.window} by {self.group} · 1: 1h  2: 24h  3: 7d · g: group · loading…")
        )
        self.tw.send("report", reply_to=self, since=since, by=self.group)

    @on(CommandDone)
    def _arrived(self, message: CommandDone) -> None:
        if message.kind != "report":
            return
        message.stop()
        title = f"last {self.window} by {self.group} · 1: 1h  2: 24h  3: 7d · g: group"
        if not message.ok:
            self.query_one("#report-title", Static).update(Text(f"{title} · {message.error}"))
            return
        data = message.result
        rows = data if isinstance(data, list) else data.get("rows", [])
        total = None if isinstance(data, list) else data.get("total")
        self.query_one("#report-title", Static).update(Text(title))
        self.show_rows(rows, total)

    def show_rows(
        self, rows: Sequence[dict[str, Any]], total: dict[str, Any] | None = None
    ) -> None:
        """One row per group, largest first as the supervisor sent them, and the window's total."""
        table = self.query_one("#report", DataTable)
        table.clear(columns=True)
        table.add_column(self.group, key="group")
        for label, field, _ in FIGURES:
            table.add_column(label, key=field)
        for row in rows:
            table.add_row(group_name(row, self.group), *(figure(row, f, m) for _, f, m in FIGURES))
        if total is None:
            total = {f: sum(float(r.get(f) or 0) for r in rows) for _, f, _ in FIGURES}
        if rows:
            table.add_row("total", *(figure(total, f, m) for _, f, m in FIGURES), key="total")

"""Top spenders: cost by agent, model, task, user or provider, with each one's share of the total."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from tokenwatch.tui.figures import format_usd

GROUPINGS = ("agent", "model", "task", "user", "provider")


class TopSpenders(Static):
    DEFAULT_CSS = """
    TopSpenders { border: round $primary-darken-2; border-title-color: $text; padding: 0 1; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.grouping = GROUPINGS[0]
        self._top: dict[str, list[tuple[str, float]]] = {}
        self._partial: dict[str, list[str]] = {}
        self._shown: object = None
        self._shown_marked: set[str] = set()

    def on_mount(self) -> None:
        self._retitle()

    def cycle_grouping(self) -> str:
        self.grouping = GROUPINGS[(GROUPINGS.index(self.grouping) + 1) % len(GROUPINGS)]
        self._retitle()
        self._redraw()
        return self.grouping

    def show(
        self, top: dict[str, list[tuple[str, float]]], partial: dict[str, list[str]] | None = None
    ) -> None:
        """Show the top spenders; names in `partial` hold estimated prices and are marked."""
        self._top = top
        self._partial = partial or {}
        self._redraw()

    def _retitle(self) -> None:
        self.border_title = f"top spenders by {self.grouping} (g)"

    def _redraw(self) -> None:
        rows = self._top.get(self.grouping, [])
        marked = set(self._partial.get(self.grouping, []))
        if (rows, marked) == (self._shown, self._shown_marked):
            return  # nothing changed: no repaint
        self._shown, self._shown_marked = list(rows), marked
        self.update(_table(rows, marked))


def _table(rows: list[tuple[str, float]], partial: set[str]) -> Table | Text:
    if not rows:
        return Text("no spending yet", style="dim")
    total = sum(cost for _, cost in rows) or 1.0
    table = Table.grid(padding=(0, 1), expand=True)
    table.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
    table.add_column(justify="right", no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    for name, cost in rows[:12]:
        shown = format_usd(cost, (name or "-") in partial)
        table.add_row(name or "(none)", shown, f"{cost / total * 100:3.0f}%")
    return table

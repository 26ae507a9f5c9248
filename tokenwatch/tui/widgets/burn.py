"""The burn-rate chart: total tokens per interval over the recent past."""

from __future__ import annotations

from collections.abc import Sequence

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Sparkline

from tokenwatch.tui.figures import format_tokens


class BurnChart(Vertical):
    DEFAULT_CSS = """
    BurnChart { height: 5; border: round $primary-darken-2; padding: 0 1; }
    BurnChart > Sparkline { height: 1fr; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.border_title = "burn rate"
        self._data: list[float] = []
        self._chart = Sparkline([], summary_function=max)

    def compose(self) -> ComposeResult:
        yield self._chart

    def show(self, burn: Sequence[float]) -> None:
        data = list(burn)
        if data == self._data:
            return
        self._data = data
        self._chart.data = data
        peak = max(data) if data else 0.0
        self.border_title = f"burn rate (peak {format_tokens(peak)} tokens/interval)"

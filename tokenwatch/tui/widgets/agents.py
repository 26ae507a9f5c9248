"""The agents table: the top agents in row slots, updated cell by cell, sorted and filtered."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.coordinate import Coordinate
from textual.widgets import DataTable

from tokenwatch.core.models import AgentView
from tokenwatch.tui.figures import (
    fit_end,
    fit_middle,
    format_tokens,
    format_usd,
    gauge,
    sparkline,
    state_label,
)

Cell = str | Text
SegmentLines = list[list[Segment]]


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    label: str
    width: int
    cell: Callable[[AgentView], Cell]
    order: Callable[[AgentView], Any]
    """Sort key; larger-is-more-interesting columns sort descending first."""
    wide_only: bool = False
    descending: bool = True
    stretch: bool = False
    """Takes the width the other columns leave, when it is the last one shown."""
    fit: int = 0
    """If set, the widest it grows to fit its cells (from `width` up); 0: always `width`. Figures
    grow but never yield: `$0.000098` cut to `$0.0000…` would say nothing."""
    least: int = 0
    """The narrowest it yields to when the others need the room (0: it does not yield)."""


def _state(v: AgentView) -> Text:
    label = state_label(v.agent.state, v.agent.exit_code, v.agent.throttle)
    if v.agent.critical:
        label.append(" ★", style="bold")
    if v.agent.route_model:  # its calls are served by another model (`m`, `tokenwatch route`)
        label.append(f" →{v.agent.route_model}", style="magenta")
    return label


def _budget(v: AgentView) -> Text:
    return gauge(v.budget_fraction, width=6, partial=v.unpriced_requests > 0)


def _alert(v: AgentView) -> Text:
    return Text(v.last_alert, style="yellow")


# key, label, width, cell, sort key: the essential columns first, the wide-only ones marked
COLUMNS: tuple[Column, ...] = (
    Column("name", "agent", 10, lambda v: v.agent.name, lambda v: v.agent.name, descending=False, fit=32, least=10),
    Column("state", "state", 9, _state, lambda v: v.agent.state, descending=False, fit=20, least=9),
    Column("pid", "pid", 7, lambda v: str(v.agent.pid or "-"), lambda v: v.agent.pid or 0, True),
    Column("models", "model", 14, lambda v: ",".join(v.models) or "-", lambda v: v.models, True, fit=24, least=10),
    Column("rpm", "req/m", 5, lambda v: f"{v.requests_per_min:.0f}", lambda v: v.requests_per_min, True, fit=8),
    Column("tpm", "tok/m", 6, lambda v: format_tokens(v.tokens_per_min), lambda v: v.tokens_per_min, fit=8),
    Column("uph", "$/h", 8, lambda v: format_usd(v.usd_per_hour), lambda v: v.usd_per_hour, fit=12),
    Column("tokens", "tokens", 6, lambda v: format_tokens(v.period_tokens), lambda v: v.period_tokens, True, fit=8),
    Column("cost", "cost", 8, lambda v: format_usd(v.period_cost_usd, v.unpriced_requests > 0), lambda v: v.period_cost_usd, fit=12),
    Column("budget", "budget", 11, _budget, lambda v: v.budget_fraction or 0.0),
    Column("burn", "burn", 8, lambda v: sparkline(v.burn), lambda v: sum(v.burn[-8:]), True),
    Column("alert", "last alert", 18, _alert, lambda v: v.last_alert, True, stretch=True, least=10),
)  # fmt: skip
YIELD_ORDER = ("alert", "models", "name", "state")
"""Who gives up room first when the columns do not fit: the alert, the models, the name (cut in the
middle, so `literatu…er-alpha` and `literatu…der-beta` stay apart), then the state."""
LEGEND = "tok/m: last 1 min · $/h: last 10 min · cost: today · budget: its own"
"""The windows the figures are measured over, shown under the table."""
ORDER_HOLD = 3.0
"""Seconds the row order stays put after the user moves the cursor (as htop and k9s do), so
a key acts on the agent that was under the cursor and rows do not jump while one reads."""
COLUMN_KEYS = tuple(c.key for c in COLUMNS)
WIDE_MIN_WIDTH = 150
"""Terminal width from which every column fits; narrower terminals show the essential ones."""
CELL_CACHE_SIZE = 20_000
"""Rendered cells kept (a few screens' worth); cleared when exceeded."""


def matches(view: AgentView, needle: str) -> bool:
    """Case-insensitive substring filter over name, state, models, task and tags."""
    if not needle:
        return True
    a = view.agent
    haystack = " ".join(
        [a.name, a.state, a.task, a.user, a.route_model, *view.models]
        + [f"{k}={v}" for k, v in a.tags.items()]
    )
    return needle.lower() in haystack.lower()


class AgentsTable(DataTable[Cell]):
    """Shows at most `max_rows` agents; only cells whose text changed are touched."""

    def __init__(
        self,
        *,
        max_rows: int = 200,
        clock: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        super().__init__(cursor_type="row", **kwargs)
        self.clock = clock
        self.max_rows = max_rows
        self.sort_key = "cost"
        self.sort_descending = True
        self.filter_text = ""
        self.wide = True
        self.cell_updates = 0
        """Cells rewritten so far: how much work the diffing saved is visible in the benchmark."""
        self._views: dict[str, AgentView] = {}
        self._slots: list[str] = []
        """Agent shown in each row slot, top to bottom (rows are keyed `slot-N`)."""
        self._plain: list[tuple[str, ...]] = []
        self._columns: tuple[Column, ...] = ()
        self._cell_lines: dict[tuple[object, ...], tuple[object, SegmentLines]] = {}
        self._widths: tuple[int, ...] = ()
        self._wanted: dict[str, int] = {}
        """Widest each column asked for since the layout was last chosen: columns grow at once
        but shrink only on a resize, sort or filter, so a figure that comes and goes does not
        lay the table out again every refresh."""
        self._held_until = float("-inf")
        self._syncing = False
        self.hidden_rows = 0
        """Agents that passed the filter but did not fit under `max_rows`."""

    def on_mount(self) -> None:
        self.set_wide(self.wide, force=True)

    def _render_cell(
        self,
        row_index: int,
        column_index: int,
        base_style: Style,
        width: int,
        cursor: bool = False,
        hover: bool = False,
    ) -> SegmentLines:
        """Reuse a cell's rendering while its value object is the same one.

        DataTable keys its cell cache on a table-wide update counter, so one changed cell makes
        every visible cell render again through Rich; here only the cells we rewrote do.
        """
        if row_index < 0 or column_index < 0:  # header and labels: DataTable's own cache
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        row_key = self._row_locations.get_key(row_index)
        column_key = self._column_locations.get_key(column_index)
        if row_key is None or column_key is None:
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        value = self._data[row_key][column_key]
        key = (
            row_index,
            column_index,
            base_style,
            width,
            cursor,
            hover,
            self._show_hover_cursor,
            self._pseudo_class_state,
        )
        hit = self._cell_lines.get(key)
        if hit is not None and hit[0] is value:
            return hit[1]
        lines = super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        if len(self._cell_lines) > CELL_CACHE_SIZE:
            self._cell_lines.clear()
        self._cell_lines[key] = (value, lines)
        return lines

    @property
    def selected_name(self) -> str | None:
        if 0 <= self.cursor_row < len(self._slots):
            return self._slots[self.cursor_row]
        return None

    def view_of(self, name: str) -> AgentView | None:
        return self._views.get(name)

    # ---- the order holds while the user moves ----------------------------------------------

    @property
    def order_held(self) -> bool:
        return self.clock() < self._held_until

    def release_order(self) -> None:
        """Sort again at once (a new sort or filter); columns may narrow to what is shown."""
        self._held_until = float("-inf")
        self._wanted = {}

    def watch_cursor_coordinate(self, old: Coordinate, new: Coordinate) -> None:
        super().watch_cursor_coordinate(old, new)
        if not self._syncing and old != new:  # the user moved (keys, mouse), not a refresh
            self._held_until = self.clock() + ORDER_HOLD

    # ---- columns -------------------------------------------------------------------------

    def set_wide(self, wide: bool, *, force: bool = False) -> None:
        """Switch between every column and the essential ones (terminal width changed)."""
        if wide == self.wide and not force:
            return
        self.wide = wide
        self._columns = tuple(c for c in COLUMNS if wide or not c.wide_only)
        self._widths, self._wanted = (), {}
        self._sync(self.selected_name)

    def on_resize(self) -> None:
        self._wanted = {}
        self._sync(self.selected_name)

    def _fit_widths(self, rows: list[list[Cell]]) -> tuple[int, ...]:
        """Each column's width: fitted to its cells, then the yielding ones narrowed (YIELD_ORDER)
        until all fit; a stretching last column takes what is left (a long alert reads whole).
        The vertical scrollbar's room is kept so many agents never push the table sideways."""
        cols = self._columns
        widths = [
            max(_wanted(col, [row[i] for row in rows]), self._wanted.get(col.key, 0))
            for i, col in enumerate(cols)
        ]
        self._wanted = {col.key: w for col, w in zip(cols, widths, strict=True)}
        room = self.size.width - self.styles.scrollbar_size_vertical
        over = sum(widths) + 2 * self.cell_padding * len(cols) - room
        for key in YIELD_ORDER:
            i = next((i for i, c in enumerate(cols) if c.key == key), None)
            if over <= 0 or i is None or not cols[i].least:
                continue
            give = max(0, min(over, widths[i] - cols[i].least))
            widths[i] -= give
            over -= give
        if cols[-1].stretch and over < 0:
            widths[-1] -= over
        return tuple(widths)

    def _lay_out(self, widths: tuple[int, ...]) -> None:
        self._widths = widths
        self.clear(columns=True)
        self._plain.clear()
        self._slots.clear()
        for col, width in zip(self._columns, widths, strict=True):
            self.add_column(col.label, key=col.key, width=width)

    # ---- rows ----------------------------------------------------------------------------

    def show(self, views: Iterable[AgentView]) -> None:
        self._views = {v.agent.name: v for v in views}
        self._sync(self.selected_name)

    def update_view(self, view: AgentView) -> None:
        """One agent changed (a pause took effect): refresh its row now, not at the next snapshot."""
        self._views[view.agent.name] = view
        self._sync(self.selected_name)

    def set_filter(self, text: str) -> None:
        self.filter_text = text
        self.release_order()
        self._sync(self.selected_name)

    def sort_by(self, key: str) -> None:
        """Sort by a column; choosing the same column again reverses the order."""
        column = next(c for c in COLUMNS if c.key == key)
        if key == self.sort_key:
            self.sort_descending = not self.sort_descending
        else:
            self.sort_key, self.sort_descending = key, column.descending
        self.release_order()
        self._sync(self.selected_name)

    def cycle_sort(self) -> str:
        keys = [c.key for c in self._columns]
        nxt = (
            keys[(keys.index(self.sort_key) + 1) % len(keys)] if self.sort_key in keys else keys[0]
        )
        self.sort_by(nxt)
        return nxt

    def _visible(self) -> list[AgentView]:
        column = next(c for c in COLUMNS if c.key == self.sort_key)
        chosen = [v for v in self._views.values() if matches(v, self.filter_text)]
        chosen.sort(key=lambda v: v.agent.name)
        chosen.sort(key=column.order, reverse=self.sort_descending)
        if self.order_held:  # rows stay where they are; newcomers go below, in sort order
            rank = {name: i for i, name in enumerate(self._slots)}
            chosen.sort(key=lambda v: rank.get(v.agent.name, len(rank)))
        self.hidden_rows = max(0, len(chosen) - self.max_rows)
        return chosen[: self.max_rows]

    def _sync(self, selected: str | None) -> None:
        """Write the chosen agents into row slots in order; only cells whose text changed are
        touched, so re-sorting or a new top-N never removes and re-adds rows."""
        if not self._columns:
            return
        self._syncing = True
        try:
            self._sync_rows(selected)
        finally:
            self._syncing = False

    def _sync_rows(self, selected: str | None) -> None:
        chosen = self._visible()
        rows = [[col.cell(v) for col in self._columns] for v in chosen]
        widths = self._fit_widths(rows)
        if widths != self._widths:
            self._lay_out(widths)
        while len(self._slots) < len(chosen):
            slot = len(self._slots)
            self.add_row(*([""] * len(self._columns)), key=f"slot-{slot}")
            self._slots.append("")
            self._plain.append(("",) * len(self._columns))
        while len(self._slots) > len(chosen):
            self.remove_row(f"slot-{len(self._slots) - 1}")
            self._slots.pop()
            self._plain.pop()
        for slot, (view, row) in enumerate(zip(chosen, rows, strict=True)):
            self._write_slot(slot, view.agent.name, row)
        if selected in self._slots and self._slots[self.cursor_row] != selected:
            self.move_cursor(row=self._slots.index(selected), animate=False)

    def _write_slot(self, slot: int, name: str, row: list[Cell]) -> None:
        self._slots[slot] = name
        cells = [
            _fitted(c, col, w) for c, col, w in zip(row, self._columns, self._widths, strict=True)
        ]
        plain = tuple(c.plain if isinstance(c, Text) else c for c in cells)
        old = self._plain[slot]
        if plain == old:
            return
        self._plain[slot] = plain
        key = f"slot-{slot}"
        for col, cell, before, after in zip(self._columns, cells, old, plain, strict=True):
            if before != after:
                self.update_cell(key, col.key, cell)
                self.cell_updates += 1

    def agent_names(self) -> list[str]:
        """The agents shown, top to bottom."""
        return list(self._slots)


def _wanted(col: Column, cells: list[Cell]) -> int:
    """The width a column asks for: its own, or (`fit`) its widest cell up to `fit`."""
    if not col.fit or not cells:
        return col.width
    widest = max(_cell_width(c) for c in cells)
    return max(col.width, min(col.fit, widest))


def _cell_width(cell: Cell) -> int:
    return cell.cell_len if isinstance(cell, Text) else cell_len(cell)


def _fitted(cell: Cell, col: Column, width: int) -> Cell:
    """The cell cut to its column with an ellipsis: names in the middle, the rest at the end."""
    if col.key == "name" and isinstance(cell, str):
        return fit_middle(cell, width)
    return fit_end(cell, width)

"""The main screen: summary bar, agents table, top spenders, alert feed and burn chart."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.events import Resize
from textual.screen import Screen
from textual.widgets import DataTable, Input

from tokenwatch.core.models import Action, AgentState, AgentView, Alert, Snapshot
from tokenwatch.tui.screens.dialogs import (
    BudgetScreen,
    ConfirmScreen,
    HelpScreen,
    LaunchScreen,
    ModelScreen,
    ThrottleScreen,
)
from tokenwatch.tui.widgets.agents import LEGEND, WIDE_MIN_WIDTH, AgentsTable
from tokenwatch.tui.widgets.alerts import AlertFeed
from tokenwatch.tui.widgets.burn import BurnChart
from tokenwatch.tui.widgets.footer import KeysFooter
from tokenwatch.tui.widgets.spenders import TopSpenders
from tokenwatch.tui.widgets.summary import SummaryBar

if TYPE_CHECKING:
    from tokenwatch.tui.app import TokenwatchApp

SHORT_MAX_HEIGHT = 30
"""Below this many lines the burn chart folds into the summary bar's sparkline."""


ESSENTIAL_KEYS = ("question_mark", "q", "p", "k", "P", "t", "R", "b", "slash")
"""The footer's keys in order of need: on a narrow terminal the rest are in `?` help."""


class MainScreen(Screen[None]):
    BINDINGS = [
        Binding("p", "pause", "Pause/resume"),
        Binding("k", "kill", "Kill"),
        Binding("t", "throttle", "Throttle"),
        Binding("m", "model", "Model switch", show=False),  # in `?` help; the footer is full
        Binding("b", "budget", "Budget"),
        Binding("P", "pause_all", "Pause all"),
        Binding("R", "resume_all", "Resume all"),
        Binding("a", "ack", "Ack alerts"),
        Binding("enter", "detail", "Detail"),
        Binding("g", "group", "Group"),
        Binding("s", "sort", "Sort", show=False),
        Binding("slash", "filter", "Filter"),
        Binding("r", "report", "Report"),
        Binding("h", "hosts", "Other hosts"),  # offered with [fleet] only (check_action)
        Binding("l", "launch", "Launch"),
        Binding("question_mark", "help", "Help"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self, *, address: str, max_rows: int, clock: Callable[[], float]) -> None:
        super().__init__()
        # Held directly, not queried: feed updates may arrive while the screen is being torn down.
        self.summary = SummaryBar(address)
        self.table = AgentsTable(max_rows=max_rows)
        self.spenders = TopSpenders()
        self.feed = AlertFeed(clock)
        self.burn = BurnChart()

    @property
    def tw(self) -> TokenwatchApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield self.summary
        yield self.table
        with Horizontal(id="lower"):
            yield self.spenders
            yield self.feed
        yield self.burn
        yield Input(
            placeholder="filter agents (name, state, model, task, tag); enter keeps, esc clears",
            id="filter",
        )
        yield KeysFooter(first=ESSENTIAL_KEYS)

    def on_mount(self) -> None:
        self.table.border_subtitle = LEGEND
        self.table.focus()

    def on_resize(self, event: Resize) -> None:
        self.table.set_wide(event.size.width >= WIDE_MIN_WIDTH)
        self.set_class(event.size.height < SHORT_MAX_HEIGHT, "-short")

    # ---- data in -------------------------------------------------------------------------

    def show_snapshot(self, snap: Snapshot) -> None:
        self.summary.show(snap)
        self.table.show(snap.agents)
        self.spenders.show(snap.top, snap.top_partial)
        self.feed.add_alerts(snap.alerts)
        self.burn.show(snap.burn)
        self._retitle_table()

    def show_alert(self, alert: Alert) -> None:
        self.feed.add_alerts([alert])

    def show_action(self, action: Action) -> None:
        self.feed.add_action(action)

    def show_agent(self, view: AgentView) -> None:
        self.table.update_view(view)

    def show_disconnected(self, why: str) -> None:
        self.summary.show_disconnected(why)

    def _retitle_table(self) -> None:
        table = self.table
        arrow = "↓" if table.sort_descending else "↑"
        parts = [f"agents · sort {table.sort_key}{arrow} (s)"]
        if table.order_held:
            parts.append("order held while you move")
        if table.filter_text:
            parts.append(f"filter '{escape(table.filter_text)}'")
        if table.hidden_rows:
            parts.append(f"{table.hidden_rows} more not shown (filter with /)")
        table.border_title = " · ".join(parts)

    # ---- keys ----------------------------------------------------------------------------

    def _selected(self) -> AgentView | None:
        name = self.table.selected_name
        view = self.table.view_of(name) if name else None
        if view is None:
            self.notify("no agent selected", severity="warning", markup=False)
        return view

    def action_pause(self) -> None:
        view = self._selected()
        if view is None:
            return
        kind = "resume" if view.agent.state == AgentState.PAUSED.value else "pause"
        self.tw.send(kind, agent=view.agent.name, who="key")

    def action_kill(self) -> None:
        view = self._selected()
        if view is None:
            return
        name = view.agent.name

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.tw.send("kill", agent=name, who="key")
            else:
                self.notify(f"{name} not killed", markup=False)

        pid = f" (pid {view.agent.pid})" if view.agent.pid else ""
        self.app.push_screen(
            ConfirmScreen(f"Kill {name}{pid} and its child processes?", yes="Kill"), confirmed
        )

    def action_throttle(self) -> None:
        view = self._selected()
        if view is None:
            return
        name = view.agent.name
        if view.agent.state == AgentState.THROTTLED.value or view.agent.throttle:
            self.tw.send("throttle", agent=name, rate="off", who="key")
            return

        def chosen(rate: str | None) -> None:
            if rate:
                self.tw.send("throttle", agent=name, rate=rate, who="key")

        self.app.push_screen(ThrottleScreen(name), chosen)

    def action_model(self) -> None:
        view = self._selected()
        if view is None:
            return
        name = view.agent.name

        def chosen(model: str | None) -> None:
            if model:
                self.tw.send("route", agent=name, model=model, who="key")
            elif model == "":  # emptied: undo (esc gives None and changes nothing)
                self.tw.send("route", agent=name, undo=True, who="key")

        self.app.push_screen(ModelScreen(name, view.agent.route_model), chosen)

    def action_budget(self) -> None:
        view = self._selected()
        if view is None:
            return
        name = view.agent.name
        current = next(
            (b for b in self.tw.budgets if b.scope == "agent" and b.target == name), None
        )

        def chosen(budget: dict[str, Any] | None) -> None:
            if budget:
                self.tw.send("set_budget", budget=budget)

        self.app.push_screen(BudgetScreen(name, current), chosen)

    def action_pause_all(self) -> None:
        self.tw.send("pause_all", who="key", why="P pressed on the dashboard")

    def action_resume_all(self) -> None:
        self.tw.send("resume_all", who="key", why="R pressed on the dashboard")

    def action_ack(self) -> None:
        ids = [e.alert_id for e in self.feed.unacknowledged if e.alert_id is not None]
        if not self.feed.unacknowledged:
            self.notify("no alerts to acknowledge", markup=False)
            return
        self.tw.send("ack_alerts", ids=ids or None)  # none known by id: all of them

    def action_detail(self) -> None:
        view = self._selected()
        if view is not None:
            self.tw.open_detail(view.agent.name)

    @on(DataTable.RowSelected)
    def _row_chosen(self, event: DataTable.RowSelected) -> None:
        event.stop()
        name = self.table.selected_name
        if name:
            self.tw.open_detail(name)

    @on(DataTable.HeaderSelected)
    def _header_chosen(self, event: DataTable.HeaderSelected) -> None:
        if event.column_key.value is not None:
            self.table.sort_by(str(event.column_key.value))
            self._retitle_table()

    def action_group(self) -> None:
        grouping = self.spenders.cycle_grouping()
        self.notify(f"top spenders by {grouping}", timeout=1.5, markup=False)

    def action_sort(self) -> None:
        self.table.cycle_sort()
        self._retitle_table()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("-active")
        self.call_after_refresh(box.focus)  # not focusable until the class shows it

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.table.set_filter(event.value.strip())
        self._retitle_table()

    @on(Input.Submitted, "#filter")
    def _filter_done(self, event: Input.Submitted) -> None:
        event.input.remove_class("-active")
        self.table.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.remove_class("-active")
        self.table.set_filter("")
        self._retitle_table()
        self.table.focus()

    def action_report(self) -> None:
        self.tw.open_report()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return self.tw.fleet or action != "hosts"

    def action_hosts(self) -> None:
        self.tw.open_hosts()

    def action_launch(self) -> None:
        names = self.tw.launchable
        if not names:
            self.notify(
                "nothing to launch: add [agents.NAME] with a command to tokenwatch.toml",
                severity="warning",
                markup=False,
            )
            return

        def chosen(name: str | None) -> None:
            if name:
                self.tw.send("launch", name=name)

        self.app.push_screen(LaunchScreen(names), chosen)

    def action_help(self) -> None:
        keys = [b for b in self.BINDINGS if self.tw.fleet or getattr(b, "action", "") != "hosts"]
        self.app.push_screen(HelpScreen(keys))

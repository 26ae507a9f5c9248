"""The dashboard application and `build_app`, the one factory the CLI, tests and benchmark use."""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from textual import on
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message_pump import MessagePump
from textual.screen import Screen
from textual.timer import Timer

from tokenwatch.core.models import Action, Agent, AgentView, BudgetStatus, Snapshot
from tokenwatch.tui.messages import (
    ActionArrived,
    AgentChanged,
    AlertArrived,
    CommandDone,
    ConnectionChanged,
    FeedEnded,
    SnapshotArrived,
)
from tokenwatch.tui.screens.detail import AgentDetailScreen
from tokenwatch.tui.screens.hosts import HostsScreen
from tokenwatch.tui.screens.main import MainScreen
from tokenwatch.tui.screens.report import ReportScreen
from tokenwatch.tui.source import CommandError, DashboardSource

QUIT_NOTE = (
    "tokenwatch: dashboard closed; agents keep running under the supervisor "
    "(`tokenwatch status` lists them, `tokenwatch kill NAME` stops one)"
)

_DONE_VERBS = {
    "pause": "paused",
    "resume": "resumed",
    "kill": "killed",
    "pause_all": "paused all non-critical agents",
    "resume_all": "resumed all paused agents",
    "ack_alerts": "alerts acknowledged",
    "set_budget": "budget saved",
    "launch": "launched",
}


def describe_done(message: CommandDone) -> str:
    """The one line a user sees when a command finished, e.g. `paused researcher`."""
    fields = message.fields
    target = fields.get("agent") or fields.get("name") or ""
    if message.kind == "throttle":
        rate = fields.get("rate", "")
        return f"throttle off for {target}" if rate == "off" else f"throttled {target} to {rate}"
    if message.kind == "route":
        if fields.get("undo"):
            return f"{target}: calls go to the models it asks for"
        return f"{target}: calls go to {fields.get('model', '')}"
    if message.kind == "set_budget":
        budget = fields.get("budget", {})
        return f"budget {budget.get('name', '')}: {budget.get('limit')} → {budget.get('action')}"
    verb = _DONE_VERBS.get(message.kind, f"{message.kind} done")
    return f"{verb} {target}".strip()


class TokenwatchApp(App[None]):
    """Live view of what agents spend, with keys to pause, throttle and kill them."""

    CSS_PATH = "dashboard.tcss"
    TITLE = "tokenwatch"
    BINDINGS: ClassVar[list[Any]] = [
        Binding("q", "quit", "Quit"),
        # Textual 8 only says "press ctrl+q"; a box with text selected still copies it first.
        Binding("ctrl+c", "quit", show=False),
    ]

    def __init__(
        self,
        source: DashboardSource,
        *,
        address: str = "",
        launchable: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
        min_refresh: float = 0.5,
        max_rows: int = 100,
    ) -> None:
        super().__init__()
        self.source = source
        self.address = address
        self.launchable = list(launchable)
        self.clock = clock
        self.min_refresh = min_refresh
        self.max_rows = max_rows
        self.snapshot = Snapshot(ts=0.0)
        self.actions: deque[Action] = deque(maxlen=500)
        self.refreshes = 0
        """Snapshots applied to the screen (fewer than received when they coalesce)."""
        self.received = 0
        self._pending: Snapshot | None = None
        self._last_apply = float("-inf")
        self._refresh_timer: Timer | None = None
        self._main = MainScreen(address=address, max_rows=max_rows, clock=clock)
        self.fleet = False
        """The supervisor has [fleet]: the other hosts screen (key h) is offered."""

    # ---- lifecycle ---------------------------------------------------------------------

    def on_mount(self) -> None:
        self.push_screen(self._main)
        self.run_worker(self._pump(), name="feed", exit_on_error=False)
        self.set_interval(1.0, self._tick)
        self.send("fleet_hosts")  # only whether there is a team: the screen reads the rest

    async def _pump(self) -> None:
        """Only posts messages: the handlers below own every piece of UI state."""
        try:
            async for kind, item in self.source.updates():
                self.post_message(_as_message(kind, item))
        except Exception as exc:
            self.post_message(FeedEnded(f"connection lost: {exc}"))
        else:
            self.post_message(FeedEnded("the supervisor closed the connection"))

    @property
    def main(self) -> MainScreen:
        """The main screen (kept after exit, so figures can still be read)."""
        return self._main

    # ---- state -------------------------------------------------------------------------

    @property
    def budgets(self) -> list[BudgetStatus]:
        return self.snapshot.budgets

    def view_of(self, name: str) -> AgentView | None:
        return next((v for v in self.snapshot.agents if v.agent.name == name), None)

    @on(SnapshotArrived)
    def _snapshot(self, message: SnapshotArrived) -> None:
        self.received += 1
        self._pending = message.snapshot
        if self._refresh_timer is not None:
            return  # the timer already set applies the newest snapshot
        wait = self._last_apply + self.min_refresh - time.monotonic()
        if wait <= 0:
            self._apply_pending()
        else:
            self._refresh_timer = self.set_timer(wait, self._apply_pending, name="refresh")

    def _apply_pending(self) -> None:
        self._refresh_timer = None
        snap, self._pending = self._pending, None
        if snap is None:
            return
        self._last_apply = time.monotonic()
        self.snapshot = snap
        self.refreshes += 1
        self.main.show_snapshot(snap)
        self._refresh_detail()

    @on(AlertArrived)
    def _alert(self, message: AlertArrived) -> None:
        self.main.show_alert(message.alert)
        if message.alert.severity == "critical":
            self.notify(
                f"{message.alert.agent}: {message.alert.message}",
                title=message.alert.rule,
                severity="error",
                markup=False,
            )

    @on(ActionArrived)
    def _action(self, message: ActionArrived) -> None:
        self.actions.append(message.action)
        self.main.show_action(message.action)
        self._refresh_detail()

    @on(AgentChanged)
    def _agent(self, message: AgentChanged) -> None:
        view = self.view_of(message.agent.name)
        if view is None:
            view = AgentView(agent=message.agent)
            self.snapshot.agents.append(view)
        else:
            view.agent = message.agent
        self.main.show_agent(view)
        self._refresh_detail()

    @on(ConnectionChanged)
    def _connection_changed(self, message: ConnectionChanged) -> None:
        if message.status:
            self.main.show_disconnected(message.status)
            self.notify(message.status, title="supervisor", severity="warning", markup=False)
        else:
            self.notify("connected again", title="supervisor", markup=False)
            self.send("fleet_hosts")  # the new supervisor may have [fleet], or not

    @on(FeedEnded)
    def _feed_ended(self, message: FeedEnded) -> None:
        self.main.show_disconnected(message.error)
        self.notify(message.error, title="supervisor", severity="error", timeout=10, markup=False)

    def _tick(self) -> None:
        self.main.feed.redraw()

    def _refresh_detail(self) -> None:
        # a snapshot can arrive while the app shuts down, when there is no screen left
        top = self.screen_stack[-1] if self.screen_stack else None
        if isinstance(top, AgentDetailScreen):
            top.refresh_view()

    # ---- commands ----------------------------------------------------------------------

    def send(self, kind: str, *, reply_to: MessagePump | None = None, **fields: Any) -> None:
        """Send a command without blocking the UI; its CommandDone goes to `reply_to` (or here)."""
        self.run_worker(
            self._send(kind, fields, reply_to or self), group="commands", exit_on_error=False
        )

    async def _send(self, kind: str, fields: dict[str, Any], reply_to: MessagePump) -> None:
        try:
            result = await self.source.command(kind, **fields)
        except CommandError as exc:
            reply_to.post_message(CommandDone(kind, fields, None, str(exc) or kind + " failed"))
        except Exception as exc:
            reply_to.post_message(CommandDone(kind, fields, None, f"{type(exc).__name__}: {exc}"))
        else:
            reply_to.post_message(CommandDone(kind, fields, result))

    @on(CommandDone)
    def _command_done(self, message: CommandDone) -> None:
        if message.kind == "fleet_hosts":  # the start-up question; an old supervisor: no team
            self.fleet = message.ok and message.result is not None
            self.main.refresh_bindings()
            return
        if message.ok:
            self.notify(describe_done(message), timeout=3, markup=False)
        else:
            self.notify(
                message.error,
                title=f"{message.kind} failed",
                severity="error",
                timeout=6,
                markup=False,
            )

    # ---- navigation --------------------------------------------------------------------

    def open_detail(self, name: str) -> None:
        self.push_screen(AgentDetailScreen(name))

    def open_report(self) -> None:
        self.push_screen(ReportScreen())

    def open_hosts(self) -> None:
        self.push_screen(HostsScreen())

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if not isinstance(screen, MainScreen):
            return
        for binding in MainScreen.BINDINGS:
            if (
                isinstance(binding, Binding)
                and binding.description
                and screen.check_action(binding.action, ())
            ):
                yield SystemCommand(
                    binding.description,
                    f"key {binding.key}",
                    _runner(screen, binding.action),
                )


def _runner(screen: Screen[Any], action: str) -> Callable[[], Any]:
    async def run() -> None:
        await screen.run_action(action)

    return run


def _as_message(
    kind: str, item: Any
) -> SnapshotArrived | AlertArrived | ActionArrived | AgentChanged | ConnectionChanged:
    if kind == "connection":
        return ConnectionChanged(str(item))
    if kind == "snapshot":
        return SnapshotArrived(item)
    if kind == "alert":
        return AlertArrived(item)
    if kind == "action":
        return ActionArrived(item)
    if kind == "agent":
        return AgentChanged(dataclasses.replace(item) if isinstance(item, Agent) else item)
    raise ValueError(f"unknown update kind {kind!r}")


def build_app(
    source: DashboardSource,
    *,
    address: str = "",
    launchable: Sequence[str] = (),
    clock: Callable[[], float] = time.time,
    min_refresh: float = 0.5,
    max_rows: int = 100,
) -> TokenwatchApp:
    """The dashboard over any source; the CLI, the tests and the benchmark all build it here."""
    return TokenwatchApp(
        source,
        address=address,
        launchable=launchable,
        clock=clock,
        min_refresh=min_refresh,
        max_rows=max_rows,
    )

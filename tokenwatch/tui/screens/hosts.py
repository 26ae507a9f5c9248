"""The other hosts screen: the team's other machines and their agents' spend today, read-only
(each is controlled by its own supervisor), refreshed every few seconds while open."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from tokenwatch.tui.figures import age, format_usd
from tokenwatch.tui.messages import CommandDone

if TYPE_CHECKING:
    from tokenwatch.tui.app import TokenwatchApp

REFRESH: Final = 3.0
"""Seconds between reads of the team's database while the screen is open."""
COLUMNS: Final = ("host", "agent", "spend today", "calls today", "last call", "last shipment")
TITLE: Final = "other hosts · read-only: each host's agents are controlled on that host"
NO_HOSTS: Final = "no other host shipped calls in the last 7 days"
CONTROL_KEYS: Final = "p,k,t,m,b,P,R"
"""The main screen's keys that act on an agent: here they only say why they do not."""


class HostsScreen(Screen[None]):
    BINDINGS = [
        Binding("escape,backspace,h", "app.pop_screen", "Back"),
        Binding(CONTROL_KEYS, "read_only", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.roster: dict[str, Any] | None = None
        """The last `fleet_hosts` reply (docs/protocol.md); None until one came."""
        self.error = ""
        self._asking = False

    @property
    def tw(self) -> TokenwatchApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Static(Text(f"{TITLE} · loading…"), id="hosts-title")
        yield DataTable(id="hosts", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#hosts", DataTable)
        for label in COLUMNS:
            table.add_column(label, key=label)
        self._request()
        self.set_interval(REFRESH, self._request, name="hosts refresh")

    def _request(self) -> None:
        if not self._asking:  # a server that does not answer must not pile up requests
            self._asking = True
            self.tw.send("fleet_hosts", reply_to=self)

    @on(CommandDone)
    def _arrived(self, message: CommandDone) -> None:
        if message.kind != "fleet_hosts":
            return
        message.stop()
        self._asking = False
        result = message.result if message.ok else None
        if not message.ok:
            self.error = message.error
        elif result is None:
            self.error = "no [fleet] in this supervisor's config: no other hosts to show"
        else:
            self.error = str(result.get("error") or "")
            if not self.error:
                self.roster = result
        self.show()

    def show(self) -> None:
        """The last roster read, and what went wrong since, if anything."""
        title = self.query_one("#hosts-title", Static)
        table = self.query_one("#hosts", DataTable)
        if self.error:
            title.update(Text(f"{TITLE} · {self.error}", style="bold red"))
            table.clear()  # figures from a database we cannot read are not shown as current
            return
        roster = self.roster or {"hosts": []}
        table.clear()
        for host in roster["hosts"]:
            for agent in host["agents"]:
                table.add_row(*_cells(host, agent, float(roster["read_at"])))
        count = len(roster["hosts"])
        note = f"{count} host{'s' if count > 1 else ''}" if count else NO_HOSTS
        title.update(Text(f"{TITLE} · {note}"))

    def action_read_only(self) -> None:
        row = self._selected_host()
        where = f"{row}'s supervisor" if row else "each host's own supervisor"
        self.notify(f"read-only: these agents are controlled by {where}", severity="warning",
                    markup=False)  # fmt: skip

    @on(DataTable.RowSelected)
    def _row_chosen(self, event: DataTable.RowSelected) -> None:
        event.stop()  # no detail screen either: the calls are in that host's ledger
        self.action_read_only()

    def _selected_host(self) -> str:
        table = self.query_one("#hosts", DataTable)
        if not table.row_count:
            return ""
        return str(table.get_row_at(table.cursor_row)[0])


def _cells(host: dict[str, Any], agent: dict[str, Any], now: float) -> tuple[str, ...]:
    return (
        host["host"],
        agent["agent"] or "-",
        format_usd(agent["spend_today_usd"], agent["estimated_today"] > 0),
        str(agent["calls_today"]),
        age(now - agent["last_seen"]) + " ago",
        age(now - host["last_shipment"]) + " ago",
    )

"""The agent detail screen: per-call history, breakdown by model and task, budgets, actions, log."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Sparkline, Static, TabbedContent, TabPane

from tokenwatch.core.models import Action, AgentView, BudgetStatus, UsageEvent
from tokenwatch.tui.figures import format_tokens, format_usd, gauge, state_label
from tokenwatch.tui.messages import CommandDone
from tokenwatch.tui.widgets.alerts import action_entry

if TYPE_CHECKING:
    from tokenwatch.tui.app import TokenwatchApp

HISTORY_LIMIT = 200

CALL_COLUMNS = (
    "time",
    "model",
    "in",
    "out",
    "cached",
    "reason",
    "cost",
    "latency",
    "status",
    "est",
)


def covers(budget: BudgetStatus, view: AgentView) -> bool:
    """Whether a budget counts this agent's spending (global, its name, its task or its tags)."""
    agent = view.agent
    if budget.scope == "global":
        return True
    if budget.scope == "agent":
        return fnmatchcase(agent.name, budget.target)
    if budget.scope == "task":
        return bool(agent.task) and fnmatchcase(agent.task, budget.target)
    if budget.scope == "model":
        return any(fnmatchcase(m, budget.target) for m in view.models)
    if budget.scope == "tag":
        key, _, value = budget.target.partition("=")
        return key in agent.tags and fnmatchcase(agent.tags[key], value or "*")
    if budget.scope == "user":
        return bool(agent.user) and fnmatchcase(agent.user, budget.target)
    return False


def call_row(event: UsageEvent) -> tuple[str | Text, ...]:
    status = Text(event.status, style="" if event.status == "ok" else "red")
    latency = f"{event.latency_ms:.0f}ms" if event.latency_ms is not None else "-"
    return (
        time.strftime("%H:%M:%S", time.localtime(event.ts)),
        event.model,
        format_tokens(event.input_tokens),
        format_tokens(event.output_tokens),
        format_tokens(event.cache_read_tokens),
        format_tokens(event.reasoning_tokens),
        format_usd(event.cost_usd),
        latency,
        status,
        "~" if event.estimated else "",
    )


def breakdown(events: Iterable[UsageEvent], by: Callable[[UsageEvent], str]) -> Table:
    """Calls, tokens and cost per model (or task) over the fetched history."""
    groups: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for event in events:
        row = groups[by(event) or "(none)"]
        row[0] += 1
        row[1] += event.total_tokens
        row[2] += event.cost_usd or 0.0
    table = Table("", "calls", "tokens", "cost", box=None, padding=(0, 1), expand=True)
    for name, (calls, tokens, cost) in sorted(groups.items(), key=lambda kv: -kv[1][2]):
        table.add_row(name, f"{calls:.0f}", format_tokens(tokens), format_usd(cost))
    return table


class AgentDetailScreen(Screen[None]):
    BINDINGS = [
        Binding("escape,backspace", "app.pop_screen", "Back"),
        Binding("r", "refresh", "Refresh calls"),
        Binding("1", "tab('calls')", "Calls", show=False),
        Binding("2", "tab('breakdown')", "Breakdown", show=False),
        Binding("3", "tab('budgets')", "Budgets", show=False),
        Binding("4", "tab('actions')", "Actions", show=False),
        Binding("5", "tab('log')", "Log", show=False),
    ]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.agent_name = name
        self.events: list[UsageEvent] = []
        self.actions: list[Action] = []
        self.log_lines: list[str] = []

    @property
    def tw(self) -> TokenwatchApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Static(id="identity")
        with Horizontal(id="figures-row"):
            yield Static(id="figures")
            yield Sparkline([], id="agent-burn")
        with TabbedContent(id="tabs"):
            with TabPane("1 Calls", id="tab-calls"):
                yield DataTable(id="calls", cursor_type="row")
            with TabPane("2 By model/task", id="tab-breakdown"), Horizontal():
                yield Static(id="by-model")
                yield Static(id="by-task")
            with TabPane("3 Budgets", id="tab-budgets"):
                yield Static(id="budgets")
            with TabPane("4 Actions", id="tab-actions"):
                yield Static(id="actions")
            with TabPane("5 Log", id="tab-log"), VerticalScroll():
                yield Static(id="log")
        yield Footer()

    def action_tab(self, pane: str) -> None:
        self.query_one(TabbedContent).active = f"tab-{pane}"

    def on_mount(self) -> None:
        table = self.query_one("#calls", DataTable)
        for label in CALL_COLUMNS:
            table.add_column(label, key=label)
        self.query_one("#by-model").border_title = "by model"
        self.query_one("#by-task").border_title = "by task"
        self.query_one("#agent-burn").border_title = "burn"
        self.refresh_view()
        self.action_refresh()

    def action_refresh(self) -> None:
        self.tw.send("history", reply_to=self, agent=self.agent_name, limit=HISTORY_LIMIT)

    @on(CommandDone)
    def _history_arrived(self, message: CommandDone) -> None:
        if message.kind != "history":
            return
        message.stop()
        if not message.ok:
            self.notify(message.error, title="call history", severity="error", markup=False)
            return
        self.set_history(message.result)

    def set_history(self, data: Any) -> None:
        """Accepts a list of UsageEvent dicts, or {calls, actions, log} from the supervisor."""
        calls: Sequence[dict[str, Any]] = data if isinstance(data, list) else data.get("calls", [])
        self.events = [UsageEvent.from_dict(c) for c in calls]
        if isinstance(data, dict):
            self.actions = [Action.from_dict(a) for a in data.get("actions", [])]
            self.log_lines = [str(line) for line in data.get("log", [])]
        table = self.query_one("#calls", DataTable)
        table.clear()
        for event in self.events:
            table.add_row(*call_row(event))
        self.query_one("#by-model", Static).update(breakdown(self.events, lambda e: e.model))
        self.query_one("#by-task", Static).update(breakdown(self.events, lambda e: e.task))
        self.refresh_view()

    def refresh_view(self) -> None:
        """Redraw the live parts (figures, burn, budgets, actions) from the app's latest state."""
        view = self.tw.view_of(self.agent_name)
        if view is None:
            self.query_one("#identity", Static).update(Text(f"{self.agent_name}: gone", "dim"))
            return
        self.query_one("#identity", Static).update(_identity(view))
        self.query_one("#figures", Static).update(_figures(view))
        self.query_one("#agent-burn", Sparkline).data = list(view.burn)
        budgets = [b for b in self.tw.budgets if covers(b, view)]
        self.query_one("#budgets", Static).update(_budgets(budgets))
        seen = {(a.ts, a.kind) for a in self.actions}
        mine = self.actions + [
            a for a in self.tw.actions if a.agent == self.agent_name and (a.ts, a.kind) not in seen
        ]
        self.query_one("#actions", Static).update(_actions(mine))
        log = "\n".join(self.log_lines[-20:]) if self.log_lines else "(no output captured)"
        self.query_one("#log", Static).update(Text(log, "dim"))


def _identity(view: AgentView) -> Text:
    agent = view.agent
    text = Text(agent.name, style="bold")
    text.append("  ")
    text.append_text(state_label(agent.state, agent.exit_code, agent.throttle))
    if agent.route_model:
        only = f" (its {agent.route_only} calls)" if agent.route_only else ""
        text.append(f"  served by {agent.route_model}{only}", style="magenta")
    if agent.pid:
        text.append(f"  pid {agent.pid}")
    if agent.task:
        text.append(f"  task {agent.task}")
    if agent.tags:
        text.append("  " + " ".join(f"{k}={v}" for k, v in agent.tags.items()), style="dim")
    if agent.command:
        text.append("\n$ " + " ".join(agent.command), style="dim")
    return text


def _figures(view: AgentView) -> Text:
    text = Text()
    text.append(f"{format_tokens(view.tokens_per_min)} tok/min  ")
    text.append(f"{format_usd(view.usd_per_hour)}/h  ")
    text.append(f"{view.requests_per_min:.0f} req/min\n")
    text.append(f"period: {format_tokens(view.period_tokens)} tokens, ")
    partial = view.unpriced_requests > 0
    text.append(f"{format_usd(view.period_cost_usd, partial)}  budget ")
    text.append_text(gauge(view.budget_fraction, partial=partial))
    models = ", ".join(view.models) or "-"
    text.append(f"\nmodels: {models}")
    return text


def _budgets(budgets: Sequence[BudgetStatus]) -> Text:
    text = Text()
    if not budgets:
        text.append("none (b sets one)", style="dim")
    for b in budgets:
        partial = b.estimated_usd > 0
        used = format_usd(b.used, partial) if b.unit == "usd" else format_tokens(b.used)
        limit = format_usd(b.limit) if b.unit == "usd" else format_tokens(b.limit)
        text.append(f"{b.name}: {used} of {limit} per {b.period} → {b.action}  ")
        text.append_text(gauge(b.fraction, partial=partial))
        text.append("\n")
    text.rstrip()
    return text


def _actions(actions: Sequence[Action]) -> Text:
    text = Text()
    if not actions:
        text.append("none", style="dim")
    for action in sorted(actions, key=lambda a: a.ts, reverse=True)[:20]:
        entry = action_entry(action)
        stamp = time.strftime("%H:%M:%S", time.localtime(action.ts))
        text.append(f"{stamp} {entry.text}\n", style=entry.style)
    text.rstrip()
    return text

"""Modal dialogs: kill confirmation, throttle rate, model switch, budget form, launch picker and
key help."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Select, Static

from tokenwatch.core.actions import ACTIONS
from tokenwatch.core.models import BudgetStatus
from tokenwatch.core.quantities import (
    QuantityError,
    RateKind,
    Unit,
    format_tokens,
    parse_rate,
    parse_typed_limit,
)

PERIODS = ("hour", "day", "week", "month", "total")
BUDGET_ACTIONS = ACTIONS


class ConfirmScreen(ModalScreen[bool]):
    """Yes only on `y` or the yes button; enter on the focused Cancel, `n` and escape say no."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, *, yes: str = "Yes") -> None:
        super().__init__()
        self._question = question
        self._yes = yes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self._question, classes="question")
            with Horizontal(classes="buttons"):
                yield Button(f"{self._yes} (y)", variant="error", id="yes")
                yield Button("Cancel (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class _FormScreen(ModalScreen[Any]):
    """A dialog that validates on submit and shows the error in place instead of closing."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def action_cancel(self) -> None:
        self.dismiss(None)

    def show_error(self, message: str) -> None:
        error = self.query_one(".error", Label)
        error.update(message)
        error.display = bool(message)


class ThrottleScreen(_FormScreen):
    """Ask for a rate: `20k/min`, `$1/h` or `50%`; returns the rate as typed (validated)."""

    def __init__(self, agent: str) -> None:
        super().__init__()
        self._agent = agent

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Throttle {self._agent} to", classes="question")
            yield Input(placeholder="20k/min, $1/h or 50%", id="rate")
            yield Label("", classes="error")
            yield Label("enter to apply · esc to cancel · t again turns it off", classes="hint")

    def on_mount(self) -> None:
        self.show_error("")
        self.query_one("#rate", Input).focus()

    @on(Input.Submitted, "#rate")
    def _submit(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        try:
            rate = parse_rate(text)
        except (QuantityError, ValueError) as exc:
            self.show_error(str(exc))
            return
        if rate.kind is RateKind.OFF:
            self.show_error("to turn a throttle off press t on a throttled agent")
            return
        self.dismiss(text)


class ModelScreen(_FormScreen):
    """Ask for the model to serve an agent's calls with (`tokenwatch route`); returns the name,
    or an empty string to serve the models it asks for again."""

    def __init__(self, agent: str, current: str = "") -> None:
        super().__init__()
        self._agent = agent
        self._current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Serve {self._agent}'s calls with", classes="question")
            yield Input(value=self._current, placeholder="gpt-4o-mini", id="model")
            yield Label("", classes="error")
            yield Label(
                "same provider and wire · enter to apply · empty to undo · esc to cancel",
                classes="hint",
            )

    def on_mount(self) -> None:
        self.show_error("")
        self.query_one("#model", Input).focus()

    @on(Input.Submitted, "#model")
    def _submit(self, event: Input.Submitted) -> None:
        model = event.value.strip()
        if any(c.isspace() for c in model):
            self.show_error("a model name has no spaces")
            return
        self.dismiss(model)


def budget_settings(agent: str, limit: str, period: str, action: str) -> dict[str, Any]:
    """The `set_budget` payload (BudgetSettings fields) for an agent budget; raises QuantityError."""
    amount = parse_typed_limit(limit)
    if amount.value <= 0:
        raise QuantityError("a budget limit must be above zero")
    if period not in PERIODS:
        raise QuantityError(f"period must be one of {', '.join(PERIODS)}")
    if action not in BUDGET_ACTIONS:
        raise QuantityError(f"action must be one of {', '.join(BUDGET_ACTIONS)}")
    value: str | int = str(amount) if amount.unit is Unit.USD else int(amount.value)
    return {
        "name": f"agent:{agent}:{period}",
        "scope": "agent",
        "target": agent,
        "period": period,
        "limit": value,
        "action": action,
    }


class BudgetScreen(_FormScreen):
    """Set or change the selected agent's budget: limit, period and what happens at the limit."""

    def __init__(self, agent: str, current: BudgetStatus | None = None) -> None:
        super().__init__()
        self._agent = agent
        self._current = current

    def compose(self) -> ComposeResult:
        cur = self._current
        limit = ""
        if cur is not None:
            limit = f"${cur.limit:g}" if cur.unit == "usd" else format_tokens(cur.limit)
        with Vertical(classes="dialog"):
            yield Label(f"Budget for {self._agent}", classes="question")
            yield Input(value=limit, placeholder="limit: 200k tokens or $2", id="limit")
            yield Select(
                [(p, p) for p in PERIODS],
                value=cur.period if cur and cur.period in PERIODS else "day",
                allow_blank=False,
                id="period",
            )
            yield Select(
                [(f"at the limit: {a}", a) for a in BUDGET_ACTIONS],
                value=cur.action if cur and cur.action in BUDGET_ACTIONS else "pause",
                allow_blank=False,
                id="action",
            )
            yield Label("", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.show_error("")
        self.query_one("#limit", Input).focus()

    @on(Input.Submitted, "#limit")
    @on(Button.Pressed, "#save")
    def _save(self) -> None:
        limit = self.query_one("#limit", Input).value.strip()
        period = str(self.query_one("#period", Select).value)
        action = str(self.query_one("#action", Select).value)
        try:
            payload = budget_settings(self._agent, limit, period, action)
        except QuantityError as exc:
            self.show_error(str(exc))
            return
        self.dismiss(payload)

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)


class LaunchScreen(_FormScreen):
    """Pick one of the `[agents.NAME]` entries of tokenwatch.toml to start."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self._names = list(names)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Launch an agent from tokenwatch.toml", classes="question")
            yield OptionList(*self._names, id="agents")
            yield Label("enter to launch · esc to cancel", classes="hint")

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self._names[event.option_index])


class HelpScreen(ModalScreen[None]):
    """Every key of the main screen and what it does."""

    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def __init__(self, bindings: Sequence[BindingType]) -> None:
        super().__init__()
        self._keys = bindings

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for binding in self._keys:
            if isinstance(binding, Binding) and binding.description:
                table.add_row(_key_label(binding.key), binding.description)
        table.add_row("ctrl+p", "Command palette (every action by name)")
        table.add_row("q", "Quit (agents keep running under the supervisor)")
        with Vertical(classes="dialog help"):
            yield Label("tokenwatch keys", classes="question")
            yield Static(table)
            yield Label("esc to close", classes="hint")

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)


def _key_label(key: str) -> str:
    return {"slash": "/", "question_mark": "?", "escape": "esc"}.get(key, key)

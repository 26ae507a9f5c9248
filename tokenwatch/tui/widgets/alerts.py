"""The alert feed: alerts and actions, newest first, coloured by severity, with what was done."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rich.text import Text
from textual.widgets import Static

from tokenwatch.core.models import Action, ActionKind, Alert
from tokenwatch.tui.figures import SEVERITY_STYLES, age

_ACTION_MARKS = {
    ActionKind.PAUSE.value: "‖",
    ActionKind.RESUME.value: "▶",
    ActionKind.KILL.value: "✖",
    ActionKind.THROTTLE.value: "◐",
    ActionKind.DENY.value: "⊘",
    ActionKind.ALERT.value: "▲",
}


@dataclass(frozen=True, slots=True)
class FeedEntry:
    ts: float
    key: tuple[object, ...]
    style: str
    text: str
    acknowledged: bool = False
    alert_id: int | None = None
    """The supervisor's id for an alert (what `ack_alerts` takes); None for actions."""


def alert_entry(alert: Alert) -> FeedEntry:
    done = "" if alert.action == ActionKind.ALERT.value else f" → {alert.action}"
    # Keyed by content, not id: the push and the snapshot carry the same alert, one without id.
    key = ("alert", alert.ts, alert.rule, alert.agent, alert.message)
    return FeedEntry(
        ts=alert.ts,
        key=key,
        style=SEVERITY_STYLES.get(alert.severity, ""),
        text=f"▲ {alert.rule} {alert.agent}: {alert.message}{done}",
        acknowledged=alert.acknowledged,
        alert_id=alert.id,
    )


def action_entry(action: Action) -> FeedEntry:
    mark = _ACTION_MARKS.get(action.kind, "•")
    why = f" ({action.why})" if action.why else ""
    failed = "" if action.ok else f" FAILED {action.detail}"
    key = ("action", action.ts, action.kind, action.agent)
    return FeedEntry(
        ts=action.ts,
        key=key,
        style="" if action.ok else "red",
        text=f"{mark} {action.kind} {action.agent} by {action.who}{why}{failed}",
    )


class AlertFeed(Static):
    """Newest first; unacknowledged alerts bold. Holds at most `limit` entries."""

    DEFAULT_CSS = """
    AlertFeed { border: round $primary-darken-2; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def __init__(self, clock: Callable[[], float], limit: int = 50, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._clock = clock
        self._limit = limit
        self._entries: dict[tuple[object, ...], FeedEntry] = {}
        self.border_title = "alerts (a: acknowledge)"

    @property
    def unacknowledged(self) -> list[FeedEntry]:
        return [e for e in self._entries.values() if e.key[0] == "alert" and not e.acknowledged]

    def add_alerts(self, alerts: Iterable[Alert]) -> None:
        self._merge(alert_entry(a) for a in alerts)

    def add_action(self, action: Action) -> None:
        self._merge([action_entry(action)])

    def _merge(self, entries: Iterable[FeedEntry]) -> None:
        changed = False
        for entry in entries:
            old = self._entries.get(entry.key)
            if old is not None and entry.alert_id is None:
                entry = dataclasses.replace(entry, alert_id=old.alert_id)
            if old != entry:
                self._entries[entry.key] = entry
                changed = True
        if changed:
            newest = sorted(self._entries.values(), key=lambda e: e.ts, reverse=True)
            self._entries = {e.key: e for e in newest[: self._limit]}
        self.redraw()

    def redraw(self) -> None:
        """Repaint (ages move on even when nothing new arrived)."""
        now = self._clock()
        text = Text(no_wrap=True, overflow="ellipsis")
        if not self._entries:
            text.append("no alerts", style="dim")
        for entry in self._entries.values():
            style = entry.style if entry.acknowledged else f"bold {entry.style}".strip()
            text.append(f"{age(now - entry.ts):>4} ", style="dim")
            text.append(
                entry.text + "\n", style=style if not entry.acknowledged else f"dim {style}"
            )
        text.rstrip()
        self.update(text)

"""Messages the dashboard's background feed and command senders post to the UI."""

from __future__ import annotations

from typing import Any

from textual.message import Message

from tokenwatch.core.models import Action, Agent, Alert, Snapshot


class SnapshotArrived(Message):
    """A new aggregated state; a newer one waiting in the queue supersedes it (one repaint)."""

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SnapshotArrived)


class ConnectionChanged(Message):
    """The feed lost the supervisor and waits for one to answer again (`status` says so), or
    has one again (`status` empty)."""

    def __init__(self, status: str) -> None:
        super().__init__()
        self.status = status


class AlertArrived(Message):
    def __init__(self, alert: Alert) -> None:
        super().__init__()
        self.alert = alert


class ActionArrived(Message):
    def __init__(self, action: Action) -> None:
        super().__init__()
        self.action = action


class AgentChanged(Message):
    def __init__(self, agent: Agent) -> None:
        super().__init__()
        self.agent = agent


class FeedEnded(Message):
    """The update stream stopped: the supervisor went away (`error` says why) or closed it."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class CommandDone(Message):
    """A command's outcome: `error` is empty on success and `result` holds the reply data."""

    def __init__(self, kind: str, fields: dict[str, Any], result: Any, error: str = "") -> None:
        super().__init__()
        self.kind = kind
        self.fields = fields
        self.result = result
        self.error = error

    @property
    def ok(self) -> bool:
        return not self.error

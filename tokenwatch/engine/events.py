"""What the engine tells its listeners (subscribers, exporters, the alert notifier), as it happens."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from tokenwatch.core.models import Action, Agent, Alert, UsageEvent

log = logging.getLogger("tokenwatch.engine")

EventKind = Literal["usage", "alert", "action", "agent"]
"""usage: a call was counted (UsageEvent); alert: an Alert was raised; action: an Action was
taken on an agent; agent: an Agent changed (registered, state, pid, task)."""
Payload = UsageEvent | Alert | Action | Agent
Listener = Callable[[EventKind, Payload], None]


class Publisher:
    """Calls every listener synchronously, in the order they were added; one that fails is logged
    and the others still hear the event."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def add(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def publish(self, kind: EventKind, obj: Payload) -> None:
        for fn in self._listeners:
            try:
                fn(kind, obj)
            except Exception:
                log.exception("listener %r failed on %s", fn, kind)

"""`rules test`: stored events replayed through budgets and rules on a replay clock, changing nothing."""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tokenwatch.config import BudgetSettings, RuleSettings
from tokenwatch.core.admission import Signal
from tokenwatch.core.budgets import Budgets
from tokenwatch.core.models import UsageEvent
from tokenwatch.core.rules import HISTORY_SECONDS, Rules


class EventSource(Protocol):
    """What replay reads: the ledger (tokenwatch.ledger.store.Store) or anything like it."""

    def iter_events(
        self, since: float = 0, until: float | None = None, batch: int = 5000
    ) -> AsyncIterable[UsageEvent]: ...


@dataclass(slots=True)
class ReplayClock:
    """Reads the time of the event being replayed."""

    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True, slots=True)
class Fired:
    """A signal replay produced, and the time it would have fired."""

    ts: float
    signal: Signal

    def to_dict(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "rule": self.signal.alert.rule,
            "agent": self.signal.agent,
            "action": self.signal.action,
            "severity": self.signal.alert.severity,
            "message": self.signal.alert.message,
        }


@dataclass(slots=True)
class ReplayResult:
    events: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    fired: list[Fired] = field(default_factory=list)


class Replay:
    """Budgets and rules as live enforcement builds them, fed events in time order.

    Events before `since` only warm them up (usage already in the period, detector history);
    what they would have fired then is not reported.
    """

    def __init__(
        self,
        budgets: Sequence[BudgetSettings],
        rules: Sequence[RuleSettings],
        *,
        since: float,
        tz: str = "local",
        is_critical: Callable[[str], bool] = lambda name: False,
    ) -> None:
        self.since = since
        self.clock = ReplayClock(since)
        self.budgets = Budgets(budgets, tz=tz, clock=self.clock)
        self.rules = Rules(
            rules, clock=self.clock, is_critical=is_critical, budgets=self.budgets.statuses
        )
        self.result = ReplayResult()

    def warm_up_from(self) -> float:
        """Where reading must start so the first reported period is complete."""
        budget_start = self.budgets.counting_since(self.since)
        start = self.since - HISTORY_SECONDS
        return min(start, budget_start) if budget_start is not None else start

    def feed(self, event: UsageEvent) -> list[Signal]:
        """One event, exactly as the engine handles it: budgets first, then rules."""
        self.clock.now = event.ts
        signals = [*self.budgets.record(event), *self.rules.observe(event)]
        if event.ts < self.since:
            return []
        r = self.result
        r.events += 1
        r.first_ts = event.ts if r.first_ts is None else r.first_ts
        r.last_ts = event.ts
        r.fired.extend(Fired(event.ts, s) for s in signals)
        return signals

    def feed_all(self, events: Iterable[UsageEvent]) -> ReplayResult:
        for event in sorted(events, key=lambda e: e.ts):
            self.feed(event)
        return self.result

    async def feed_store(self, store: EventSource, until: float | None = None) -> ReplayResult:
        async for event in store.iter_events(since=self.warm_up_from(), until=until):
            self.feed(event)
        return self.result

"""Live figures kept in memory: rolling per-agent windows, today's spend by group, and the
dashboard Snapshot built from them."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from tokenwatch.core.models import AgentView, Alert, BudgetStatus, Snapshot, UsageEvent
from tokenwatch.core.periods import period_end, period_start, zone
from tokenwatch.core.pricing import is_estimated

BUCKET_SECONDS: Final = 5.0
HISTORY_BUCKETS: Final = 120
"""Ten minutes of 5-second buckets per agent."""
BURN_BUCKETS: Final = 60
"""Buckets in a sparkline (the last five minutes)."""
RATE_WINDOW: Final = 60.0
"""Seconds over which tokens/min and requests/min are measured."""
COST_WINDOW: Final = 600.0
"""Seconds over which $/hour is measured (then scaled to an hour)."""
MAX_ALERTS: Final = 50
TOP_N: Final = 10
GROUPS: Final = ("agent", "model", "task", "user", "provider")


class RollingWindow:
    """Tokens, dollars and requests in fixed buckets over the recent past (a ring, O(1) per event)."""

    def __init__(self, clock: Callable[[], float], buckets: int = HISTORY_BUCKETS) -> None:
        self._clock = clock
        self._n = buckets
        self._tokens = [0.0] * buckets
        self._cost = [0.0] * buckets
        self._requests = [0] * buckets
        self._epoch = int(clock() // BUCKET_SECONDS)

    def _advance(self) -> int:
        now = int(self._clock() // BUCKET_SECONDS)
        gap = now - self._epoch
        if gap > 0:
            for i in range(1, min(gap, self._n) + 1):
                j = (self._epoch + i) % self._n
                self._tokens[j] = 0.0
                self._cost[j] = 0.0
                self._requests[j] = 0
            self._epoch = now
        return now % self._n

    def add(self, tokens: int, cost: float | None) -> None:
        i = self._advance()
        self._tokens[i] += tokens
        self._cost[i] += cost or 0.0
        self._requests[i] += 1

    def _last(self, series: list[float] | list[int], seconds: float) -> float:
        i = self._advance()
        k = min(self._n, max(1, round(seconds / BUCKET_SECONDS)))
        return float(sum(series[(i - j) % self._n] for j in range(k)))

    def tokens_per_min(self) -> float:
        return self._last(self._tokens, RATE_WINDOW) * 60.0 / RATE_WINDOW

    def requests_per_min(self) -> float:
        return self._last(self._requests, RATE_WINDOW) * 60.0 / RATE_WINDOW

    def usd_per_hour(self) -> float:
        return self._last(self._cost, COST_WINDOW) * 3600.0 / COST_WINDOW

    def burn(self, n: int = BURN_BUCKETS) -> list[float]:
        """Tokens per bucket, oldest first."""
        i = self._advance()
        n = min(n, self._n)
        return [self._tokens[(i - j) % self._n] for j in range(n - 1, -1, -1)]

    def idle(self) -> bool:
        self._advance()
        return not any(self._requests)


@dataclass(slots=True)
class DayTotals:
    """Today's tokens and dollars, in total and by agent, model, task, user and provider, with
    the calls to models no price table knows counted apart (their cost is an estimate)."""

    tokens: int = 0
    cost_usd: float = 0.0
    estimated_usd: float = 0.0
    unpriced_requests: int = 0
    by: dict[str, dict[str, float]] = field(
        default_factory=lambda: {g: defaultdict(float) for g in GROUPS}
    )
    estimated_by: dict[str, dict[str, float]] = field(
        default_factory=lambda: {g: defaultdict(float) for g in GROUPS}
    )
    """The estimated part of each group's cost."""
    agent_tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    agent_unpriced: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, event: UsageEvent) -> None:
        cost = event.cost_usd or 0.0
        unpriced = event.cost_usd is None or is_estimated(event.price_source)
        self.tokens += event.total_tokens
        self.cost_usd += cost
        self.agent_tokens[event.agent] += event.total_tokens
        keys = {
            "agent": event.agent,
            "model": event.model,
            "task": event.task,
            "user": event.user,
            "provider": event.provider,
        }
        for group, key in keys.items():
            self.by[group][key] += cost
            if unpriced:
                self.estimated_by[group][key] += cost
        if unpriced:
            self.estimated_usd += cost
            self.unpriced_requests += 1
            self.agent_unpriced[event.agent] += 1

    def seed(
        self,
        group: str,
        key: str,
        tokens: int,
        cost: float,
        estimated: float = 0.0,
        unpriced: int = 0,
    ) -> None:
        """Usage stored before this supervisor started (from the ledger's per-group totals)."""
        self.by[group][key] += cost
        if unpriced:
            self.estimated_by[group][key] += estimated
        if group == "agent":
            self.tokens += tokens
            self.cost_usd += cost
            self.agent_tokens[key] += tokens
            self.estimated_usd += estimated
            self.unpriced_requests += unpriced
            if unpriced:
                self.agent_unpriced[key] += unpriced

    def partial(self) -> dict[str, list[str]]:
        """Per group, the names whose cost holds an estimate (marked where they are shown)."""
        return {
            group: sorted(k or "-" for k in names) for group, names in self.estimated_by.items()
        }

    def top(self, n: int = TOP_N) -> dict[str, list[tuple[str, float]]]:
        return {
            group: sorted(((k or "-", v) for k, v in costs.items()), key=lambda kv: -kv[1])[:n]
            for group, costs in self.by.items()
        }


class LiveFigures:
    """What the engine feeds every recorded event into, and reads snapshots from."""

    def __init__(self, *, tz: str = "local", clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tz = zone(tz)
        self._windows: dict[str, RollingWindow] = {}
        self._total = RollingWindow(clock)
        self._models: dict[str, dict[str, None]] = defaultdict(dict)
        self._day_start = self._day_end = 0.0
        self.today = DayTotals()
        self.alerts: deque[Alert] = deque(maxlen=MAX_ALERTS)
        self._roll_day()

    @property
    def day_start(self) -> float:
        self._roll_day()
        return self._day_start

    def _roll_day(self) -> None:
        now = self._clock()
        if now >= self._day_end:
            self._day_start = period_start(now, "day", self._tz)
            self._day_end = period_end(now, "day", self._tz)
            self.today = DayTotals()

    def add(self, event: UsageEvent) -> None:
        self._roll_day()
        tokens = event.total_tokens
        window = self._windows.get(event.agent)
        if window is None:
            window = self._windows[event.agent] = RollingWindow(self._clock)
        window.add(tokens, event.cost_usd)
        self._total.add(tokens, event.cost_usd)
        if event.model:
            models = self._models[event.agent]
            models.pop(event.model, None)
            models[event.model] = None  # most recent last
        if event.ts >= self._day_start:
            self.today.add(event)

    def add_alert(self, alert: Alert) -> None:
        self.alerts.appendleft(alert)

    def forget(self, agent: str) -> None:
        self._windows.pop(agent, None)
        self._models.pop(agent, None)

    def view(self, rec_agent: AgentView) -> AgentView:
        """Fill an AgentView's live figures from the windows."""
        name = rec_agent.agent.name
        window = self._windows.get(name)
        if window is not None:
            rec_agent.tokens_per_min = window.tokens_per_min()
            rec_agent.requests_per_min = window.requests_per_min()
            rec_agent.usd_per_hour = window.usd_per_hour()
            rec_agent.burn = window.burn()
        rec_agent.models = list(reversed(self._models.get(name, {})))[:3]
        rec_agent.period_tokens = self.today.agent_tokens.get(name, 0)
        rec_agent.period_cost_usd = self.today.by["agent"].get(name, 0.0)
        rec_agent.period_estimated_usd = self.today.estimated_by["agent"].get(name, 0.0)
        rec_agent.unpriced_requests = self.today.agent_unpriced.get(name, 0)
        for alert in self.alerts:
            if alert.agent == name:
                rec_agent.last_alert = alert.message
                break
        return rec_agent

    def snapshot(
        self,
        views: list[AgentView],
        budgets: list[BudgetStatus],
        *,
        supervisor: str = "",
    ) -> Snapshot:
        self._roll_day()
        for view in views:
            self.view(view)
            view.budget_fraction = agent_budget_fraction(view.agent.name, budgets)
        return Snapshot(
            ts=self._clock(),
            tokens_per_min=self._total.tokens_per_min(),
            usd_per_hour=self._total.usd_per_hour(),
            spend_today_usd=self.today.cost_usd,
            estimated_today_usd=self.today.estimated_usd,
            unpriced_today=self.today.unpriced_requests,
            daily_budget_usd=daily_budget_usd(budgets),
            agents=views,
            top=self.today.top(),
            top_partial=self.today.partial(),
            budgets=budgets,
            alerts=list(self.alerts),
            burn=self._total.burn(),
            supervisor=supervisor,
        )


def agent_budget_fraction(name: str, budgets: Iterable[BudgetStatus]) -> float | None:
    """The fullest of the agent's own budgets (`agent:` ones and its run's), as a fraction of its
    limit; None when it has none. The global budget is not its own: every row would show it."""
    fractions = [b.fraction for b in budgets if b.scope == "agent" and _matches(b.target, name)]
    return max(fractions) if fractions else None


def daily_budget_usd(budgets: Iterable[BudgetStatus]) -> float | None:
    for b in budgets:
        if b.scope == "global" and b.period == "day" and b.unit == "usd":
            return b.limit
    return None


def _matches(pattern: str, name: str) -> bool:
    from fnmatch import fnmatchcase

    return fnmatchcase(name, pattern)

"""The model switch: an agent's calls served by another model, live (`tokenwatch route`) or by
a rule once a budget is nearly used."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenwatch.config import SwitchSettings
from tokenwatch.core.models import BudgetStatus

STATUS_TTL = 1.0
"""Seconds budget figures are reused by the rules (the engine sums them for every budget)."""


@dataclass(frozen=True, slots=True)
class LiveSwitch:
    """`tokenwatch route AGENT --model M`: in force until undone."""

    agent: str
    model: str
    only: str = "*"
    """Glob of the requested models it applies to."""
    who: str = "cli"


class BudgetFractions:
    """How much of each budget is used (0.0 to 1.0 and beyond), refreshed at most every second."""

    def __init__(
        self,
        statuses: Callable[[], list[BudgetStatus]],
        clock: Callable[[], float],
        ttl: float = STATUS_TTL,
    ) -> None:
        self._statuses = statuses
        self._clock = clock
        self._ttl = ttl
        self._rows: list[BudgetStatus] = []
        self._at = -float("inf")

    def fraction(self, budget: str, agent: str) -> float:
        """The largest use of `budget` among its rows that cover `agent` (0 when none)."""
        now = self._clock()
        if now - self._at >= self._ttl:
            self._rows, self._at = self._statuses(), now
        best = 0.0
        for row in self._rows:
            if row.name != budget:
                continue
            if row.scope == "agent" and not fnmatch.fnmatchcase(agent, row.target):
                continue
            best = max(best, row.fraction)
        return best


class ModelSwitch:
    """Which model serves an agent's call. `active` is False while no switch or rule exists, so
    the proxy's hot path checks one attribute."""

    def __init__(
        self, rules: Sequence[SwitchSettings] = (), fractions: BudgetFractions | None = None
    ) -> None:
        self._rules = list(rules)
        self._fractions = fractions
        self._live: dict[str, LiveSwitch] = {}
        self.active = bool(self._rules)

    def set(self, switch: LiveSwitch) -> None:
        self._live[switch.agent] = switch
        self.active = True

    def undo(self, agent: str) -> LiveSwitch | None:
        """Stop switching `agent`'s calls; the switch that was in force, if any."""
        gone = self._live.pop(agent, None)
        self.active = bool(self._live or self._rules)
        return gone

    def live_of(self, agent: str) -> LiveSwitch | None:
        return self._live.get(agent)

    def live(self) -> list[LiveSwitch]:
        return sorted(self._live.values(), key=lambda s: s.agent)

    def model_for(self, agent: str, model: str) -> str:
        """The model to serve instead of `model`; empty to serve it as asked."""
        live = self._live.get(agent)
        if live is not None and fnmatch.fnmatchcase(model, live.only):
            return live.model if live.model != model else ""
        for rule in self._rules:
            if not fnmatch.fnmatchcase(agent, rule.agents):
                continue
            if not fnmatch.fnmatchcase(model, rule.model) or rule.to == model:
                continue
            if self._fractions and self._fractions.fraction(rule.budget, agent) * 100 >= rule.at:
                return rule.to
        return ""

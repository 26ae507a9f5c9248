"""Neutral stand-ins for the engine's collaborators: no budgets, no rules, no prices. Used by
engine tests, and by a supervisor whose config switches a piece off."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tokenwatch.config import BudgetSettings, RuleSettings
from tokenwatch.core.admission import CallRequest, Refusal, Reservation, Signal
from tokenwatch.core.budgets import BudgetError
from tokenwatch.core.models import BudgetStatus, UsageEvent

_ids = itertools.count(1)


class NoBudgets:
    """Admits everything and reports no budgets."""

    def reserve(
        self, call: CallRequest, tokens: int, usd: float | None, estimated_from: str = ""
    ) -> Reservation | Refusal:
        return Reservation(id=f"r{next(_ids)}", tokens=tokens, usd=usd or 0.0, budgets=())

    def settle(self, reservation: Reservation | None, event: UsageEvent) -> list[Signal]:
        return []

    def release(self, reservation: Reservation) -> None:
        return None

    def record(self, event: UsageEvent) -> list[Signal]:
        return []

    def signals_nowait(self) -> list[Signal]:
        return []

    def statuses(self) -> list[BudgetStatus]:
        return []

    def replace(self, settings: Sequence[BudgetSettings]) -> None:
        return None

    def add_ephemeral(self, settings: BudgetSettings, *, start: float) -> None:
        return None

    def remove_ephemeral(self, name: str) -> bool:
        return False

    def set_run_limit(self, name: str, limit: str) -> BudgetStatus:
        raise BudgetError(f"no agent running now has a run budget named {name}")


class NoRules:
    """Never fires."""

    def observe(self, event: UsageEvent) -> list[Signal]:
        return []

    def task_ended(self, agent: str, task: str) -> list[Signal]:
        return []

    def names(self) -> Sequence[str]:
        return ()

    def replace(self, settings: Sequence[RuleSettings]) -> None:
        return None


class NoPrices:
    """Leaves every event unpriced (cost None, never a silent $0)."""

    version = ""

    def price(self, event: UsageEvent) -> UsageEvent:
        return event

    def worst_case(
        self, model: str, input_tokens: int, max_output_tokens: int, provider: str = ""
    ) -> float | None:
        return None

    def estimated_from(self, model: str, provider: str = "") -> str:
        return ""

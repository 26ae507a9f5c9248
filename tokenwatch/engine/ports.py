"""What the engine needs of the ledger, the price table, the budgets, the team's shared budgets and
the proxy's routes: ports the composition root fills, so the engine imports none of them."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

from tokenwatch.config import BudgetSettings
from tokenwatch.core.admission import BudgetBook, CallRequest, Refusal, Signal
from tokenwatch.core.models import Action, Agent, Alert, BudgetStatus, UsageEvent
from tokenwatch.process.processes import ProcessHandle

Attacher = Callable[..., ProcessHandle]
ChildEnv = Callable[[Mapping[str, str]], Mapping[str, str]]
"""The environment a launched agent gets, from the one it would have had (auto-instrumentation)."""


class Ledger(Protocol):
    """The part of tokenwatch.ledger.store.Store the engine uses."""

    async def append(self, event: UsageEvent) -> bool: ...

    async def append_many(self, events: Sequence[UsageEvent]) -> int: ...

    async def flush(self) -> None: ...

    async def save_agent(self, agent: Agent) -> None: ...

    async def load_agents(self) -> list[Agent]: ...

    async def forget_agent(self, name: str) -> None: ...

    async def add_alert(self, alert: Alert) -> int: ...

    async def list_alerts(self, since: float = 0, limit: int = 200) -> list[Alert]: ...

    async def ack_alerts(self, ids: Sequence[int] | None = None) -> int: ...

    async def add_action(self, action: Action) -> int: ...


class Pricer(Protocol):
    """The part of tokenwatch.core.pricing.PriceTable the engine uses."""

    def price(self, event: UsageEvent) -> UsageEvent: ...

    def worst_case(
        self, model: str, input_tokens: int, max_output_tokens: int, provider: str = ""
    ) -> float | None: ...

    def estimated_from(self, model: str, provider: str = "") -> str:
        """The fallback model that prices `model` when no table knows it, else ""."""
        ...


class Budgeting(BudgetBook, Protocol):
    """tokenwatch.core.budgets.Budgets: a BudgetBook that can be edited live."""

    def replace(self, settings: Sequence[BudgetSettings]) -> list[str]: ...

    async def seed(self, store: Any, only: Collection[str] | None = None) -> None: ...

    def add_ephemeral(self, settings: BudgetSettings, *, start: float) -> None: ...

    def remove_ephemeral(self, name: str) -> bool: ...

    def set_run_limit(self, name: str, limit: str) -> BudgetStatus: ...


class SharedBudgets(Protocol):
    """tokenwatch.fleet's shared budgets: reserved and settled in the team's PostgreSQL, after
    the local budgets admitted the call (the engine has none when no [fleet] is configured)."""

    async def reserve(
        self, call: CallRequest, tokens: int, usd: float | None, estimated_from: str, rid: str
    ) -> Refusal | None:
        """Hold the call's likely use against every shared budget covering it, under `rid`;
        a Refusal when one would be exceeded, or the server is unreachable and its policy
        refuses. Returns at once for a call no shared budget covers."""
        ...

    def settle(self, rid: str, event: UsageEvent) -> None:
        """Replace the hold `rid` (empty: none) with the call's real use; never waits on the
        server (queued, and sent again after an outage)."""
        ...

    def release(self, rid: str) -> None:
        """Give back the hold of a call that never went."""
        ...

    def statuses(self, local: list[BudgetStatus]) -> list[BudgetStatus]:
        """The budgets' rows with the team's figures and the fleet's state on shared ones."""
        ...

    def replace(self, settings: Sequence[BudgetSettings]) -> None:
        """The budgets in force after an edit: the shared ones among them are shared now."""
        ...

    def signals_nowait(self) -> list[Signal]:
        """Limit actions due because the team spent a shared budget (once a period)."""
        ...


class Routes(Protocol):
    """The proxy's route table and URLs, as far as the engine needs them."""

    def add_route(
        self, rec: Agent, openai_upstream: str, anthropic_upstream: str, token: str = ""
    ) -> str: ...

    def remove_route(self, token: str) -> None: ...

    def set_task(self, agent: str, task: str) -> None: ...

    def base_urls(self, token: str) -> dict[str, str]: ...

    @property
    def url(self) -> str: ...

    @property
    def endpoint(self) -> str:
        """The stable endpoint's URL (`http://127.0.0.1:PORT`), or "" when it is off."""
        ...

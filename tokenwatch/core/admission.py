"""The contracts between capture paths and the engine: a call asking to go, its admission, and the
budget and rule books the engine consults. Plain data and Protocols; implementations live elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from tokenwatch.core.models import Alert, BudgetStatus, UsageEvent

if TYPE_CHECKING:
    from tokenwatch.config import RuleSettings


@dataclass(frozen=True, slots=True)
class CallRequest:
    """A call about to be sent upstream, as the proxy or the SDK sees it before sending."""

    agent: str
    provider: str
    model: str
    endpoint: str = ""
    run_id: str = ""
    task: str = ""
    user: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    input_tokens: int = 0
    """Prompt tokens counted locally (tiktoken)."""
    max_output_tokens: int = 0
    """The request's own max tokens, else the configured default."""
    prompt_hash: str = ""


@dataclass(slots=True)
class Admission:
    """The engine's answer to a CallRequest. Settle it exactly once (or release it)."""

    allowed: bool
    reservation: str = ""
    """Opaque id of the budget reservation; empty when nothing was reserved."""
    status: int = 200
    """HTTP status for a refusal: 429 over budget, 503 store unavailable."""
    message: str = ""
    """Why it was refused, and how to fix it (which budget, how to raise it)."""
    budget: str = ""
    """Name of the budget that refused it."""
    retry_after: float | None = None
    """Seconds after which a retry may succeed (period reset), when waiting helps."""
    waited_ms: float = 0.0
    """Time the call was held (paused agent, throttle queue) before this answer."""


class Gate(Protocol):
    """What a capture path (proxy, SDK) calls around every LLM call."""

    async def admit(self, call: CallRequest) -> Admission:
        """Hold while the agent is paused or throttled, then reserve the worst case against budgets."""
        ...

    async def settle(self, admission: Admission, event: UsageEvent) -> None:
        """Record the call's real usage (returns once stored) and settle its reservation."""
        ...


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    tokens: int
    usd: float
    budgets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A budget that would be exceeded by the call."""

    budget: str
    message: str
    retry_after: float | None = None
    status: int = 429
    """HTTP status the agent gets: 429 over budget, 503 when a shared budget cannot be checked."""


@dataclass(frozen=True, slots=True)
class Signal:
    """Something a budget or rule wants done: an alert and maybe an action on an agent."""

    alert: Alert
    action: str
    """alert, throttle, pause, kill or deny (deny: refuse the agent's next calls)."""
    agent: str
    rate: str = ""
    """For throttle: the rate to apply (`20k/min`, `50%`)."""


class BudgetBook(Protocol):
    """Budgets: reserve before a call, settle after, report status. Clock and zone passed in."""

    def reserve(
        self, call: CallRequest, tokens: int, usd: float | None, estimated_from: str = ""
    ) -> Reservation | Refusal:
        """Hold `tokens` / `usd` for the call; `estimated_from` names the fallback model when
        no price table knows the call's (its dollars are an estimate)."""
        ...

    def settle(self, reservation: Reservation | None, event: UsageEvent) -> list[Signal]: ...

    def release(self, reservation: Reservation) -> None: ...

    def record(self, event: UsageEvent) -> list[Signal]:
        """Usage that was not reserved (SDK report without admit, import): count it."""
        ...

    def signals_nowait(self) -> list[Signal]:
        """Actions that became due outside settle/record (a refusal that makes a limit's action due)."""
        ...

    def statuses(self) -> list[BudgetStatus]: ...


class RuleBook(Protocol):
    """Detectors: fed every stored event, return what should happen (cooldown applied)."""

    def observe(self, event: UsageEvent) -> list[Signal]: ...

    def task_ended(self, agent: str, task: str) -> list[Signal]: ...

    def names(self) -> Sequence[str]: ...

    def replace(self, settings: Sequence[RuleSettings]) -> None: ...

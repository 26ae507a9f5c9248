"""What the ledger's reads return: totals over a span, per group and per session, rates, events."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

from tokenwatch.core.models import UsageEvent

T = TypeVar("T", bound="Totals")


@dataclass(slots=True)
class Totals:
    """Sums over a set of usage events, with the ratios reports show."""

    requests: int = 0
    input_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    """Cost of every event, fallback estimates included; see `unpriced_requests`."""
    unpriced_requests: int = 0
    """Events whose model no price table knows: counted at the fallback's rates (`estimated_usd`
    of `cost_usd`), or, stored before tokenwatch had a fallback, with no cost at all."""
    estimated_usd: float = 0.0
    """The part of `cost_usd` that is a fallback estimate: the total is partial when above 0."""
    errors: int = 0
    denied: int = 0
    estimated_requests: int = 0
    tasks: int = 0
    """Distinct non-empty task names."""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def avg_tokens_per_call(self) -> float:
        return self.total_tokens / self.requests if self.requests else 0.0

    @property
    def output_input_ratio(self) -> float | None:
        return self.output_tokens / self.input_tokens if self.input_tokens else None

    @property
    def cost_per_task(self) -> float | None:
        return self.cost_usd / self.tasks if self.tasks else None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(
            total_tokens=self.total_tokens,
            avg_tokens_per_call=self.avg_tokens_per_call,
            output_input_ratio=self.output_input_ratio,
            cost_per_task=self.cost_per_task,
        )
        return d


@dataclass(slots=True)
class GroupTotals(Totals):
    """Totals of one group (`key` is the agent, task, model, user, provider or local date)."""

    key: str = ""


@dataclass(slots=True)
class SessionTotals(GroupTotals):
    """Totals of one run of an agent (`key` is `AGENT RUN_ID`) and when it called."""

    agent: str = ""
    run_id: str = ""
    first_ts: float = 0.0
    last_ts: float = 0.0


@dataclass(frozen=True, slots=True)
class Rates:
    """Rates over a rolling window ending now."""

    window: float
    """Seconds."""
    tokens_per_min: float
    usd_per_hour: float
    requests_per_min: float
    totals: Totals


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """A usage event with its row id (for paging history)."""

    id: int
    event: UsageEvent


def as_totals(cls: type[T], row: tuple[Any, ...] | None) -> T:
    """A row of the rollup queries as `cls` (Totals or GroupTotals); no row is all zero."""
    if row is None:
        return cls()
    (
        requests,
        input_tokens,
        cache_read,
        cache_write,
        output,
        reasoning,
        cost,
        unpriced,
        errors,
        denied,
        estimated,
        estimated_usd,
        tasks,
        key,
    ) = row
    totals = cls(
        requests=int(requests),
        input_tokens=int(input_tokens),
        cache_read_tokens=int(cache_read),
        cache_write_tokens=int(cache_write),
        output_tokens=int(output),
        reasoning_tokens=int(reasoning),
        cost_usd=float(cost),
        unpriced_requests=int(unpriced),
        errors=int(errors),
        denied=int(denied),
        estimated_requests=int(estimated),
        estimated_usd=float(estimated_usd),
        tasks=int(tasks),
    )
    if isinstance(totals, GroupTotals):
        totals.key = str(key)
    return totals

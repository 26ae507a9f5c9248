"""Task attribution (contextvars), this process's usage totals and cost split, and `report()`."""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

from tokenwatch import environ
from tokenwatch.client import session
from tokenwatch.core.models import MAX_CALL_TOKENS, Source, Status, UsageEvent, over_call_limit

log = logging.getLogger("tokenwatch")

_task: contextvars.ContextVar[str | None] = contextvars.ContextVar("tokenwatch_task", default=None)


def current_task() -> str:
    """The task calls are attributed to here: the innermost `task()`, else TOKENWATCH_TASK."""
    name = _task.get()
    return name if name is not None else os.environ.get(environ.TASK, "")


class task:  # lower case: used like a function, `with tokenwatch.task("t-42"):`
    """Attribute the calls made inside to a task; tells the supervisor when it starts and ends.

    Works with `with` and `async with`; nested tasks restore the outer one on exit. Built on
    contextvars, so concurrent asyncio tasks each keep their own.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._tokens: list[contextvars.Token[str | None]] = []

    def __enter__(self) -> task:
        self._tokens.append(_task.set(self.name))
        _send_task(self.name, "start")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _task.reset(self._tokens.pop())
        _send_task(self.name, "end")

    async def __aenter__(self) -> task:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def _send_task(name: str, state: str) -> None:
    try:
        session.reporter().send_nowait("task", name=name, state=state)
    except Exception:  # reporting must never break the agent
        log.debug("tokenwatch: could not queue task %s", state, exc_info=True)


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens for one model."""

    input: float
    output: float
    cache_read: float
    cache_write: float
    reasoning: float | None = None
    """Reasoning tokens when billed apart from output; None bills them as output."""


@functools.cache
def _price_table() -> Any | None:
    try:
        from tokenwatch.core.pricing import PriceTable
    except Exception:  # pricing is another module's job; without it costs are just unknown
        return None
    try:
        from tokenwatch.config_file import read_config

        # The user's [prices.MODEL] overrides, as the supervisor prices with them.
        return PriceTable.load(read_config().prices)
    except Exception:  # an unreadable tokenwatch.toml must not cost the agent its totals
        try:
            return PriceTable.load()
        except Exception:
            return None


def rates_for(model: str) -> Rates | None:
    table = _price_table()
    if table is None or not model:
        return None
    try:
        found = table.lookup(model)
    except Exception:
        return None
    if found is None:
        return None
    rate_in = _rate(found, "input")
    rate_out = _rate(found, "output")
    if rate_in is None or rate_out is None:
        return None
    return Rates(
        input=rate_in,
        output=rate_out,
        cache_read=_rate(found, "cache_read", rate_in),
        cache_write=_rate(found, "cache_write", rate_in),
        reasoning=_rate(found, "reasoning"),
    )


def _rate(found: Any, name: str, default: float | None = None) -> Any:
    value = found.get(name) if isinstance(found, dict) else getattr(found, name, None)
    return default if value is None else float(value)


@dataclass(frozen=True, slots=True)
class Usage:
    """This process's usage so far (or one task's): tokens by kind, requests and cost.

    Tokens follow UsageEvent: `input_tokens` includes cached ones, `output_tokens` includes
    reasoning. Costs are USD; `cost_usd` is None until at least one call could be priced.
    `input_cost_usd` covers uncached input and cache writes, `cached_cost_usd` cache reads.
    """

    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    estimated_requests: int = 0
    """Calls whose tokens were counted locally because the provider gave no usage."""
    unpriced_requests: int = 0
    """Calls of a model with no known price (not in the cost figures)."""
    input_cost_usd: float = 0.0
    cached_cost_usd: float = 0.0
    output_cost_usd: float = 0.0
    models: dict[str, int] = field(default_factory=dict)
    """Requests per model."""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def cost_usd(self) -> float | None:
        if self.requests and self.unpriced_requests == self.requests:
            return None
        return self.input_cost_usd + self.cached_cost_usd + self.output_cost_usd

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "total_tokens": self.total_tokens,
            "estimated_requests": self.estimated_requests,
            "unpriced_requests": self.unpriced_requests,
            "input_cost_usd": self.input_cost_usd,
            "cached_cost_usd": self.cached_cost_usd,
            "output_cost_usd": self.output_cost_usd,
            "cost_usd": self.cost_usd,
            "models": dict(self.models),
        }

    def add(self, event: UsageEvent, rates: Rates | None) -> Usage:
        models = dict(self.models)
        models[event.model] = models.get(event.model, 0) + 1
        costs = _cost_split(event, rates)
        return replace(
            self,
            requests=self.requests + 1,
            errors=self.errors + (event.status != Status.OK.value),
            input_tokens=self.input_tokens + event.input_tokens,
            output_tokens=self.output_tokens + event.output_tokens,
            cache_read_tokens=self.cache_read_tokens + event.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens + event.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens + event.reasoning_tokens,
            estimated_requests=self.estimated_requests + event.estimated,
            unpriced_requests=self.unpriced_requests + (costs is None),
            input_cost_usd=self.input_cost_usd + (costs[0] if costs else 0.0),
            cached_cost_usd=self.cached_cost_usd + (costs[1] if costs else 0.0),
            output_cost_usd=self.output_cost_usd + (costs[2] if costs else 0.0),
            models=models,
        )


def _cost_split(event: UsageEvent, rates: Rates | None) -> tuple[float, float, float] | None:
    """(input incl. cache writes, cache reads, output) in USD, or None when the model is unpriced."""
    if event.cost_usd is not None and rates is None:
        return (event.cost_usd, 0.0, 0.0)
    if rates is None:
        return None
    uncached = max(0, event.input_tokens - event.cache_read_tokens - event.cache_write_tokens)
    output = event.output_tokens * rates.output
    if rates.reasoning is not None:
        reasoning = min(event.reasoning_tokens, event.output_tokens)
        output += reasoning * (rates.reasoning - rates.output)
    per = 1_000_000
    return (
        (uncached * rates.input + event.cache_write_tokens * rates.cache_write) / per,
        event.cache_read_tokens * rates.cache_read / per,
        output / per,
    )


_totals_lock = threading.Lock()
_totals: dict[str, Usage] = {}
_ALL = "\0all"


def usage(task: str | None = None) -> Usage:
    """Totals for every call this process made so far, or for one task's calls."""
    with _totals_lock:
        return _totals.get(_ALL if task is None else task, Usage())


def reset_usage() -> None:
    """Forget the totals (tests, or an agent that reports per phase)."""
    with _totals_lock:
        _totals.clear()


def record(event: UsageEvent, *, reservation: str = "", deliver: bool = True) -> None:
    """Count a finished call, log it, and send it to the supervisor unless `deliver` is False."""
    rates = rates_for(event.model)
    with _totals_lock:
        _totals[_ALL] = _totals.get(_ALL, Usage()).add(event, rates)
        if event.task:
            _totals[event.task] = _totals.get(event.task, Usage()).add(event, rates)
    _log(event, _cost_split(event, rates))
    if not deliver:
        return
    rep = session.reporter()
    if reservation:
        rep.send_nowait("settle", reservation=reservation, event=wire_event(event))
    else:
        rep.send_nowait("usage", event=wire_event(event))


_EVENT_FIELDS = UsageEvent.field_names()


def wire_event(event: UsageEvent) -> dict[str, Any]:
    """The event as a message field; every field is a scalar, so no deep copy (asdict) is needed."""
    return {name: getattr(event, name) for name in _EVENT_FIELDS}


def _log(event: UsageEvent, costs: tuple[float, float, float] | None) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    cost = f"${sum(costs):.6f}" if costs is not None else "cost unknown"
    log.info(
        "tokenwatch: %s %s %s: %d in (%d cached) + %d out tokens%s, %s%s",
        event.provider or "?",
        event.model or "?",
        event.endpoint or "call",
        event.input_tokens,
        event.cache_read_tokens,
        event.output_tokens,
        " (estimated)" if event.estimated else "",
        cost,
        f" [task {event.task}]" if event.task else "",
    )


def new_event(**fields: Any) -> UsageEvent:
    """A UsageEvent with this process's identity and current task filled in."""
    ident = session.identity()
    base: dict[str, Any] = {
        "agent": ident.name,
        "run_id": ident.run_id,
        "pid": ident.pid,
        "session": ident.session,
        "user": ident.user,
        "task": current_task(),
        "source": Source.SDK.value,
    }
    base.update(fields)
    return UsageEvent(**base)


def report(
    *,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cache_read_tokens: int = 0,
    cache_write_tokens: int = 0,
    reasoning_tokens: int = 0,
    provider: str = "",
    endpoint: str = "",
    latency_ms: float | None = None,
    ttft_ms: float | None = None,
    status: str = Status.OK.value,
    http_status: int | None = None,
    prompt_hash: str = "",
    cost_usd: float | None = None,
    estimated: bool = False,
    task: str | None = None,
    call_id: str = "",
    ts: float | None = None,
) -> UsageEvent:
    """Report one call made with any provider; tokens normalised as UsageEvent says.

    `input_tokens` must include cache reads and writes (for Anthropic: input_tokens +
    cache_read_input_tokens + cache_creation_input_tokens), `output_tokens` reasoning.
    Never raises for a supervisor that is absent; returns the event as sent.
    """
    _check_counts(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read_tokens,
        cache_write_tokens=cache_write_tokens,
        reasoning_tokens=reasoning_tokens,
    )
    import uuid

    event = new_event(
        ts=time.time() if ts is None else ts,
        provider=provider,
        model=model,
        endpoint=endpoint,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read_tokens,
        cache_write_tokens=cache_write_tokens,
        reasoning_tokens=reasoning_tokens,
        latency_ms=latency_ms,
        ttft_ms=ttft_ms,
        status=status,
        http_status=http_status,
        prompt_hash=prompt_hash,
        cost_usd=cost_usd,
        estimated=estimated,
        call_id=call_id or str(uuid.uuid4()),
    )
    if task is not None:
        event.task = task
    record(event)
    return event


def _check_counts(**counts: int) -> None:
    # A programming error in the caller's report() call: say so at once, before anything is counted.
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"tokenwatch.report: {name} must be a non-negative int, got {value!r}")
        if value > MAX_CALL_TOKENS:
            raise ValueError(f"tokenwatch.report: {over_call_limit(name, value)}")
    cache_read, cache_write = counts["cache_read_tokens"], counts["cache_write_tokens"]
    if cache_read + cache_write > counts["input_tokens"]:
        raise ValueError(
            "tokenwatch.report: input_tokens must include cache reads and writes "
            f"({cache_read} + {cache_write} > {counts['input_tokens']})"
        )

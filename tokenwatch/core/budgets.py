"""Budgets: scope x period x limit x action; reserve before a call, settle after, warn once per period."""

from __future__ import annotations

import bisect
import datetime as dt
import fnmatch
import itertools
import logging
import math
import shlex
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from tokenwatch.config import BudgetSettings, ConfigError
from tokenwatch.core.admission import CallRequest, Refusal, Reservation, Signal
from tokenwatch.core.models import (
    MAX_CLOCK_SKEW,
    ActionKind,
    Alert,
    BudgetStatus,
    Severity,
    UsageEvent,
)
from tokenwatch.core.periods import ALL_PERIODS, CALENDAR_PERIODS, ROLLING_SECONDS, period_end, zone
from tokenwatch.core.periods import period_start as calendar_start
from tokenwatch.core.pricing import ESTIMATED, is_estimated
from tokenwatch.core.quantities import (
    Amount,
    QuantityError,
    Unit,
    format_tokens,
    format_usd,
    parse_amount,
    parse_rate,
)

log = logging.getLogger(__name__)

SCOPES: Final = ("global", "agent", "task", "model", "user", "tag")
ACTIONS: Final = ("alert", "throttle", "pause", "kill", "deny")
HARD_ACTIONS: Final = frozenset({"pause", "kill", "deny"})
"""Budgets that refuse a call which would take them over the limit (the others only warn or slow)."""
MAX_KEYS_SHOWN: Final = 20
"""Counters reported per budget (a glob budget keeps one per agent/model/...), most recent first."""
MIN_FORECAST_SPAN: Final = 60.0
"""Seconds of history below which a burn rate is not trusted for a forecast."""
DEFAULT_THROTTLE_RATE: Final = "50%"
UNPRICED_MODES: Final = ("estimate", "free")
"""How a dollar budget counts calls to models no price table knows (see BudgetSettings)."""
RUN_BUDGET_PREFIX: Final = "run:"
"""Names kept for the budgets of `tokenwatch run --budget` (they live and end with their run)."""


class BudgetError(ConfigError):
    """A budget that cannot be used; the message names it and says what is wrong."""


def budget_name(settings: BudgetSettings) -> str:
    """The budget's name: its own, or `SCOPE:TARGET:PERIOD`."""
    return settings.name or f"{settings.scope}:{settings.target}:{settings.period}"


def run_budget_name(agent: str) -> str:
    """The name of the budget an agent's `tokenwatch run --budget` gave it."""
    return f"{RUN_BUDGET_PREFIX}{agent}"


def is_run_budget(name: str) -> bool:
    return name.startswith(RUN_BUDGET_PREFIX)


def check_budget(settings: BudgetSettings) -> Amount:
    """The budget's limit, after checking scope, period, action and thresholds; raises BudgetError."""
    name = budget_name(settings)
    if not name.isprintable():  # it is shown in tables, alerts and commands to copy
        raise BudgetError(f"budget {name!r}: a name cannot hold control characters")
    if settings.scope not in SCOPES:
        raise BudgetError(f"budget {name}: unknown scope {settings.scope!r} ({', '.join(SCOPES)})")
    if settings.period not in ALL_PERIODS:
        raise BudgetError(
            f"budget {name}: unknown period {settings.period!r} ({', '.join(ALL_PERIODS)})"
        )
    if settings.action not in ACTIONS:
        raise BudgetError(
            f"budget {name}: unknown action {settings.action!r} ({', '.join(ACTIONS)})"
        )
    if settings.rolling and settings.period not in ROLLING_SECONDS:
        raise BudgetError(f"budget {name}: a {settings.period} period cannot be rolling")
    if any(not 0 < w <= 100 for w in settings.warn):
        raise BudgetError(f"budget {name}: warn thresholds must be percentages from 1 to 100")
    if settings.unpriced not in UNPRICED_MODES:
        raise BudgetError(
            f"budget {name}: unpriced must be one of {', '.join(UNPRICED_MODES)}, "
            f"not {settings.unpriced!r}"
        )
    if settings.scope == "tag":
        _check_tag_target(name, settings.target)
    try:
        amount = parse_amount(settings.limit)
        parse_rate(settings.rate or DEFAULT_THROTTLE_RATE)
    except QuantityError as exc:
        raise BudgetError(f"budget {name}: {exc}") from None
    if amount.value <= 0:
        raise BudgetError(f"budget {name}: the limit must be above zero")
    return amount


def _check_tag_target(name: str, target: str) -> None:
    """A tag budget names the tag (`team`) and may pick its value (`team=ml`, `team=ml*`); the
    tag's name is matched exactly, so a glob there (the default `*`) would match nothing."""
    key = target.partition("=")[0]
    if not key or any(c in key for c in "*?["):
        raise BudgetError(
            f"budget {name}: a tag budget's target is KEY or KEY=VALUE (like team=ml), "
            f"not {target!r}"
        )


@dataclass(slots=True)
class _Counter:
    """Usage of one budget for one key (agent, model, ...) in its current period."""

    start: float
    used: float = 0.0
    reserved: float = 0.0
    fired: set[int] = field(default_factory=set)
    first_ts: float | None = None
    last_ts: float = 0.0
    exhausted_at: float | None = None
    estimated: float = 0.0
    """The part of `used` priced at the fallback's rates (a model no table knows)."""
    estimated_from: str = ""
    """The fallback model of the latest such call."""
    recent: deque[tuple[float, float, float]] = field(default_factory=deque)
    """(ts, amount, estimated part) still inside a rolling window."""


class _Budget:
    """One configured (or ephemeral) budget and its counters."""

    def __init__(self, settings: BudgetSettings, tz: dt.tzinfo, *, start: float = 0.0) -> None:
        amount = check_budget(settings)
        self.settings = settings
        self.name = budget_name(settings)
        self.limit = amount.value
        self.unit = amount.unit
        self.tz = tz
        self.origin = start
        """Usage before this time never counts (ephemeral `run --budget` budgets)."""
        self.warn = sorted({int(w) for w in settings.warn})
        self.counters: dict[str, _Counter] = {}
        self.counted_live: set[str] | None = None
        """While its past is being counted in (`Budgets.seed`): the calls it counted meanwhile."""

    @property
    def scope(self) -> str:
        return self.settings.scope

    @property
    def period(self) -> str:
        return self.settings.period

    def same_measure(self, other: _Budget) -> bool:
        """True when `other` counts the same usage, so its counters can be kept on reload."""
        a, b = self.settings, other.settings
        return (a.scope, a.target, a.period, a.rolling, self.unit) == (
            b.scope,
            b.target,
            b.period,
            b.rolling,
            other.unit,
        )

    # -- matching ---------------------------------------------------------------------------

    def key_for(
        self, agent: str, task: str, model: str, user: str, tags: Mapping[str, str]
    ) -> str | None:
        """The counter a call counts toward, or None when the budget does not cover it."""
        key = self._scope_key(agent, task, model, user, tags)
        if key is None:
            return None
        if self.period == "task":
            if not task:
                return None
            return f"{key}/{task}" if key and self.scope != "task" else task
        return key

    def _scope_key(
        self, agent: str, task: str, model: str, user: str, tags: Mapping[str, str]
    ) -> str | None:
        target = self.settings.target or "*"
        if self.scope == "global":
            return ""
        if self.scope == "tag":
            return "" if _tags_match(target, tags) else None
        value = {"agent": agent, "task": task, "model": model, "user": user}[self.scope]
        if value and fnmatch.fnmatchcase(value, target):
            return value
        return None

    def amount(self, tokens: float, usd: float | None, estimated: bool = False) -> float:
        if self.unit is Unit.USD:
            if estimated and self.settings.unpriced == "free":
                return 0.0  # the behaviour chosen for this budget: unknown models count $0
            return usd or 0.0
        return float(tokens)

    # -- periods ----------------------------------------------------------------------------

    def period_start(self, ts: float) -> float:
        if self.period in CALENDAR_PERIODS and not self.settings.rolling:
            return calendar_start(ts, self.period, self.tz)
        return self.origin

    def resets_at(self, now: float) -> float | None:
        if self.period in CALENDAR_PERIODS and not self.settings.rolling:
            return period_end(now, self.period, self.tz)
        return None

    def counter(self, key: str, ts: float) -> _Counter | None:
        """The key's counter for the period containing `ts`; None for a period already over."""
        start = self.period_start(ts)
        c = self.counters.get(key)
        if c is None:
            c = self.counters[key] = _Counter(start)
        elif start > c.start:
            c.start, c.used, c.first_ts, c.exhausted_at = start, 0.0, None, None
            c.estimated, c.estimated_from = 0.0, ""
            c.fired.clear()
        elif start < c.start:
            return None
        if self.settings.rolling:
            self._expire(c, ts)
        return c

    def _expire(self, c: _Counter, now: float) -> None:
        horizon = now - ROLLING_SECONDS[self.period]
        while c.recent and c.recent[0][0] <= horizon:
            _, amount, estimated = c.recent.popleft()
            c.used -= amount
            c.estimated -= estimated
        if not c.recent:
            c.used, c.first_ts, c.estimated = 0.0, None, 0.0
            c.fired.clear()

    def add(self, c: _Counter, amount: float, ts: float, estimated_from: str = "") -> None:
        """Count `amount` at `ts`; `estimated_from` names the fallback model that priced it."""
        latest = c.last_ts  # usage read in from the ledger can be older than live calls
        estimated = amount if estimated_from and self.unit is Unit.USD else 0.0
        c.used += amount
        c.estimated += estimated
        c.estimated_from = estimated_from or c.estimated_from
        c.last_ts = max(c.last_ts, ts)
        c.first_ts = ts if c.first_ts is None else min(c.first_ts, ts)
        if self.settings.rolling:
            entry = (ts, amount, estimated)
            if c.recent and ts < c.recent[-1][0]:
                bisect.insort(c.recent, entry)  # older usage read in after live calls
            else:
                c.recent.append(entry)
        if c.exhausted_at is None and c.used >= self.limit:
            c.exhausted_at = max(ts, latest)  # the limit is reached by the latest call, in time

    # -- words --------------------------------------------------------------------------------

    def show(self, value: float) -> str:
        return format_usd(value) if self.unit is Unit.USD else f"{format_tokens(value)} tokens"

    def show_used(self, c: _Counter) -> str:
        """The counter's usage, saying how much of it is a fallback estimate."""
        if c.estimated <= 0:
            return self.show(c.used)
        return (
            f"{self.show(c.used)}, {self.show(c.estimated)} of it at an estimated price "
            f"(price: estimated from {c.estimated_from})"
        )

    def per(self) -> str:
        if self.period == "request":
            return "per call"
        if self.period == "total":
            return "in total"
        if self.settings.rolling:
            return f"per rolling {self.period}"
        return f"per {self.period}"

    def raise_hint(self, key: str, needed: float = 0.0) -> str:
        """The command that raises this budget: to double its limit, or more when the call
        refused `needed` more than that (so the suggestion lets it go)."""
        s = self.settings
        scope = s.scope if s.scope == "global" else f"{s.scope}:{s.target}"
        raised = Amount(max(self.limit * 2, _round_up(needed, self.unit)), self.unit)
        words = ["tokenwatch", "budget", "set", scope, str(raised), "--period", s.period]
        if self.name != f"{s.scope}:{s.target}:{s.period}":
            words += ["--name", self.name]
        return shlex.join(words)


_DONE: Final = {
    "alert": "",
    "throttle": "; throttled",
    "pause": "; paused",
    "kill": "; stopped",
    "deny": "; its calls are refused",
}
"""What a budget's action did, as its alert says it."""


def _tags_match(target: str, tags: Mapping[str, str]) -> bool:
    """`team=ml` (value may be a glob) or `team` (the tag is present)."""
    name, eq, pattern = target.partition("=")
    if name not in tags:
        return False
    return not eq or fnmatch.fnmatchcase(tags[name], pattern)


@dataclass(frozen=True, slots=True)
class _Hold:
    budget: str
    key: str
    amount: float


class Budgets:
    """Every budget in force: admission (reserve, settle, release), usage, warnings and status.

    Implements `admission.BudgetBook`. Synchronous and single-threaded: the engine calls it from
    its event loop; time comes from `clock` so tests and `rules test` replay histories.
    """

    def __init__(
        self,
        settings: Sequence[BudgetSettings],
        *,
        tz: str = "local",
        clock: Callable[[], float] = time.time,
    ) -> None:
        try:
            self._tz = zone(tz)
        except QuantityError as exc:
            raise BudgetError(f"[supervisor] timezone: {exc}") from None
        self._clock = clock
        self._ids = itertools.count(1)
        self._budgets: dict[str, _Budget] = {}
        self._ephemeral: dict[str, _Budget] = {}
        self._holds: dict[str, list[_Hold]] = {}
        self._tags: dict[str, dict[str, str]] = {}
        self._pending: list[Signal] = []
        self.replace(settings)

    # -- configuration --------------------------------------------------------------------------

    def replace(self, settings: Sequence[BudgetSettings]) -> list[str]:
        """Hot reload: new limits apply at once; usage and reservations of unchanged budgets stay.
        Returns the budgets that start empty (new, or now measuring something else): `seed` them
        so they count what the ledger already holds for their period."""
        fresh: dict[str, _Budget] = {}
        empty: list[str] = []
        for s in settings:
            budget = _Budget(s, self._tz)
            if is_run_budget(budget.name):
                raise BudgetError(
                    f"budget {budget.name}: names starting with {RUN_BUDGET_PREFIX} are kept for "
                    "the budgets of `tokenwatch run --budget`"
                )
            if budget.name in fresh:
                raise BudgetError(f"two budgets are named {budget.name!r}; give one a --name")
            old = self._budgets.get(budget.name)
            if old is not None and old.same_measure(budget):
                budget.counters = old.counters
                budget.counted_live = old.counted_live  # a seed under way goes on for it
                _forget_passed_thresholds(budget)
            elif budget.period != "request":
                empty.append(budget.name)
            fresh[budget.name] = budget
        self._budgets = fresh
        return empty

    def add_ephemeral(self, settings: BudgetSettings, *, start: float) -> None:
        """A budget for one run (`tokenwatch run --budget`): counts usage from `start` on."""
        budget = _Budget(settings, self._tz, start=start)
        self._ephemeral[budget.name] = budget

    def remove_ephemeral(self, name: str) -> bool:
        """Forget a run's budget; False when there was none of that name."""
        return self._ephemeral.pop(name, None) is not None

    def set_run_limit(self, name: str, limit: str) -> BudgetStatus:
        """Change the limit of a run's budget in place (its usage so far stays counted); raises
        BudgetError when no running agent has a budget of that name."""
        old = self._ephemeral.get(name)
        if old is None:
            raise BudgetError(f"no agent running now has a run budget named {name}")
        changed = _Budget(replace(old.settings, limit=limit), self._tz, start=old.origin)
        if changed.unit is not old.unit:
            raise BudgetError(f"budget {name} counts {old.unit}: give a limit in {old.unit}")
        changed.counters = old.counters
        changed.counted_live = old.counted_live
        _forget_passed_thresholds(changed)
        self._ephemeral[name] = changed
        return next(s for s in self.statuses() if s.name == name)

    def note_tags(self, agent: str, tags: Mapping[str, str]) -> None:
        """Remember an agent's tags so tag budgets cover its usage reported without a call."""
        if tags:
            self._tags[agent] = dict(tags)

    def _all(self) -> Iterator[_Budget]:
        yield from self._budgets.values()
        yield from self._ephemeral.values()

    def _get(self, name: str) -> _Budget | None:
        return self._budgets.get(name) or self._ephemeral.get(name)

    # -- admission ------------------------------------------------------------------------------

    def reserve(
        self, call: CallRequest, tokens: int, usd: float | None, estimated_from: str = ""
    ) -> Reservation | Refusal:
        """Hold what the call may use against every budget covering it, or refuse it.
        `estimated_from` names the fallback model when no price table knows the call's."""
        now = self._clock()
        self.note_tags(call.agent, call.tags)
        tags = call.tags or self._tags.get(call.agent, {})
        planned: list[tuple[_Budget, str, _Counter | None, float]] = []
        for budget in self._all():
            key = budget.key_for(call.agent, call.task, call.model, call.user, tags)
            if key is None:
                continue
            amount = budget.amount(tokens, usd, bool(estimated_from))
            c = None if budget.period == "request" else budget.counter(key, now)
            refusal = self._check(budget, key, c, amount, call.agent, now, estimated_from)
            if refusal is not None:
                return refusal
            planned.append((budget, key, c, amount))
        holds: list[_Hold] = []
        for budget, key, c, amount in planned:
            if c is not None:
                c.reserved += amount
                holds.append(_Hold(budget.name, key, amount))
        rid = f"b{next(self._ids)}"
        self._holds[rid] = holds
        names = tuple(dict.fromkeys(h.budget for h in holds))
        return Reservation(id=rid, tokens=tokens, usd=usd or 0.0, budgets=names)

    def _check(
        self,
        budget: _Budget,
        key: str,
        c: _Counter | None,
        amount: float,
        agent: str,
        now: float,
        estimated_from: str = "",
    ) -> Refusal | None:
        if budget.settings.action not in HARD_ACTIONS or amount <= 0:
            return None
        used = 0.0 if c is None else c.used
        reserved = 0.0 if c is None else c.reserved
        if used + reserved + amount <= budget.limit:
            return None
        whose = f" for {key}" if key else ""
        why = f"{budget.show_used(c)} used, " if c is not None else ""
        if reserved > 0:
            why += f"{budget.show(reserved)} in flight, "
        why += f"this call may use {budget.show(amount)}"
        if estimated_from and budget.unit is Unit.USD:
            why += f" (price: estimated from {estimated_from})"
        message = (
            f"budget {budget.name} ({budget.show(budget.limit)} {budget.per()}{whose}) would be "
            f"exceeded: {why}. Raise it with `{budget.raise_hint(key, used + reserved + amount)}`"
        )
        if c is not None and used + amount > budget.limit:
            # Even with nothing in flight the call would not fit: the budget is spent for this
            # agent, so its action is due (refusals caused only by calls in flight are not).
            # Its alert says what the refused call was told, word for word.
            self._limit_reached(budget, c, agent, now, message)
        return Refusal(budget.name, message, self._retry_after(budget, c, now))

    def _retry_after(self, budget: _Budget, c: _Counter | None, now: float) -> float | None:
        resets = budget.resets_at(now)
        if resets is not None:
            return max(0.0, resets - now)
        if budget.settings.rolling and c is not None and c.recent:
            return max(0.0, c.recent[0][0] + ROLLING_SECONDS[budget.period] - now)
        return None

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation for a call that never went (or before settling it)."""
        for hold in self._holds.pop(reservation.id, []):
            budget = self._get(hold.budget)
            c = budget.counters.get(hold.key) if budget is not None else None
            if c is not None:
                c.reserved = max(0.0, c.reserved - hold.amount)

    def settle(self, reservation: Reservation | None, event: UsageEvent) -> list[Signal]:
        """Replace the reservation with the call's real usage; warnings and limit actions due."""
        if reservation is not None:
            self.release(reservation)
        return self.record(event)

    def signals_nowait(self) -> list[Signal]:
        """Limit actions due from refusals since the last call (also returned by the next
        settle or record), so a pause budget pauses the agent it stopped."""
        pending, self._pending = self._pending, []
        return pending

    # -- usage ----------------------------------------------------------------------------------

    def record(self, event: UsageEvent) -> list[Signal]:
        """Count usage (reserved or not); returns warnings and limit actions that became due."""
        signals = self.signals_nowait()
        self._count(event, signals)
        return signals

    def _count(
        self,
        event: UsageEvent,
        signals: list[Signal] | None,
        seeding: Collection[_Budget] | None = None,
    ) -> None:
        if event.ts > self._clock() + MAX_CLOCK_SKEW:
            return  # from a ledger written before such times were refused: no period has it
        tags = self._tags.get(event.agent, {})
        estimated = is_estimated(event.price_source)
        estimated_from = event.price_source.removeprefix(ESTIMATED) if estimated else ""
        for budget in self._all() if seeding is None else seeding:
            if event.ts < budget.origin:
                continue
            if budget.counted_live is not None:
                if seeding is not None and event.call_id in budget.counted_live:
                    continue  # counted live while its past was being read
                if seeding is None and event.call_id:
                    budget.counted_live.add(event.call_id)
            key = budget.key_for(event.agent, event.task, event.model, event.user, tags)
            if key is None:
                continue
            amount = budget.amount(event.total_tokens, event.cost_usd, estimated)
            if budget.period == "request":
                if signals is not None and amount > budget.limit:
                    signals.append(self._over_request(budget, key, event, amount))
                continue
            c = budget.counter(key, event.ts)
            if c is None:
                continue
            before = c.used
            budget.add(c, amount, event.ts, estimated_from if amount else "")
            if seeding is not None and budget.counted_live is not None:
                continue  # an edit's catch-up: thresholds it passes warn on the next live call
            due = [w for w in budget.warn if w not in c.fired and c.used >= budget.limit * w / 100]
            c.fired.update(due)
            if c.used >= budget.limit and 100 not in c.fired:
                c.fired.add(100)
                due.append(100)
            if signals is not None and due and c.used > before:
                signals.append(self._threshold(budget, key, c, event.agent, max(due)))

    async def seed(self, store: Any, only: Collection[str] | None = None) -> None:
        """Count usage already in the ledger for the current periods: into every budget at start
        (no warnings re-fired), or into `only`, configured budgets that `replace` left empty,
        after an edit. Those then warn and act on their next call if they are past a threshold
        already; calls counted live while the ledger is read are not counted twice."""
        if only is None:
            budgets = list(self._all())
        else:
            budgets = [b for b in self._budgets.values() if b.name in only]
        since = self.counting_since(self._clock(), budgets)
        if since is None:
            return
        tracking: set[str] | None = None if only is None else set()
        for budget in budgets:
            budget.counted_live = tracking
        try:
            if tracking is not None and hasattr(store, "flush"):
                await store.flush()  # calls counted before the edit are in the ledger
            async for event in store.iter_events(since=since):
                self._count(event, None, seeding=self._current(budgets))
        finally:
            for budget in [*budgets, *self._all()]:
                if budget.counted_live is tracking:
                    budget.counted_live = None

    def _current(self, budgets: list[_Budget]) -> list[_Budget]:
        """The budgets being seeded as they are now: an edit midway replaces the objects (with
        the same counters when it kept their measure); its limits are the ones that count."""
        now = []
        for budget in budgets:
            current = self._budgets.get(budget.name)
            now.append(
                current if current is not None and current.counters is budget.counters else budget
            )
        return now

    def warm_up(self, event: UsageEvent) -> None:
        """Count usage from before the time of interest, silently (seeding, replay warm-up)."""
        self._count(event, None)

    def counting_since(
        self, now: float, budgets: Collection[_Budget] | None = None
    ) -> float | None:
        """The earliest time whose usage counts toward some budget at `now` (None: no budget)."""
        starts: list[float] = []
        for budget in self._all() if budgets is None else budgets:
            if budget.period == "request":
                continue
            if budget.settings.rolling:
                starts.append(now - ROLLING_SECONDS[budget.period])
            else:
                starts.append(budget.period_start(now))
        return min(starts) if starts else None

    # -- signals --------------------------------------------------------------------------------

    def _threshold(self, budget: _Budget, key: str, c: _Counter, agent: str, pct: int) -> Signal:
        now = self._clock()
        if pct >= 100:
            return self._limit_signal(budget, key, c, agent, now)
        share = f"{c.used / budget.limit:.0%}"
        resets = _when(budget.resets_at(now), self._tz, now)
        message = (
            f"{agent} has used {share} of budget {budget.name} "
            f"({budget.show_used(c)} of {budget.show(budget.limit)} {budget.per()})"
            + (f"; resets {resets}" if resets else "")
        )
        severity = Severity.WARNING if pct >= 80 else Severity.INFO
        alert = Alert(f"budget:{budget.name}", agent, message, severity.value, ts=now)
        return Signal(alert=alert, action=ActionKind.ALERT.value, agent=agent)

    def _limit_reached(
        self, budget: _Budget, c: _Counter, agent: str, now: float, refusal: str
    ) -> None:
        if 100 in c.fired:
            return
        c.fired.add(100)
        action = budget.settings.action
        message = f"{agent}: {refusal}{_DONE[action]}"
        self._pending.append(self._action_signal(budget, agent, now, message))

    def _limit_signal(
        self, budget: _Budget, key: str, c: _Counter, agent: str, now: float
    ) -> Signal:
        action = budget.settings.action
        resets = _when(budget.resets_at(now), self._tz, now)
        until = f" until it resets {resets} or is raised" if resets else " until it is raised"
        hint = budget.raise_hint(key, c.used)
        message = (
            f"{agent} reached budget {budget.name} "
            f"({budget.show_used(c)} of {budget.show(budget.limit)} {budget.per()})"
            f"{_DONE[action]}"
            + (f"{until} (`{hint}`)" if action != "alert" else "")
            + (f"; raise it with `{hint}`" if action == "alert" else "")
        )
        return self._action_signal(budget, agent, now, message)

    def _action_signal(self, budget: _Budget, agent: str, now: float, message: str) -> Signal:
        action = budget.settings.action
        # deny is enforced by reserve() per budget; denying the whole agent would also block
        # calls this budget does not cover, so the engine is only told to alert.
        act = ActionKind.ALERT.value if action in ("alert", "deny") else action
        alert = Alert(f"budget:{budget.name}", agent, message, Severity.CRITICAL.value, action, now)
        rate = budget.settings.rate or DEFAULT_THROTTLE_RATE
        return Signal(alert=alert, action=act, agent=agent, rate=rate if act == "throttle" else "")

    def _over_request(self, budget: _Budget, key: str, event: UsageEvent, amount: float) -> Signal:
        message = (
            f"{event.agent} made one call using {budget.show(amount)}, over budget "
            f"{budget.name} ({budget.show(budget.limit)} per call)"
        )
        alert = Alert(
            f"budget:{budget.name}", event.agent, message, Severity.WARNING.value, ts=self._clock()
        )
        return Signal(alert=alert, action=ActionKind.ALERT.value, agent=event.agent)

    # -- status ---------------------------------------------------------------------------------

    def statuses(self) -> list[BudgetStatus]:
        """Where every budget stands now: one row per budget, or per key for a glob budget."""
        now = self._clock()
        rows: list[BudgetStatus] = []
        for budget in self._all():
            rows.extend(self._status(budget, now))
        return rows

    def _status(self, budget: _Budget, now: float) -> list[BudgetStatus]:
        live: list[tuple[str, _Counter]] = []
        for key in list(budget.counters):
            c = budget.counter(key, now)
            if c is not None and (c.used > 0 or c.reserved > 0):
                live.append((key, c))
        live.sort(key=lambda kc: -kc[1].last_ts)
        if not live:
            return [self._row(budget, budget.settings.target or "*", None, now)]
        return [self._row(budget, key, c, now) for key, c in live[:MAX_KEYS_SHOWN]]

    def _row(self, budget: _Budget, key: str, c: _Counter | None, now: float) -> BudgetStatus:
        resets = budget.resets_at(now)
        return BudgetStatus(
            name=budget.name,
            scope=budget.scope,
            target=key or budget.settings.target or "*",
            period=budget.period,
            limit=budget.limit,
            unit=budget.unit.value,
            used=c.used if c is not None else 0.0,
            action=budget.settings.action,
            resets_at=resets,
            forecast_exhausted_at=_forecast(budget, c, now, resets),
            estimated_usd=c.estimated if c is not None else 0.0,
            estimated_from=c.estimated_from if c is not None else "",
        )


def _round_up(value: float, unit: Unit) -> float:
    """`value` rounded up to two significant digits (whole tokens): a limit that reads well."""
    if value <= 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(value)) - 1)
    if unit is Unit.TOKENS:
        step = max(step, 1.0)
    return math.ceil(value / step - 1e-9) * step


def _forget_passed_thresholds(budget: _Budget) -> None:
    """After a limit change, thresholds no longer reached may fire again."""
    for c in budget.counters.values():
        c.fired = {w for w in c.fired if c.used >= budget.limit * w / 100}
        if c.used < budget.limit:
            c.exhausted_at = None


def _forecast(
    budget: _Budget, c: _Counter | None, now: float, resets: float | None
) -> float | None:
    """When the budget runs out at the burn rate seen so far this period (None: not before reset)."""
    if c is None or c.used <= 0 or c.first_ts is None:
        return None
    if c.used >= budget.limit:
        return c.exhausted_at if c.exhausted_at is not None else now
    span = now - c.first_ts
    if span < MIN_FORECAST_SPAN:
        return None
    eta = now + (budget.limit - c.used) * span / c.used
    if resets is not None and eta >= resets:
        return None
    return eta


def _when(ts: float | None, tz: dt.tzinfo, now: float) -> str:
    """`at 00:00` today-ish, or `on 2026-12-01 00:00` further away."""
    if ts is None:
        return ""
    moment = dt.datetime.fromtimestamp(ts, tz)
    if ts - now < 86400:
        return f"at {moment:%H:%M}"
    return f"on {moment:%Y-%m-%d %H:%M}"

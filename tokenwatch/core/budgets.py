"""Budgets: scope x period x limit x action; reserve before a call, settle after, warn once per period."""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from tokenwatch.config import BudgetSettings
from tokenwatch.core.actions import HARD_ACTIONS
from tokenwatch.core.admission import CallRequest, Refusal, Reservation, Signal
from tokenwatch.core.budget import (
    DEFAULT_THROTTLE_RATE,
    DONE,
    RUN_BUDGET_PREFIX,
    Budget,
    BudgetError,
    Counter,
    budget_name,
    check_budget,
    is_run_budget,
    run_budget_name,
)
from tokenwatch.core.models import (
    MAX_CLOCK_SKEW,
    ActionKind,
    Alert,
    BudgetStatus,
    Severity,
    UsageEvent,
)
from tokenwatch.core.periods import ROLLING_SECONDS, zone
from tokenwatch.core.pricing import ESTIMATED, is_estimated
from tokenwatch.core.quantities import QuantityError, Unit

__all__ = [
    "BudgetError",
    "Budgets",
    "budget_name",
    "check_budget",
    "is_run_budget",
    "run_budget_name",
]

log = logging.getLogger(__name__)

MAX_KEYS_SHOWN: Final = 20
"""Counters reported per budget (a glob budget keeps one per agent/model/...), most recent first."""
FORECAST_IDLE: Final = 600.0
"""Seconds without spending (at least) after which a budget is not forecast to run out."""
MIN_FORECAST_SPAN: Final = 60.0
"""Seconds of history below which a burn rate is not trusted for a forecast."""


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
        self._budgets: dict[str, Budget] = {}
        self._ephemeral: dict[str, Budget] = {}
        self._holds: dict[str, list[_Hold]] = {}
        self._tags: dict[str, dict[str, str]] = {}
        self._pending: list[Signal] = []
        self.replace(settings)

    # -- configuration --------------------------------------------------------------------------

    def replace(self, settings: Sequence[BudgetSettings]) -> list[str]:
        """Hot reload: new limits apply at once; usage and reservations of unchanged budgets stay.
        Returns the budgets that start empty (new, or now measuring something else): `seed` them
        so they count what the ledger already holds for their period."""
        fresh: dict[str, Budget] = {}
        empty: list[str] = []
        for s in settings:
            budget = Budget(s, self._tz)
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
        budget = Budget(settings, self._tz, start=start)
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
        changed = Budget(replace(old.settings, limit=limit), self._tz, start=old.origin)
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

    def _all(self) -> Iterator[Budget]:
        yield from self._budgets.values()
        yield from self._ephemeral.values()

    def _get(self, name: str) -> Budget | None:
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
        planned: list[tuple[Budget, str, Counter | None, float]] = []
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
        budget: Budget,
        key: str,
        c: Counter | None,
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
        why = f"{budget.show(used)} used{budget.estimate_words(c)}, " if c is not None else ""
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

    def _retry_after(self, budget: Budget, c: Counter | None, now: float) -> float | None:
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
        seeding: Collection[Budget] | None = None,
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

    def _current(self, budgets: list[Budget]) -> list[Budget]:
        """The budgets being seeded as they are now: an edit midway replaces the objects (with
        the same counters when it kept their measure); its limits are the ones that count."""
        now = []
        for budget in budgets:
            current = self._budgets.get(budget.name)
            now.append(
                current if current is not None and current.counters is budget.counters else budget
            )
        return now

    def counting_since(self, now: float, budgets: Collection[Budget] | None = None) -> float | None:
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

    def _threshold(self, budget: Budget, key: str, c: Counter, agent: str, pct: int) -> Signal:
        now = self._clock()
        if pct >= 100:
            return self._limit_signal(budget, key, c, agent, now)
        share = f"{c.used / budget.limit:.0%}"
        resets = _when(budget.resets_at(now), self._tz, now)
        message = (
            f"{agent} has used {share} of budget {budget.name} "
            f"({budget.show(c.used)} of {budget.show(budget.limit)} {budget.per()}"
            f"{budget.estimate_words(c)})" + (f"; resets {resets}" if resets else "")
        )
        severity = Severity.WARNING if pct >= 80 else Severity.INFO
        alert = Alert(f"budget:{budget.name}", agent, message, severity.value, ts=now)
        return Signal(alert=alert, action=ActionKind.ALERT.value, agent=agent)

    def _limit_reached(
        self, budget: Budget, c: Counter, agent: str, now: float, refusal: str
    ) -> None:
        if 100 in c.fired:
            return
        c.fired.add(100)
        action = budget.settings.action
        message = f"{agent}: {refusal}{DONE[action]}"
        self._pending.append(self._action_signal(budget, agent, now, message))

    def _limit_signal(self, budget: Budget, key: str, c: Counter, agent: str, now: float) -> Signal:
        action = budget.settings.action
        resets = _when(budget.resets_at(now), self._tz, now)
        until = f" until it resets {resets} or is raised" if resets else " until it is raised"
        hint = budget.raise_hint(key, c.used)
        message = (
            f"{agent} reached budget {budget.name} "
            f"({budget.show(c.used)} of {budget.show(budget.limit)} {budget.per()}"
            f"{budget.estimate_words(c)})"
            f"{DONE[action]}"
            + (f"{until} (`{hint}`)" if action != "alert" else "")
            + (f"; raise it with `{hint}`" if action == "alert" else "")
        )
        return self._action_signal(budget, agent, now, message)

    def _action_signal(self, budget: Budget, agent: str, now: float, message: str) -> Signal:
        action = budget.settings.action
        # deny is enforced by reserve() per budget; denying the whole agent would also block
        # calls this budget does not cover, so the engine is only told to alert.
        act = ActionKind.ALERT.value if action in ("alert", "deny") else action
        alert = Alert(f"budget:{budget.name}", agent, message, Severity.CRITICAL.value, action, now)
        rate = budget.settings.rate or DEFAULT_THROTTLE_RATE
        return Signal(alert=alert, action=act, agent=agent, rate=rate if act == "throttle" else "")

    def _over_request(self, budget: Budget, key: str, event: UsageEvent, amount: float) -> Signal:
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

    def _status(self, budget: Budget, now: float) -> list[BudgetStatus]:
        live: list[tuple[str, Counter]] = []
        for key in list(budget.counters):
            c = budget.counter(key, now)
            if c is not None and (c.used > 0 or c.reserved > 0):
                live.append((key, c))
        live.sort(key=lambda kc: -kc[1].last_ts)
        if not live:
            return [self._row(budget, budget.settings.target or "*", None, now)]
        return [self._row(budget, key, c, now) for key, c in live[:MAX_KEYS_SHOWN]]

    def _row(self, budget: Budget, key: str, c: Counter | None, now: float) -> BudgetStatus:
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


def _forget_passed_thresholds(budget: Budget) -> None:
    """After a limit change, thresholds no longer reached may fire again."""
    for c in budget.counters.values():
        c.fired = {w for w in c.fired if c.used >= budget.limit * w / 100}
        if c.used < budget.limit:
            c.exhausted_at = None


def _forecast(budget: Budget, c: Counter | None, now: float, resets: float | None) -> float | None:
    """When the budget runs out at the burn rate seen so far this period (None: not before reset)."""
    if c is None or c.used <= 0 or c.first_ts is None:
        return None
    if c.used >= budget.limit:
        return c.exhausted_at if c.exhausted_at is not None else now
    span = now - c.first_ts
    if span < MIN_FORECAST_SPAN or _idle(c, now):
        return None
    eta = now + (budget.limit - c.used) * span / c.used
    if resets is not None and eta >= resets:
        return None
    return eta


def _idle(c: Counter, now: float) -> bool:
    """Nothing spent for longer than FORECAST_IDLE and twice the usual gap between calls: there
    is no pace to forecast from (a run that ended must not 'run out at 08:22')."""
    gap = (c.last_ts - (c.first_ts or c.last_ts)) / max(1, c.calls - 1)
    return now - c.last_ts > max(FORECAST_IDLE, 2 * gap)


def _when(ts: float | None, tz: dt.tzinfo, now: float) -> str:
    """`at 00:00` today-ish, or `on 2026-12-01 00:00` further away."""
    if ts is None:
        return ""
    moment = dt.datetime.fromtimestamp(ts, tz)
    if ts - now < 86400:
        return f"at {moment:%H:%M}"
    return f"on {moment:%Y-%m-%d %H:%M}"

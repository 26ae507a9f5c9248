"""One budget: its settings checked, what it covers, its periods, its counters, and its words."""

from __future__ import annotations

import bisect
import datetime as dt
import fnmatch
import math
import shlex
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from tokenwatch.config import BudgetSettings, ConfigError
from tokenwatch.core.actions import ACTIONS
from tokenwatch.core.periods import ALL_PERIODS, CALENDAR_PERIODS, ROLLING_SECONDS, period_end
from tokenwatch.core.periods import period_start as calendar_start
from tokenwatch.core.quantities import (
    Amount,
    QuantityError,
    Unit,
    format_tokens,
    format_usd,
    parse_amount,
    parse_rate,
)

SCOPES: Final = ("global", "agent", "task", "model", "user", "tag")
"""What a budget can cover: everything, or the calls of one agent, task, model, user or tag."""
DEFAULT_THROTTLE_RATE: Final = "50%"
UNPRICED_MODES: Final = ("estimate", "free")
"""How a dollar budget counts calls to models no price table knows (see BudgetSettings)."""
WHEN_UNREACHABLE: Final = ("refuse", "local-slice")
"""What a shared budget does while the team's database cannot be reached (docs/fleet.md)."""
SHARED_PERIODS: Final = ("hour", "day", "week", "month", "total")
"""The periods a shared budget can count: one row per period in the team's database."""
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
    if settings.when_unreachable not in WHEN_UNREACHABLE:
        raise BudgetError(
            f"budget {name}: when_unreachable must be one of {', '.join(WHEN_UNREACHABLE)}, "
            f"not {settings.when_unreachable!r}"
        )
    if settings.shared:
        _check_shared(name, settings, amount)
    return amount


def _check_shared(name: str, settings: BudgetSettings, limit: Amount) -> None:
    """A shared budget counts calendar periods (every supervisor finds the same row) and, with
    `local-slice`, has a slice in its own unit."""
    if settings.period not in SHARED_PERIODS or settings.rolling:
        raise BudgetError(
            f"budget {name}: a shared budget counts a calendar {', '.join(SHARED_PERIODS[:-1])} "
            f"or total, not a {'rolling ' if settings.rolling else ''}{settings.period}"
        )
    if settings.when_unreachable != "local-slice":
        return
    try:
        piece = parse_amount(settings.slice)
    except QuantityError as exc:
        raise BudgetError(f"budget {name}: slice: {exc}") from None
    if piece.unit is not limit.unit or piece.value <= 0:
        like = '"$1"' if limit.unit is Unit.USD else "50k"
        raise BudgetError(
            f"budget {name}: with local-slice, give a slice like {like}, in the limit's unit: "
            "what this supervisor may spend while the fleet database is unreachable"
        )


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
class Counter:
    """Usage of one budget for one key (agent, model, ...) in its current period."""

    start: float
    used: float = 0.0
    reserved: float = 0.0
    fired: set[int] = field(default_factory=set)
    first_ts: float | None = None
    last_ts: float = 0.0
    calls: int = 0
    exhausted_at: float | None = None
    estimated: float = 0.0
    """The part of `used` priced at the fallback's rates (a model no table knows)."""
    estimated_from: str = ""
    """The fallback model of the latest such call."""
    recent: deque[tuple[float, float, float]] = field(default_factory=deque)
    """(ts, amount, estimated part) still inside a rolling window."""


class Budget:
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
        self.counters: dict[str, Counter] = {}
        self.counted_live: set[str] | None = None
        """While its past is being counted in (`Budgets.seed`): the calls it counted meanwhile."""

    @property
    def scope(self) -> str:
        return self.settings.scope

    @property
    def period(self) -> str:
        return self.settings.period

    def same_measure(self, other: Budget) -> bool:
        """True when `other` counts the same usage, so its counters can be kept on reload."""
        a, b = self.settings, other.settings
        counted = (a.scope, a.target, a.period, a.rolling, a.unpriced, self.unit)
        return counted == (b.scope, b.target, b.period, b.rolling, b.unpriced, other.unit)

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
            return "" if tags_match(target, tags) else None
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

    def counter(self, key: str, ts: float) -> Counter | None:
        """The key's counter for the period containing `ts`; None for a period already over."""
        start = self.period_start(ts)
        c = self.counters.get(key)
        if c is None:
            c = self.counters[key] = Counter(start)
        elif start > c.start:
            c.start, c.used, c.first_ts, c.exhausted_at, c.calls = start, 0.0, None, None, 0
            c.estimated, c.estimated_from = 0.0, ""
            c.fired.clear()
        elif start < c.start:
            return None
        if self.settings.rolling:
            self._expire(c, ts)
        return c

    def _expire(self, c: Counter, now: float) -> None:
        horizon = now - ROLLING_SECONDS[self.period]
        while c.recent and c.recent[0][0] <= horizon:
            _, amount, estimated = c.recent.popleft()
            c.used -= amount
            c.estimated -= estimated
        c.calls = len(c.recent)
        if not c.recent:
            c.used, c.first_ts, c.estimated = 0.0, None, 0.0
            c.fired.clear()

    def add(self, c: Counter, amount: float, ts: float, estimated_from: str = "") -> None:
        """Count `amount` at `ts`; `estimated_from` names the fallback model that priced it."""
        latest = c.last_ts  # usage read in from the ledger can be older than live calls
        estimated = amount if estimated_from and self.unit is Unit.USD else 0.0
        c.used += amount
        c.calls += 1
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

    def estimate_words(self, c: Counter) -> str:
        """`, all of it at an estimated price (price: estimated from M)` when some of the
        counter's usage is priced by the fallback; empty otherwise."""
        if c.estimated <= 0:
            return ""
        share = "all of it" if c.estimated >= c.used * 0.9999 else f"{self.show(c.estimated)}"
        return f", {share} at an estimated price (price: estimated from {c.estimated_from})"

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
        raised = Amount(max(self.limit * 2, round_up(needed, self.unit)), self.unit)
        words = ["tokenwatch", "budget", "set", scope, str(raised), "--period", s.period]
        if self.name != f"{s.scope}:{s.target}:{s.period}":
            words += ["--name", self.name]
        return shlex.join(words)


DONE: Final = {
    "alert": "",
    "throttle": "; throttled",
    "pause": "; paused",
    "kill": "; stopped",
    "deny": "; its calls are refused",
}
"""What a budget's action did, as its alert says it."""


def tags_match(target: str, tags: Mapping[str, str]) -> bool:
    """`team=ml` (value may be a glob) or `team` (the tag is present)."""
    name, eq, pattern = target.partition("=")
    if name not in tags:
        return False
    return not eq or fnmatch.fnmatchcase(tags[name], pattern)


def round_up(value: float, unit: Unit) -> float:
    """`value` rounded up to two significant digits (whole tokens): a limit that reads well."""
    if value <= 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(value)) - 1)
    if unit is Unit.TOKENS:
        step = max(step, 1.0)
    return math.ceil(value / step - 1e-9) * step

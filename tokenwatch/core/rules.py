"""The rule book: `[[rule]]` settings turned into detectors with confirmation, cooldown, escalation
and critical agents; DEFAULT_RULES when the config has none."""

from __future__ import annotations

import bisect
import fnmatch
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from tokenwatch.config import ConfigError, RuleSettings
from tokenwatch.core import detect, loops
from tokenwatch.core.actions import ACTIONS, past
from tokenwatch.core.admission import Signal
from tokenwatch.core.detect import Finding
from tokenwatch.core.models import ActionKind, Alert, BudgetStatus, Severity, Status, UsageEvent
from tokenwatch.core.quantities import QuantityError, parse_rate
from tokenwatch.core.recent import Recent, busy_median

DETECTORS: Final = (
    "runaway",
    "tool_loop",
    "turn_loop",
    "alternation",
    "task_tokens",
    "spike",
    "huge_request",
    "context_growth",
    "drift",
    "forecast",
)
LOOPS: Final = frozenset({"runaway", "tool_loop", "turn_loop", "alternation"})
"""Detectors of an agent repeating itself: they read its last calls that count, in a row."""
ALERT_ONLY: Final = frozenset({"huge_request", "drift"})
"""Detectors that inform but never act on an agent, whatever their rule says."""
CONFIRM: Final = {"forecast": 2}
"""Consecutive observations a finding must hold for before it fires (not one noisy sample);
the other detectors already need several calls by construction (a spike: 3 in its window)."""
ESCALATION_MEMORY: Final = 10.0
"""A rule that fires again within this many cooldowns (or windows) escalates; later, it starts over."""
HISTORY_SECONDS: Final = 2 * 3600.0
HISTORY_CALLS: Final = 2000
TASKS_KEPT: Final = 500
DEFAULT_RATE: Final = "50%"


def _loop_rule(name: str, detector: str, window: float = 0) -> RuleSettings:
    """A default loop rule: 3 repeats (cycles, for alternation), pause, then kill."""
    return RuleSettings(
        name=name,
        detector=detector,
        threshold=3,
        window=window,
        action="pause",
        escalate=["kill"],
        cooldown=60,
    )


DEFAULT_RULES: list[RuleSettings] = [
    _loop_rule("runaway", "runaway", window=60),
    _loop_rule("tool-loop", "tool_loop"),
    _loop_rule("turn-loop", "turn_loop"),
    _loop_rule("alternation", "alternation"),
    RuleSettings(
        name="spike", detector="spike", threshold=5, window=60, action="pause", cooldown=300
    ),
    RuleSettings(
        name="task-tokens", detector="task_tokens", threshold=3, action="pause", cooldown=600
    ),
    RuleSettings(name="huge-request", detector="huge_request", threshold=8000, cooldown=300),
    RuleSettings(
        name="context-growth",
        detector="context_growth",
        threshold=4,
        action="pause",
        cooldown=600,
    ),
    RuleSettings(name="drift", detector="drift", threshold=0.3, window=86400, cooldown=86400),
    RuleSettings(name="forecast", detector="forecast", cooldown=3600),
]
"""Used when tokenwatch.toml has no [[rule]]: pause loops, spikes and snowballing prompts (a
throttle leaves the process running at half speed), tell about the rest."""

_DONE: Final = {
    "alert": "",
    "throttle": "; throttled",
    "pause": "; paused",
    "kill": "; stopped",
    "deny": "; its calls are refused",
}


class RuleError(ConfigError):
    """A rule that cannot be used; the message names it and says what is wrong."""


def rule_name(settings: RuleSettings) -> str:
    return settings.name or settings.detector


def check_rule(settings: RuleSettings) -> None:
    """Raise RuleError for an unknown detector or action."""
    name = rule_name(settings) or "(unnamed)"
    if settings.detector not in DETECTORS:
        raise RuleError(
            f"rule {name}: unknown detector {settings.detector!r} ({', '.join(DETECTORS)})"
        )
    for action in [settings.action, *settings.escalate]:
        if action not in ACTIONS:
            raise RuleError(f"rule {name}: unknown action {action!r} ({', '.join(ACTIONS)})")
    if settings.threshold < 0 or settings.window < 0 or settings.cooldown < 0:
        raise RuleError(f"rule {name}: threshold, window and cooldown cannot be negative")
    try:
        parse_rate(settings.rate or DEFAULT_RATE)
    except QuantityError as exc:
        raise RuleError(f"rule {name}: {exc}") from None


@dataclass(slots=True)
class _Firing:
    """One rule's memory of one agent."""

    since: float = float("-inf")
    """Evidence older than the last firing is spent: escalating needs the pattern again."""
    last: float | None = None
    level: int = 0
    holding: int = 0


@dataclass(slots=True)
class _Task:
    name: str
    started: float
    tokens: int = 0
    calls: int = 0


@dataclass(slots=True)
class _AgentMemory:
    events: deque[UsageEvent] = field(default_factory=lambda: deque(maxlen=HISTORY_CALLS))
    task: _Task | None = None
    finished: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=TASKS_KEPT))
    """(end time, tokens) of the agent's finished tasks."""
    sizes: list[int] = field(default_factory=list)
    """The tokens of `finished`, sorted: its median is the agent's usual task."""
    usual: float | None = None
    lengths: deque[int] = field(default_factory=lambda: deque(maxlen=TASKS_KEPT))
    """Calls of each task in `finished`."""
    sorted_lengths: list[int] = field(default_factory=list)
    usual_calls: float | None = None
    context_from: float = float("-inf")
    recent: Recent = field(default_factory=Recent)
    """`events`' successful calls, indexed so the detectors need not re-read them."""
    watch: list[tuple[RuleSettings, _Firing]] = field(default_factory=list)
    """The rules watching this agent's calls, each with its memory of the agent."""
    watch_of: int = -1
    """Which set of rules `watch` was worked out for (`Rules.replace` starts a new one)."""
    latest: deque[UsageEvent] = field(default_factory=lambda: deque(maxlen=3))
    """The last calls that count as steps (`loops.counts`), in arrival order: a loop detector
    need not read back when the newest does not repeat the one before."""
    tail: tuple[int, float, list[UsageEvent]] = (-1, 0.0, [])
    """(arrivals, since, steps): the steps the loop rules read, shared by them for one call."""

    def steps(self, since: float) -> list[UsageEvent]:
        """The agent's last steps after `since`, in time order (loops.TAIL of them at most)."""
        seen, was, steps = self.tail
        if seen == self.recent.seen and was == since:
            return steps
        steps = []
        for e in reversed(self.events):
            if e.ts > since and loops.counts(e):
                steps.append(e)
                if len(steps) == loops.TAIL:
                    break
        steps.reverse()
        steps.sort(key=_ts)  # stable: calls of the same time stay in arrival order
        self.tail = (self.recent.seen, since, steps)
        return steps

    def finish(self, now: float, tokens: int, calls: int) -> None:
        if len(self.finished) == self.finished.maxlen:
            del self.sizes[bisect.bisect_left(self.sizes, self.finished[0][1])]
            del self.sorted_lengths[bisect.bisect_left(self.sorted_lengths, self.lengths[0])]
        self.finished.append((now, tokens))
        self.lengths.append(calls)
        bisect.insort(self.sizes, tokens)
        bisect.insort(self.sorted_lengths, calls)
        self.usual = detect.usual_task(self.sizes)
        self.usual_calls = detect.usual_task(self.sorted_lengths)

    def ordered(self) -> bool:
        return self.recent.ordered(len(self.events))

    def fresh(self, since: float) -> bool:
        """Whether any remembered call is later than `since`."""
        if self.ordered():
            return self.events[-1].ts > since
        return any(e.ts > since for e in self.events)


class Rules:
    """Feeds every event to the configured detectors and says what should happen.

    Implements `admission.RuleBook`. `budgets` (optional) gives budget statuses to the forecast
    and spike detectors; `is_critical` names agents that are only ever alerted on.
    """

    def __init__(
        self,
        settings: Sequence[RuleSettings],
        *,
        clock: Callable[[], float] = time.time,
        is_critical: Callable[[str], bool] = lambda name: False,
        budgets: Callable[[], Sequence[BudgetStatus]] | None = None,
    ) -> None:
        self._clock = clock
        self._is_critical = is_critical
        self._budgets = budgets
        self._rules: list[RuleSettings] = []
        self._agents: dict[str, _AgentMemory] = {}
        self._firings: dict[tuple[str, str], _Firing] = {}
        self._generation = 0
        self.replace(settings)

    def replace(self, settings: Sequence[RuleSettings]) -> None:
        """New rules at once; the memory of agents and of what already fired stays."""
        for s in settings:
            check_rule(s)
        names = [rule_name(s) for s in settings]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise RuleError(f"two rules are named {sorted(dupes)[0]!r}; name them apart")
        self._rules = [s for s in settings if s.enabled]
        self._generation += 1

    def names(self) -> Sequence[str]:
        return [rule_name(s) for s in self._rules]

    def observe(self, event: UsageEvent) -> list[Signal]:
        """Remember the event and run every rule watching its agent."""
        if not self._rules:
            # Nothing reads the memory without a rule (a later `replace` learns from then on);
            # keeping it cost a supervisor with rules turned off a fifth of its ingest CPU.
            return []
        now = self._clock()
        mem = self._agents.get(event.agent)
        if mem is None:
            mem = self._agents[event.agent] = _AgentMemory()
        signals: list[Signal] = []
        if event.task and mem.task is not None and mem.task.name != event.task:
            signals += self._end_task(event.agent, mem, now)
        if event.task and mem.task is None:
            mem.task = _Task(event.task, event.ts)
        if mem.task is not None and event.task == mem.task.name:
            mem.task.tokens += event.total_tokens
            mem.task.calls += 1
        mem.events.append(event)
        _forget_old(mem.events, now)
        mem.recent.add(event)
        mem.recent.trim(len(mem.events))
        if loops.counts(event):
            mem.latest.append(event)
        if mem.watch_of != self._generation:
            self._watch(event.agent, mem)
        for rule, firing in mem.watch:
            signal = self._run(rule, firing, event, mem, now)
            if signal is not None:
                signals.append(signal)
        return signals

    def _watch(self, agent: str, mem: _AgentMemory) -> None:
        # Worked out once per agent, not per call: the glob and the firing lookup were a fifth
        # of the rules' cost per event.
        mem.watch = [
            (rule, self._firing(rule, agent))
            for rule in self._rules
            if rule.detector != "drift" and fnmatch.fnmatchcase(agent, rule.agents)
        ]
        mem.watch_of = self._generation

    def task_ended(self, agent: str, task: str) -> list[Signal]:
        """The agent said its task is over: its figure joins the agent's usual, drift is checked."""
        mem = self._agents.get(agent)
        if mem is None or mem.task is None or mem.task.name != task:
            return []
        return self._end_task(agent, mem, self._clock())

    def _end_task(self, agent: str, mem: _AgentMemory, now: float) -> list[Signal]:
        assert mem.task is not None
        if mem.task.tokens > 0:
            mem.finish(now, mem.task.tokens, mem.task.calls)
        mem.task = None
        mem.context_from = now
        signals: list[Signal] = []
        for rule in self._rules:
            if rule.detector == "drift" and fnmatch.fnmatchcase(agent, rule.agents):
                finding = detect.drift(
                    agent,
                    list(mem.finished),
                    now,
                    rise=rule.threshold or detect.DRIFT_RISE,
                    window=rule.window or detect.DRIFT_WINDOW,
                )
                signal = self._fire(rule, agent, finding, now)
                if signal is not None:
                    signals.append(signal)
        return signals

    # -- one rule -------------------------------------------------------------------------------

    def _run(
        self,
        rule: RuleSettings,
        firing: _Firing,
        event: UsageEvent,
        mem: _AgentMemory,
        now: float,
    ) -> Signal | None:
        if _cooling(rule, firing, now):
            return None
        finding = None
        if mem.fresh(firing.since):
            finding = self._detect(rule, event, mem, now, firing.since)
        return self._fire(rule, event.agent, finding, now, firing)

    def _detect(
        self, rule: RuleSettings, event: UsageEvent, mem: _AgentMemory, now: float, since: float
    ) -> Finding | None:
        kind = rule.detector
        if kind == "huge_request":
            limit = rule.threshold or detect.HUGE_REQUEST_TOKENS
            if event.input_tokens <= limit:
                return None
            return detect.huge_request(event, limit=limit, usual=_usual_prompt(mem))
        if kind in LOOPS:
            # Cheap first: the newest call must be a step that repeats an earlier one.
            if not loops.counts(event) or event.ts <= since:
                return None
            if mem.ordered() and not loops.may_repeat(kind, mem.latest):
                return None
            return loops.check(kind, rule.threshold, rule.window, mem.steps(since), now)
        if kind == "task_tokens":
            return self._task_tokens(rule, mem)
        if kind == "forecast":
            budgets = self._budgets
            return None if budgets is None else detect.forecast(event.agent, budgets(), now)
        if not _indexable(rule, mem):
            return self._scan(rule, mem, now, since)
        if kind == "spike":
            return self._spike(rule, mem, now, since)
        return _context_growth(rule, mem, since)

    def _spike(
        self, rule: RuleSettings, mem: _AgentMemory, now: float, since: float
    ) -> Finding | None:
        # Only a change of pace: spend against a budget is the budget's own warnings and action
        # (an arm comparing the hour's spend with a day budget / 24 paused healthy agents).
        factor = rule.threshold or detect.SPIKE_FACTOR
        return _spike(mem, now, factor, rule.window or detect.SPIKE_WINDOW, since)

    def _scan(
        self, rule: RuleSettings, mem: _AgentMemory, now: float, since: float
    ) -> Finding | None:
        """The detectors over the whole history: exact when calls arrived out of time order."""
        events = [e for e in mem.events if e.ts > since]
        level, window = rule.threshold, rule.window
        kind = rule.detector
        if kind == "spike":
            # The baseline is the agent's whole recent history; only the burst must be fresh.
            return detect.spike(
                list(mem.events),
                now,
                factor=level or detect.SPIKE_FACTOR,
                window=window or detect.SPIKE_WINDOW,
                since=since,
            )
        if kind == "context_growth":
            recent = [e for e in events if e.ts > mem.context_from]
            return detect.context_growth(recent, calls=int(level or detect.CONTEXT_CALLS))
        return None

    def _task_tokens(self, rule: RuleSettings, mem: _AgentMemory) -> Finding | None:
        task = mem.task
        if task is None:
            return None
        limit = None
        if self._budgets is not None:
            limits = [
                b.limit
                for b in self._budgets()
                if b.period == "task" and b.unit == "tokens" and b.target in (task.name, "*")
            ]
            limit = min(limits) if limits else None
        agent = mem.events[-1].agent
        return detect.task_over(
            agent,
            task.name,
            task.tokens,
            mem.usual,
            factor=rule.threshold or detect.TASK_FACTOR,
            limit=limit,
            calls=task.calls,
            usual_calls=mem.usual_calls,
        )

    def _firing(self, rule: RuleSettings, agent: str) -> _Firing:
        key = (rule_name(rule), agent)
        firing = self._firings.get(key)
        if firing is None:
            firing = self._firings[key] = _Firing()
        return firing

    def _fire(
        self,
        rule: RuleSettings,
        agent: str,
        finding: Finding | None,
        now: float,
        firing: _Firing | None = None,
    ) -> Signal | None:
        """Apply confirmation, cooldown and escalation to what a detector found."""
        if firing is None:
            firing = self._firing(rule, agent)
        if finding is None:
            firing.holding = 0
            return None
        firing.holding += 1
        if firing.holding < CONFIRM.get(rule.detector, 1):
            return None
        if firing.last is not None and now - firing.last < rule.cooldown:
            return None
        memory = ESCALATION_MEMORY * max(rule.cooldown, rule.window, 1.0)
        if firing.last is not None and now - firing.last <= memory:
            firing.level += 1
        else:
            firing.level = 0
        firing.last, firing.since, firing.holding = now, now, 0
        return self._signal(rule, agent, finding, firing.level, now)

    def _signal(
        self, rule: RuleSettings, agent: str, finding: Finding, level: int, now: float
    ) -> Signal:
        steps = [rule.action, *rule.escalate]
        action = steps[min(level, len(steps) - 1)]
        note = ""
        if rule.detector in ALERT_ONLY:
            action = ActionKind.ALERT.value
        elif action != ActionKind.ALERT and self._is_critical(agent):
            note = f"; {agent} is critical: not {past(action)}, only alerted"
            action = ActionKind.ALERT.value
        rate = (rule.rate or DEFAULT_RATE) if action == ActionKind.THROTTLE else ""
        done = f"{_DONE[action]} to {rate}" if rate else _DONE[action]
        alert = Alert(
            rule=rule_name(rule),
            agent=agent,
            message=f"{finding.message}{done}{note}",
            severity=_severity(action, finding),
            action=action,
            ts=now,
        )
        return Signal(alert=alert, action=action, agent=agent, rate=rate)


def _severity(action: str, finding: Finding) -> str:
    if action in (ActionKind.PAUSE, ActionKind.KILL, ActionKind.DENY):
        return Severity.CRITICAL.value
    if action == ActionKind.THROTTLE:
        return Severity.WARNING.value
    return finding.severity


def _indexable(rule: RuleSettings, mem: _AgentMemory) -> bool:
    """The index answers for calls in time order and for a count of one or more calls."""
    if not mem.ordered():
        return False
    return rule.detector == "spike" or not 0 < rule.threshold < 1


def _cooling(rule: RuleSettings, firing: _Firing, now: float) -> bool:
    """In its cooldown a rule cannot fire; unless it needs confirming, it need not look."""
    if CONFIRM.get(rule.detector, 1) > 1 or firing.last is None:
        return False
    return now - firing.last < rule.cooldown


def _usual_prompt(mem: _AgentMemory) -> float | None:
    """The agent's usual prompt: the median of its last successful calls before the newest."""
    older = itertools.islice(reversed(mem.events), 1, None)
    ok = (e.input_tokens for e in older if e.status == Status.OK)
    return detect.usual_prompt(list(itertools.islice(ok, detect.HUGE_HISTORY_CALLS)))


def _ts(e: UsageEvent) -> float:
    return e.ts


def _spike(
    mem: _AgentMemory, now: float, factor: float, window: float, since: float
) -> Finding | None:
    """`detect.spike` from the index: bisect the ordered calls, sum tokens by differences."""
    ok = mem.recent.ok
    i, j = ok.after(max(now - window, since)), ok.upto(now)
    if j - i < detect.SPIKE_MIN_CALLS:
        return None
    edge = now - window
    b0, b1 = ok.after(edge - detect.BASELINE_SPAN), ok.upto(edge)
    if (
        b1 - b0 < detect.SPIKE_MIN_CALLS
        or edge - ok.ts[b0] < detect.SPIKE_BASELINE_WINDOWS * window
    ):
        return None
    usual, gaps = busy_median(ok, b0, b1, edge, window)
    agent = mem.events[-1].agent
    found = detect.spike_finding(agent, ok.tokens(i, j), usual, factor=factor, window=window)
    if found is None or not detect.faster(j - i, window, gaps):
        return None
    return found


def _context_growth(rule: RuleSettings, mem: _AgentMemory, since: float) -> Finding | None:
    """`detect.context_growth` from the index: only its last `calls` calls are read."""
    calls = int(rule.threshold or detect.CONTEXT_CALLS)
    ok = mem.recent.ok
    i = ok.after(max(since, mem.context_from))
    if len(ok.events) - i < calls:
        return None
    return detect.context_growth(ok.events[len(ok.events) - calls :], calls=calls)


def _forget_old(events: deque[UsageEvent], now: float) -> None:
    while events and events[0].ts < now - HISTORY_SECONDS:
        events.popleft()

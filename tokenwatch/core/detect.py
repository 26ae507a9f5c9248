"""Detectors: small pure functions of an agent's recent events and the time, each saying what it saw."""

from __future__ import annotations

import datetime as dt
import itertools
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from tokenwatch.core.models import BudgetStatus, Severity, Status, UsageEvent
from tokenwatch.core.pricing import is_estimated
from tokenwatch.core.quantities import format_tokens, format_usd

TASK_FACTOR: Final = 3.0
TASK_HISTORY_MIN: Final = 3
"""Finished tasks needed before an agent's usual per-task figure is trusted."""
SPIKE_FACTOR: Final = 5.0
SPIKE_WINDOW: Final = 60.0
SPIKE_MIN_CALLS: Final = 3
"""Calls in the window before a rate counts: one big call is not a spike."""
SPIKE_PACE: Final = 3.0
"""The window's calls must also come this many times as fast as the agent's usual pace (3 calls
where its usual pace sends one, as a spike needs 3 calls): a spike is an agent calling faster
than usual. One that pasted a big file into its context, or whose conversation grew, sends
bigger prompts at its usual pace; context_growth and huge_request speak for that."""
SPIKE_BASELINE_WINDOWS: Final = 5
"""The baseline must span at least this many windows of the agent's own history."""
BASELINE_SPAN: Final = 1800.0
"""Seconds of history, before the window, that make an agent's baseline."""
HUGE_REQUEST_TOKENS: Final = 8000
HUGE_FACTOR: Final = 4.0
"""A huge prompt is also this many times the agent's usual one: a coding agent's ordinary
context of 8-20k tokens is its usual, not news."""
HUGE_HISTORY_CALLS: Final = 50
"""The agent's last calls whose median prompt is its usual."""
HUGE_HISTORY_MIN: Final = 5
CONTEXT_CALLS: Final = 4
CONTEXT_MIN_TOKENS: Final = 8000
"""Prompt size from which growth counts: a small context grows by a tenth with one tool result."""
CONTEXT_RISE: Final = 0.1
"""Growth per call, as a fraction of the prompt, that makes a snowball: tool output appended and
never trimmed grows the prompt in proportion to itself; a coding agent's steps add a few hundred
tokens, a smaller and smaller fraction as its context grows."""
DRIFT_RISE: Final = 0.3
DRIFT_WINDOW: Final = 86400.0


@dataclass(frozen=True, slots=True)
class Finding:
    """What a detector saw, in words a person can act on."""

    detector: str
    agent: str
    message: str
    severity: str = Severity.WARNING.value


def _ok(events: Sequence[UsageEvent]) -> list[UsageEvent]:
    # Failed attempts cost nothing: an SDK retrying a 429 three times is not a loop.
    return [e for e in events if e.status == Status.OK]


def task_tokens(
    agent: str,
    task: str,
    tokens: int,
    finished: Sequence[int],
    *,
    factor: float = TASK_FACTOR,
    limit: float | None = None,
    calls: int = 0,
    finished_calls: Sequence[int] = (),
) -> Finding | None:
    """A task's tokens so far over `factor` x its limit, or over `factor` x the agent's usual
    (median) task in tokens and, when `finished_calls` are given, in calls too."""
    return task_over(
        agent,
        task,
        tokens,
        usual_task(finished),
        factor=factor,
        limit=limit,
        calls=calls,
        usual_calls=usual_task(finished_calls),
    )


def usual_task(finished: Sequence[int]) -> float | None:
    """The agent's usual (median) tokens or calls per task, once there is enough history."""
    return statistics.median(finished) if len(finished) >= TASK_HISTORY_MIN else None


def task_over(
    agent: str,
    task: str,
    tokens: int,
    usual: float | None,
    *,
    factor: float = TASK_FACTOR,
    limit: float | None = None,
    calls: int = 0,
    usual_calls: float | None = None,
) -> Finding | None:
    """`task_tokens` against already known usual figures.

    Against the usual, the task must also have gone on for `factor` x the usual calls: a task
    that ran on is what this watches for, and one file pasted into an otherwise usual task makes
    it bigger, not longer."""
    if limit:
        baseline, what = limit, f"its limit of {format_tokens(limit)}"
    elif usual is not None:
        if usual_calls is not None and calls <= factor * usual_calls:
            return None
        baseline = usual
        what = f"its usual {format_tokens(baseline)} per task"
        if usual_calls is not None:
            what += f" in {usual_calls:g} calls"
    else:
        return None
    if baseline <= 0 or tokens <= factor * baseline:
        return None
    length = f" in {calls} calls" if usual_calls is not None and not limit else ""
    return Finding(
        "task_tokens",
        agent,
        f"{agent}'s task {task or '(unnamed)'} has used {format_tokens(tokens)} tokens{length}, "
        f"{tokens / baseline:.1f}x {what}",
    )


def spike(
    events: Sequence[UsageEvent],
    now: float,
    *,
    factor: float = SPIKE_FACTOR,
    window: float = SPIKE_WINDOW,
    since: float = float("-inf"),
) -> Finding | None:
    """The agent's tokens over the last `window` s (calls after `since` only) above `factor` x
    its usual window, with its calls coming SPIKE_PACE x as fast as usual (see `faster`).

    Its usual window is the median of its busy windows: the baseline span before the current
    window is cut into windows of the same length and those with calls are compared, so an
    agent that always works in bursts has bursts as its usual, and idle time does not count."""
    if not events:
        return None
    ok = _ok(events)
    current = [e for e in ok if max(now - window, since) < e.ts <= now]
    if len(current) < SPIKE_MIN_CALLS:
        return None
    edge = now - window
    before = [e for e in ok if edge - BASELINE_SPAN < e.ts <= edge]
    if len(before) < SPIKE_MIN_CALLS or edge - before[0].ts < SPIKE_BASELINE_WINDOWS * window:
        return None
    tokens, gaps = _busy_windows(before, edge, window)
    usual = statistics.median(tokens)
    burning = sum(e.total_tokens for e in current)
    found = spike_finding(events[-1].agent, burning, usual, factor=factor, window=window)
    if found is None or not faster(len(current), window, gaps):
        return None
    return found


def spike_finding(
    agent: str, burning: float, usual: float, *, factor: float, window: float
) -> Finding | None:
    """`burning` tokens in the window against the `usual` busy window."""
    if usual <= 0 or burning <= factor * usual:
        return None
    per_min = 60.0 / window
    return Finding(
        "spike",
        agent,
        f"{agent} is burning {format_tokens(burning * per_min)} tokens/min, "
        f"{burning / usual:.0f}x its usual {format_tokens(usual * per_min)}/min",
    )


def faster(calls: int, window: float, gaps: Sequence[float], *, pace: float = SPIKE_PACE) -> bool:
    """Whether `calls` in `window` s come `pace` times as fast as the agent's usual pace: one call
    per median of `gaps`, one gap per busy window (see `_busy_windows`)."""
    return bool(gaps) and calls * statistics.median(gaps) >= pace * window


def _busy_windows(
    events: Sequence[UsageEvent], edge: float, window: float
) -> tuple[list[float], list[float]]:
    """Tokens per `window`-long slice before `edge`, for the slices that had calls; and for each,
    the gap before its last call (one per slice, like the tokens: a long burst does not become
    the usual pace in a few minutes, and idle spells between tasks do not slow it down), unless
    that call began another task: the idle spell before a task is not the agent's pace, and
    counting it made an agent at its usual pace look several times faster than usual."""
    tokens: dict[int, float] = {}
    gaps: dict[int, float] = {}
    for prev, e in zip([None, *events], events, strict=False):
        k = busy_slice(edge, e.ts, window)
        tokens[k] = tokens.get(k, 0.0) + e.total_tokens
        if prev is not None and prev.task == e.task:
            gaps[k] = e.ts - prev.ts
        else:
            gaps.pop(k, None)
    return list(tokens.values()), list(gaps.values())


def busy_slice(edge: float, ts: float, window: float) -> int:
    """Which `window`-long slice before `edge` a call at `ts` falls in (0: the nearest)."""
    return int((edge - ts) // window)


def hourly_overspend(
    events: Sequence[UsageEvent],
    now: float,
    budgets: Sequence[BudgetStatus],
    *,
    factor: float = SPIKE_FACTOR,
) -> Finding | None:
    """The agent's spend over the last hour above `factor` x (a daily dollar budget / 24)."""
    if not events:
        return None
    agent = events[-1].agent
    daily = daily_usd(budgets, agent)
    if not daily:
        return None
    hour = [e for e in _ok(events) if e.ts > now - 3600.0]
    spent = sum(e.cost_usd or 0.0 for e in hour)
    return overspend(agent, spent, daily, factor=factor, partial=partial_cost(hour))


def partial_cost(events: Iterable[UsageEvent]) -> bool:
    """True when some of the events' cost is a fallback estimate (or unknown)."""
    return any(e.cost_usd is None or is_estimated(e.price_source) for e in events)


def daily_usd(budgets: Sequence[BudgetStatus], agent: str) -> list[BudgetStatus]:
    """The daily dollar budgets covering the agent."""
    return [b for b in budgets if b.unit == "usd" and b.period == "day" and _covers(b, agent)]


def overspend(
    agent: str,
    spent: float,
    daily: Sequence[BudgetStatus],
    *,
    factor: float,
    partial: bool = False,
) -> Finding | None:
    """`spent` in the last hour against the hourly pace of the first `daily` budget it beats;
    `partial` marks a spend holding estimated prices."""
    for b in daily:
        pace = b.limit / 24.0
        if pace > 0 and spent > factor * pace:
            return Finding(
                "spike",
                agent,
                f"{agent} spent {format_usd(spent, partial)} in the last hour, "
                f"{spent / pace:.0f}x the "
                f"hourly pace of budget {b.name} ({format_usd(b.limit)} per day)",
            )
    return None


def usual_prompt(sizes: Sequence[int]) -> float | None:
    """The agent's usual prompt (median of its recent ones), once there are HUGE_HISTORY_MIN."""
    return statistics.median(sizes) if len(sizes) >= HUGE_HISTORY_MIN else None


def huge_request(
    event: UsageEvent, *, limit: float = HUGE_REQUEST_TOKENS, usual: float | None = None
) -> Finding | None:
    """One call whose prompt is over `limit` tokens and over HUGE_FACTOR x the agent's `usual`
    prompt (no usual yet: nothing to compare with, so nothing to say)."""
    tokens = event.input_tokens
    if tokens <= limit or usual is None or tokens <= HUGE_FACTOR * usual:
        return None
    return Finding(
        "huge_request",
        event.agent,
        f"{event.agent} sent a {format_tokens(tokens)}-token prompt to "
        f"{event.model or 'its model'}, {tokens / max(usual, 1):.0f}x its usual "
        f"{format_tokens(usual)} (over {format_tokens(limit)})",
        Severity.INFO.value,
    )


def context_growth(
    events: Sequence[UsageEvent],
    *,
    calls: int = CONTEXT_CALLS,
    min_tokens: int = CONTEXT_MIN_TOKENS,
    rise: float = CONTEXT_RISE,
) -> Finding | None:
    """The last `calls` calls of one task each sent at least `min_tokens`, each prompt bigger
    than the one before by `rise` of it or more."""
    ok = _ok(events)
    if len(ok) < calls:
        return None
    tail = ok[-calls:]
    if len({e.task for e in tail}) != 1:
        return None
    sizes = [e.input_tokens for e in tail]
    if sizes[0] < min_tokens or any(b < (1 + rise) * a for a, b in itertools.pairwise(sizes)):
        return None
    agent = tail[-1].agent
    return Finding(
        "context_growth",
        agent,
        f"{agent}'s prompt grew by {rise:.0%} or more call after call over its last {calls} calls, "
        f"from {format_tokens(sizes[0])} to {format_tokens(sizes[-1])} tokens, without the task "
        "ending",
    )


def drift(
    agent: str,
    tasks: Sequence[tuple[float, int]],
    now: float,
    *,
    rise: float = DRIFT_RISE,
    window: float = DRIFT_WINDOW,
) -> Finding | None:
    """Tokens per task over the last `window` s up by `rise` or more against the window before.

    `tasks` are (end time, tokens) of finished tasks."""
    current = [t for ts, t in tasks if now - window < ts <= now]
    previous = [t for ts, t in tasks if now - 2 * window < ts <= now - window]
    if len(current) < TASK_HISTORY_MIN or len(previous) < TASK_HISTORY_MIN:
        return None
    was, now_avg = statistics.fmean(previous), statistics.fmean(current)
    if was <= 0 or now_avg < (1 + rise) * was:
        return None
    return Finding(
        "drift",
        agent,
        f"{agent} now uses {format_tokens(now_avg)} tokens per task, "
        f"up {now_avg / was - 1:.0%} from {format_tokens(was)} in the period before",
        Severity.INFO.value,
    )


def forecast(
    agent: str, budgets: Sequence[BudgetStatus], now: float, tz: dt.tzinfo | None = None
) -> Finding | None:
    """A budget covering the agent runs out, at the current burn rate, before its period ends."""
    for b in budgets:
        eta, resets = b.forecast_exhausted_at, b.resets_at
        if eta is None or resets is None or b.used >= b.limit or not _covers(b, agent):
            continue
        if eta < resets:
            return Finding(
                "forecast",
                agent,
                f"at the current rate budget {b.name} runs out at {_clock_time(eta, tz)}, "
                f"before it resets at {_clock_time(resets, tz)} ({b.fraction:.0%} used)",
            )
    return None


def _covers(b: BudgetStatus, agent: str) -> bool:
    return b.scope == "global" or (b.scope == "agent" and b.target == agent)


def _clock_time(ts: float, tz: dt.tzinfo | None) -> str:
    return f"{dt.datetime.fromtimestamp(ts, tz):%H:%M}"

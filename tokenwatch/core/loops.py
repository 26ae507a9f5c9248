"""Repeat-loop detectors: the same step N times in a row in an agent's calls (its whole prompt,
its tool call, the turn it adds) or two steps taking turns; pollers, parallel copies and
interleaved templates are left alone."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence
from typing import Final

from tokenwatch.core.detect import Finding
from tokenwatch.core.models import Status, UsageEvent

RUNAWAY_REPEATS: Final = 3
RUNAWAY_WINDOW: Final = 60.0
TOOL_REPEATS: Final = 3
TURN_REPEATS: Final = 3
ALTERNATION_CYCLES: Final = 3
NEAR_DUPLICATE_SPREAD: Final = 0.1
"""Near-duplicate prompts (same shape) must also be within this fraction in size: a loop resends
the same prompt with a counter changed; a conversation whose shape collides grows."""
POLL_GAP: Final = 10.0
"""Seconds between one call's end and the next one's start (its start, if its duration is not
known) from which repeats are a poller's (a status check every 20 s), not a loop's: a looping
agent calls again as soon as its tool returns. The run's mean gap decides, so a poller that
waits through a tool every other call (status, wait, status, wait) is one too."""
TAIL: Final = 16
"""Calls a loop detector reads back: enough for the longest default run (3 cycles of 2)."""


def counts(event: UsageEvent) -> bool:
    """Whether a call is a step of the agent's sequence: it succeeded (an SDK retrying a 429 is
    not a loop) and it is not a copy of a request already in flight (best-of-n sampling)."""
    return event.status == Status.OK and event.overlap == 0


def paced(run: Sequence[UsageEvent]) -> bool:
    """A poller's run: its calls come POLL_GAP s or more apart (mean, end to start)."""
    gaps = [b.ts - a.ts - (a.latency_ms or 0.0) / 1000.0 for a, b in itertools.pairwise(run)]
    return bool(gaps) and statistics.fmean(gaps) >= POLL_GAP


def _run(
    steps: Sequence[UsageEvent], n: int, same: Callable[[UsageEvent], bool]
) -> Sequence[UsageEvent] | None:
    """The last `n` steps if each is `same` (as the newest) and they are not a poller's."""
    if len(steps) < n:
        return None
    run = steps[-n:]
    if not all(same(e) for e in run) or paced(run):
        return None
    return run


def runaway(
    steps: Sequence[UsageEvent],
    now: float,
    *,
    repeats: int = RUNAWAY_REPEATS,
    window: float = RUNAWAY_WINDOW,
) -> Finding | None:
    """The newest prompt sent `repeats` times in a row within `window` s, exactly or with only
    numbers, ids or times changed. `steps`: the agent's calls that count, in time order."""
    if not steps:
        return None
    last = steps[-1]
    recent = [e for e in steps[-repeats:] if e.ts > now - window]
    what = "the same prompt"
    run = _run(
        recent, repeats, lambda e: bool(last.prompt_hash) and e.prompt_hash == last.prompt_hash
    )
    if run is None and last.prompt_shape:
        what = "nearly the same prompt"
        run = _run(recent, repeats, lambda e: near_duplicate(e, last))
    if run is None:
        return None
    return runaway_finding(last.agent, what, len(run), run[-1].ts - run[0].ts)


def runaway_finding(agent: str, what: str, times: int, span: float) -> Finding:
    return Finding(
        "runaway", agent, f"{agent} repeated {what} {times} times in a row in {span:.0f} s"
    )


def near_duplicate(e: UsageEvent, last: UsageEvent) -> bool:
    """Same shape and within NEAR_DUPLICATE_SPREAD in size."""
    if e.prompt_shape != last.prompt_shape:
        return False
    big = max(e.input_tokens, last.input_tokens, 1)
    return abs(e.input_tokens - last.input_tokens) <= NEAR_DUPLICATE_SPREAD * big


def tool_loop(steps: Sequence[UsageEvent], *, repeats: int = TOOL_REPEATS) -> Finding | None:
    """The same tool call, same arguments, same result, ending each of the last `repeats` calls."""
    if not steps or not steps[-1].tool_hash:
        return None
    last = steps[-1]
    run = _run(steps, repeats, lambda e: e.tool_hash == last.tool_hash)
    if run is None:
        return None
    return Finding(
        "tool_loop",
        last.agent,
        f"{last.agent} called {last.tool_call or 'a tool'} {len(run)} times in a row, same result",
    )


def turn_loop(steps: Sequence[UsageEvent], *, repeats: int = TURN_REPEATS) -> Finding | None:
    """The same new turn (exactly, or by shape) added to the conversation by each of the last
    `repeats` calls, and answered alike. A turn with tool calls is tool_loop's."""
    if not steps or not steps[-1].turn_hash or steps[-1].tool_hash:
        return None
    last = steps[-1]

    def alike(e: UsageEvent) -> bool:
        return e.answer_hash == last.answer_hash and not e.tool_hash

    what = "the same turn"
    run = _run(steps, repeats, lambda e: e.turn_hash == last.turn_hash and alike(e))
    if run is None and last.turn_shape:
        what = "nearly the same turn"
        run = _run(steps, repeats, lambda e: e.turn_shape == last.turn_shape and alike(e))
    if run is None:
        return None
    return Finding(
        "turn_loop",
        last.agent,
        f"{last.agent} added {what} to its conversation {len(run)} times in a row, "
        "answered alike each time",
    )


def step_key(e: UsageEvent) -> str:
    """What a step of a conversation does: its tool call and result, else its new turn; ''
    without a conversation (a batch's templates take turns without undoing anything)."""
    return e.tool_hash or e.turn_shape


def alternation(steps: Sequence[UsageEvent], *, cycles: int = ALTERNATION_CYCLES) -> Finding | None:
    """Two steps undoing each other: the last 2 x `cycles` calls go A, B, A, B... (A != B)."""
    n = 2 * cycles
    if len(steps) < n:
        return None
    run = steps[-n:]
    a, b = step_key(run[0]), step_key(run[1])
    if not a or not b or a == b or paced(run):
        return None
    if any(step_key(e) != (a if i % 2 == 0 else b) for i, e in enumerate(run)):
        return None
    last = run[-1]
    pair = "two turns"
    if run[0].tool_call and run[1].tool_call:
        pair = f"{run[0].tool_call} and {run[1].tool_call}"
    return Finding(
        "alternation",
        last.agent,
        f"{last.agent} went back and forth between {pair} {cycles} times, same results",
    )


def check(
    kind: str, level: float, window: float, steps: Sequence[UsageEvent], now: float
) -> Finding | None:
    """The loop detector `kind` on the agent's `steps` (time order), at the rule's `level`
    (repeats or cycles; 0 for the default) and `window` (runaway only; 0 for the default)."""
    n = int(level)
    if kind == "runaway":
        return runaway(steps, now, repeats=n or RUNAWAY_REPEATS, window=window or RUNAWAY_WINDOW)
    if kind == "tool_loop":
        return tool_loop(steps, repeats=n or TOOL_REPEATS)
    if kind == "turn_loop":
        return turn_loop(steps, repeats=n or TURN_REPEATS)
    return alternation(steps, cycles=n or ALTERNATION_CYCLES)


def may_repeat(kind: str, latest: Sequence[UsageEvent]) -> bool:
    """A necessary condition for `kind` to fire, from the agent's last 3 steps in time order:
    the newest repeats the one before (for alternation, the one before that)."""
    back = 3 if kind == "alternation" else 2
    if len(latest) < back:
        return False
    new, old = latest[-1], latest[-back]
    if kind == "runaway":
        return (bool(new.prompt_hash) and new.prompt_hash == old.prompt_hash) or (
            bool(new.prompt_shape) and new.prompt_shape == old.prompt_shape
        )
    if kind == "tool_loop":
        return bool(new.tool_hash) and new.tool_hash == old.tool_hash
    if kind == "turn_loop":
        return bool(new.turn_hash) and new.turn_shape == old.turn_shape
    key = step_key(new)
    return bool(key) and key == step_key(old)

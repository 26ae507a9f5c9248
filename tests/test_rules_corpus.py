"""The default rules on the benchmark's traces: every runaway paused, no healthy agent acted on."""

from __future__ import annotations

from bench.traces.corpus import Trace, corpus
from tokenwatch.core.admission import Signal
from tokenwatch.core.rules import DEFAULT_RULES, Rules


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def acted(trace: Trace) -> list[tuple[int, Signal]]:
    """(call index, signal) of every throttle, pause or kill, the trace replayed live."""
    clock = _Clock()
    rules = Rules(DEFAULT_RULES, clock=clock)
    out: list[tuple[int, Signal]] = []
    for i, event in enumerate(trace.events):
        clock.now = event.ts
        signals = rules.observe(event)
        if i in trace.task_ends:
            signals += rules.task_ended(event.agent, trace.task_ends[i])
        out += [(i, s) for s in signals if s.action != "alert"]
    return out


TRACES = corpus(variants=3)  # each wire-format kind once per wire
"""The benchmark's own draw (its seed); other draws are in docs/benchmarks.md, Detection."""


def test_no_healthy_look_alike_is_throttled_paused_or_killed() -> None:
    for trace in TRACES:
        if not trace.runaway:
            assert acted(trace) == [], f"{trace.name}: {[s.alert.message for _, s in acted(trace)]}"


def test_every_runaway_kind_is_paused_and_loops_and_spikes_within_three_calls() -> None:
    calls: dict[str, list[int]] = {}
    for trace in TRACES:
        if trace.runaway:
            assert trace.start is not None
            first, signal = acted(trace)[0]
            assert signal.action == "pause", trace.name
            assert first >= trace.start, f"{trace.name}: paused before it went wrong"
            calls.setdefault(trace.kind, []).append(first - trace.start + 1)
    assert set(calls) == {
        "loop",
        "near_loop",
        "tool_loop",
        "turn_loop",
        "alternation",
        "spike",
        "snowball",
        "overrun",
    }
    for kind in ("loop", "near_loop", "tool_loop", "turn_loop", "spike"):
        assert max(calls[kind]) <= 3, (kind, calls[kind])
    # A snowball is told from a coder reading files by its fifth growing call; an overrun from a
    # longer task than usual at 3x the agent's usual task (see docs/benchmarks.md, Detection).
    assert max(calls["snowball"]) <= 4
    assert max(calls["alternation"]) <= 6  # A, B, A, B, A, B

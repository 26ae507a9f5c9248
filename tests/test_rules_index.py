"""The rule book's index of recent calls gives the very signals that re-reading the history gives."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenwatch.config import RuleSettings
from tokenwatch.core import detect, recent, rules
from tokenwatch.core.admission import Signal
from tokenwatch.core.models import BudgetStatus, UsageEvent
from tokenwatch.core.recent import Recent
from tokenwatch.core.rules import DEFAULT_RULES, Rules

T0 = 1_795_000_000.0
TWITCHY = [
    RuleSettings(name="loop2", detector="runaway", threshold=2, window=10, cooldown=0),
    RuleSettings(name="spike2", detector="spike", threshold=1.5, window=3, cooldown=1),
    RuleSettings(name="ctx2", detector="context_growth", threshold=2, cooldown=0),
    RuleSettings(name="tt", detector="task_tokens", threshold=1.2, cooldown=0),
    RuleSettings(name="big", detector="huge_request", threshold=5000, cooldown=0),
]
"""Small windows, thresholds and no cooldown, so short random histories make them fire."""
DAILY = BudgetStatus("day", "global", "", "day", 0.2, "usd", 0.0, "alert", T0 + 9e4, T0 + 10)


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Step:
    gap: float
    """Seconds after the previous call (negative now and then: clients' clocks disagree)."""
    late: float
    """How far the supervisor's clock is past the call's own time."""
    agent: str
    prompt: int
    size: int
    """Prompt tokens; 0: twice the previous prompt (a context snowballing)."""
    ok: bool
    task: str
    ends_task: bool


steps = st.builds(
    Step,
    gap=st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0, 1.0, 2.0, 3.0, 7.0, 30.0, -0.5]),
    late=st.sampled_from([0.0, 0.0, 0.1, 2.0]),
    agent=st.sampled_from(["a", "a", "b"]),
    prompt=st.integers(0, 5),
    size=st.sampled_from([0, 0, 100, 900, 990, 1000, 1100, 1111, 3000, 9000]),
    ok=st.sampled_from([True, True, True, False]),
    task=st.sampled_from(["t1", "t1", "t2", ""]),
    ends_task=st.sampled_from([False, False, False, True]),
)


def run(history: list[Step], *, scan: bool, budget: bool = False, kept: int = 6) -> list[Signal]:
    clock = Clock()
    budgets = [DAILY] if budget else []
    book = Rules([*DEFAULT_RULES, *TWITCHY], clock=clock, budgets=lambda: budgets)
    signals: list[Signal] = []
    with _scanning(scan, kept):
        for event, step in zip(_events(history), history, strict=True):
            clock.now = event.ts + step.late
            signals += book.observe(event)
            if step.ends_task:
                signals += book.task_ended(event.agent, event.task)
    return signals


def _events(history: list[Step]) -> Iterator[UsageEvent]:
    ts, size = T0, 1000
    for s in history:
        ts += s.gap
        size = (
            s.size or 2 * size
        )  # Prompts 0-2 are exact repeats; 3-5 share one shape with a number changed.
        yield UsageEvent(
            ts=ts,
            agent=s.agent,
            task=s.task,
            input_tokens=size,
            output_tokens=50,
            cost_usd=size * 1e-6,
            status="ok" if s.ok else "error",
            prompt_hash=f"h{s.prompt}" if s.prompt < 3 else f"h{s.prompt}-{ts}",
            prompt_shape=f"s{min(s.prompt, 3)}",
        )


@contextmanager
def _scanning(scan: bool, kept: int) -> Iterator[None]:
    """Histories of `kept` calls and lists compacted early; `scan` skips the index."""
    with (
        mock.patch.object(rules, "HISTORY_CALLS", kept),
        mock.patch.object(recent, "COMPACT_AT", 2),
        mock.patch.object(Recent, "ordered", return_value=False) if scan else _nothing(),
    ):
        yield


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@settings(max_examples=400)
@given(st.lists(steps, min_size=1, max_size=80), st.booleans(), st.sampled_from([4, 9, 2000]))
def test_the_index_gives_the_same_signals_as_reading_the_whole_history(
    history: list[Step], budget: bool, kept: int
) -> None:
    indexed = run(history, scan=False, budget=budget, kept=kept)
    assert indexed == run(history, scan=True, budget=budget, kept=kept)


def test_the_differential_test_sees_signals() -> None:
    """The generated histories do make the twitchy rules fire, so the comparison means something."""
    loop = [Step(1.0, 0.0, "a", 0, 1000, True, "t1", False)] * 4
    fired = {s.alert.rule for s in run(loop, scan=False)}
    assert {"loop2", "runaway"} <= fired


@given(st.lists(st.integers(1, 50), max_size=40))
def test_the_usual_task_is_the_median_of_the_tasks_still_remembered(tokens: list[int]) -> None:
    with mock.patch.object(rules, "TASKS_KEPT", 5):
        mem = rules._AgentMemory()
    for i, t in enumerate(tokens):
        mem.finish(float(i), t, 100 - t)
        assert mem.usual == detect.usual_task([t for _, t in mem.finished])
        assert mem.usual_calls == detect.usual_task(list(mem.lengths))

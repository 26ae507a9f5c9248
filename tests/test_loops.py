"""Loop detectors with the default rules, in each wire format: each pauses its pattern by its
third repeat (alternation: its third cycle) and leaves each healthy look-alike alone."""

from __future__ import annotations

import random

import pytest
from budget_fixtures import Clock
from test_detect import T0, sent

from bench.traces import agents
from bench.traces.wire import WIRES
from tokenwatch.core import loops
from tokenwatch.core.admission import Signal
from tokenwatch.core.models import UsageEvent
from tokenwatch.core.rules import DEFAULT_RULES, Rules


def acted(events: list[UsageEvent]) -> list[tuple[int, Signal]]:
    """(call index, signal) of every throttle, pause or kill under the default rules."""
    clock = Clock(T0)
    rules = Rules(DEFAULT_RULES, clock=clock)
    out: list[tuple[int, Signal]] = []
    for i, event in enumerate(events):
        clock.now = event.ts + (event.latency_ms or 0) / 1000  # it arrives once answered
        out += [(i, s) for s in rules.observe(event) if s.action != "alert"]
    return out


@pytest.mark.parametrize("wire", WIRES)
def test_a_tool_loop_is_paused_on_its_third_repeat_naming_the_call(wire: str) -> None:
    done = agents.tool_loop(random.Random(1), wire)
    first, signal = acted(done.events)[0]
    assert first == (done.start or 0) + 2
    assert (signal.action, signal.alert.rule) == ("pause", "tool-loop")
    assert signal.alert.message == (
        'coder called search_files(pattern="payment*.yaml") 3 times in a row, same result; paused'
    )


TURN_LOOP = (
    "checker added the same turn to its conversation 3 times in a row, answered alike each time"
)
ALTERNATION = (
    'fixer went back and forth between edit_file(path="pyproject.toml", version=2) and '
    'edit_file(path="pyproject.toml", version=1) 3 times, same results'
)


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize(
    ("kind", "calls", "rule", "message"),
    [("turn_loop", 3, "turn-loop", TURN_LOOP), ("alternation", 6, "alternation", ALTERNATION)],
)
def test_a_repeated_turn_and_an_edit_undone_again_and_again_are_paused(
    wire: str, kind: str, calls: int, rule: str, message: str
) -> None:
    """A question asked again and answered alike, by its third repeat; two steps undoing each
    other, by their third cycle."""
    done = agents.RUNAWAYS[kind](random.Random(2), wire)
    first, signal = acted(done.events)[0]
    assert first == (done.start or 0) + calls - 1
    assert signal.alert.rule == rule
    assert signal.alert.message == f"{message}; paused"


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("kind", sorted(agents.HEALTHY))
def test_healthy_look_alikes_are_left_alone(kind: str, wire: str) -> None:
    for seed in range(3):
        done = agents.HEALTHY[kind](random.Random(seed), wire)
        found = [(i, s.alert.message) for i, s in acted(done.events)]
        assert found == [], f"{kind} ({wire}, seed {seed})"


# -- the whole-prompt repeat ----------------------------------------------------------------------

PROMPT = "How many jobs are waiting?"


def steps(gaps: list[float], latency: float = 1.0, **kw: object) -> list[UsageEvent]:
    """Calls of one prompt, each `gap` s after the one before ended."""
    out, ts = [], T0
    for gap in gaps:
        out.append(sent(ts, PROMPT, 300, latency_ms=latency * 1000, **kw))
        ts += latency + gap
    return out


def test_the_same_prompt_sent_again_at_once_is_a_loop_on_its_third_call() -> None:
    events = steps([0.5, 0.5, 0.5])
    assert loops.runaway(events[:2], events[1].ts) is None
    finding = loops.runaway(events, events[2].ts)
    assert finding is not None
    assert finding.message == "researcher repeated the same prompt 3 times in a row in 3 s"


def test_a_steady_poller_is_not_a_loop() -> None:
    assert loops.runaway(steps([20, 20, 20]), T0 + 63) is None
    assert loops.runaway(steps([9.5, 9.5, 9.5]), T0 + 33) is not None


def test_identical_requests_in_flight_at_once_are_copies_not_steps() -> None:
    copies = [sent(T0 + 0.01 * i, PROMPT, 300, overlap=i) for i in range(5)]
    assert [loops.counts(e) for e in copies] == [True, False, False, False, False]
    clock = Clock(T0)
    rules = Rules(DEFAULT_RULES, clock=clock)
    assert [s for e in copies for s in rules.observe(e)] == []


def test_a_template_interleaved_with_other_shapes_is_not_a_loop() -> None:
    events = []
    for i in range(6):
        events.append(sent(T0 + i, f"Classify ticket {1000 + i}: password reset", 300))
        events.append(sent(T0 + i + 0.5, f"Route ticket {1000 + i}: password reset", 300))
    assert all(loops.runaway(events[: i + 1], e.ts) is None for i, e in enumerate(events))
    in_a_row = events[::2]  # the classify calls alone
    assert loops.runaway(in_a_row[:3], in_a_row[2].ts) is not None  # the same, not interleaved


def test_failed_retries_do_not_count_as_repeats() -> None:
    retries = steps([0.5, 0.5], status="error", http_status=429)
    ok = steps([0.5])[0]
    ok.ts = retries[-1].ts + 2
    assert loops.runaway([e for e in [*retries, ok] if loops.counts(e)], ok.ts) is None

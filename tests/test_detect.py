"""Each detector fires on its pattern and stays quiet on healthy traffic that looks like it."""

from __future__ import annotations

import datetime as dt

from budget_fixtures import Clock, at

from tokenwatch.config import BudgetSettings
from tokenwatch.core import detect
from tokenwatch.core.budgets import Budgets
from tokenwatch.core.models import UsageEvent
from tokenwatch.core.tokens import prompt_hash, prompt_shape_hash

T0 = at("2026-11-23 10:00")


def sent(
    ts: float, prompt: object, tokens: int, agent: str = "researcher", **kw: object
) -> UsageEvent:
    """A call as the SDK or proxy reports it: hashes of the prompt, never the prompt."""
    return UsageEvent(
        ts=ts,
        agent=agent,
        model="gpt-4o",
        input_tokens=tokens,
        output_tokens=200,
        prompt_hash=prompt_hash(prompt),
        prompt_shape=prompt_shape_hash(prompt),
        **kw,  # type: ignore[arg-type]
    )


def first_firing(events: list[UsageEvent], check: object) -> int | None:
    """Index of the first call after which `check(events so far, now)` finds something."""
    for i in range(len(events)):
        if check(events[: i + 1], events[i].ts) is not None:  # type: ignore[operator]
            return i
    return None


def chat_with_short_turns(turns: int = 30) -> list[UsageEvent]:
    """A person chatting: `ok`, `go on`, `ok` ... every few seconds; the history grows."""
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are helpful."}]
    events = []
    for i in range(turns):
        messages.append({"role": "user", "content": "ok" if i % 2 else "go on"})
        events.append(sent(T0 + 4 * i, list(messages), 40 + 60 * i, agent="chat"))
        messages.append({"role": "assistant", "content": f"Here is part {i + 1} of the story."})
    return events


def batch_job(calls: int = 200) -> list[UsageEvent]:
    """Many different documents summarised as fast as the API allows."""
    words = ["invoice", "contract", "memo", "report", "letter", "minutes", "brief", "note"]
    return [
        sent(
            T0 + 0.3 * i,
            f"Summarise this {words[i % 8]}: {' '.join(words[(i * k) % 8] for k in range(40))} "
            f"from {words[(i // 8) % 8]} {words[(i // 64) % 8]}",
            800 + (i * 37) % 400,
            agent="batch",
        )
        for i in range(calls)
    ]


def long_expensive_task(calls: int = 40) -> list[UsageEvent]:
    """One task reading a big fixed document and asking a different question each step."""
    questions = ["who", "what", "when", "where", "why", "how", "which", "whose"]
    return [
        sent(
            T0 + 20 * i,
            f"<6000-token document> Question {questions[i % 8]} {questions[(i // 8) % 8]}",
            6000 + (i % 5) * 50,
            agent="analyst",
            task="audit",
        )
        for i in range(calls)
    ]


HEALTHY = {
    "chat": chat_with_short_turns,
    "batch": batch_job,
    "long task": long_expensive_task,
}


def test_no_detector_fires_on_healthy_traffic_that_looks_like_a_problem() -> None:
    checks = {
        "spike": detect.spike,
        "context_growth": lambda events, now: detect.context_growth(events),
    }
    for kind, make in HEALTHY.items():
        events = make()
        for name, check in checks.items():
            assert first_firing(events, check) is None, f"{name} fired on {kind}"


# -- spike --------------------------------------------------------------------------------------------


def steady(calls: int, every: float, tokens: int, start: float = T0) -> list[UsageEvent]:
    return [sent(start + every * i, f"step {chr(65 + i % 26)}{i}", tokens) for i in range(calls)]


def test_spike_fires_when_an_agent_burns_far_above_its_own_baseline() -> None:
    baseline = steady(30, 60, 1000)  # 1.2k tokens/min for half an hour
    burst_start = baseline[-1].ts + 60
    burst = [sent(burst_start + 5 * i, f"tool output {i}", 3000) for i in range(12)]
    events = baseline + burst
    hit = first_firing(events, detect.spike)
    assert hit is not None
    assert hit >= len(baseline) + detect.SPIKE_MIN_CALLS - 1  # never on the first burst call
    finding = detect.spike(events[: hit + 1], events[hit].ts)
    assert finding is not None
    assert "x its usual 1.2" in finding.message  # ~1.2k tokens/min before the burst


def test_a_pasted_file_at_the_usual_pace_is_not_a_spike() -> None:
    # A coding agent calling every 10 s pastes a 12k-token file: 7x the tokens a minute, but
    # calls come no faster than before.
    before = steady(180, 10, 2000)
    pasted = [sent(before[-1].ts + 10 * (i + 1), f"with file {i}", 14_000) for i in range(12)]
    assert first_firing(before + pasted, detect.spike) is None
    fanned_out = [sent(before[-1].ts + i + 1, f"subtask {i}", 14_000) for i in range(30)]
    assert first_firing(before + fanned_out, detect.spike) is not None


def test_idle_spells_between_tasks_do_not_set_the_usual_pace() -> None:
    # Six short tasks (4 calls 10 s apart, 90 s of idle before each), then a task that reads
    # three big files at that same pace: 10x the tokens a minute, but no faster than the agent
    # always works inside a task. The idle spells before its tasks are not its pace.
    events: list[UsageEvent] = []
    ts = T0
    for task in range(6):
        ts += 80
        for step in range(4):
            ts += 10
            events.append(sent(ts, f"t{task} s{step}", 2000, task=f"issue-{task}"))
    for step, tokens in enumerate([9000, 16_000, 22_000, 22_500, 23_000, 23_400, 24_000]):
        ts += 10
        events.append(sent(ts, f"big s{step}", tokens, task="issue-6"))
    assert first_firing(events, detect.spike) is None
    fanned_out = [sent(ts + 1 + i, f"subtask {i}", 9000, task="issue-6") for i in range(30)]
    assert first_firing(events + fanned_out, detect.spike) is not None


def test_spike_needs_a_baseline_and_more_than_one_big_call() -> None:
    fast_from_the_start = [sent(T0 + i, f"doc {i}", 3000) for i in range(60)]
    assert first_firing(fast_from_the_start, detect.spike) is None
    one_big = [*steady(30, 60, 1000), sent(T0 + 1810, "a huge one", 90_000)]
    assert first_firing(one_big, detect.spike) is None


def test_hourly_spend_over_the_daily_pace_counts_as_a_spike() -> None:
    budgets = Budgets([BudgetSettings(name="daily", limit="$24")], tz="UTC", clock=lambda: T0)
    rows = budgets.statuses()
    events = [sent(T0 - 3000 + 60 * i, f"q{i}", 1000, cost_usd=0.2) for i in range(50)]
    finding = detect.hourly_overspend(events, T0, rows)
    assert finding is not None
    assert "spent $10.00 in the last hour, 10x the hourly pace of budget daily" in finding.message
    assert detect.hourly_overspend(events[:20], T0, rows) is None  # $4 in the hour: under 5x
    events[-1].price_source = "estimated:claude-opus-4-5"  # one call to a model no table knows
    finding = detect.hourly_overspend(events, T0, rows)
    assert finding is not None
    assert "spent $10.00* in the last hour" in finding.message


# -- task tokens, context growth, drift --------------------------------------------------------------


def test_task_tokens_compares_a_task_with_the_agents_usual_or_its_limit() -> None:
    usual = [10_000, 12_000, 9_000]
    assert detect.task_tokens("a", "t", 35_000, usual[:2]) is None  # too little history
    assert detect.task_tokens("a", "t", 29_000, usual) is None
    finding = detect.task_tokens("a", "t", 31_000, usual)
    assert finding is not None
    assert finding.message == "a's task t has used 31k tokens, 3.1x its usual 10k per task"
    # With its calls known, the task must also have run on: 3x the usual calls.
    assert detect.task_tokens("a", "t", 31_000, usual, calls=6, finished_calls=[5, 6, 4]) is None
    long = detect.task_tokens("a", "t", 31_000, usual, calls=16, finished_calls=[5, 6, 4])
    assert long is not None
    assert long.message == (
        "a's task t has used 31k tokens in 16 calls, 3.1x its usual 10k per task in 5 calls"
    )
    by_limit = detect.task_tokens("a", "t", 16_000, [], limit=5000)
    assert by_limit is not None
    assert "3.2x its limit of 5k" in by_limit.message


def test_context_growth_fires_when_the_prompt_snowballs_within_a_task() -> None:
    sizes = [int(12_000 * 1.2**i) for i in range(5)]  # tool output appended, never trimmed
    growing = [sent(T0 + 10 * i, f"step {i}", size, task="t") for i, size in enumerate(sizes)]
    assert detect.context_growth(growing[:3]) is None
    finding = detect.context_growth(growing[:4])
    assert finding is not None
    assert finding.message == (
        "researcher's prompt grew by 10% or more call after call over its last 4 calls, "
        "from 12k to 20.7k tokens, without the task ending"
    )
    two_tasks = [
        sent(e.ts, "s", e.input_tokens, task="t" if i < 2 else "u") for i, e in enumerate(growing)
    ]
    assert detect.context_growth(two_tasks) is None


def test_context_growth_leaves_a_coder_and_a_pasted_file_alone() -> None:
    def calls(sizes: list[int]) -> list[UsageEvent]:
        return [sent(T0 + 10 * i, f"step {i}", n, task="t") for i, n in enumerate(sizes)]

    def fires(events: list[UsageEvent]) -> bool:
        return first_firing(events, lambda some, now: detect.context_growth(some)) is not None

    assert not fires(calls([12_000 + 900 * i for i in range(20)]))  # a coder's steps
    assert not fires(calls([3000, 3500, 15_500, 16_000, 16_600, 17_000, 17_800]))  # a file pasted
    # Early steps grow a small context by a tenth each; then the paste.
    assert not fires(calls([4900, 5500, 6100, 6800, 19_300, 19_900]))


def test_drift_compares_tokens_per_task_with_the_period_before() -> None:
    day = 86400.0
    before = [(T0 - day - 3600 * i, 10_000) for i in range(3)]
    assert detect.drift("a", [*before, *((T0 - 60 * i, 12_000) for i in range(3))], T0) is None
    finding = detect.drift("a", [*before, *((T0 - 60 * i, 14_000) for i in range(3))], T0)
    assert finding is not None
    assert finding.message == "a now uses 14k tokens per task, up 40% from 10k in the period before"


def test_huge_request_is_about_one_prompt_far_over_the_agents_usual() -> None:
    # A coding agent's ordinary 8-20k contexts are its usual, not news; with no usual yet,
    # there is nothing to compare with.
    assert detect.huge_request(sent(T0, "x", 60_000)) is None
    assert detect.huge_request(sent(T0, "x", 8000), usual=1000) is None
    assert detect.huge_request(sent(T0, "x", 40_000), usual=12_000) is None
    finding = detect.huge_request(sent(T0, "x", 52_000), usual=12_000)
    assert finding is not None
    assert finding.message == (
        "researcher sent a 52k-token prompt to gpt-4o, 4x its usual 12k (over 8k)"
    )
    assert detect.usual_prompt([12_000] * 4) is None
    assert detect.usual_prompt([9000, 12_000, 20_000, 11_000, 15_000]) == 12_000


def test_forecast_names_the_budget_and_when_it_runs_out() -> None:
    clock = Clock(at("2026-11-23 00:00"))
    budgets = Budgets([BudgetSettings(name="daily", limit="10k")], tz="UTC", clock=clock)
    for _ in range(4):
        budgets.record(sent(clock.now, "x", 800))  # 1k per hour
        clock.advance(3600)
    finding = detect.forecast("researcher", budgets.statuses(), clock.now, dt.UTC)
    assert finding is not None
    assert finding.message == (
        "at the current rate budget daily runs out at 10:00, before it resets at 00:00 (40% used)"
    )
    assert detect.forecast("researcher", [], clock.now) is None

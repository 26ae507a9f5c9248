"""The rule book: what fires, when it repeats, how it escalates, and who is spared."""

from __future__ import annotations

from dataclasses import replace

import pytest
from budget_fixtures import Clock, at
from test_detect import HEALTHY, long_expensive_task, sent

from tokenwatch.config import BudgetSettings, ConfigError, RuleSettings
from tokenwatch.core.admission import Signal
from tokenwatch.core.budgets import Budgets
from tokenwatch.core.models import UsageEvent
from tokenwatch.core.rules import DEFAULT_RULES, Rules

T0 = at("2026-11-23 10:00")
LOOP = [{"role": "user", "content": "Run the tests and fix what fails."}]


def feed(rules: Rules, clock: Clock, events: list[UsageEvent]) -> list[Signal]:
    """Events as they happen live: the clock reads each event's time when it arrives."""
    out: list[Signal] = []
    for e in events:
        clock.now = e.ts
        out += rules.observe(e)
    return out


def loop(
    n: int, start: float = T0, every: float = 10.0, agent: str = "researcher"
) -> list[UsageEvent]:
    """An agent sending one prompt again as soon as each answer is in (a 6 s call, 4 s idle)."""
    return [sent(start + every * i, LOOP, 900, agent=agent, latency_ms=6000.0) for i in range(n)]


def test_a_runaway_agent_is_paused_with_a_message_a_person_can_act_on() -> None:
    clock = Clock(T0)
    signals = feed(Rules(DEFAULT_RULES, clock=clock), clock, loop(3))
    (signal,) = signals
    assert (signal.action, signal.agent, signal.alert.rule) == ("pause", "researcher", "runaway")
    assert (
        signal.alert.message
        == "researcher repeated the same prompt 3 times in a row in 20 s; paused"
    )
    assert signal.alert.severity == "critical"
    assert signal.alert.ts == T0 + 20


def test_the_default_rules_leave_healthy_look_alikes_alone() -> None:
    for kind, make in HEALTHY.items():
        clock = Clock(T0)
        rules = Rules(DEFAULT_RULES, clock=clock)
        acted = [s for s in feed(rules, clock, make()) if s.action != "alert"]
        assert acted == [], f"{kind}: {[s.alert.message for s in acted]}"


def test_the_default_rules_pause_a_snowballing_prompt_on_its_fourth_growing_call() -> None:
    clock = Clock(T0)
    sizes = [3000, 3400, *(int(12_000 * 1.2**i) for i in range(6))]
    calls = [sent(T0 + 10 * i, f"step {i}", n, task="fix") for i, n in enumerate(sizes)]
    rules = Rules(DEFAULT_RULES, clock=clock)
    signals = [(i, s) for i, e in enumerate(calls) for s in feed(rules, clock, [e])]
    acted = [(i, s.action, s.alert.message) for i, s in signals if s.alert.rule != "huge-request"]
    assert acted == [
        (
            5,
            "pause",
            "researcher's prompt grew by 10% or more call after call over its last 4 calls, "
            "from 12k to 20.7k tokens, without the task ending; paused",
        )
    ]


def test_a_rule_keeps_quiet_during_its_cooldown() -> None:
    clock = Clock(T0)
    rule = RuleSettings(name="loop", detector="runaway", action="alert", cooldown=120)
    signals = feed(Rules([rule], clock=clock), clock, loop(12))  # 110 s of looping
    assert len(signals) == 1
    more = feed(Rules([rule], clock=clock), clock, loop(16))  # 150 s: past the cooldown
    assert [s.alert.ts - T0 for s in more] == [20, 140]


def test_a_rule_that_keeps_firing_escalates_in_order_then_stays_at_the_last_step() -> None:
    clock = Clock(T0)
    rule = RuleSettings(
        name="loop",
        detector="runaway",
        action="throttle",
        escalate=["pause", "kill"],
        cooldown=30,
        rate="20k/min",
    )
    signals = feed(Rules([rule], clock=clock), clock, loop(40))
    assert [s.action for s in signals][:5] == ["throttle", "pause", "kill", "kill", "kill"]
    assert signals[0].rate == "20k/min"
    assert signals[0].alert.message.endswith("; throttled to 20k/min")
    assert signals[2].alert.message.endswith("; stopped")


def test_escalation_starts_over_after_a_long_quiet_spell() -> None:
    clock = Clock(T0)
    rule = RuleSettings(
        name="loop", detector="runaway", action="throttle", escalate=["kill"], cooldown=30
    )
    rules = Rules([rule], clock=clock)
    first = feed(rules, clock, loop(3))
    later = feed(rules, clock, loop(3, start=T0 + 3600))
    assert [s.action for s in first + later] == ["throttle", "throttle"]


def test_firing_again_needs_fresh_evidence_not_the_calls_already_acted_on() -> None:
    clock = Clock(T0)
    rule = RuleSettings(
        name="loop", detector="runaway", action="pause", escalate=["kill"], cooldown=5, window=60
    )
    rules = Rules([rule], clock=clock)
    assert [s.action for s in feed(rules, clock, loop(3))] == ["pause"]
    # One more identical call after the cooldown: 4 within the window, but only 1 since firing.
    assert feed(rules, clock, loop(1, start=T0 + 30)) == []


def test_a_critical_agent_is_only_ever_alerted_on() -> None:
    clock = Clock(T0)
    rule = RuleSettings(
        name="loop", detector="runaway", action="pause", escalate=["kill"], cooldown=10
    )
    rules = Rules([rule], clock=clock, is_critical=lambda name: name == "prod-bot")
    signals = feed(rules, clock, loop(12, agent="prod-bot"))
    assert len(signals) >= 2
    assert {s.action for s in signals} == {"alert"}
    assert signals[0].alert.message == (
        "prod-bot repeated the same prompt 3 times in a row in 20 s; prod-bot is critical: not paused, "
        "only alerted"
    )
    assert "not killed" in signals[1].alert.message
    other = feed(rules, clock, loop(3, start=T0 + 500))
    assert [s.action for s in other] == ["pause"]


def test_alert_only_detectors_never_act_whatever_the_rule_says() -> None:
    clock = Clock(T0)
    rule = RuleSettings(name="big", detector="huge_request", action="kill", cooldown=0)
    usual = [sent(T0 + i, f"small {i}", 2000) for i in range(5)]
    (signal,) = feed(Rules([rule], clock=clock), clock, [*usual, sent(T0 + 9, "x", 20_000)])
    assert (signal.action, signal.alert.action) == ("alert", "alert")
    assert signal.alert.severity == "info"


def test_rules_watch_only_the_agents_their_glob_names_and_can_be_switched_off() -> None:
    clock = Clock(T0)
    rules = Rules(
        [
            RuleSettings(name="loop", detector="runaway", action="pause", agents="ci-*"),
            RuleSettings(name="off", detector="runaway", action="kill", enabled=False),
        ],
        clock=clock,
    )
    assert rules.names() == ["loop"]
    assert feed(rules, clock, loop(5, agent="researcher")) == []
    assert [s.agent for s in feed(rules, clock, loop(3, agent="ci-7"))] == ["ci-7"]


def test_a_spike_needs_several_fast_calls_not_one_big_one() -> None:
    clock = Clock(T0)
    rule = RuleSettings(name="spike", detector="spike", action="throttle")
    baseline = [sent(T0 + 60 * i, f"s{i}", 1000) for i in range(30)]
    one_big = Rules([rule], clock=clock)
    assert feed(one_big, clock, [*baseline, sent(T0 + 1805, "one huge call", 60_000)]) == []
    rules = Rules([rule], clock=clock)
    feed(rules, clock, baseline)
    burst = [sent(T0 + 1805 + 4 * i, f"b{i}", 4000) for i in range(6)]
    fired_at = [i for i, e in enumerate(burst) if feed(rules, clock, [e])]
    assert fired_at == [2]  # the third fast call makes a rate; the cooldown holds after


def test_a_spike_that_goes_on_escalates_after_its_cooldown() -> None:
    clock = Clock(T0)
    rule = RuleSettings(
        name="spike", detector="spike", action="throttle", escalate=["pause"], cooldown=120
    )
    rules = Rules([rule], clock=clock)
    feed(rules, clock, [sent(T0 + 60 * i, f"s{i}", 1000) for i in range(30)])
    burst = [sent(T0 + 1805 + 4 * i, f"b{i}", 4000) for i in range(90)]  # 6 minutes of it
    signals = feed(rules, clock, burst)
    assert [s.action for s in signals] == ["throttle", "pause", "pause"]
    assert signals[1].alert.ts - signals[0].alert.ts >= 120


def test_task_tokens_learns_an_agents_usual_task_from_the_tasks_it_finished() -> None:
    clock = Clock(T0)
    rules = Rules([RuleSettings(name="tt", detector="task_tokens", action="pause")], clock=clock)
    ts = T0
    for n in range(3):
        for _ in range(5):
            ts += 10
            feed(rules, clock, [sent(ts, f"t{n}-{ts}", 1800, task=f"t{n}")])
        assert rules.task_ended("researcher", f"t{n}") == []
    # Usual task: 5 x 2k = 10k tokens. A task past 30k is flagged, once.
    signals = []
    for _ in range(20):
        ts += 10
        signals += feed(rules, clock, [sent(ts, f"t3-{ts}", 1800, task="t3")])
    (signal,) = signals
    assert signal.alert.message == (
        "researcher's task t3 has used 32k tokens in 16 calls, 3.2x its usual 10k per task in "
        "5 calls; paused"
    )


def test_a_task_ends_when_the_agent_says_so_or_moves_on_to_another() -> None:
    clock = Clock(T0)
    rule = RuleSettings(name="drift", detector="drift", window=3600, cooldown=0)
    rules = Rules([rule], clock=clock)
    signals: list[Signal] = []
    for i in range(6):  # three tasks of 2k, then three of 3k, one every 15 minutes
        clock.now = T0 + 900 * i
        signals += rules.observe(sent(clock.now, f"p{i}", 1800 + 1000 * (i >= 3), task=f"job{i}"))
        if i < 5:
            signals += rules.task_ended("researcher", f"job{i}")
    # job5 has not ended: moving on to job6 ends it.
    clock.now = T0 + 900 * 6
    signals += rules.observe(sent(clock.now, "p6", 1800, task="job6"))
    assert [s.alert.rule for s in signals] == ["drift"]
    assert "up 50% from 2k" in signals[0].alert.message
    assert rules.task_ended("researcher", "never-started") == []


def test_forecast_rule_reads_budget_statuses_and_repeats_only_after_cooldown() -> None:
    clock = Clock(at("2026-11-23 00:00"))
    budgets = Budgets([BudgetSettings(name="daily", limit="10k")], tz="UTC", clock=clock)
    rules = Rules(
        [RuleSettings(name="fc", detector="forecast", cooldown=3600)],
        clock=clock,
        budgets=budgets.statuses,
    )
    signals: list[Signal] = []
    for _ in range(8):  # 1k tokens every 30 minutes: 10k by 05:00
        e = sent(clock.now, "x", 800)
        budgets.record(e)
        signals += rules.observe(e)
        clock.advance(1800)
    # First seen at 00:30 (a rate needs a minute of history), holds at 01:00, then hourly.
    hours = ["01:00", "02:00", "03:00"]
    assert [s.alert.ts for s in signals] == [at(f"2026-11-23 {h}") for h in hours]
    assert "budget daily runs out at" in signals[0].alert.message


@pytest.mark.parametrize(
    ("rule", "words"),
    [
        (RuleSettings(name="x", detector="psychic"), "unknown detector 'psychic'"),
        (RuleSettings(name="x", detector="runaway", action="nuke"), "unknown action 'nuke'"),
        (RuleSettings(name="x", detector="runaway", escalate=["pause", "boom"]), "'boom'"),
        (RuleSettings(name="x", detector="runaway", cooldown=-1), "cannot be negative"),
    ],
)
def test_a_rule_that_cannot_work_is_refused_with_its_name(rule: RuleSettings, words: str) -> None:
    with pytest.raises(ConfigError, match="rule x") as info:
        Rules([rule])
    assert words in str(info.value)


def test_replacing_rules_keeps_what_was_learnt_about_agents() -> None:
    clock = Clock(T0)
    rules = Rules([RuleSettings(name="a", detector="huge_request")], clock=clock)
    feed(rules, clock, loop(2))
    rules.replace([RuleSettings(name="loop", detector="runaway", action="pause")])
    assert rules.names() == ["loop"]
    assert [s.action for s in feed(rules, clock, loop(1, start=T0 + 25))] == ["pause"]


def test_a_small_day_budget_does_not_make_a_steady_agent_a_spike() -> None:
    # The tour's researcher: a healthy call every 20 s under a $0.01 day budget. Its spend is
    # the budget's business (warnings at 50 and 80 %, its action at the limit); the spike rule
    # also fired when the hour's spend passed 5x the budget / 24, pausing it at 21 % of it.
    clock = Clock(T0)
    budgets = Budgets(
        [BudgetSettings(scope="agent", target="researcher", limit="$0.01", action="pause")],
        tz="UTC",
        clock=clock,
    )
    rules = Rules(DEFAULT_RULES, clock=clock, budgets=budgets.statuses)
    calls = [replace(e, agent="researcher", cost_usd=0.0002) for e in long_expensive_task(30)]
    fired: list[Signal] = []
    for e in calls:
        clock.now = e.ts
        budgets.record(e)
        fired += rules.observe(e)
    assert budgets.statuses()[0].fraction == pytest.approx(0.6)
    assert [s.alert.message for s in fired if s.action != "alert"] == []  # the forecast alerts

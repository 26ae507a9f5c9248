"""`rules test` replays exactly what live enforcement did on the same events, and changes nothing."""

from __future__ import annotations

import random

import anyio
from budget_fixtures import Clock, at
from supervisor_fixtures import running_supervisor
from test_detect import batch_job, chat_with_short_turns, long_expensive_task, sent

from bench.traces import agents
from tokenwatch.config import BudgetSettings, Config, RuleSettings, SupervisorSettings
from tokenwatch.core.admission import Signal
from tokenwatch.core.budgets import Budgets
from tokenwatch.core.models import Alert, UsageEvent
from tokenwatch.core.replay import Replay
from tokenwatch.core.rules import Rules
from tokenwatch.paths import Paths

T0 = at("2026-11-23 10:00")
BUDGETS = [
    BudgetSettings(name="daily", limit="150k"),
    BudgetSettings(name="res", scope="agent", target="researcher", limit="20k", action="pause"),
]
RULES = [
    RuleSettings(name="loop", detector="runaway", action="throttle", escalate=["pause", "kill"],
                 cooldown=30),
    RuleSettings(name="big", detector="huge_request", threshold=5000, cooldown=120),
    RuleSettings(name="tasks", detector="task_tokens", action="pause"),
    RuleSettings(name="tools", detector="tool_loop", action="pause", escalate=["kill"]),
    RuleSettings(name="turns", detector="turn_loop", action="pause", escalate=["kill"]),
    RuleSettings(name="undo", detector="alternation", action="pause"),
]  # fmt: skip


def history() -> list[UsageEvent]:
    """Healthy traffic interleaved with a loop that starts, stops, and starts again."""
    loop = [{"role": "user", "content": "Try again."}]
    events = [*chat_with_short_turns(), *batch_job(60), *long_expensive_task(20)]
    events += [sent(T0 + 30 + 6 * i, loop, 1500) for i in range(25)]
    events += [sent(T0 + 900 + 6 * i, loop, 1500) for i in range(10)]
    # an agent of small prompts that, once, sends a whole repository
    events += [sent(T0 + 400 + 5 * i, f"question {i}", 1200, agent="repo-reader") for i in range(6)]
    events.append(sent(T0 + 431, "the whole repository", 30_000, agent="repo-reader"))
    # agents in the three wire formats: loops of each kind, and look-alikes
    for i, make in enumerate(agents.RUNAWAYS.values()):
        events += make(random.Random(i), agents.wire_for(i)).events
    for i, healthy in enumerate(agents.HEALTHY.values()):
        events += healthy(random.Random(i), agents.wire_for(i)).events
    return sorted(events, key=lambda e: e.ts)


def seen(ts: float, alert: Alert) -> tuple[float, str, str, str, str]:
    return (ts, alert.rule, alert.agent, alert.action, alert.message)


def live(events: list[UsageEvent]) -> list[tuple[float, str, str, str, str]]:
    """What the engine does with each stored event: budgets, then rules, on its own clock."""
    clock = Clock(T0)
    budgets = Budgets(BUDGETS, tz="UTC", clock=clock)
    rules = Rules(RULES, clock=clock)
    out = []
    for e in events:
        clock.now = e.ts
        signals: list[Signal] = [*budgets.record(e), *rules.observe(e)]
        out += [seen(e.ts, s.alert) for s in signals]
    return out


def test_replay_fires_what_live_enforcement_fired_at_the_same_times() -> None:
    events = history()
    expected = live(events)
    assert {a[1] for a in expected} >= {"loop", "big", "budget:res", "tools", "turns", "undo"}

    replay = Replay(BUDGETS, RULES, since=events[0].ts, tz="UTC")
    result = replay.feed_all(events)
    assert [seen(f.ts, f.signal.alert) for f in result.fired] == expected
    assert (result.events, result.first_ts, result.last_ts) == (
        len(events),
        events[0].ts,
        events[-1].ts,
    )


async def test_replaying_the_ledger_of_a_live_supervisor_matches_its_stored_alerts() -> None:
    events = history()
    clock = Clock(T0)
    config = Config(supervisor=SupervisorSettings(timezone="UTC"), budget=BUDGETS, rule=RULES)
    paths = Paths.discover()
    async with running_supervisor(paths, config, clock=clock, proxy=False, exporters=False) as sup:
        assert sup.engine is not None
        assert sup.store is not None
        for e in events:
            clock.now = e.ts
            await sup.engine.ingest([e])
        with anyio.fail_after(30):
            while len(stored := await sup.store.list_alerts(since=0, limit=10_000)) < len(
                live(events)
            ):
                await anyio.sleep(0.01)
        await sup.store.flush()
        before = await sup.store.count_events()

        replay = Replay(config.budget, config.rule, since=events[0].ts, tz="UTC")
        result = await replay.feed_store(sup.store)
        assert await sup.store.count_events() == before  # nothing written

    live_alerts = sorted(seen(a.ts, a) for a in stored)
    replayed = sorted(seen(f.ts, f.signal.alert) for f in result.fired)
    assert replayed == live_alerts


def test_events_before_since_warm_up_but_are_not_reported() -> None:
    events = history()
    cut = events[len(events) // 2].ts
    full = Replay(BUDGETS, RULES, since=events[0].ts, tz="UTC").feed_all(events)
    later = Replay(BUDGETS, RULES, since=cut, tz="UTC").feed_all(events)
    assert [f for f in full.fired if f.ts >= cut] == later.fired
    assert later.first_ts is not None
    assert later.first_ts >= cut


async def test_near_duplicate_loops_are_caught_when_replayed_from_the_ledger() -> None:
    from tokenwatch.core.tokens import prompt_hash, prompt_shape_hash
    from tokenwatch.ledger.store import Store

    # Only a counter changes between calls: exact hashes differ, shapes collide.
    prompts = [f"retry #{i}: fix test_parser (attempt id 9f{i}3a)" for i in range(6)]
    events = [
        UsageEvent(
            ts=T0 + 5 * i,
            agent="looper",
            model="gpt-4o",
            input_tokens=900,
            output_tokens=50,
            prompt_hash=prompt_hash(p),
            prompt_shape=prompt_shape_hash(p),
            call_id=f"n{i}",
        )
        for i, p in enumerate(prompts)
    ]
    assert len({e.prompt_hash for e in events}) == len(events)
    rule = RuleSettings(name="loop", detector="runaway", threshold=3, window=60, action="pause")
    async with await Store.open(Paths.discover().db) as store:
        await store.append_many(events)
        result = await Replay([], [rule], since=T0, tz="UTC").feed_store(store)
    assert [(f.signal.agent, f.signal.action) for f in result.fired][:1] == [("looper", "pause")]

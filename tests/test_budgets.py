"""Budgets: what counts toward which budget, in which period, and what a user is told and refused."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from budget_fixtures import Clock, at, call, event

from tokenwatch.config import BudgetSettings, ConfigError
from tokenwatch.core.admission import Refusal, Reservation, Signal
from tokenwatch.core.budgets import Budgets
from tokenwatch.core.models import BudgetStatus, UsageEvent


def used(budgets: Budgets, name: str, target: str | None = None) -> float:
    rows = [s for s in budgets.statuses() if s.name == name and target in (None, s.target)]
    assert rows, f"no status for {name} {target}"
    return sum(r.used for r in rows)


def status(budgets: Budgets, name: str) -> BudgetStatus:
    (row,) = [s for s in budgets.statuses() if s.name == name]
    return row


# -- scopes ----------------------------------------------------------------------------------------


def test_each_scope_counts_only_the_usage_it_covers() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets(
        [
            BudgetSettings(name="all", limit="1M"),
            BudgetSettings(name="res", scope="agent", target="researcher", limit="1M"),
            BudgetSettings(name="gpt4", scope="model", target="gpt-4o*", limit="1M"),
            BudgetSettings(name="ann", scope="user", target="ann", limit="1M"),
            BudgetSettings(name="fix", scope="task", target="fix-*", limit="1M"),
            BudgetSettings(name="ml", scope="tag", target="team=ml", limit="1M"),
        ],
        tz="UTC",
        clock=clock,
    )
    budgets.note_tags("researcher", {"team": "ml"})
    budgets.record(event(clock.now, "researcher", 1000, user="ann", task="fix-login"))
    budgets.record(event(clock.now, "writer", 300, model="claude-sonnet-4", user="bob"))
    budgets.record(event(clock.now, "writer", 20, model="gpt-4o-mini", task="draft"))

    assert used(budgets, "all") == 1320
    assert used(budgets, "res") == 1000
    assert used(budgets, "gpt4") == 1020
    assert used(budgets, "ann") == 1000
    assert used(budgets, "fix") == 1000
    assert used(budgets, "ml") == 1000


def test_a_glob_budget_gives_each_matching_name_its_own_limit() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets(
        [BudgetSettings(name="each", scope="agent", target="*", limit="5k", action="deny")],
        tz="UTC",
        clock=clock,
    )
    budgets.record(event(clock.now, "a", 4000))
    budgets.record(event(clock.now, "b", 1000))

    assert used(budgets, "each", "a") == 4000
    assert used(budgets, "each", "b") == 1000
    assert isinstance(budgets.reserve(call("a"), 2000, None), Refusal)
    assert isinstance(budgets.reserve(call("b"), 2000, None), Reservation)


def test_dollar_budgets_count_cost_and_skip_unpriced_calls() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([BudgetSettings(name="usd", limit="$2")], tz="UTC", clock=clock)
    budgets.record(event(clock.now, tokens=10_000, cost_usd=0.75))
    budgets.record(event(clock.now, tokens=10_000, cost_usd=None))

    row = status(budgets, "usd")
    assert (row.unit, row.used, row.limit, row.remaining) == ("usd", 0.75, 2.0, 1.25)


# -- periods ---------------------------------------------------------------------------------------


def test_a_day_budget_starts_over_at_local_midnight() -> None:
    clock = Clock(at("2026-11-23 23:50", "Europe/Paris"))
    budgets = Budgets([BudgetSettings(name="d", limit="10k")], tz="Europe/Paris", clock=clock)
    budgets.record(event(clock.now, tokens=4000))
    assert status(budgets, "d").resets_at == at("2026-11-24 00:00", "Europe/Paris")

    clock.now = at("2026-11-24 00:05", "Europe/Paris")
    assert status(budgets, "d").used == 0
    budgets.record(event(clock.now, tokens=1500))
    row = status(budgets, "d")
    assert row.used == 1500
    assert row.resets_at == at("2026-11-25 00:00", "Europe/Paris")


def test_the_same_events_fall_in_different_days_in_different_zones() -> None:
    # 22:30 UTC is already tomorrow in Tokyo: a Tokyo day budget has started over by then.
    events = [event(at("2026-11-23 12:00"), tokens=700), event(at("2026-11-23 22:30"), tokens=300)]
    clock = Clock(at("2026-11-23 23:00"))
    by_zone: dict[str, float] = {}
    for tz in ("UTC", "Asia/Tokyo", "America/New_York"):
        budgets = Budgets([BudgetSettings(name="d", limit="10k")], tz=tz, clock=clock)
        for e in events:
            budgets.record(e)
        by_zone[tz] = status(budgets, "d").used
    assert by_zone == {"UTC": 1000, "Asia/Tokyo": 300, "America/New_York": 1000}


def test_a_day_with_a_daylight_saving_change_lasts_25_hours() -> None:
    clock = Clock(at("2026-10-25 12:00", "Europe/Paris"))
    budgets = Budgets([BudgetSettings(name="d", limit="10k")], tz="Europe/Paris", clock=clock)
    budgets.record(event(at("2026-10-25 00:30", "Europe/Paris"), tokens=100))
    budgets.record(event(at("2026-10-25 23:30", "Europe/Paris"), tokens=200))
    row = status(budgets, "d")
    assert row.used == 300
    assert row.resets_at is not None
    assert row.resets_at - at("2026-10-25 00:00", "Europe/Paris") == 25 * 3600


@pytest.mark.parametrize(
    ("period", "inside", "next_period", "resets"),
    [
        ("hour", "2026-11-23 10:59", "2026-11-23 11:00", "2026-11-23 12:00"),
        ("week", "2026-11-29 23:59", "2026-11-30 00:00", "2026-12-07 00:00"),
        ("month", "2026-12-31 23:59", "2027-01-01 00:00", "2027-02-01 00:00"),
    ],
)
def test_calendar_periods_start_over_at_their_boundary(
    period: str, inside: str, next_period: str, resets: str
) -> None:
    clock = Clock(at(inside, "Europe/Berlin"))
    budgets = Budgets(
        [BudgetSettings(name="p", period=period, limit="10k")], tz="Europe/Berlin", clock=clock
    )
    budgets.record(event(clock.now, tokens=900))
    assert status(budgets, "p").used == 900

    clock.now = at(next_period, "Europe/Berlin")
    budgets.record(event(clock.now, tokens=50))
    row = status(budgets, "p")
    assert row.used == 50
    assert row.resets_at == at(resets, "Europe/Berlin")


def test_a_rolling_hour_forgets_usage_older_than_an_hour() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets(
        [BudgetSettings(name="r", period="hour", rolling=True, limit="10k", action="deny")],
        tz="UTC",
        clock=clock,
    )
    budgets.record(event(clock.now, tokens=6000))
    clock.advance(1800)
    budgets.record(event(clock.now, tokens=3000))
    refusal = budgets.reserve(call(), 2000, None)
    assert isinstance(refusal, Refusal)
    assert refusal.retry_after == 1800  # when the first call leaves the window

    clock.advance(1801)
    row = status(budgets, "r")
    assert (row.used, row.resets_at) == (3000, None)
    assert isinstance(budgets.reserve(call(), 2000, None), Reservation)


def test_a_task_budget_limits_each_task_on_its_own() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets(
        [
            BudgetSettings(
                name="t",
                scope="agent",
                target="researcher",
                period="task",
                limit="5k",
                action="deny",
            )
        ],
        tz="UTC",
        clock=clock,
    )
    budgets.record(event(clock.now, tokens=4500, task="one"))
    budgets.record(event(clock.now, tokens=100))  # no task: not covered
    assert isinstance(budgets.reserve(call(task="one"), 1000, None), Refusal)
    assert isinstance(budgets.reserve(call(task="two"), 1000, None), Reservation)
    assert used(budgets, "t", "researcher/one") == 4500


def test_a_request_budget_refuses_one_call_that_is_too_big() -> None:
    budgets = Budgets(
        [BudgetSettings(name="big", period="request", limit="8k", action="deny")], tz="UTC"
    )
    refusal = budgets.reserve(call(), 9000, None)
    assert isinstance(refusal, Refusal)
    assert "8k tokens per call" in refusal.message
    assert isinstance(budgets.reserve(call(), 8000, None), Reservation)


# -- warnings and actions ------------------------------------------------------------------------------


def test_warnings_fire_once_per_threshold_per_period() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([BudgetSettings(name="d", limit="10k")], tz="UTC", clock=clock)
    fired: list[str] = []
    for _ in range(12):
        for signal in budgets.record(event(clock.now, tokens=1000)):
            fired.append(signal.alert.message)
        clock.advance(60)
    assert len(fired) == 3
    assert "50% of budget d" in fired[0]
    assert "80% of budget d" in fired[1]
    assert "reached budget d" in fired[2]

    clock.now = at("2026-11-24 10:00")
    again = [s for _ in range(5) for s in budgets.record(event(clock.now, tokens=1000))]
    assert [s.alert.message.split(" budget")[0] for s in again] == ["researcher has used 50% of"]


def test_one_big_call_past_several_thresholds_warns_once() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([BudgetSettings(name="d", limit="10k")], tz="UTC", clock=clock)
    signals = budgets.record(event(clock.now, tokens=9000))
    assert len(signals) == 1
    assert "90% of budget d" in signals[0].alert.message
    assert signals[0].alert.severity == "warning"


def test_a_pause_budget_pauses_the_agent_and_lets_it_go_on_once_raised() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    settings = BudgetSettings(scope="agent", target="researcher", limit="$5", action="pause")
    budgets = Budgets([settings], tz="UTC", clock=clock)
    signals = budgets.record(event(clock.now, cost_usd=5.01))
    (limit_hit,) = [s for s in signals if s.action != "alert"]
    assert limit_hit.action == "pause"
    assert limit_hit.agent == "researcher"
    assert limit_hit.alert.rule == "budget:agent:researcher:day"
    assert limit_hit.alert.severity == "critical"
    assert "paused until it resets at 00:00 or is raised" in limit_hit.alert.message

    refusal = budgets.reserve(call(), 1000, 0.02)
    assert isinstance(refusal, Refusal)
    assert "tokenwatch budget set agent:researcher '$10' --period day" in refusal.message

    budgets.replace(
        [BudgetSettings(scope="agent", target="researcher", limit="$10", action="pause")]
    )
    assert isinstance(budgets.reserve(call(), 1000, 0.02), Reservation)
    assert status(budgets, "agent:researcher:day").used == 5.01


def test_a_call_that_no_longer_fits_sets_off_the_budget_action() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets(
        [BudgetSettings(name="d", limit="10k", action="kill", warn=[])], tz="UTC", clock=clock
    )
    assert budgets.record(event(clock.now, tokens=9000)) == []
    assert isinstance(budgets.reserve(call(), 2000, None), Refusal)
    (due,) = budgets.signals_nowait()
    assert (due.action, due.agent) == ("kill", "researcher")
    assert budgets.signals_nowait() == []
    # Refused again in the same period: the action is not repeated.
    assert isinstance(budgets.reserve(call(), 2000, None), Refusal)
    assert budgets.signals_nowait() == []


def test_a_deny_budget_refuses_calls_but_does_not_deny_the_whole_agent() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets(
        [BudgetSettings(name="m", scope="model", target="o1", limit="1k", action="deny")],
        tz="UTC",
        clock=clock,
    )
    (signal,) = budgets.record(event(clock.now, tokens=1000, model="o1"))
    assert (signal.action, signal.alert.action) == ("alert", "deny")
    assert isinstance(budgets.reserve(call(model="o1"), 10, None), Refusal)
    assert isinstance(budgets.reserve(call(model="gpt-4o"), 10, None), Reservation)


def test_an_alert_budget_never_refuses() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([BudgetSettings(name="d", limit="1k")], tz="UTC", clock=clock)
    budgets.record(event(clock.now, tokens=5000))
    assert isinstance(budgets.reserve(call(), 5000, None), Reservation)


def test_a_refusal_says_which_budget_how_full_and_when_it_resets() -> None:
    clock = Clock(at("2026-11-23 22:00"))
    budgets = Budgets(
        [BudgetSettings(name="daily", limit="100k", action="deny")], tz="UTC", clock=clock
    )
    budgets.record(event(clock.now, tokens=95_000))
    refusal = budgets.reserve(call(), 8000, None)
    assert isinstance(refusal, Refusal)
    assert refusal.budget == "daily"
    assert refusal.retry_after == 2 * 3600
    assert "95k tokens used" in refusal.message
    assert "this call may use 8k tokens" in refusal.message
    assert "tokenwatch budget set global 200k --period day --name daily" in refusal.message


def test_a_refused_call_bigger_than_the_limit_is_offered_a_limit_that_lets_it_go() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets(
        [BudgetSettings(name="small", limit="1k", action="deny")], tz="UTC", clock=clock
    )
    budgets.record(event(clock.now, tokens=300))
    refusal = budgets.reserve(call(), 4130, None)  # doubling to 2k would refuse it again
    assert isinstance(refusal, Refusal)
    assert refusal.message.endswith("`tokenwatch budget set global 4.5k --period day --name small`")
    budgets.replace([BudgetSettings(name="small", limit="4.5k", action="deny")])
    assert isinstance(budgets.reserve(call(), 4130, None), Reservation)


def test_a_runs_budget_is_raised_in_place_and_keeps_its_usage() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([], tz="UTC", clock=clock)
    run = BudgetSettings(
        name="run:researcher", scope="agent", target="researcher", period="total", limit="1k",
        action="deny",
    )  # fmt: skip
    budgets.add_ephemeral(run, start=clock.now - 60)
    budgets.record(event(clock.now, tokens=900))
    assert isinstance(budgets.reserve(call(), 500, None), Refusal)
    raised = budgets.set_run_limit("run:researcher", "2k")
    assert (raised.limit, raised.used, raised.action) == (2000, 900, "deny")
    assert isinstance(budgets.reserve(call(), 500, None), Reservation)
    with pytest.raises(ConfigError, match="counts tokens: give a limit in tokens"):
        budgets.set_run_limit("run:researcher", "$5")
    with pytest.raises(ConfigError, match="no agent running now has a run budget named run:nobody"):
        budgets.set_run_limit("run:nobody", "2k")


def test_budget_names_starting_with_run_are_kept_for_runs() -> None:
    budgets = Budgets([], tz="UTC", clock=Clock(at("2026-11-23 10:00")))
    with pytest.raises(ConfigError, match="budget run:mine: names starting with run: are kept"):
        budgets.replace([BudgetSettings(name="run:mine", limit="1k")])


# -- reservations ----------------------------------------------------------------------------------


def test_settling_replaces_the_reservation_with_the_real_figure() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([BudgetSettings(name="d", limit="10k", action="deny")], tz="UTC", clock=clock)
    first = budgets.reserve(call(), 6000, None)
    assert isinstance(first, Reservation)
    assert first.budgets == ("d",)
    assert isinstance(budgets.reserve(call(), 6000, None), Refusal)  # 6k in flight

    budgets.settle(first, event(clock.now, tokens=1000))
    assert status(budgets, "d").used == 1000
    second = budgets.reserve(call(), 6000, None)
    assert isinstance(second, Reservation)
    budgets.release(second)
    budgets.release(second)  # twice is harmless
    assert isinstance(budgets.reserve(call(), 9000, None), Reservation)


def test_usage_beyond_the_reservation_is_recorded() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([BudgetSettings(name="d", limit="10k", action="deny")], tz="UTC", clock=clock)
    r = budgets.reserve(call(), 2000, None)
    assert isinstance(r, Reservation)
    budgets.settle(r, event(clock.now, tokens=3000))
    assert status(budgets, "d").used == 3000


def test_a_reservation_made_before_a_reload_can_still_be_settled() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([BudgetSettings(name="d", limit="10k", action="deny")], tz="UTC", clock=clock)
    r = budgets.reserve(call(), 2000, None)
    assert isinstance(r, Reservation)
    budgets.replace([BudgetSettings(name="other", limit="1M", action="deny")])
    budgets.settle(r, event(clock.now, tokens=500))
    assert used(budgets, "other") == 500
    assert [s.name for s in budgets.statuses()] == ["other"]


def test_reload_keeps_usage_and_rearms_warnings_above_a_raised_limit() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([BudgetSettings(name="d", limit="10k")], tz="UTC", clock=clock)
    budgets.record(event(clock.now, tokens=8500))
    budgets.replace([BudgetSettings(name="d", limit="20k")])
    assert status(budgets, "d").used == 8500
    (warning,) = budgets.record(event(clock.now, tokens=8000))
    assert "82% of budget d" in warning.alert.message


class _Ledger:
    """Stored events, read back as `Store.iter_events` does; `meanwhile` runs mid-read, and
    `flush` commits what the writer still held."""

    def __init__(
        self,
        events: list[UsageEvent],
        meanwhile: Callable[[], object],
        unflushed: list[UsageEvent] | None = None,
    ) -> None:
        self.events, self.meanwhile, self.unflushed = events, meanwhile, unflushed or []

    async def flush(self) -> None:
        self.events += self.unflushed

    async def iter_events(self, since: float = 0) -> AsyncIterator[UsageEvent]:
        for i, e in enumerate(self.events):
            if i == 2:
                self.meanwhile()  # a call settles while the past is being read
            if e.ts >= since:
                yield e


async def test_a_budget_added_by_an_edit_counts_todays_usage_so_far() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([BudgetSettings(name="d", limit="100k")], tz="UTC", clock=clock)
    yesterday = event(at("2026-11-22 23:00"), tokens=9000, call_id="y")
    early = event(at("2026-11-23 09:00"), tokens=500, call_id="z")
    seen = [event(clock.now, tokens=1000, call_id="a"), event(clock.now, tokens=2000, call_id="b")]
    for e in seen:
        budgets.record(e)
    fresh = budgets.replace(
        [BudgetSettings(name="d", limit="100k"), BudgetSettings(name="g", limit="50k")]
    )
    late = event(clock.now + 1, tokens=4000, call_id="c")
    ledger = _Ledger([yesterday, early, *seen, late], lambda: budgets.record(late))
    await budgets.seed(ledger, only=fresh)
    assert fresh == ["g"]
    assert used(budgets, "g") == 500 + 1000 + 2000 + 4000  # `late` counted once
    assert used(budgets, "d") == 1000 + 2000 + 4000  # kept as it was, nothing counted again
    budgets.record(event(clock.now + 2, tokens=100, call_id="d"))
    assert used(budgets, "g") == 7600


async def test_a_seed_survives_an_edit_midway_and_reads_what_the_writer_held() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([], tz="UTC", clock=clock)
    both = [BudgetSettings(name="g", limit="50k"), BudgetSettings(name="h", limit="50k")]
    held = event(clock.now - 5, tokens=300, call_id="w")  # counted before the edit, not stored
    budgets.record(held)
    fresh = budgets.replace(both)
    late = event(clock.now + 1, tokens=4000, call_id="c")

    def edit_then_call() -> None:
        budgets.replace(both)  # the config watch re-reads the file the edit just wrote
        budgets.record(late)  # a call settles: counted, then stored
        ledger.events.append(late)

    stored = [event(at("2026-11-23 09:00"), tokens=500, call_id="z"), event(0, tokens=1)]
    ledger = _Ledger(stored, edit_then_call, unflushed=[held])
    await budgets.seed(ledger, only=fresh)
    assert used(budgets, "g") == used(budgets, "h") == 300 + 500 + 4000
    budgets.record(event(clock.now + 2, tokens=100, call_id="d"))
    assert used(budgets, "g") == 4900  # the seed is over: nothing counted twice from now on


async def test_a_budget_added_past_its_limit_acts_on_the_next_call() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([], tz="UTC", clock=clock)
    budgets.add_ephemeral(BudgetSettings(name="run:x", limit="1M", period="total"), start=0)
    fresh = budgets.replace(
        [
            BudgetSettings(name="tight", limit="10k", action="pause"),
            BudgetSettings(name="x-total", limit="1M", period="total"),
        ]
    )
    spent = [event(clock.now - 60 * i, tokens=5000, call_id=f"e{i}") for i in range(3)]
    await budgets.seed(_Ledger(spent, lambda: None), only=fresh)
    assert used(budgets, "tight") == 15_000
    assert used(budgets, "x-total") == 15_000
    assert used(budgets, "run:x") == 0  # a run's own budget counts from its start, not seeded
    signals = budgets.record(event(clock.now, tokens=10, call_id="next"))
    assert [s.action for s in signals] == ["pause"]


async def test_thresholds_passed_in_a_catch_up_warn_once_on_the_next_call() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([], tz="UTC", clock=clock)
    fresh = budgets.replace([BudgetSettings(name="w", limit="10k", warn=[50, 80])])
    live = event(clock.now, tokens=8500, call_id="live")  # passes 80 % as it settles
    warned: list[Signal] = []
    past = [event(0, tokens=1), event(0, tokens=1), event(clock.now - 60, tokens=500)]
    await budgets.seed(_Ledger(past, lambda: warned.extend(budgets.record(live))), only=fresh)
    assert [s.alert.message[:30] for s in warned] == ["researcher has used 85% of bud"]
    assert budgets.record(event(clock.now, tokens=100, call_id="next")) == []  # not again


async def test_a_catch_up_that_fails_midway_leaves_warnings_to_come() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([], tz="UTC", clock=clock)
    fresh = budgets.replace([BudgetSettings(name="w", limit="10k")])

    class Breaks(_Ledger):
        async def iter_events(self, since: float = 0) -> AsyncIterator[UsageEvent]:
            yield event(clock.now - 60, tokens=6000)
            raise OSError("disk gone")

    with pytest.raises(OSError):
        await budgets.seed(Breaks([], lambda: None), only=fresh)
    (signal,) = budgets.record(event(clock.now, tokens=100, call_id="next"))
    assert "61% of budget w" in signal.alert.message


async def test_a_limit_raised_during_a_catch_up_is_the_one_that_counts() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([], tz="UTC", clock=clock)
    fresh = budgets.replace([BudgetSettings(name="l", limit="1k")])
    raise_it = lambda: budgets.replace([BudgetSettings(name="l", limit="5k")])  # noqa: E731
    past = [event(0, tokens=1), event(0, tokens=1), event(clock.now - 3600, tokens=2000)]
    await budgets.seed(_Ledger(past, raise_it), only=fresh)
    assert (status(budgets, "l").limit, status(budgets, "l").used) == (5000, 2000)
    assert budgets.record(event(clock.now, tokens=100, call_id="n")) == []  # 42 %: no warning
    budgets.record(event(clock.now, tokens=3000, call_id="over"))
    assert status(budgets, "l").forecast_exhausted_at == clock.now  # ran out now, not an hour ago


async def test_a_limit_reached_by_a_live_call_during_a_catch_up_is_dated_by_it() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([], tz="UTC", clock=clock)
    fresh = budgets.replace([BudgetSettings(name="x", limit="10k")])
    live = event(clock.now, tokens=2000, call_id="live")
    past = [event(0, tokens=1), event(0, tokens=1)]
    past += [event(clock.now - 1800, tokens=6000), event(clock.now - 1700, tokens=3000)]
    await budgets.seed(_Ledger(past, lambda: budgets.record(live)), only=fresh)
    assert status(budgets, "x").used == 11_000
    assert status(budgets, "x").forecast_exhausted_at == clock.now  # 9k before, 11k with it


async def test_a_rolling_budget_forgets_seeded_usage_in_time() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([], tz="UTC", clock=clock)
    hourly = BudgetSettings(name="r", limit="50k", period="hour", rolling=True)
    fresh = budgets.replace([hourly])
    live = event(clock.now, tokens=100, call_id="live")
    old = event(clock.now - 3000, tokens=4000, call_id="old")  # read in after `live` counted
    before = [event(0, tokens=1), event(0, tokens=1)]  # outside the hour: read past first
    await budgets.seed(_Ledger([*before, old, live], lambda: budgets.record(live)), only=fresh)
    assert used(budgets, "r") == 4100
    clock.advance(700)  # `old` is now more than an hour ago
    assert used(budgets, "r") == 100


def test_an_ephemeral_budget_counts_from_its_start_and_can_be_removed() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([], tz="UTC", clock=clock)
    budgets.record(event(clock.now - 60, tokens=5000))
    budgets.add_ephemeral(
        BudgetSettings(
            name="run:researcher",
            scope="agent",
            target="researcher",
            period="total",
            limit="2k",
            action="deny",
        ),
        start=clock.now,
    )
    budgets.record(event(clock.now, tokens=1500))
    assert used(budgets, "run:researcher") == 1500
    assert isinstance(budgets.reserve(call(), 1000, None), Refusal)
    budgets.replace([BudgetSettings(name="d", limit="1M")])  # reload keeps it
    assert isinstance(budgets.reserve(call(), 1000, None), Refusal)
    budgets.remove_ephemeral("run:researcher")
    assert isinstance(budgets.reserve(call(), 1000, None), Reservation)


# -- forecast and status ---------------------------------------------------------------------------


def test_forecast_says_when_a_steady_burn_runs_out_before_the_reset() -> None:
    clock = Clock(at("2026-11-23 00:00"))
    budgets = Budgets([BudgetSettings(name="d", limit="10k")], tz="UTC", clock=clock)
    for _ in range(5):  # 1k tokens an hour from midnight to 04:00
        budgets.record(event(clock.now, tokens=1000))
        clock.advance(3600)
    clock.now = at("2026-11-23 05:00")
    # 5k in the 5 hours since the first call: the other 5k last until 10:00.
    assert status(budgets, "d").forecast_exhausted_at == at("2026-11-23 10:00")

    slow = Budgets([BudgetSettings(name="d", limit="100k")], tz="UTC", clock=clock)
    slow.record(event(at("2026-11-23 00:00"), tokens=1000))
    assert status(slow, "d").forecast_exhausted_at is None  # lasts well past midnight


def test_a_new_period_forecasts_from_its_own_calls_only() -> None:
    clock = Clock(at("2026-11-22 12:00"))
    budgets = Budgets([BudgetSettings(name="d", limit="10k")], tz="UTC", clock=clock)
    for _ in range(500):  # yesterday: a busy afternoon of small calls
        budgets.record(event(clock.now, tokens=1))
        clock.advance(10)
    clock.now = at("2026-11-23 00:00")
    for _ in range(5):  # today: 1k tokens an hour, a steady pace
        budgets.record(event(clock.now, tokens=1000))
        clock.advance(3600)
    clock.now = at("2026-11-23 05:00")
    # An hour since the last call is the usual gap today, not idleness.
    assert status(budgets, "d").forecast_exhausted_at == at("2026-11-23 10:00")


def test_nothing_spending_means_no_runs_out_time() -> None:
    clock = Clock(at("2026-11-23 08:00"))
    budgets = Budgets([BudgetSettings(name="d", limit="10k")], tz="UTC", clock=clock)
    for _ in range(30):  # a run: a call every 10 s for five minutes, then it ends
        budgets.record(event(clock.now, tokens=100))
        clock.advance(10)
    assert status(budgets, "d").forecast_exhausted_at is not None  # still spending
    clock.now = at("2026-11-23 08:30")
    assert status(budgets, "d").forecast_exhausted_at is None  # 25 minutes without a call


def test_statuses_list_every_budget_even_before_any_usage() -> None:
    budgets = Budgets(
        [
            BudgetSettings(name="a", limit="1k"),
            BudgetSettings(scope="model", target="o1*", limit="$3", period="month"),
        ],
        tz="UTC",
    )
    rows = {s.name: s for s in budgets.statuses()}
    assert set(rows) == {"a", "model:o1*:month"}
    assert rows["model:o1*:month"].target == "o1*"
    assert rows["model:o1*:month"].unit == "usd"
    assert rows["a"].remaining == 1000


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        (BudgetSettings(name="x", scope="team", limit="1k"), "unknown scope 'team'"),
        (BudgetSettings(name="x", period="fortnight", limit="1k"), "unknown period"),
        (BudgetSettings(name="x", action="explode", limit="1k"), "unknown action"),
        (BudgetSettings(name="x", limit="lots"), "not a limit: 'lots'"),
        (BudgetSettings(name="x", limit=0), "must be above zero"),
        (BudgetSettings(name="x", limit="1k", warn=[150]), "percentages"),
        (BudgetSettings(name="x", period="total", rolling=True, limit="1k"), "cannot be rolling"),
    ],
)
def test_a_budget_that_cannot_work_is_refused_with_its_name(
    settings: BudgetSettings, words: str
) -> None:
    with pytest.raises(ConfigError, match="budget x") as info:
        Budgets([settings], tz="UTC")
    assert words in str(info.value)


def test_two_budgets_with_one_name_are_refused() -> None:
    with pytest.raises(ConfigError, match="two budgets are named 'd'"):
        Budgets([BudgetSettings(name="d", limit="1k"), BudgetSettings(name="d", limit="2k")])


def test_an_unknown_time_zone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="timezone: unknown time zone 'Mars/Olympus'"):
        Budgets([], tz="Mars/Olympus")


async def test_a_call_dated_in_the_far_future_counts_nowhere_and_breaks_nothing() -> None:
    # ledgers written before such times were refused may hold one: year 33658
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([BudgetSettings(name="d", limit="10k")], tz="UTC", clock=clock)
    far = event(1e12, tokens=5000, call_id="far")
    await budgets.seed(_Ledger([far], lambda: None))
    assert budgets.record(event(1e12, tokens=5000, call_id="far-live")) == []
    budgets.record(event(clock.now, tokens=100, call_id="now"))
    assert used(budgets, "d") == 100

"""Admission under concurrency never overshoots; budgets pick up where the ledger left off."""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import anyio.lowlevel
from budget_fixtures import Clock, at, call, event
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenwatch.config import BudgetSettings
from tokenwatch.core.admission import Refusal, Reservation
from tokenwatch.core.budgets import Budgets
from tokenwatch.ledger.store import Store

LIMIT = 100_000


async def test_fifty_concurrent_calls_never_overshoot_the_limit() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([BudgetSettings(name="d", limit=LIMIT, action="deny")], tz="UTC", clock=clock)
    rng = random.Random(7)
    outcomes: list[str] = []

    async def one_call(worst: int) -> None:
        got = budgets.reserve(call(), worst, None)
        if isinstance(got, Refusal):
            outcomes.append("refused")
            return
        outcomes.append("sent")
        # In flight while the others reserve: let every other task run first.
        for _ in range(rng.randint(1, 5)):
            await anyio.lowlevel.checkpoint()
        budgets.settle(got, event(clock.now, tokens=rng.randint(worst // 4, worst)))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(one_call, rng.randint(2000, 8000))

    (row,) = budgets.statuses()
    assert row.used <= LIMIT
    assert outcomes.count("refused") > 0  # 50 calls of up to 8k cannot all fit in 100k
    assert isinstance(budgets.reserve(call(), int(LIMIT - row.used), None), Reservation)
    assert isinstance(budgets.reserve(call(), 1, None), Refusal)


# One step: reserve N tokens, then settle the k-th open reservation with a fraction of it,
# or release it.
steps = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(1, 30_000)),
        st.tuples(st.just("settle"), st.integers(0, 50), st.floats(0, 1)),
        st.tuples(st.just("release"), st.integers(0, 50)),
    ),
    max_size=60,
)


@settings(max_examples=150)
@given(steps)
def test_used_plus_in_flight_never_exceeds_a_hard_limit(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    clock = Clock(at("2026-11-23 10:00"))
    budgets = Budgets([BudgetSettings(name="d", limit=LIMIT, action="deny")], tz="UTC", clock=clock)
    open_: list[Reservation] = []
    in_flight = 0
    for op in ops:
        if op[0] == "reserve":
            got = budgets.reserve(call(), op[1], None)
            if isinstance(got, Reservation):
                open_.append(got)
                in_flight += op[1]
        elif open_:
            r = open_.pop(op[1] % len(open_))
            in_flight -= r.tokens
            if op[0] == "settle":
                budgets.settle(r, event(clock.now, tokens=int(r.tokens * op[2])))
            else:
                budgets.release(r)
        (row,) = budgets.statuses()
        assert row.used + in_flight <= LIMIT
    # Every reservation given back: what is left is exactly what was used.
    for r in open_:
        budgets.release(r)
    (row,) = budgets.statuses()
    assert isinstance(budgets.reserve(call(), int(LIMIT - row.used), None), Reservation)


async def test_seed_counts_this_periods_usage_from_the_ledger_without_warning_again(
    tmp_path: Path,
) -> None:
    now = at("2026-11-23 15:00")
    async with await Store.open(tmp_path / "usage.db", clock=lambda: now) as store:
        await store.append_many(
            [
                event(at("2026-11-22 23:00"), tokens=9000),  # yesterday
                event(at("2026-11-23 09:00"), tokens=6000),
                event(at("2026-11-23 10:00"), "writer", tokens=500),
            ]
        )
        await store.flush()
        budgets = Budgets(
            [
                BudgetSettings(name="d", limit="10k"),
                BudgetSettings(name="r", scope="agent", target="researcher", limit="10k"),
            ],
            tz="UTC",
            clock=lambda: now,
        )
        await budgets.seed(store)

    rows = {s.name: s.used for s in budgets.statuses()}
    assert rows == {"d": 6500, "r": 6000}
    # 50% was already passed before the restart: only 80% is news.
    signals = {s.alert.rule: s.alert.message for s in budgets.record(event(now, tokens=2000))}
    assert set(signals) == {"budget:d", "budget:r"}
    assert "has used 85% of budget d" in signals["budget:d"]
    assert "has used 80% of budget r" in signals["budget:r"]

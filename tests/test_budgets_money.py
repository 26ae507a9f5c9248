"""Dollar budgets you can trust: estimated prices counted and said, one message per refusal,
reservations that fit coding agents (a $5 budget spends its $5; the overshoot bound holds)."""

from __future__ import annotations

import random
import re
import shlex

import anyio
import anyio.lowlevel
import pytest
from budget_fixtures import Clock, at, call
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenwatch.config import BudgetSettings
from tokenwatch.core.admission import Refusal, Reservation
from tokenwatch.core.budgets import BudgetError, Budgets
from tokenwatch.core.models import UsageEvent
from tokenwatch.core.output_estimate import OutputEstimate
from tokenwatch.core.pricing import PriceTable

TABLE = PriceTable.load()
UNKNOWN = "acme-coder-7"  # in no table: priced as claude-opus-4-5 ($5 in, $6.25 write, $25 out)


def book(limit: str = "$5", **kw: object) -> tuple[Budgets, Clock]:
    clock = Clock(at("2026-12-05 10:00"))
    settings = BudgetSettings(name="b", limit=limit, action="deny", **kw)  # type: ignore[arg-type]
    return Budgets([settings], tz="UTC", clock=clock), clock


def priced(clock: Clock, model: str, prompt: int, out: int, agent: str = "coder") -> UsageEvent:
    event = UsageEvent(
        ts=clock.now,
        agent=agent,
        provider="anthropic",
        model=model,
        input_tokens=prompt,
        output_tokens=out,
    )
    return TABLE.price(event)


def test_calls_to_unknown_models_count_at_the_fallback_price_and_say_so() -> None:
    budgets, clock = book()
    budgets.record(priced(clock, UNKNOWN, 1_000, 1_000))  # 1000*5 + 1000*25 -> $0.03
    (row,) = budgets.statuses()
    assert row.used == pytest.approx(0.03)
    assert row.estimated_usd == pytest.approx(0.03)
    assert row.estimated_from == "claude-opus-4-5"
    budgets.record(priced(clock, "claude-opus-4-5", 1_000, 1_000))
    (row,) = budgets.statuses()
    assert (row.used, row.estimated_usd) == (pytest.approx(0.06), pytest.approx(0.03))


def test_a_budget_can_choose_to_count_unknown_models_free() -> None:
    budgets, clock = book(unpriced="free")
    budgets.record(priced(clock, UNKNOWN, 1_000, 1_000))
    (row,) = budgets.statuses()
    assert (row.used, row.estimated_usd) == (0.0, 0.0)
    got = budgets.reserve(call(model=UNKNOWN), 10, 100.0, estimated_from="claude-opus-4-5")
    assert isinstance(got, Reservation)  # $100 of estimate counts $0 here, as asked
    with pytest.raises(BudgetError, match="unpriced must be one of estimate, free"):
        book(unpriced="maybe")
    # Changing how it counts them counts the period again (from the ledger), not on top.
    fresh = budgets.replace([BudgetSettings(name="b", limit="$5", action="deny")])
    assert fresh == ["b"]


def test_one_refusal_one_message_and_the_suggested_limit_admits_the_call() -> None:
    budgets, _ = book("$0.01")
    worst = TABLE.worst_case(UNKNOWN, 2_000, 4_096)
    assert worst == pytest.approx((2_000 * 6.25 + 4_096 * 25) / 1e6)  # $0.1149
    refusal = budgets.reserve(call(model=UNKNOWN), 6_096, worst, estimated_from="claude-opus-4-5")
    assert isinstance(refusal, Refusal)
    assert "this call may use $0.1149 (price: estimated from claude-opus-4-5)" in refusal.message
    [signal] = budgets.signals_nowait()
    # The stored alert says what the agent was told, word for word.
    assert signal.alert.message == f"researcher: {refusal.message}; its calls are refused"
    # ...and its suggestion lets that very call go.
    hint = re.search(r"`(tokenwatch budget set [^`]+)`", refusal.message)
    assert hint is not None
    words = shlex.split(hint.group(1))
    assert words[3:6] == ["global", "$0.12", "--period"]
    budgets.replace([BudgetSettings(name="b", limit=words[4], action="deny")])
    again = budgets.reserve(call(model=UNKNOWN), 6_096, worst, estimated_from="claude-opus-4-5")
    assert isinstance(again, Reservation)


def test_the_limit_alert_names_the_estimated_part() -> None:
    budgets, clock = book("$0.05", warn=[100])
    budgets.record(priced(clock, UNKNOWN, 1_000, 1_000))
    [signal] = budgets.record(priced(clock, UNKNOWN, 1_000, 1_000))
    assert signal.alert.message.startswith(
        "coder reached budget b ($0.0600 of $0.0500 per day, all of it at an estimated price "
        "(price: estimated from claude-opus-4-5))"
    )


# -- reservations that fit coding agents ------------------------------------------------------

PROMPT, MAX_TOKENS = 20_000, 32_000  # what Claude Code sends on every call


def reserve(
    budgets: Budgets, estimate: OutputEstimate, agent: str = "coder"
) -> tuple[Reservation | Refusal, float]:
    out = estimate.expected(agent, UNKNOWN, MAX_TOKENS)
    usd = TABLE.worst_case(UNKNOWN, PROMPT, out)
    assert usd is not None
    got = budgets.reserve(
        call(agent, model=UNKNOWN), PROMPT + out, usd, estimated_from="claude-opus-4-5"
    )
    return got, usd


def test_a_five_dollar_budget_spends_to_within_one_call_of_five_dollars() -> None:
    budgets, clock = book("$5")
    estimate = OutputEstimate()
    rng = random.Random(5)
    calls = 0
    while True:
        got, usd = reserve(budgets, estimate)
        if isinstance(got, Refusal):
            break
        out = rng.randint(500, 1_100)  # ~800 out
        budgets.settle(got, priced(clock, UNKNOWN, PROMPT, out))
        estimate.observe("coder", UNKNOWN, out)
        calls += 1
    (row,) = budgets.statuses()
    # Each call costs 20000*5 + ~800*25 = ~$0.12; the refused one was held at
    # 20000*6.25 + 1.5 x (largest recent output) x 25 = ~$0.166.
    assert row.used <= 5.0
    assert 5.0 - row.used < usd < 0.17
    assert calls >= 40
    # Reserving max_tokens, as before, stops with almost a dollar unspent.
    first_call = TABLE.worst_case(UNKNOWN, PROMPT, MAX_TOKENS)
    assert first_call == pytest.approx(0.925)


def overshoot_run(outputs: list[int], seed: int) -> tuple[float, float]:
    """50 concurrent Claude Code-shaped calls against $5: (spend past the limit, the bound)."""
    budgets, clock = book("$5")
    estimate = OutputEstimate()
    for warm in (800, 900, 700):  # the agent's recent calls on the model
        estimate.observe("coder", UNKNOWN, warm)
    rng = random.Random(seed)
    excess: dict[str, float] = {}
    in_flight: set[str] = set()
    last_admission: set[str] = set()

    async def one_call(out: int) -> None:
        got, usd = reserve(budgets, estimate)
        if isinstance(got, Refusal):
            return
        in_flight.add(got.id)
        last_admission.clear()
        last_admission.update(in_flight)
        for _ in range(rng.randint(1, 8)):
            await anyio.lowlevel.checkpoint()
        event = priced(clock, UNKNOWN, PROMPT, out)
        budgets.settle(got, event)
        estimate.observe("coder", UNKNOWN, out)
        in_flight.discard(got.id)
        excess[got.id] = max(0.0, (event.cost_usd or 0.0) - usd)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for out in outputs:
                tg.start_soon(one_call, out)

    for _ in range(3):  # three waves of 50: the later ones meet a budget nearly spent
        anyio.run(main)
    (row,) = budgets.statuses()
    return row.used - 5.0, sum(excess.get(rid, 0.0) for rid in last_admission)


@settings(max_examples=60, deadline=None)
@given(
    outputs=st.lists(st.integers(0, MAX_TOKENS), min_size=50, max_size=50),
    seed=st.integers(0, 2**16),
)
def test_fifty_concurrent_calls_overshoot_by_at_most_the_excess_in_flight(
    outputs: list[int], seed: int
) -> None:
    over, bound = overshoot_run(outputs, seed)
    assert over <= bound + 1e-9

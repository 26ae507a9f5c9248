"""TokenBucket against a scripted clock: waits, debt for oversized calls, rate changes, fairness."""

from __future__ import annotations

import math

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenwatch.core.throttle import TokenBucket


class FakeClock:
    """Time that only moves when someone sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if math.isinf(seconds):
            await anyio.sleep_forever()
        self.now += seconds
        await anyio.lowlevel.checkpoint()


def bucket(rate: float, burst: float) -> tuple[TokenBucket, FakeClock]:
    """A bucket that starts full, so each test sets out from a known level."""
    clock = FakeClock()
    return TokenBucket(rate, burst, clock=clock, sleep=clock.sleep, start=burst), clock


async def test_a_new_throttle_lets_about_its_rate_through_in_its_first_minute() -> None:
    # 20k tokens/min with a minute of burst, calls of 1k back to back: a bucket that started
    # full let 40k through in the first minute.
    clock = FakeClock()
    tb = TokenBucket(20_000 / 60, 20_000, clock=clock, sleep=clock.sleep)
    passed = 0
    while True:
        await tb.acquire(1_000)
        if clock.now >= 60:
            break
        passed += 1_000
    assert passed <= 20_000 * 1.1
    assert passed >= 20_000 * 0.9  # throttled to its rate, not below it


async def test_waits_only_for_what_the_bucket_lacks() -> None:
    tb, clock = bucket(rate=10, burst=100)
    assert await tb.acquire(100) == 0
    assert await tb.acquire(50) == pytest.approx(5.0)
    clock.now += 2.0  # idle: 20 tokens refill
    assert await tb.acquire(20) == 0
    assert tb.statistics().available == pytest.approx(0)


async def test_a_call_bigger_than_the_burst_waits_for_a_full_bucket_then_owes() -> None:
    tb, _ = bucket(rate=10, burst=100)
    assert await tb.acquire(30) == 0
    assert await tb.acquire(250) == pytest.approx(3.0)  # refill 70 -> 100, then owe 150
    assert tb.statistics().available == pytest.approx(-150)
    assert await tb.acquire(10) == pytest.approx(16.0)


async def test_a_zero_rate_holds_until_the_rate_is_raised() -> None:
    tb, clock = bucket(rate=0, burst=50)
    await tb.acquire(50)
    waited: list[float] = []

    async def caller() -> None:
        waited.append(await tb.acquire(20))

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        assert tb.statistics().waiting == 1
        assert waited == []
        tb.update_rate(4)
    assert waited == [pytest.approx(5.0)]
    assert clock.now == pytest.approx(5.0)


async def test_callers_are_served_in_arrival_order() -> None:
    tb, _ = bucket(rate=1, burst=10)
    await tb.acquire(10)
    order: list[str] = []

    async def caller(name: str, amount: float) -> None:
        await tb.acquire(amount)
        order.append(name)

    async with anyio.create_task_group() as tg:
        for name, amount in (("big", 8), ("small", 1), ("medium", 3)):
            tg.start_soon(caller, name, amount)
            await anyio.wait_all_tasks_blocked()
    assert order == ["big", "small", "medium"]


def test_acquire_nowait_takes_only_what_fits() -> None:
    tb, clock = bucket(rate=1, burst=10)
    assert tb.acquire_nowait(6)
    assert not tb.acquire_nowait(6)
    clock.now += 2
    assert tb.acquire_nowait(6)


@pytest.mark.parametrize(("rate", "burst"), [(-1, 10), (1, 0), (math.inf, 10), (1, math.nan)])
def test_bad_rates_are_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match=r"rate|burst"):
        TokenBucket(rate, burst)


@settings(max_examples=60)
@given(
    rate=st.floats(0.5, 1000),
    burst=st.floats(1, 1000),
    amounts=st.lists(st.floats(0, 3000), min_size=1, max_size=20),
)
def test_never_lets_more_through_than_burst_plus_rate(
    rate: float, burst: float, amounts: list[float]
) -> None:
    async def scenario() -> None:
        tb, clock = bucket(rate, burst)
        total = 0.0
        for amount in amounts:
            await tb.acquire(amount)
            total += amount
            # only a call larger than the burst may push past it, and only by its own excess
            allowance = burst + rate * clock.now + max(0.0, amount - burst)
            assert total <= allowance * (1 + 1e-9) + 1e-6

    anyio.run(scenario)


async def test_a_cancelled_caller_takes_nothing_and_holds_no_one_up() -> None:
    tb, clock = bucket(rate=0, burst=10)  # a zero rate holds the caller until cancelled
    await tb.acquire(10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(tb.acquire, 4)
        await anyio.wait_all_tasks_blocked()
        assert tb.statistics().waiting == 1
        tg.cancel_scope.cancel()
    assert tb.statistics().waiting == 0
    tb.update_rate(1)
    clock.now += 6
    assert tb.statistics().available == pytest.approx(6)
    assert await tb.acquire(6) == 0

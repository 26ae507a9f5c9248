"""A token bucket that holds calls to a rate (tokens/min or $/hour), first come first served."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
START_FILL = 0.1
"""Share of the burst a new bucket holds: a full one let a minute's burst through at once, on
top of the rate, so a throttle's first minute passed about twice the rate it was set to."""


@dataclass(frozen=True, slots=True)
class TokenBucketStatistics:
    rate_per_s: float
    burst: float
    available: float
    """May be negative: a call larger than the burst borrows from the future."""
    waiting: int
    """Callers currently held in acquire()."""


class TokenBucket:
    """Refills at `rate_per_s` up to `burst`; `acquire(amount)` waits until the amount fits.

    A call larger than the whole burst waits for a full bucket and then leaves it in debt, so
    it is slowed to the rate instead of being held forever. A rate of 0 holds every caller
    until `update_rate` raises it. It starts with `start` (default: START_FILL of the burst).
    Clock and sleep are passed in so tests can script time.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
        *,
        start: float | None = None,
    ) -> None:
        _check(rate_per_s, burst)
        self._rate = rate_per_s
        self._burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = burst * START_FILL if start is None else min(start, burst)
        self._stamp = clock()
        self._turn = anyio.Lock()
        self._waiting = 0
        self._nap: anyio.CancelScope | None = None

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def _wait_for(self, amount: float) -> float:
        missing = min(amount, self._burst) - self._tokens
        if missing <= 0:
            return 0.0
        return missing / self._rate if self._rate > 0 else math.inf

    async def acquire(self, amount: float) -> float:
        """Take `amount` (tokens or dollars) from the bucket; returns the seconds waited."""
        if amount < 0:
            raise ValueError(f"cannot acquire a negative amount: {amount}")
        start = self._clock()
        self._waiting += 1
        try:
            async with self._turn:
                await self._wait_until_fits(amount)
                self._tokens -= amount
        finally:
            self._waiting -= 1
        return self._clock() - start

    async def _wait_until_fits(self, amount: float) -> None:
        while True:
            self._refill()
            delay = self._wait_for(amount)
            if delay <= 0:
                return
            # update_rate cancels this scope so the delay is worked out again at the new rate
            nap = self._nap = anyio.CancelScope()
            with nap:
                await self._sleep(delay)
            self._nap = None
            if not nap.cancel_called:
                # slept the whole delay: rounding (or a timer firing early) must not loop again
                self._refill()
                self._tokens = max(self._tokens, min(amount, self._burst))
                return

    def acquire_nowait(self, amount: float) -> bool:
        """Take `amount` only if it fits now and nobody is queued; True when taken."""
        self._refill()
        if self._waiting or self._wait_for(amount) > 0:
            return False
        self._tokens -= amount
        return True

    def update_rate(self, rate_per_s: float, burst: float | None = None) -> None:
        """Change the rate (and burst); the caller at the head of the queue re-plans its wait."""
        burst = self._burst if burst is None else burst
        _check(rate_per_s, burst)
        self._refill()
        self._rate = rate_per_s
        self._burst = burst
        self._tokens = min(self._tokens, burst)
        if self._nap is not None:
            self._nap.cancel()

    def statistics(self) -> TokenBucketStatistics:
        self._refill()
        return TokenBucketStatistics(self._rate, self._burst, self._tokens, self._waiting)


def _check(rate_per_s: float, burst: float) -> None:
    if rate_per_s < 0 or not math.isfinite(rate_per_s):
        raise ValueError(f"a rate must be a finite number at least 0: {rate_per_s}")
    if burst <= 0 or not math.isfinite(burst):
        raise ValueError(f"a burst must be a positive finite number: {burst}")

"""An agent's recent successful calls indexed by time, with running token and cost totals, so the
detectors answer each new call in O(log n) instead of re-reading the agent's whole history."""

from __future__ import annotations

import statistics
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Final

from tokenwatch.core.detect import busy_slice
from tokenwatch.core.models import Status, UsageEvent

COMPACT_AT: Final = 1024
"""Dropped entries kept before a list is compacted: amortises the copy over many calls."""
_DOLLAR: Final = 1 << 1074
"""Costs are summed exactly as integers in units of the smallest float (2**-1074 dollars)."""


@dataclass(slots=True)
class Track:
    """Calls in arrival order from `start` on, with their running token total.

    Bisecting on `ts` assumes timestamps that never go down; `Recent.ordered` says when."""

    seqs: list[int] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    events: list[UsageEvent] = field(default_factory=list)
    before: list[int] = field(default_factory=list)
    """Tokens of every call added before this one (differences give any slice's tokens)."""
    total: int = 0
    cost_before: list[int] = field(default_factory=list)
    """Exact cost of every call added before this one (see `exact_cost`)."""
    cost_total: int = 0
    start: int = 0

    def add(self, seq: int, event: UsageEvent, cost: int = 0) -> None:
        self.seqs.append(seq)
        self.ts.append(event.ts)
        self.events.append(event)
        self.before.append(self.total)
        self.total += event.total_tokens
        self.cost_before.append(self.cost_total)
        self.cost_total += cost

    def trim(self, lo: int) -> None:
        """Forget calls older than arrival `lo` (those the agent's history no longer holds)."""
        while self.start < len(self.seqs) and self.seqs[self.start] < lo:
            self.start += 1
        if self.start > COMPACT_AT and 2 * self.start > len(self.seqs):
            for column in (self.seqs, self.ts, self.events, self.before, self.cost_before):
                del column[: self.start]
            self.start = 0

    def after(self, cutoff: float) -> int:
        """Index of the first call later than `cutoff`."""
        return bisect_right(self.ts, cutoff, self.start)

    def upto(self, edge: float) -> int:
        """Index past the last call at or before `edge`."""
        return bisect_right(self.ts, edge, self.start)

    def tokens(self, i: int, j: int) -> int:
        end = self.total if j == len(self.ts) else self.before[j]
        return end - self.before[i] if i < j else 0

    def cost_since(self, i: int) -> float:
        """The exact cost of the calls from index i on, rounded once to a float."""
        if i >= len(self.ts):
            return 0.0
        return (self.cost_total - self.cost_before[i]) / _DOLLAR


@dataclass(slots=True)
class Recent:
    """One agent's successful calls, by time; arrival numbers match its history."""

    ok: Track = field(default_factory=Track)
    seen: int = 0
    """Calls added so far: the next call's arrival number."""
    disorder: int = -1
    """Arrival number of the latest call older than the one before it."""
    last_ts: float = float("-inf")
    costs_exact: bool = True
    """Every cost so far finite and not negative, so `Track.cost_since` bounds a float sum."""

    def add(self, event: UsageEvent) -> None:
        seq, self.seen = self.seen, self.seen + 1
        if event.ts < self.last_ts:
            self.disorder = seq
        self.last_ts = event.ts
        if event.status != Status.OK:
            return
        self.ok.add(seq, event, self._exact_cost(event.cost_usd or 0.0))

    def _exact_cost(self, usd: float) -> int:
        if not 0.0 <= usd < float("inf"):
            self.costs_exact = False
            return 0
        num, den = usd.as_integer_ratio()
        return num * (_DOLLAR // den)

    def trim(self, kept: int) -> None:
        """Keep what the agent's history keeps: its last `kept` calls."""
        lo = self.seen - kept
        self.ok.trim(lo)

    def ordered(self, kept: int) -> bool:
        """True when the last `kept` calls arrived in time order, so bisecting is exact."""
        return self.disorder <= self.seen - kept


def busy_median(ok: Track, i: int, j: int, edge: float, window: float) -> tuple[float, list[float]]:
    """Median tokens of the `window`-long slices before `edge` that had calls, over ok[i:j], and
    the gap before each slice's last call unless it began another task (as
    `detect._busy_windows` gives them)."""
    sums: list[float] = []
    gaps: list[float] = []
    first = i
    k = busy_slice(edge, ok.ts[i], window) if i < j else 0
    while i < j:
        end, after = _slice_end(ok.ts, i, j, edge, window, k)
        sums.append(float(ok.tokens(i, end)))
        if end - 1 > first and ok.events[end - 1].task == ok.events[end - 2].task:
            gaps.append(ok.ts[end - 1] - ok.ts[end - 2])
        i, k = end, after
    return statistics.median(sums), gaps


def _slice_end(
    ts: list[float], i: int, j: int, edge: float, window: float, k: int
) -> tuple[int, int]:
    """Where slice k (starting at ts[i]) ends, and the slice of the call there."""
    # Bisect on the slice's float edge, then step over any rounding so the slice holds exactly
    # the calls `busy_slice` puts in k, as the scanning detector cuts them.
    end = max(i + 1, bisect_right(ts, edge - k * window, i, j))
    while busy_slice(edge, ts[end - 1], window) != k:
        end -= 1
    after = busy_slice(edge, ts[end], window) if end < j else k
    while after == k and end < j:
        end += 1
        after = busy_slice(edge, ts[end], window) if end < j else k
    return end, after

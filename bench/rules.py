"""Rules throughput: events/s and µs/event through `Rules(DEFAULT_RULES)`, indexed vs scanning.

Usage: python bench/rules.py [--events 2000] [--histories 500,2000,8000] [--agents 20]

Synthetic calls on a replay clock (the clock reads each call's own time): 75% distinct prompts,
15% drawn again from a pool of 3000 common prompts (an exact repeat now and then), 10% from 1000
templates with a number changed (same shape, size within 5%: near-duplicates); a new task every
50 calls; prompt sizes 300-6000 tokens. Two loads: one busy agent (5 calls/s) and `--agents`
agents interleaved (1 call/s each); and the busy agent again under a $5000/day budget (the
forecast rule then reads its status).

For each agent-history size (HISTORY_CALLS; 2000 is the default), a fresh `Rules` is first
filled past that size (untimed, indexed), then `--events` more calls are timed with
time.perf_counter, in two modes on the same state: "index" (what runs) and "scan" (the agents'
calls flagged as out of time order, which makes `Rules` read the whole history per rule per
call, the way every call was handled before the index). Both modes must give the same signals;
the bench says so. Figures are ratios from one run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tokenwatch.core import rules as rules_mod
from tokenwatch.core.models import BudgetStatus, UsageEvent
from tokenwatch.core.rules import DEFAULT_RULES, Rules

DAILY = BudgetStatus("daily", "global", "", "day", 5000.0, "usd", 0.0, "alert")
"""A budget the forecast rule reads the status of."""


@dataclass(frozen=True)
class Load:
    title: str
    agents: int
    rate: float
    """Calls per second per agent."""
    budget: bool = False


@dataclass
class Clock:
    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def calls(agents: int, rate: float, seed: int = 7) -> Iterator[UsageEvent]:
    """An endless mix of distinct, repeated and near-duplicate prompts, agents interleaved."""
    rng = random.Random(seed)
    ts, step, n = Clock().now, 1.0 / (rate * agents), 0
    while True:
        n += 1
        ts += step
        yield _call(rng, f"agent-{n % agents}", ts, n, n // agents)


def _call(rng: random.Random, agent: str, ts: float, n: int, own: int) -> UsageEvent:
    """The agent's `own`th call, the `n`th of all."""
    pick = rng.random()
    size = rng.randint(300, 6000)
    if pick < 0.75:
        digest, shape = f"h{n}", f"s{n}"
    elif pick < 0.90:
        k = rng.randrange(3000)
        digest, shape, size = f"common{k}", f"cs{k}", 300 + k
    else:
        k = rng.randrange(1000)
        digest, shape = f"t{n}", f"ts{k}"
        size = int((1000 + 5 * k) * rng.uniform(0.975, 1.025))
    return UsageEvent(
        ts=ts,
        agent=agent,
        task=f"task-{own // 50}",
        input_tokens=size,
        output_tokens=rng.randint(50, 600),
        cost_usd=size * 3e-6,
        prompt_hash=digest,
        prompt_shape=shape,
    )


def run(load: Load, history: int, timed: int, scan: bool) -> tuple[float, int]:
    """Seconds for `timed` calls after `history` calls per agent, and the signals they raised."""
    setattr(rules_mod, "HISTORY_CALLS", history)  # noqa: B010 (a Final, patched for the bench)
    clock = Clock()
    budgets = [DAILY] if load.budget else []
    rules = Rules(DEFAULT_RULES, clock=clock, budgets=lambda: budgets)
    agents, rate = load.agents, load.rate
    feed = calls(agents, rate)
    for _ in range(agents * history + 100):
        _observe(rules, clock, next(feed))
    batch = [next(feed) for _ in range(timed)]
    if scan:
        _scan_everything(rules)
    start = time.perf_counter()
    signals = sum(len(_observe(rules, clock, e)) for e in batch)
    return time.perf_counter() - start, signals


def _observe(rules: Rules, clock: Clock, event: UsageEvent) -> list[object]:
    clock.now = event.ts
    return list(rules.observe(event))


def _scan_everything(rules: Rules) -> None:
    # An arrival after every call flagged out of order: the index never answers.
    for mem in rules._agents.values():
        mem.recent.disorder = 1 << 62


def table(load: Load, histories: list[int], timed: int) -> None:
    calls_s = load.rate * load.agents
    print(f"\n{load.title} ({load.agents} agent(s), {calls_s:g} calls/s), {timed} timed calls\n")
    print("| history (calls) | index events/s | index µs/event | scan µs/event | scan/index |")
    print("| --- | --- | --- | --- | --- |")
    for history in histories:
        fast, fast_signals = run(load, history, timed, scan=False)
        slow, slow_signals = run(load, history, timed, scan=True)
        same = "" if fast_signals == slow_signals else f" SIGNALS DIFFER {fast_signals}"
        print(
            f"| {history} | {timed / fast:,.0f} | {fast / timed * 1e6:.1f} | "
            f"{slow / timed * 1e6:.1f} | {slow / fast:.1f}x{same} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=2000, help="timed calls per row")
    parser.add_argument("--histories", default="500,2000,8000", help="HISTORY_CALLS sizes")
    parser.add_argument("--agents", type=int, default=20, help="agents in the many-agent load")
    args = parser.parse_args(argv)
    histories = [int(h) for h in args.histories.split(",")]
    print(f"# tokenwatch rules throughput ({platform.python_version()}, {os.cpu_count()} cores)")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    loads = [
        Load("one busy agent", 1, 5.0),
        Load("many agents", args.agents, 1.0),
        Load("one busy agent under a $5000/day budget", 1, 5.0, budget=True),
    ]
    for load in loads:
        table(load, histories, args.events)


if __name__ == "__main__":
    main()

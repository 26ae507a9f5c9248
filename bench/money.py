"""Money benchmark: how much of a $5 budget Claude Code-shaped calls can spend, how far 50
concurrent calls overshoot it, and what pricing through genai-prices costs.

Usage: python bench/money.py [--trials 200] [--seed 1]

1. Spend before the first refusal: one agent sends Claude Code-shaped calls (20,000 prompt
   tokens, max_tokens 32,000, output drawn from a log-normal around 800 tokens, capped at
   32,000) one after another against a `$5` deny budget, on a model no price table knows (so
   priced at the fallback, claude-opus-4-5: $5 / $6.25 cache write / $25 per 1M). Each call
   reserves what `Gate._reserve` (engine/gate.py) reserves (the prompt at the dearest input
   rate plus the output `OutputEstimate` expects, or plus max_tokens as before) through the
   real `Budgets`, `OutputEstimate` and `PriceTable`, and settles at its priced cost.
   Reported: calls admitted, dollars spent when the first call is refused, and what was left
   unspent.
2. Overshoot: `--trials` runs of three waves of 50 concurrent calls each (anyio tasks that
   yield 1-8 times between reserve and settle, in random order) against a fresh `$5` budget;
   outputs as above, then with 5% long answers (4k-32k tokens, a file written whole). Reported:
   how many trials ended over $5, the largest spend past $5 over all trials, and the documented
   bound for that trial (the excess over their reservations of the calls in flight at the last
   admission), which the spend must never pass.
3. Pricing cost: the time to import genai-prices and load its data (a fresh interpreter, best of
   5), and the time to price one call (`PriceTable.price`) of a model it knows, after warm-up.
"""

from __future__ import annotations

import argparse
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass

import anyio
import anyio.lowlevel

from tokenwatch.config import BudgetSettings
from tokenwatch.core.admission import CallRequest, Refusal
from tokenwatch.core.budgets import Budgets
from tokenwatch.core.models import UsageEvent
from tokenwatch.core.output_estimate import OutputEstimate
from tokenwatch.core.pricing import PriceTable

MODEL = "acme-coder-7"
PROMPT, MAX_TOKENS, LIMIT = 20_000, 32_000, 5.0
TABLE = PriceTable.load()


def output(rng: random.Random, tail: float = 0.0) -> int:
    """~800 tokens (log-normal, median ~735); with probability `tail`, a long answer (4k-32k)."""
    if rng.random() < tail:
        return rng.randint(4_000, MAX_TOKENS)
    return min(MAX_TOKENS, max(1, round(rng.lognormvariate(6.6, 0.5))))


@dataclass
class Book:
    budgets: Budgets
    estimate: OutputEstimate
    likely: bool

    def reserve(self) -> tuple[object, float]:
        out = self.estimate.expected("coder", MODEL, MAX_TOKENS) if self.likely else MAX_TOKENS
        usd = TABLE.worst_case(MODEL, PROMPT, out) or 0.0
        call = CallRequest(agent="coder", provider="anthropic", model=MODEL)
        return self.budgets.reserve(call, PROMPT + out, usd, "claude-opus-4-5"), usd

    def settle(self, got: object, out: int) -> float:
        event = UsageEvent(
            agent="coder", model=MODEL, provider="anthropic", input_tokens=PROMPT, output_tokens=out
        )
        TABLE.price(event)
        self.budgets.settle(got, event)  # type: ignore[arg-type]
        self.estimate.observe("coder", MODEL, out)
        return event.cost_usd or 0.0


def book(likely: bool) -> Book:
    settings = BudgetSettings(name="five", limit="$5", action="deny", period="total")
    return Book(Budgets([settings], tz="UTC"), OutputEstimate(), likely)


def sequential(likely: bool, seed: int) -> tuple[int, float]:
    rng = random.Random(seed)
    b = book(likely)
    calls = 0
    while True:
        got, _ = b.reserve()
        if isinstance(got, Refusal):
            break
        b.settle(got, output(rng))
        calls += 1
    (row,) = b.budgets.statuses()
    return calls, row.used


def concurrent(seed: int, tail: float) -> tuple[float, float]:
    rng = random.Random(seed)
    b = book(likely=True)
    excess: dict[str, float] = {}
    in_flight: set[str] = set()
    last: set[str] = set()

    async def one() -> None:
        got, usd = b.reserve()
        if isinstance(got, Refusal):
            return
        rid = got.id  # type: ignore[attr-defined]
        in_flight.add(rid)
        last.clear()
        last.update(in_flight)
        for _ in range(rng.randint(1, 8)):
            await anyio.lowlevel.checkpoint()
        cost = b.settle(got, output(rng, tail))
        in_flight.discard(rid)
        excess[rid] = max(0.0, cost - usd)

    async def wave() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(one)

    for _ in range(3):
        anyio.run(wave)
    (row,) = b.budgets.statuses()
    return row.used - LIMIT, sum(excess.get(r, 0.0) for r in last)


def import_cost() -> float:
    code = (
        "import time; t = time.perf_counter(); from genai_prices import data_snapshot; "
        "data_snapshot.get_snapshot(); print(time.perf_counter() - t)"
    )
    runs = [float(subprocess.check_output([sys.executable, "-c", code])) for _ in range(5)]
    return min(runs)


def price_cost(n: int = 20_000) -> float:
    events = [UsageEvent(model="claude-sonnet-4-5-20250929", input_tokens=i, output_tokens=9)
              for i in range(n)]  # fmt: skip
    TABLE.price(events[0])
    start = time.perf_counter()
    for event in events:
        TABLE.price(event)
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {args.trials} trials")
    for likely, name in ((False, "max_tokens (before)"), (True, "likely output (now)")):
        calls, used = sequential(likely, args.seed)
        print(f"reserve {name:20} {calls:3} calls admitted, ${used:.4f} spent, "
              f"${LIMIT - used:.4f} left unspent at the first refusal")  # fmt: skip
    for tail in (0.0, 0.05):
        worst_over, worst_bound, breaches, over_runs = 0.0, 0.0, 0, 0
        for trial in range(args.trials):
            over, bound = concurrent(args.seed * 10_000 + trial, tail)
            breaches += over > bound + 1e-9
            over_runs += over > 0
            if over > worst_over:
                worst_over, worst_bound = over, bound
        print(f"50 concurrent x 3 waves, {tail:.0%} long answers: over $5 in {over_runs} of "
              f"{args.trials} trials, largest overshoot ${worst_over:.4f} (its bound "
              f"${worst_bound:.4f}); bound broken in {breaches} trials")  # fmt: skip
    print(f"genai-prices import + data load: {import_cost() * 1000:.0f} ms (best of 5)")
    print(f"PriceTable.price per call: {price_cost() * 1e6:.1f} us")


if __name__ == "__main__":
    main()

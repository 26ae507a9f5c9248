"""Dashboard under load: 1,000 agents and 10,000 calls/s for 30 s, headless.

The engine aggregates calls into snapshots (it never sends the dashboard one message per call), so
the load here is what the supervisor would send for that traffic: a snapshot of every agent every
`--interval` seconds, each agent's figures moved by its share of the calls, plus alerts and actions.
Snapshots are built before the clock starts, so the CPU figure is the dashboard's own work.

Prints: time per refresh (applying one snapshot to every panel), key-press-to-screen latency (from the
key event to the end of the first paint showing its effect), and CPU used as a share of one core.
Run: `.venv/bin/python bench/tui.py` (or `--seconds 5` for a quick look).
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import anyio
from textual import events

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio.lowlevel

from tokenwatch.core.models import Action, Agent, AgentView, Alert, Snapshot
from tokenwatch.tui.app import TokenwatchApp, build_app
from tokenwatch.tui.source import ScriptedSource

MODELS = ("gpt-4o-mini", "gpt-4o", "claude-haiku-4-5", "gpt-4.1-nano")


def build_snapshots(agents: int, rate: float, seconds: float, interval: float) -> list[Snapshot]:
    """What the engine would publish for `rate` calls/s spread unevenly over `agents` agents."""
    rng = random.Random(1)
    weights = [rng.paretovariate(1.2) for _ in range(agents)]
    total_w = sum(weights)
    tokens = [0] * agents
    cost = [0.0] * agents
    burn: list[list[float]] = [[] for _ in range(agents)]
    names = [f"agent-{i:04d}" for i in range(agents)]
    snaps = []
    calls_per_tick = rate * interval
    for tick in range(int(seconds / interval)):
        views = []
        for i in range(agents):
            calls = calls_per_tick * weights[i] / total_w
            t = int(calls * rng.uniform(800, 1600))
            tokens[i] += t
            cost[i] += t * 0.6e-6
            burn[i] = (burn[i] + [float(t)])[-12:]
            per_min = t / interval * 60
            views.append(
                AgentView(
                    agent=Agent(name=names[i], pid=10_000 + i, started_at=0.0),
                    models=[MODELS[i % len(MODELS)]],
                    requests_per_min=calls / interval * 60,
                    tokens_per_min=per_min,
                    usd_per_hour=per_min * 60 * 0.6e-6,
                    period_tokens=tokens[i],
                    period_cost_usd=cost[i],
                    budget_fraction=min(1.5, cost[i] / 5.0),
                    burn=list(burn[i]),
                )
            )
        top = sorted(((v.agent.name, v.period_cost_usd) for v in views), key=lambda r: -r[1])
        snaps.append(
            Snapshot(
                ts=tick * interval,
                tokens_per_min=sum(v.tokens_per_min for v in views),
                usd_per_hour=sum(v.usd_per_hour for v in views),
                spend_today_usd=sum(cost),
                daily_budget_usd=500.0,
                agents=views,
                top={"agent": top[:10]},
                burn=[float(sum(b[-1] for b in burn if b))] * 60,
                supervisor="bench",
            )
        )
    return snaps


class Timed:
    """Wraps the app's snapshot apply to time each refresh."""

    def __init__(self, app: TokenwatchApp) -> None:
        self.durations: list[float] = []
        original = app._apply_pending

        def timed() -> None:
            start = time.perf_counter()
            original()
            self.durations.append(time.perf_counter() - start)

        app._apply_pending = timed  # type: ignore[method-assign]


async def feed(source: ScriptedSource, snaps: list[Snapshot], interval: float) -> None:
    start = time.monotonic()
    for n, snap in enumerate(snaps):
        source.push_nowait("snapshot", snap)
        if n % 20 == 0:
            name = snap.agents[n % len(snap.agents)].agent.name
            source.push_nowait("alert", Alert("spike", name, "burn 5x baseline", ts=snap.ts))
            source.push_nowait("action", Action("throttle", name, "rule:spike", ts=snap.ts))
        await anyio.sleep(max(0.0, start + (n + 1) * interval - time.monotonic()))


class Paints:
    """Records when the main screen last finished painting (a compositor refresh)."""

    def __init__(self, app: TokenwatchApp) -> None:
        self.last = 0.0
        screen = app.main
        original = screen._compositor_refresh

        def painted() -> None:
            original()
            self.last = time.perf_counter()

        screen._compositor_refresh = painted  # type: ignore[method-assign]


def _effect(app: TokenwatchApp, key: str) -> object:
    """What the key changes, to tell when the app has handled it."""
    table = app.main.table
    if key in ("down", "up"):
        return table.cursor_row
    if key == "g":
        return app.main.spenders.grouping
    return (table.sort_key, table.sort_descending)


async def press_latencies(
    app: TokenwatchApp, paints: Paints, seconds: float
) -> dict[str, list[float]]:
    """Key presses as a terminal sends them, spread over the run: each timed from the key event
    to the end of the first paint after the app changed what the key changes."""
    by_key: dict[str, list[float]] = {}
    keys = ["down", "down", "up", "g", "s"]
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        key = keys[n % len(keys)]
        n += 1
        before = _effect(app, key)
        start = time.perf_counter()
        assert app._driver is not None
        app._driver.send_message(events.Key(key, None))
        with anyio.move_on_after(5):  # a key with nothing to change (cursor at the end)
            while _effect(app, key) == before:
                await anyio.sleep(0.0005)
            while paints.last < start:
                await anyio.sleep(0.0005)
            by_key.setdefault(key, []).append(paints.last - start)
        await anyio.sleep(0.37)
    return by_key


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.1f}"


async def main(args: argparse.Namespace) -> None:
    print(f"building {int(args.seconds / args.interval)} snapshots of {args.agents} agents...")
    snaps = build_snapshots(args.agents, args.rate, args.seconds, args.interval)
    source = ScriptedSource(snaps[0])
    app = build_app(source, address="bench", max_rows=args.max_rows)
    timed = Timed(app)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause(0.5)
        paints = Paints(app)
        cpu0, wall0 = cpu_seconds(), time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(feed, source, snaps[1:], args.interval)
            by_key = await press_latencies(app, paints, args.seconds - 1)
        cpu, wall = cpu_seconds() - cpu0, time.monotonic() - wall0
    refresh = timed.durations
    latencies = [x for values in by_key.values() for x in values]
    print(
        f"agents {args.agents}, {args.rate:,.0f} calls/s aggregated into a snapshot every "
        f"{args.interval:g} s, {wall:.1f} s, table shows top {args.max_rows}, 160x48 headless"
    )
    print(
        f"snapshots received {app.received}, applied {app.refreshes}; cells rewritten "
        f"{app.main.table.cell_updates:,}"
    )
    print(
        f"time per refresh   median {ms(refresh, 0.5)} ms  p95 {ms(refresh, 0.95)} ms  "
        f"max {ms(refresh, 1.0)} ms"
    )
    print(
        f"key to screen      median {ms(latencies, 0.5)} ms  p95 {ms(latencies, 0.95)} ms  "
        f"max {ms(latencies, 1.0)} ms  ({len(latencies)} presses)"
    )
    per_key = ", ".join(f"{k} {ms(v, 0.5)}" for k, v in by_key.items())
    print(f"  median by key    {per_key} ms (s re-sorts by another column: new top rows)")
    print(f"CPU                {cpu / wall * 100:.0f}% of one core ({cpu:.1f} s over {wall:.1f} s)")
    if refresh:
        print(f"mean refresh       {statistics.fmean(refresh) * 1000:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=10_000, help="calls per second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between snapshots")
    parser.add_argument("--max-rows", type=int, default=100)
    anyio.run(main, parser.parse_args())

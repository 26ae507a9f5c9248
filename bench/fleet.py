"""Fleet benchmark: shared budgets on PostgreSQL (docs/fleet.md).

Usage: python bench/fleet.py [--rounds 20] [--calls 2000]

Both parts start a throwaway PostgreSQL cluster of their own (tests/postgres_fixtures.py: initdb
in a temp dir, a Unix socket, fsync off), so they need the server's binaries, not a server.

1. Admission latency: one in-process supervisor (no proxy, no exporters), `--calls` calls
   admitted one after another through `Engine.admit` and released, timed with perf_counter
   around each admit. Once with a local `$` deny budget, once with the same budget shared
   (`shared = true`): the shared one adds its reservation statement (one round trip on the
   Unix socket). Reported: p50 and p99 of each and the difference. The release of the shared
   hold goes to the background sender and is not in the figure.
2. Overshoot: `--rounds` rounds, each with a fresh database and four fresh `tokenwatch serve`
   processes (homes of their own), each sending 50 concurrent calls through its proxy to
   fake-llm (2 s latency, so all 200 are in flight together) against one shared `$` budget
   that fits 60.5 calls' reservations. Reported per round: calls admitted and refused, what the
   four SQLite ledgers recorded against the limit, and what the team's database counted (after
   the four stopped: it must equal the ledgers' sum, each call counted once).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' fixtures

from tests.fleet_fixtures import fire, team, team_figures, team_toml, worst_case_usd
from tests.postgres_fixtures import PgCluster, find_bindir
from tokenwatch.config import BudgetSettings, Config, FleetSettings, RuleSettings
from tokenwatch.core.admission import CallRequest
from tokenwatch.demo.fake_llm import running_fake_llm
from tokenwatch.paths import Paths
from tokenwatch.supervisor.service import Supervisor


@contextmanager
def cluster() -> Iterator[PgCluster]:
    bindir = find_bindir()
    if bindir is None:
        sys.exit(
            "PostgreSQL's server binaries are not installed (Debian: apt-get install postgresql)"
        )
    root = Path(tempfile.mkdtemp(prefix="twpg-"))
    pg = PgCluster(bindir, root)
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        if pg.running():
            pg.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def admission_ms(pg: PgCluster, shared: bool, calls: int) -> list[float]:
    db = pg.create_database()
    os.environ.update(pg.env(db))
    budget = BudgetSettings(name="team", limit="$1000", action="deny", shared=shared)
    config = Config(
        budget=[budget],
        rule=[RuleSettings(name="off", detector="runaway", enabled=False)],
        fleet=FleetSettings(url=pg.url(db)) if shared else None,
    )
    home = Path(tempfile.mkdtemp(prefix="twb-"))
    times: list[float] = []
    try:
        paths = Paths.discover({"TOKENWATCH_HOME": str(home)})
        sup = Supervisor(paths, config, proxy=False, exporters=False)
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            assert sup.engine is not None
            engine = sup.engine
            call = CallRequest(agent="bench", provider="openai", model="gpt-4o-mini",
                               input_tokens=500, max_output_tokens=200)  # fmt: skip
            for i in range(calls + 100):
                start = time.perf_counter()
                admission = await engine.admit(call)
                elapsed = (time.perf_counter() - start) * 1000
                assert admission.allowed, admission.message
                engine.release(admission)
                if i >= 100:  # after warm-up
                    times.append(elapsed)
            sup.request_shutdown()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return times


async def overshoot_round(pg: PgCluster, index: int) -> tuple[Counter[str], float, float, float]:
    db = pg.create_database()
    env = pg.env(db)
    os.environ.update(env)
    url = pg.url(db)
    limit = worst_case_usd() * 60.5
    budget = f'[[budget]]\nname = "team"\nlimit = "${limit:.8f}"\naction = "deny"\nshared = true\n'
    outcomes: Counter[str] = Counter()
    async with running_fake_llm(latency_ms=2000) as fake:
        with team(["a", "b", "c", "d"], env, team_toml(url, fake.url, budget)) as members:
            async with anyio.create_task_group() as tg:
                for member in members:
                    tg.start_soon(fire, member, f"crowd-{index}-{member.name}", 50, outcomes)
            for member in members:
                member.stop()
            recorded = sum(member.ledger_usd() for member in members)
        spent, _ = await team_figures(url, "team")
    return outcomes, recorded, spent, limit


async def main(args: argparse.Namespace) -> None:
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    with cluster() as pg:
        local = await admission_ms(pg, False, args.calls)
        shared = await admission_ms(pg, True, args.calls)
        print(f"\nadmission latency, {args.calls} sequential calls (ms):")
        for name, times in (("local budget", local), ("shared budget", shared)):
            print(
                f"  {name:14} p50 {percentile(times, 0.5):.3f}  p99 {percentile(times, 0.99):.3f}"
            )
        print(
            f"  added by sharing: p50 +{percentile(shared, 0.5) - percentile(local, 0.5):.3f}  "
            f"p99 +{percentile(shared, 0.99) - percentile(local, 0.99):.3f}"
        )
        print(f"\novershoot: {args.rounds} rounds of 4 supervisors x 50 concurrent calls")
        over = []
        differ = 0
        for i in range(args.rounds):
            outcomes, recorded, spent, limit = await overshoot_round(pg, i)
            over.append(recorded - limit)
            differ += abs(spent - recorded) > 1e-12
            print(
                f"  round {i + 1:2}: {outcomes['ok']:3} admitted, {outcomes['refused']:3} refused, "
                f"recorded ${recorded:.6f} of ${limit:.6f} ({recorded / limit:.1%}), "
                f"team counted ${spent:.6f}"
            )
        print(f"  largest spend past the limit: ${max(0.0, max(over)):.6f}; mean of "
              f"(recorded - limit): ${statistics.mean(over):.6f}")  # fmt: skip
        print(f"  rounds where the team's count differs from the four ledgers: {differ}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=2000)
    anyio.run(main, parser.parse_args())

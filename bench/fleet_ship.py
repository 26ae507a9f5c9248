"""Fleet benchmark: events/s the ledger shipper sends to PostgreSQL (docs/fleet.md, "One ledger
for the team").

Usage: python bench/fleet_ship.py [--events 100000] [--runs 3]

A real SQLite ledger (tokenwatch's Store, in a temp dir) is filled with `--events` priced usage
events, each with its own call_id, as a backlog (what a supervisor holds after an outage). Then
the shipper (tokenwatch/fleet/shipper.py, batches of 2,000 rows in one INSERT ... ON CONFLICT DO
NOTHING each, the cursor written to the ledger after each commit) ships it into a fresh database
of a throwaway cluster (bench/fleet.py's: initdb in a temp dir, Unix socket, fsync off). Timed
with perf_counter from the moment the shipper is connected (schema migrated) until the ledger's
cursor reaches the last event (polled every 5 ms); the team's row count is checked afterwards.
Each run uses a fresh ledger and database; the figure is events / seconds per run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the bench and tests modules

from bench.fleet import cluster
from tests.postgres_fixtures import PgCluster
from tokenwatch.config import FleetSettings
from tokenwatch.core.models import UsageEvent
from tokenwatch.fleet.shipper import BATCH, Shipper
from tokenwatch.ledger.store import Store


async def fill(ledger: Path, events: int) -> None:
    """`events` calls over the last hour, four agents, priced."""
    start = time.time() - 3600
    async with await Store.open(ledger) as store:
        for lo in range(0, events, 5000):
            await store.append_many(
                [event(i, start, events) for i in range(lo, min(events, lo + 5000))]
            )


def event(i: int, start: float, events: int) -> UsageEvent:
    """The i-th of `events` calls spread over the hour from `start`."""
    return UsageEvent(
        ts=start + i * 3600 / events,
        agent=f"agent-{i % 4}",
        call_id=f"c{i}",
        provider="openai",
        model="gpt-4o-mini",
        input_tokens=500 + i % 97,
        output_tokens=40 + i % 13,
        cost_usd=0.0001 + (i % 7) * 1e-6,
    )


def cursor(ledger: Path) -> tuple[int, int]:
    """(shipped up to, last event id) of the ledger."""
    with closing(sqlite3.connect(ledger)) as db:
        (last,) = db.execute("SELECT max(id) FROM events").fetchone()
        row = db.execute("SELECT last_id FROM fleet_shipped").fetchone()
    return (row[0] if row else 0), last


async def one_run(pg: PgCluster, events: int) -> float:
    db = pg.create_database()
    os.environ.update(pg.env(db))
    root = Path(tempfile.mkdtemp(prefix="twship-"))
    try:
        ledger = root / "usage.db"
        await fill(ledger, events)
        shipper = Shipper(FleetSettings(url=pg.url(db), host="bench", ship_interval=0.05), ledger)
        async with anyio.create_task_group() as tg:
            await tg.start(shipper.run)
            assert shipper.link.up, shipper.link.error
            began = time.perf_counter()
            while (found := cursor(ledger))[0] < found[1]:
                await anyio.sleep(0.005)
            elapsed = time.perf_counter() - began
            tg.cancel_scope.cancel()
        await shipper.finish()
        stored = await team_rows(pg.url(db))
        assert stored == events, (stored, events)
        return events / elapsed
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def team_rows(url: str) -> int:
    import psycopg

    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT count(*) FROM fleet_events")
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def main(args: argparse.Namespace) -> None:
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"backlog of {args.events:,} events, batches of {BATCH:,}, {args.runs} runs")
    with cluster() as pg:
        rates = [await one_run(pg, args.events) for _ in range(args.runs)]
    for i, rate in enumerate(rates, 1):
        print(f"  run {i}: {rate:,.0f} events/s")
    print(f"  best {max(rates):,.0f}, median {sorted(rates)[len(rates) // 2]:,.0f} events/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    anyio.run(main, parser.parse_args())

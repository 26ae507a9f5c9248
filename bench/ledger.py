"""Ledger benchmark: events/s through the batched writer, and a 24 h report over a big ledger.

Usage: python bench/ledger.py [--events 1000000] [--stored 10000000] [--dir DIR] [--keep]
                              [--writer thread|process]

1. Writer: `--events` usage events go through `Store.append_nowait` (and, separately, through
   64 concurrent `Store.append` callers), timed from the first call to the end of `flush()`,
   i.e. until every event is committed. Fresh file, WAL, synchronous=NORMAL. `--writer` picks
   the writer the commands use (a thread, the default) or the supervisor's (a child process);
   the writer's CPU is the thread's `thread_time` plus, for the process, the child's.
2. Report: a ledger of `--stored` events spread evenly over 30 days is filled in bulk (plain
   sqlite3 inserts of pre-built rows into `events` (the writer's `insert_rows`), 200k rows per transaction, each
   followed by the store's own rollup SQL for those rows), then `aggregate("agent", now - 24h)` is
   timed through the public Store API: first (cold cache) run, then the median of 20 runs.
   The workload has 20 agents, each on one task at a time (new task every ~10 min), 4 models,
   3 users. For contrast the same report is also timed as a plain GROUP BY over raw events.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from tokenwatch.core.models import UsageEvent
from tokenwatch.ledger.schema import EVENT_COLUMNS
from tokenwatch.ledger.store import Store
from tokenwatch.ledger.transaction import fold_rollups, insert_rows, prepare_rollups
from tokenwatch.ledger.writer import event_row

DAY = 86400.0
SPAN_DAYS = 30
AGENTS = [f"agent-{i:02d}" for i in range(20)]
MODELS = [("gpt-4o", "openai"), ("gpt-4o-mini", "openai"), ("claude-sonnet-4-5", "anthropic"),
          ("gemini-2.5-flash", "google")]  # fmt: skip
USERS = ["ana", "bo", "cy"]


def sample_event(ts: float, i: int) -> UsageEvent:
    """Live-like traffic: 20 agents interleaved, each on its own task and model."""
    agent = i % len(AGENTS)
    model, provider = MODELS[agent % len(MODELS)]
    return UsageEvent(
        ts=ts,
        agent=AGENTS[agent],
        task=f"{AGENTS[agent]}-t{int(ts // 600)}",
        user=USERS[agent % len(USERS)],
        model=model,
        provider=provider,
        input_tokens=1000 + i % 500,
        cache_read_tokens=i % 300,
        output_tokens=200 + i % 100,
        cost_usd=0.001,
        price_version="2026-11-01",
        latency_ms=500.0,
        source="proxy",
        call_id=f"c{i}",
    )


@dataclass
class WriterRun:
    events: int
    wall: float
    process_cpu: float
    writer_cpu: float

    def line(self, how: str) -> str:
        return (
            f"writer: {self.events:,} events via {how}: {self.events / self.wall:,.0f} events/s "
            f"wall; writer {self.writer_cpu / self.events * 1e6:.1f} us CPU/event "
            f"(= {self.events / self.writer_cpu:,.0f} events per CPU-second); whole process "
            f"{self.process_cpu / self.events * 1e6:.1f} us CPU/event"
        )


async def bench_writer(workdir: Path, n: int, process: bool) -> tuple[WriterRun, WriterRun]:
    now = time.time()
    events = [sample_event(now - i * 0.001, i) for i in range(n)]
    async with await Store.open(workdir / "nowait.db", writer_process=process) as store:
        wall, cpu = time.perf_counter(), time.process_time()
        for event in events:
            store.append_nowait(event)
        await store.flush()
        stats = store.statistics()
        nowait = WriterRun(
            n, time.perf_counter() - wall, time.process_time() - cpu, stats.cpu_seconds
        )
        assert stats.committed == n
    m = min(n, 200_000)
    events = [sample_event(now - i * 0.001, i) for i in range(m)]
    async with await Store.open(workdir / "awaited.db", writer_process=process) as store:
        wall, cpu = time.perf_counter(), time.process_time()
        async with anyio.create_task_group() as tg:
            for k in range(64):
                tg.start_soon(_append_each, store, events[k::64])
        stats = store.statistics()
        awaited = WriterRun(
            m, time.perf_counter() - wall, time.process_time() - cpu, stats.cpu_seconds
        )
        assert stats.committed == m
    return nowait, awaited


async def _append_each(store: Store, events: list[UsageEvent]) -> None:
    for event in events:
        await store.append(event)


def cost_breakdown(workdir: Path, n: int = 100_000) -> dict[str, float]:
    """Writer-thread CPU per event for the same statements the writer runs, with parts removed.

    Min of 3 runs each, batches of 2000, live-like rows: where the writer's time goes.
    """
    now = time.time()
    rows = [event_row(sample_event(now - i * 0.001, i)) for i in range(n)]
    variants = {
        "insert, no secondary index, no rollups": (False, False),
        "insert with the 3 indexes, no rollups": (True, False),
        "insert with indexes and both rollups (the writer)": (True, True),
    }
    best: dict[str, float] = {}
    for run in range(3):
        for name, (indexes, rollups) in variants.items():
            path = workdir / f"breakdown-{run}-{len(best)}-{indexes}{rollups}.db"
            anyio.run(create_empty, path)
            db = sqlite3.connect(path, isolation_level=None)
            prepare_rollups(db)
            if not indexes:
                for index in ("events_ts", "events_agent_id", "events_call_id"):
                    db.execute(f"DROP INDEX {index}")
            started = time.thread_time()
            for k in range(0, n, 2000):
                db.execute("BEGIN IMMEDIATE")
                last = db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
                insert_rows(db, rows[k : k + 2000])
                if rollups:
                    fold_rollups(db, last)
                db.execute("COMMIT")
            per_event = (time.thread_time() - started) / n * 1e6
            best[name] = min(best.get(name, math.inf), per_event)
            db.close()
    return best


def bulk_rows(total: int, now: float, unique_tasks: bool = False) -> Iterator[tuple[Any, ...]]:
    """`total` rows evenly over SPAN_DAYS up to now; each agent changes task every ~10 min
    (or, with `unique_tasks`, every call is its own task: the worst case for rollups)."""
    rnd = random.Random(7)
    start = now - SPAN_DAYS * DAY
    step = SPAN_DAYS * DAY / total
    columns = EVENT_COLUMNS
    base = dict.fromkeys(columns)
    for i in range(total):
        ts = start + i * step
        agent = i % len(AGENTS)
        model, provider = MODELS[(agent + int(ts // 3600)) % len(MODELS)]
        row = dict(base)
        row.update(
            ts=ts,
            agent=AGENTS[agent],
            run_id="",
            session="",
            user=USERS[agent % len(USERS)],
            task=f"t{i}" if unique_tasks else f"{AGENTS[agent]}-t{int(ts // 600)}",
            step="",
            tool="",
            provider=provider,
            model=model,
            endpoint="/v1/chat/completions",
            input_tokens=rnd.randrange(200, 8000),
            output_tokens=rnd.randrange(10, 800),
            cache_read_tokens=0,
            cache_write_tokens=0,
            reasoning_tokens=0,
            cost_usd=0.002,
            price_version="2026-11-01",
            wait_ms=0.0,
            status="ok",
            prompt_hash="",
            source="proxy",
            estimated=0,
            call_id="",
            prompt_shape="",
        )
        yield tuple(row[c] for c in columns)


async def create_empty(path: Path) -> None:
    async with await Store.open(path):
        pass


def fill(path: Path, total: int, now: float, unique_tasks: bool = False) -> float:
    """Bulk load: 200k rows per transaction, rollups folded in per chunk as the writer does."""
    anyio.run(create_empty, path)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")  # a bulk load, not the writer under test
    db.execute("PRAGMA temp_store = MEMORY")
    db.execute("PRAGMA cache_size = -262144")
    prepare_rollups(db)
    start = time.perf_counter()
    rows = bulk_rows(total, now, unique_tasks)
    chunk = 200_000
    last = 0
    while True:
        batch = [row for _, row in zip(range(chunk), rows, strict=False)]
        if not batch:
            break
        db.execute("BEGIN")
        # INSERT OR IGNORE skips a row that breaks a constraint: a bulk row missing a column
        # would vanish silently, so count them.
        if insert_rows(db, batch) != len(batch):
            raise SystemExit("fill: some rows were not inserted (a NOT NULL column left None?)")
        fold_rollups(db, last)
        db.execute("COMMIT")
        last += len(batch)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("ANALYZE")
    db.close()
    return time.perf_counter() - start


async def time_report(path: Path, now: float) -> tuple[float, float, int]:
    async with await Store.open(path, clock=lambda: now) as store:
        start = time.perf_counter()
        groups = await store.aggregate("agent", now - DAY)
        cold = time.perf_counter() - start
        runs = []
        for _ in range(20):
            start = time.perf_counter()
            again = await store.aggregate("agent", now - DAY)
            runs.append(time.perf_counter() - start)
        assert again == groups
    return cold, statistics.median(runs), sum(g.requests for g in groups)


def time_raw_report(path: Path, now: float) -> float:
    """The same figures (every sum and the distinct tasks) straight from the window's rows."""
    measures = (
        "COUNT(*), SUM(input_tokens), SUM(cache_read_tokens), SUM(cache_write_tokens), "
        "SUM(output_tokens), SUM(reasoning_tokens), TOTAL(cost_usd), SUM(cost_usd IS NULL), "
        "SUM(status = 'error'), SUM(status = 'denied'), SUM(estimated != 0), "
        "COUNT(DISTINCT NULLIF(task, ''))"
    )
    db = sqlite3.connect(path)
    start = time.perf_counter()
    db.execute(
        f"SELECT agent, {measures} FROM events INDEXED BY events_ts WHERE ts >= ? GROUP BY agent",
        (now - DAY,),
    ).fetchall()
    elapsed = time.perf_counter() - start
    db.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events for the writer")
    parser.add_argument("--stored", type=int, default=10_000_000, help="events in the big ledger")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the files")
    parser.add_argument("--keep", action="store_true", help="keep the big ledger afterwards")
    parser.add_argument(
        "--unique-tasks",
        action="store_true",
        help="every stored call is its own task (worst case: rollups cannot compress)",
    )
    parser.add_argument("--skip-writer", action="store_true", help="only the report part")
    parser.add_argument(
        "--writer",
        choices=("thread", "process"),
        default="thread",
        help="the commands' writer thread, or the supervisor's writer process",
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also split the writer's CPU per event by part"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tw-bench-", dir=args.dir))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python "
          f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}")  # fmt: skip
    try:
        print(f"load average before: {os.getloadavg()[0]:.1f}")
        if not args.skip_writer:
            process = args.writer == "process"
            nowait, awaited = anyio.run(bench_writer, workdir, args.events, process)
            print(nowait.line(f"append_nowait + flush ({args.writer})"))
            print(awaited.line(f"64 concurrent append() ({args.writer})"))
        if args.breakdown:
            for name, us in cost_breakdown(workdir).items():
                print(f"breakdown: {name}: {us:.1f} us CPU/event")
        now = time.time()
        big = workdir / "big.db"
        fill_s = fill(big, args.stored, now, args.unique_tasks)
        size = sum(p.stat().st_size for p in workdir.glob("big.db*")) / 1e9
        shape = "every call its own task" if args.unique_tasks else "tasks of ~10 min per agent"
        print(f"fill: {args.stored:,} events over {SPAN_DAYS} days ({shape}) in {fill_s:.1f} s "
              f"(rows and rollups), {size:.2f} GB on disk")  # fmt: skip
        cold, median, counted = anyio.run(time_report, big, now)
        print(f"report: 24 h by agent over {args.stored:,} events ({counted:,} in window): "
              f"first {cold * 1000:.1f} ms, median of 20 {median * 1000:.1f} ms")  # fmt: skip
        raw = time_raw_report(big, now)
        print(f"contrast: same report as GROUP BY over raw events: {raw * 1000:.0f} ms")
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")


if __name__ == "__main__":
    main()

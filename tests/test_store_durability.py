"""Ledger durability and evolution: SIGKILL after an ack, migration from v1, rollup pieces."""

from __future__ import annotations

import itertools
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwatch.core.errors import StoreUnavailable
from tokenwatch.core.models import UsageEvent
from tokenwatch.ledger import schema, transaction
from tokenwatch.ledger.rollups import segments
from tokenwatch.ledger.store import Store
from tokenwatch.ledger.transaction import Statement

WRITER = textwrap.dedent(
    """
    import sys, anyio
    from pathlib import Path
    from tokenwatch.core.models import UsageEvent
    from tokenwatch.ledger.store import Store

    async def main() -> None:
        store = await Store.open(Path(sys.argv[1]))
        i = 0
        while True:
            # Acknowledged (committed) events are announced; queued ones are never announced.
            for j in range(50):
                store.append_nowait(UsageEvent(ts=1.0, agent="bulk", call_id=f"q{i}-{j}"))
            await store.append(UsageEvent(ts=2.0, agent="acked", call_id=f"a{i}", input_tokens=i))
            print(f"a{i}", flush=True)
            i += 1

    anyio.run(main)
    """
)


@pytest.mark.slow
async def test_acknowledged_events_survive_sigkill(tokenwatch_home: Path) -> None:
    db = tokenwatch_home / "kill.db"
    proc = await anyio.open_process([sys.executable, "-c", WRITER, str(db)])
    acked: list[str] = []
    assert proc.stdout is not None
    buffer = b""
    with anyio.fail_after(60):
        while len(acked) < 300:
            buffer += await proc.stdout.receive()
            *lines, buffer = buffer.split(b"\n")
            acked += [line.decode() for line in lines if line]
    os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # The killed process left a WAL behind; a fresh reader must recover every acked row.
    with sqlite3.connect(db) as conn:
        stored = {row[0] for row in conn.execute("SELECT call_id FROM events WHERE agent='acked'")}
    missing = [a for a in acked if a not in stored]
    assert missing == []
    async with await Store.open(db) as store:
        totals = await store.totals(0, agent="acked")
    assert totals.requests >= len(acked)


V1_ROWS = [
    (1_700_000_000.5, "old-agent", "gpt-4o", 100, 20, 0.0015, "t1"),
    (1_700_000_100.0, "old-agent", "mystery", 50, 5, None, "t2"),
    (1_700_003_700.0, "other", "gpt-4o", 10, 1, 0.0002, ""),
]


def make_v1_ledger(path: Path) -> None:
    """A ledger as the first tokenwatch release wrote it (schema v1), built by hand."""
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            PRAGMA journal_mode = WAL;
            CREATE TABLE events (
                id INTEGER PRIMARY KEY, ts REAL NOT NULL,
                agent TEXT NOT NULL DEFAULT '', run_id TEXT NOT NULL DEFAULT '', pid INTEGER,
                session TEXT NOT NULL DEFAULT '', "user" TEXT NOT NULL DEFAULT '',
                task TEXT NOT NULL DEFAULT '', step TEXT NOT NULL DEFAULT '',
                tool TEXT NOT NULL DEFAULT '', provider TEXT NOT NULL DEFAULT '',
                model TEXT NOT NULL DEFAULT '', endpoint TEXT NOT NULL DEFAULT '',
                input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
                cache_read_tokens INTEGER NOT NULL DEFAULT 0,
                cache_write_tokens INTEGER NOT NULL DEFAULT 0,
                reasoning_tokens INTEGER NOT NULL DEFAULT 0, cost_usd REAL,
                price_version TEXT NOT NULL DEFAULT '', latency_ms REAL, ttft_ms REAL,
                status TEXT NOT NULL DEFAULT 'ok', http_status INTEGER,
                prompt_hash TEXT NOT NULL DEFAULT '', source TEXT NOT NULL DEFAULT 'sdk',
                estimated INTEGER NOT NULL DEFAULT 0
            );
            CREATE INDEX events_ts ON events (ts);
            PRAGMA user_version = 1;
            """
        )
        db.executemany(
            "INSERT INTO events (ts, agent, model, input_tokens, output_tokens, cost_usd, task) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            V1_ROWS,
        )


async def test_v1_ledger_is_migrated_with_its_history(tokenwatch_home: Path) -> None:
    path = tokenwatch_home / "old.db"
    make_v1_ledger(path)
    async with await Store.open(path) as store:
        assert store.migrated_from == 1
        totals = await store.totals(0)
        assert totals.requests == 3
        assert totals.input_tokens == 160
        assert totals.cost_usd == pytest.approx(0.0017)
        assert totals.unpriced_requests == 1
        assert totals.tasks == 2
        # Old rows are in the rollups too: a whole-hour window is answered from them.
        hour = await store.totals(1_699_999_200, 1_700_002_800)
        assert (hour.requests, hour.output_tokens) == (2, 25)
        by_agent = await store.aggregate("agent", 0)
        assert [(g.key, g.requests) for g in by_agent] == [("old-agent", 2), ("other", 1)]
        # New columns work on migrated rows: dedup on call_id, wait_ms.
        assert await store.append(UsageEvent(ts=1_700_000_200, call_id="n1", wait_ms=5)) is True
        assert await store.append(UsageEvent(ts=1_700_000_200, call_id="n1")) is False
        [newest] = await store.history(limit=1)
        assert newest.event.wait_ms == 5
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema.VERSION


async def test_ledger_from_a_newer_tokenwatch_is_refused(tokenwatch_home: Path) -> None:
    path = tokenwatch_home / "future.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {schema.VERSION + 1}")
    with pytest.raises(StoreUnavailable, match="newer"):
        await Store.open(path)


@pytest.mark.parametrize("writer_process", [False, True], ids=["thread", "process"])
async def test_full_disk_fails_loudly_and_loses_nothing_queued(
    tokenwatch_home: Path, writer_process: bool
) -> None:
    path = tokenwatch_home / "full.db"
    async with await Store.open(path, writer_process=writer_process) as store:
        await store.append(UsageEvent(ts=10.0, input_tokens=1))
        # Cap the file at its current size: SQLite then reports "database or disk is full",
        # exactly as on a full disk. (A test-only reach into the writer's connection.)
        with sqlite3.connect(path) as db:
            pages = db.execute("PRAGMA page_count").fetchone()[0]
        await store._write(Statement(f"PRAGMA max_page_count = {pages}"))
        big = [UsageEvent(ts=20.0, prompt_hash="x" * 2000, call_id=f"b{i}") for i in range(50)]
        with pytest.raises(StoreUnavailable, match=f"{path}.*disk is full"):
            await store.append_many(big)
        for i in range(30):
            store.append_nowait(UsageEvent(ts=30.0, prompt_hash="y" * 2000, call_id=f"q{i}"))
        with pytest.raises(StoreUnavailable, match="disk is full"):
            await store.flush()
        assert "disk is full" in store.statistics().last_error
        assert (await store.totals(0)).requests == 1
        # Space comes back: the queued events were kept and are now written.
        await store._write(Statement("PRAGMA max_page_count = 1000000"))
        await store.flush()
        assert (await store.totals(25, 35)).requests == 30
        assert store.statistics().lost == 0


finite = st.floats(0, 2e9, allow_nan=False)


@given(since=finite, span=st.floats(0, 4e6, allow_nan=False))
def test_rollup_pieces_cover_the_range_exactly(since: float, span: float) -> None:
    until = since + span
    pieces = segments(since, until, now=since)
    if until <= since:
        assert pieces == []
        return
    assert pieces[0][1] == since
    assert pieces[-1][2] == until
    for (_, _, hi), (_, lo, _) in itertools.pairwise(pieces):
        assert hi == lo  # contiguous, no overlap
    for table, lo, hi in pieces:
        width = dict(schema.ROLLUPS).get(table or "", None)
        if width is not None:
            assert lo % width == 0
            assert hi % width == 0
    raw = sum(hi - lo for table, lo, hi in pieces if table is None)
    assert raw <= 2 * 60  # only the sub-minute edges are read from raw events


def test_open_ended_range_reads_the_future_raw() -> None:
    pieces = segments(0.0, math.inf, now=7_200.5)
    assert pieces[-1] == (None, pieces[-2][2], math.inf)
    assert pieces[-2][2] > 7_200.5


async def wal_sizes(path: Path, count: int) -> list[int]:
    """The WAL's size after each of `count` events written one commit at a time."""
    sizes = []
    async with await Store.open(path) as store:
        for i in range(count):
            await store.append(UsageEvent(ts=10.0 + i, agent=f"a{i % 3}", call_id=f"w{i}"))
            sizes.append(os.stat(f"{path}-wal").st_size)
    return sizes


async def test_on_a_nearly_full_disk_every_commit_truncates_the_wal(
    tokenwatch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roomy = await wal_sizes(tokenwatch_home / "roomy.db", 20)
    monkeypatch.setattr(transaction, "LOW_DISK_BYTES", 2**62)  # any disk is nearly full now
    tight = await wal_sizes(tokenwatch_home / "tight.db", 20)
    assert roomy == sorted(roomy)
    assert roomy[-1] > 20 * 4096  # grows until ~16 MB before checkpointing by itself
    assert tight == [0] * 20
    with sqlite3.connect(tokenwatch_home / "tight.db") as db:
        assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 20


TINY_DISK_WRITER = textwrap.dedent(
    """
    import subprocess, sys, anyio
    from pathlib import Path
    from tokenwatch.core.models import UsageEvent
    from tokenwatch.ledger.store import Store, StoreUnavailable

    async def main(directory: str, count: int) -> None:
        stored = 0
        async with await Store.open(Path(directory) / "usage.db", writer_process=True) as store:
            for i in range(count):
                event = UsageEvent(agent=f"a{i % 7}", task=f"t{i}", input_tokens=100,
                                   output_tokens=20, call_id=f"c{i}")
                try:
                    stored += await store.append(event)
                except StoreUnavailable as exc:
                    print(f"event {i}: {exc}")
                    break
        print(f"stored {stored}")

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", sys.argv[1]], check=True)
    anyio.run(main, sys.argv[1], int(sys.argv[2]))
    """
)


@pytest.mark.slow
def test_a_ledger_on_a_2_mb_disk_holds_thousands_of_events(tokenwatch_home: Path) -> None:
    # The fault run's 2 MB filesystem: the WAL filled it after 81 events and the ledger never
    # wrote again. A private mount namespace (unshare) makes the tiny disk without root.
    disk = tokenwatch_home / "tiny"
    disk.mkdir()
    command = ["unshare", "--map-root-user", "--mount", sys.executable, "-c", TINY_DISK_WRITER]
    try:
        done = subprocess.run(
            [*command, str(disk), "2000"], capture_output=True, text=True, timeout=300
        )
    except FileNotFoundError:
        pytest.skip("no unshare(1) here to make a 2 MB filesystem")
    if "stored" not in done.stdout:
        pytest.skip(f"cannot make a 2 MB filesystem here: {done.stderr.strip()[-200:]}")
    assert done.stdout.splitlines() == ["stored 2000"]

"""The local ledger as the shipper's outbox: its events after the shipped-up-to cursor, and that
cursor, kept in the same SQLite file (a table of its own, `fleet_shipped`, one row per host)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tokenwatch.ledger.schema import quoted

BUSY_TIMEOUT: Final = 10.0
"""Seconds to wait for the ledger's writer to let the cursor be written."""
SHIPPED: Final = (
    "ts", "agent", "run_id", "user", "task", "provider", "model", "input_tokens",
    "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "cost_usd",
    "price_source", "status", "estimated",
)  # fmt: skip
"""The event columns the team's table keeps (what reports and the dashboard read)."""
_SELECT: Final = (
    f"SELECT id, call_id, {', '.join(quoted(c) for c in SHIPPED)} FROM events "
    "WHERE id > ? ORDER BY id LIMIT ?"
)


@dataclass(frozen=True, slots=True)
class Batch:
    """Ledger rows on their way, column by column as the INSERT takes them (built in a worker
    thread: a backlog of thousands never holds the event loop)."""

    keys: list[str]
    """Each row's key in the team's table (`event_key`)."""
    local_ids: list[int]
    columns: list[list[Any]]
    """One list per SHIPPED column."""

    @property
    def last_id(self) -> int:
        return self.local_ids[-1]

    def __len__(self) -> int:
        return len(self.local_ids)


def event_key(local_id: int, call_id: str, ts: float) -> str:
    """The call's id; an event without one (imported, or from an old ledger) is keyed by its
    row and time, which no other row of this host's ledger shares."""
    return call_id or f"row:{local_id}:{ts!r}"


@contextlib.contextmanager
def opened(path: Path) -> Iterator[sqlite3.Connection]:
    """An autocommit connection to the ledger at `path`, with the cursor table made."""
    # Used from worker threads one call at a time, hence not tied to the opening thread.
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS fleet_shipped (host TEXT PRIMARY KEY, "
            "last_id INTEGER NOT NULL)"
        )
        yield conn
    finally:
        conn.close()


def cursor(conn: sqlite3.Connection, host: str) -> int:
    """The id of the last event the team's database has from this host (0: none yet)."""
    row = conn.execute("SELECT last_id FROM fleet_shipped WHERE host = ?", (host,)).fetchone()
    return int(row[0]) if row else 0


def advance(conn: sqlite3.Connection, host: str, last_id: int) -> None:
    """Record that events up to `last_id` are in the team's database (after its commit)."""
    conn.execute(
        "INSERT INTO fleet_shipped (host, last_id) VALUES (?, ?) "
        "ON CONFLICT (host) DO UPDATE SET last_id = max(last_id, excluded.last_id)",
        (host, last_id),
    )


def pending(conn: sqlite3.Connection, after: int, limit: int) -> Batch | None:
    """Up to `limit` events after id `after`, oldest first (None: none). Ids only grow: the
    ledger has one writer, which commits whole batches, and never deletes events."""
    rows = conn.execute(_SELECT, (after, limit)).fetchall()
    if not rows:
        return None
    columns = [list(column) for column in zip(*(row[2:] for row in rows), strict=True)]
    columns[-1] = [bool(v) for v in columns[-1]]  # SQLite keeps `estimated` as 0/1
    return Batch(
        keys=[event_key(row[0], row[1], row[2]) for row in rows],
        local_ids=[row[0] for row in rows],
        columns=columns,
    )


def backlog(conn: sqlite3.Connection, after: int) -> int:
    """Events not shipped yet."""
    return int(conn.execute("SELECT COUNT(*) FROM events WHERE id > ?", (after,)).fetchone()[0])

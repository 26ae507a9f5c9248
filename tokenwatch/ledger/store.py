"""The usage ledger: one SQLite file (WAL) with a batched writer, rollups and the queries on top."""

from __future__ import annotations

import datetime
import json
import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite
import anyio
import anyio.to_thread

from tokenwatch.core.errors import StoreUnavailable
from tokenwatch.core.models import Action, Agent, Alert, UsageEvent
from tokenwatch.core.periods import CALENDAR_PERIODS, period_end, period_start, zone
from tokenwatch.ledger.rollups import period_windows, session_sql, summary_sql, window_batches
from tokenwatch.ledger.savings import savings_sql
from tokenwatch.ledger.schema import (
    EVENT_COLUMNS,
    ROLLUP_DIMS,
    VERSION,
    SchemaTooNew,
    migrate,
    quoted,
)
from tokenwatch.ledger.totals import (
    GroupTotals,
    Rates,
    SessionTotals,
    StoredEvent,
    Totals,
    as_totals,
)
from tokenwatch.ledger.transaction import (
    BUSY_TIMEOUT,
    CACHE_KIB,
    Committer,
    Statement,
    connect_writer,
    describe,
)
from tokenwatch.ledger.writer import BatchWriter, Item, Waiter
from tokenwatch.ledger.writer_process import ChildCommitter

__all__ = [
    "GROUPINGS",
    "GroupTotals",
    "Rates",
    "SessionTotals",
    "Store",
    "StoreStatistics",
    "StoreUnavailable",
    "StoredEvent",
    "Totals",
]

GROUPINGS: tuple[str, ...] = (*ROLLUP_DIMS, "day", "week", "month")
"""What `aggregate(by=...)` accepts."""
MAX_ROWS = 2**63 - 1
"""The largest row count SQLite binds (a signed 64-bit integer): a larger `limit` means the same."""

_SELECT_EVENT = f"SELECT id, {', '.join(quoted(c) for c in EVENT_COLUMNS)} FROM events"
_ALERT_COLUMNS = ("id", "ts", "rule", "agent", "message", "severity", "action", "acknowledged")
_ACTION_COLUMNS = ("id", "ts", "kind", "agent", "who", "why", "detail", "ok")


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    pending: int
    """Events and writes queued, not yet committed."""
    committed: int
    duplicates: int
    """Events not stored because their call_id already was."""
    rejected: int
    batches: int
    failures: int
    lost: int
    last_error: str
    cpu_seconds: float = 0.0
    """CPU time the writer thread has spent writing."""


class Store:
    """The ledger. Writes go through one batched writer thread; reads use their own connection
    (the only one when opened read-only)."""

    def __init__(
        self,
        path: Path,
        writer: BatchWriter | None,
        reader: aiosqlite.Connection,
        clock: Callable[[], float],
        migrated_from: int,
    ) -> None:
        self.path = path
        self.migrated_from = migrated_from
        """Schema version found on open (0 for a new file)."""
        self._writer = writer
        self._reader = reader
        self._clock = clock
        self._closed = False

    # -- life cycle ---------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        batch_size: int = 2000,
        flush_interval: float = 0.05,
        clock: Callable[[], float] = time.time,
        writer_process: bool = False,
    ) -> Store:
        """Open (creating and migrating as needed) the ledger at `path`. With `writer_process`,
        batches are committed by a child process (a long-lived daemon's choice: the SQLite work
        leaves this process's GIL); otherwise by a thread here."""
        path = Path(path)
        conn, migrated_from = await anyio.to_thread.run_sync(_open_writer, path)
        committer: Committer | ChildCommitter = Committer(conn)
        if writer_process:
            conn.close()
            committer = await anyio.to_thread.run_sync(_start_child, path)
        writer = BatchWriter(
            committer,
            path,
            batch_size=batch_size,
            flush_interval=flush_interval,
        )
        try:
            reader = await aiosqlite.connect(path, isolation_level=None)
            await reader.execute("PRAGMA query_only = ON")
            await reader.execute(f"PRAGMA cache_size = {-CACHE_KIB}")
            await reader.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        except sqlite3.Error as exc:
            committer.close()
            raise StoreUnavailable(describe(exc, path)) from None
        writer.start()
        return cls(path, writer, reader, clock, migrated_from)

    @classmethod
    async def open_read_only(cls, path: Path, *, clock: Callable[[], float] = time.time) -> Store:
        """Open the existing ledger at `path` for reads (SQLite `mode=ro`): works on a read-only
        file or directory and takes no write lock. A ledger from an older tokenwatch is first
        migrated (opened for writing); writes on the result raise StoreUnavailable."""
        path = Path(path)
        try:
            reader = await aiosqlite.connect(_read_uri(path), uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreUnavailable(_read_failure(exc, path)) from None
        try:
            version = await _schema_version(reader, path)
        except BaseException:
            await reader.close()
            raise
        if version < VERSION:
            await reader.close()
            return await cls.open(path, clock=clock)
        return cls(path, None, reader, clock, version)

    async def aclose(self) -> None:
        """Commit everything queued, then close. Raises StoreUnavailable if some could not be."""
        if self._closed:
            return
        self._closed = True
        if self._writer is None:
            await self._reader.close()
            return
        error: StoreUnavailable | None = None
        try:
            await self.flush()
        except StoreUnavailable as exc:
            error = exc
        with anyio.CancelScope(shield=True):
            await self._writer.aclose()
            await self._reader.close()
        if error is not None or self._writer.stats.lost:
            lost = self._writer.stats.lost
            raise StoreUnavailable(f"{error or self._writer.stats.last_error} ({lost} events lost)")

    @property
    def _writes(self) -> BatchWriter:
        if self._writer is None:
            raise StoreUnavailable(f"cannot write the ledger {self.path}: opened read-only")
        return self._writer

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- writes -------------------------------------------------------------------------

    async def append(self, event: UsageEvent) -> bool:
        """Store one event; returns once committed. False if its call_id was already stored."""
        return await self.append_many((event,)) == 1

    async def append_many(self, events: Sequence[UsageEvent]) -> int:
        """Store events (committed on return); the number newly stored (duplicates excluded)."""
        if not events:
            return 0
        waiter = Waiter()
        self._writes.submit(Item(events=events, waiter=waiter))
        return (await waiter.wait()).stored

    def append_nowait(self, event: UsageEvent) -> None:
        """Queue an event; it is durable after the next flush (within `flush_interval`)."""
        self._writes.put_nowait(event)

    async def flush(self) -> None:
        """Return once everything queued before this call is committed."""
        waiter = Waiter()
        self._writes.submit(Item(waiter=waiter))
        await waiter.wait()

    async def _write(self, statement: Statement) -> int:
        """Run `statement` inside the writer's next transaction; its row count or new row id."""
        waiter = Waiter()
        self._writes.submit(Item(statement=statement, waiter=waiter))
        value = (await waiter.wait()).value
        return value if isinstance(value, int) else 0

    def statistics(self) -> StoreStatistics:
        s = self._writes.stats
        return StoreStatistics(
            pending=self._writes.pending,
            committed=s.committed,
            duplicates=s.duplicates,
            rejected=s.rejected,
            batches=s.batches,
            failures=s.failures,
            lost=s.lost,
            last_error=s.last_error,
            cpu_seconds=s.cpu_seconds,
        )

    # -- totals and groups --------------------------------------------------------------

    async def totals(self, since: float, until: float | None = None, **filters: str) -> Totals:
        """Sums over events with `since <= ts < until` (no upper bound when None)."""
        rows = await self._grouped(None, [("", since, _upper(until))], filters)
        return as_totals(Totals, rows[0] if rows else None)

    async def window_rates(self, window: float, now: float | None = None, **filters: str) -> Rates:
        """Tokens/min, USD/hour and requests/min over the `window` seconds up to `now` inclusive."""
        now = self._clock() if now is None else now
        totals = await self.totals(now - window, math.nextafter(now, math.inf), **filters)
        minutes = window / 60.0 if window > 0 else math.inf
        return Rates(
            window=window,
            tokens_per_min=totals.total_tokens / minutes,
            usd_per_hour=totals.cost_usd / (minutes / 60.0),
            requests_per_min=totals.requests / minutes,
            totals=totals,
        )

    async def period_totals(
        self,
        period: str,
        tz: datetime.tzinfo,
        now: float | None = None,
        **filters: str,
    ) -> Totals:
        """Totals of the calendar hour/day/week/month containing `now` (or `total`: all time)."""
        now = self._clock() if now is None else now
        if period == "total":
            return await self.totals(0.0, None, **filters)
        if period not in CALENDAR_PERIODS:
            raise ValueError(f"not a calendar period: {period!r} (hour, day, week, month, total)")
        start = period_start(now, period, tz)
        return await self.totals(start, period_end(now, period, tz), **filters)

    async def aggregate(
        self,
        by: str,
        since: float,
        until: float | None = None,
        *,
        top: int | None = None,
        tz: datetime.tzinfo | None = None,
        **filters: str,
    ) -> list[GroupTotals]:
        """Totals per agent, task, model, user, provider, or local `day`, `week` (from Monday)
        or `month` (in `tz`).

        Groups come largest cost first (then tokens); periods come in date order.
        """
        if by not in GROUPINGS:
            raise ValueError(f"cannot group by {by!r} (one of: {', '.join(GROUPINGS)})")
        hi = _upper(until)
        if by in ("day", "week", "month"):
            now = self._clock()
            rows = []
            windows = period_windows(since, hi, by, tz or zone("local"), now)
            for batch in window_batches(windows, now):
                rows += await self._grouped("label", batch, filters)
            groups = [as_totals(GroupTotals, row) for row in rows]
            groups.sort(key=lambda g: g.key)
        else:
            rows = await self._grouped(quoted(by), [("", since, hi)], filters)
            groups = [as_totals(GroupTotals, row) for row in rows]
            groups.sort(key=lambda g: (-g.cost_usd, -g.total_tokens, g.key))
        return groups[:top] if top is not None else groups

    async def sessions(
        self, since: float, until: float | None = None, **filters: str
    ) -> list[SessionTotals]:
        """Totals per run of an agent (`tokenwatch run`; calls of no run are one per agent),
        oldest first."""
        sql, params = session_sql(since, _upper(until), filters)
        found = []
        for row in await self._rows(sql, params):
            *sums, agent, run_id, first, last = row
            totals = as_totals(SessionTotals, (*sums, f"{agent} {run_id}".strip()))
            totals.agent, totals.run_id, totals.first_ts, totals.last_ts = (
                agent,
                run_id,
                first,
                last,
            )
            found.append(totals)
        return sorted(found, key=lambda s: (s.first_ts, s.key))

    async def _grouped(
        self,
        key: str | None,
        windows: Sequence[tuple[str, float, float]],
        filters: Mapping[str, str],
    ) -> list[tuple[Any, ...]]:
        sql, params = summary_sql(key, windows, filters, self._clock())
        return [tuple(row) for row in await self._rows(sql, params)]

    async def savings(self, since: float, until: float | None = None) -> list[tuple[Any, ...]]:
        """(agent, lever, calls, saved tokens, saved USD, the agent's calls) per agent and lever."""
        sql, params = savings_sql(since, _upper(until))
        return [tuple(row) for row in await self._rows(sql, params)]

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row of a read; a damaged or unreadable file is StoreUnavailable, saying so."""
        try:
            async with self._reader.execute(sql, params) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailable(_read_failure(exc, self.path)) from None

    # -- coding agents' session logs -------------------------------------------------------

    async def log_offsets(self, source: str) -> dict[str, tuple[int, int, str]]:
        """How far each of `source`'s session logs was read: path -> (inode, offset, state)."""
        sql = "SELECT path, inode, offset, state FROM log_offsets WHERE source = ?"
        return {r[0]: (r[1], r[2], r[3]) for r in await self._rows(sql, (source,))}

    async def save_log_offsets(
        self, source: str, rows: Iterable[tuple[str, int, int, str]]
    ) -> None:
        """Record (path, inode, offset, state) per log."""
        sql = "INSERT OR REPLACE INTO log_offsets VALUES (?, ?, ?, ?, ?)"
        await self._changes(sql, [(source, *row) for row in rows])

    async def stored_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of `ids` the ledger holds, as a call_id or as a response_id."""
        found: set[str] = set()
        for i in range(0, len(ids), 400):
            part, marks = ids[i : i + 400], ", ".join("?" * len(ids[i : i + 400]))
            sql = f"SELECT call_id, response_id FROM events WHERE call_id IN ({marks}) OR response_id IN ({marks})"
            found.update(v for row in await self._rows(sql, [*part, *part]) for v in row)
        return found.intersection(ids)

    # -- events -------------------------------------------------------------------------

    async def history(
        self, *, agent: str | None = None, limit: int = 100, before_id: int | None = None
    ) -> list[StoredEvent]:
        """Stored events newest first; pass the last id seen as `before_id` for the next page."""
        where: list[str] = []
        params: list[str | int] = []
        if agent is not None:
            where.append("agent = ?")
            params.append(agent)
        if before_id is not None:
            where.append("id < ?")
            params.append(before_id)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        sql = f"{_SELECT_EVENT}{clause} ORDER BY id DESC LIMIT ?"
        return [StoredEvent(row[0], _event(row)) for row in await self._rows(sql, (*params, limit))]

    async def iter_events(
        self, since: float = 0, until: float | None = None, batch: int = 5000
    ) -> AsyncIterator[UsageEvent]:
        """Every event with `since <= ts < until`, oldest first, read a page at a time."""
        hi = _upper(until)
        last_ts, last_id = since, -1
        sql = (
            # `ts >= ?` first so each page starts from the index, not from the oldest row.
            f"{_SELECT_EVENT} WHERE ts >= ? AND ts < ? AND (ts > ? OR id > ?) "
            "ORDER BY ts, id LIMIT ?"
        )
        while True:
            rows = await self._rows(sql, (last_ts, hi, last_ts, last_id, batch))
            for row in rows:
                yield _event(row)
            if len(rows) < batch:
                return
            last_ts, last_id = rows[-1][1], rows[-1][0]

    async def count_events(self) -> int:
        rows = await self._rows("SELECT COUNT(*) FROM events")
        return int(rows[0][0]) if rows else 0

    # -- agents, alerts, actions ----------------------------------------------------------

    async def save_agent(self, agent: Agent) -> None:
        data = json.dumps(agent.to_dict(), sort_keys=True)
        now = self._clock()
        await self._write(
            Statement(
                "INSERT INTO agents (name, data, updated) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET data = excluded.data, updated = excluded.updated",
                (agent.name, data, now),
            )
        )

    async def load_agents(self) -> list[Agent]:
        rows = await self._rows("SELECT data FROM agents ORDER BY name")
        return [Agent.from_dict(json.loads(row[0])) for row in rows]

    async def forget_agent(self, name: str) -> None:
        await self._write(Statement("DELETE FROM agents WHERE name = ?", (name,)))

    async def add_alert(self, alert: Alert) -> int:
        """Store an alert; returns (and sets on `alert`) its id."""
        alert.id = await self._insert_row("alerts", alert.to_dict())
        return alert.id

    async def list_alerts(self, since: float = 0, limit: int = 200) -> list[Alert]:
        """Alerts with `ts >= since`, newest first."""
        rows = await self._recent_rows("alerts", _ALERT_COLUMNS, since, limit)
        return [Alert(**{**row, "acknowledged": bool(row["acknowledged"])}) for row in rows]

    async def ack_alerts(self, ids: Sequence[int] | None = None) -> int:
        """Acknowledge the given alerts (all when None); returns how many changed."""
        if ids is None:
            return await self._changes("UPDATE alerts SET acknowledged = 1 WHERE NOT acknowledged")
        wanted = [(int(i),) for i in ids]
        return await self._changes(
            "UPDATE alerts SET acknowledged = 1 WHERE id = ? AND NOT acknowledged", wanted
        )

    async def add_action(self, action: Action) -> int:
        """Log an action; returns (and sets on `action`) its id."""
        action.id = await self._insert_row("actions", action.to_dict())
        return action.id

    async def list_actions(
        self, agent: str | None = None, since: float = 0, limit: int = 200
    ) -> list[Action]:
        """Actions with `ts >= since` (for one agent or all), newest first."""
        rows = await self._recent_rows("actions", _ACTION_COLUMNS, since, limit, agent)
        return [Action(**{**row, "ok": bool(row["ok"])}) for row in rows]

    async def _changes(self, sql: str, many: Iterable[tuple[Any, ...]] | None = None) -> int:
        if many is None:
            return await self._write(Statement(sql))
        return await self._write(Statement(sql, list(many), many=True))

    async def _insert_row(self, table: str, row: Mapping[str, Any]) -> int:
        values = {k: v for k, v in row.items() if k != "id"}
        sql = f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join('?' for _ in values)})"
        params = tuple(int(v) if isinstance(v, bool) else v for v in values.values())
        return await self._write(Statement(sql, params, lastrowid=True))

    async def _recent_rows(
        self,
        table: str,
        columns: tuple[str, ...],
        since: float,
        limit: int,
        agent: str | None = None,
    ) -> list[dict[str, Any]]:
        where = "ts >= ?" + (" AND agent = ?" if agent is not None else "")
        params = (since, agent, limit) if agent is not None else (since, limit)
        sql = (
            f"SELECT {', '.join(columns)} FROM {table} "
            f"WHERE {where} ORDER BY ts DESC, id DESC LIMIT ?"
        )
        return [dict(zip(columns, row, strict=True)) for row in await self._rows(sql, params)]


# -- opening ---------------------------------------------------------------------------------


def _open_writer(path: Path) -> tuple[sqlite3.Connection, int]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create {path.parent}: {exc.strerror}") from None
    try:
        conn = connect_writer(path)
    except sqlite3.DatabaseError as exc:
        raise StoreUnavailable(_open_failure(exc, path)) from None
    try:
        migrated_from = migrate(conn)
    except SchemaTooNew as exc:
        conn.close()
        raise StoreUnavailable(f"cannot use the ledger {path}: {exc}") from None
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreUnavailable(_open_failure(exc, path)) from None
    except BaseException:
        conn.close()
        raise
    return conn, migrated_from


def _open_failure(error: sqlite3.DatabaseError, path: Path) -> str:
    if "not a database" in str(error):
        return f"{path} is not a tokenwatch ledger (not SQLite)"
    return describe(error, path)


def _read_uri(path: Path) -> str:
    uri = f"{path.absolute().as_uri()}?mode=ro"
    # Reading a WAL ledger needs its -shm file, which a read-only directory cannot get. With no
    # -wal there either, no writer can be at work (it would have made one): immutable is exact.
    if not os.access(path.parent, os.W_OK) and _wal_is_empty(path):
        uri += "&immutable=1"
    return uri


def _wal_is_empty(path: Path) -> bool:
    try:
        return Path(f"{path}-wal").stat().st_size == 0
    except FileNotFoundError:
        return True


async def _schema_version(reader: aiosqlite.Connection, path: Path) -> int:
    try:
        await reader.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        await reader.execute(f"PRAGMA cache_size = {-CACHE_KIB}")
        async with reader.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
    except sqlite3.DatabaseError as exc:
        raise StoreUnavailable(_read_failure(exc, path)) from None
    version = int(row[0]) if row else 0
    if version > VERSION:
        raise StoreUnavailable(
            f"cannot read the ledger {path}: its schema version {version} is newer than this "
            f"tokenwatch understands ({VERSION}); upgrade tokenwatch"
        )
    return version


def _read_failure(error: sqlite3.Error, path: Path) -> str:
    text = str(error)
    if "not a database" in text:
        reason = "not a tokenwatch ledger (not SQLite)"
    elif "unable to open" in text:
        reason = "the file cannot be opened (check it exists and is readable)"
    elif "locked" in text or "busy" in text:
        reason = "another process held the database locked for too long"
    else:
        reason = text
    return f"cannot read the ledger {path}: {reason}"


def _start_child(path: Path) -> ChildCommitter:
    try:
        return ChildCommitter(path)
    except sqlite3.Error as exc:
        raise StoreUnavailable(describe(exc, path)) from None


# -- query helpers -----------------------------------------------------------------------------


def _upper(until: float | None) -> float:
    return math.inf if until is None else until


def _event(row: Sequence[Any]) -> UsageEvent:
    event = UsageEvent(**dict(zip(EVENT_COLUMNS, row[1:], strict=True)))
    event.estimated = bool(event.estimated)
    return event

"""The ledger's batched writer: one thread, one SQLite connection, many events per transaction."""

from __future__ import annotations

import sqlite3
import threading
import time
import typing
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from copy import copy
from dataclasses import dataclass, field
from functools import cache
from operator import attrgetter
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.from_thread
import anyio.to_thread
from anyio.lowlevel import EventLoopToken, current_token

from tokenwatch.core.models import UsageEvent
from tokenwatch.core.schema import EVENT_COLUMNS, batch_rollup_sql, quoted

# UsageEvent -> row tuple in EVENT_COLUMNS order, done in C (the writer's hot path).
event_row: Callable[[UsageEvent], tuple[Any, ...]] = attrgetter(*EVENT_COLUMNS)

_INSERT_INTO = f"INSERT OR IGNORE INTO events ({', '.join(quoted(c) for c in EVENT_COLUMNS)})"
_ROW_PLACES = f"({', '.join('?' for _ in EVENT_COLUMNS)})"
ROWS_PER_INSERT: Final = 256
"""Rows one INSERT statement carries (fewer where SQLite allows fewer bound values)."""
_CREATE_BATCH, _CLEAR_BATCH, _FILL_BATCH, _FOLDS = batch_rollup_sql()
_INT64 = 2**63
_RETRY_MAX = 2.0


class StoreUnavailable(Exception):
    """The ledger file cannot be written (disk full, read-only, locked too long); names the path."""


class Waiter:
    """What an awaiting caller holds: settled by the writer thread, woken on the event loop."""

    __slots__ = ("done", "error", "remaining", "stored", "token", "value")

    def __init__(self, count: int = 1) -> None:
        self.done = anyio.Event()
        self.token = current_token()
        """The event loop to wake this waiter on (whichever loop the caller runs in)."""
        self.remaining = count
        self.stored = 0
        self.value: object = None
        self.error: BaseException | None = None

    async def wait(self) -> Waiter:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self

    def settle(self, stored: int = 0, value: object = None) -> bool:
        """Account one item (and how many of its events were stored); True once every item this
        waiter covers is settled."""
        self.stored += stored
        if value is not None:
            self.value = value
        self.remaining -= 1
        return self.remaining <= 0

    def fail(self, error: BaseException) -> bool:
        if self.error is None:
            self.error = error
        return self.settle()


class Operation:
    """A write run inside a batch's transaction (in its own savepoint); keeps its outcome."""

    __slots__ = ("error", "fn", "value")

    def __init__(self, fn: Callable[[sqlite3.Connection], object]) -> None:
        self.fn = fn
        self.value: object = None
        self.error: BaseException | None = None


@dataclass(slots=True)
class Item:
    """One queued unit: events someone awaits, an operation run in the batch's transaction, or a
    flush marker."""

    events: Sequence[UsageEvent] = ()
    op: Operation | None = None
    waiter: Waiter | None = None


@dataclass(slots=True)
class WriterStatistics:
    """What the writer has done so far."""

    pending: int = 0
    committed: int = 0
    duplicates: int = 0
    rejected: int = 0
    """Events that could not be stored as given (a field of the wrong type); never retried."""
    batches: int = 0
    failures: int = 0
    lost: int = 0
    """Queued (not awaited) events given up at close because the file stayed unwritable."""
    last_error: str = ""
    cpu_seconds: float = 0.0
    """CPU time the writer thread spent writing batches."""


@dataclass(slots=True)
class _Outcome:
    wake: list[Waiter] = field(default_factory=list)


def describe(error: BaseException, path: Path) -> str:
    """One line a person can act on, naming the file."""
    text = str(error)
    lowered = text.lower()
    if "full" in lowered:
        reason = "the disk is full"
    elif "readonly" in lowered or "read-only" in lowered:
        reason = "the file or its directory is read-only"
    elif "locked" in lowered or "busy" in lowered:
        reason = "another process held the database locked for too long"
    elif "unable to open" in lowered:
        reason = "the file cannot be opened (check the directory exists and is writable)"
    else:
        reason = text
    return f"cannot write the ledger {path}: {reason}"


def _bindable(row: tuple[Any, ...]) -> bool:
    for value in row:
        if value is None or isinstance(value, str | float):
            continue
        if isinstance(value, int) and -_INT64 <= value < _INT64:
            continue
        return False
    return True


# What sqlite3 raises when a value cannot be bound (wrong type, int too large).
_BIND_ERRORS = (sqlite3.ProgrammingError, sqlite3.InterfaceError, OverflowError, TypeError)


class BatchWriter:
    """Owns the write connection and its thread; the queue is FIFO, committed in batches.

    Awaited items (append, flush, operations) are written as soon as the thread is free, so
    concurrent callers share one commit; queued-only events linger up to `flush_interval`
    to fill a batch of `batch_size`.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        *,
        batch_size: int,
        flush_interval: float,
    ) -> None:
        self._conn = conn
        self._path = path
        self._batch_size = max(1, batch_size)
        self._flush_interval = max(0.001, flush_interval)
        self._cond = threading.Condition()
        # Plain events (queued without a waiter) or Items; deque appends are thread-safe.
        self._queue: deque[UsageEvent | Item] = deque()
        self._awaited = 0
        self._idle = False
        self._closing = False
        self._last_id = 0
        """Largest event id before the current batch (its rows are the ones above it)."""
        self._batch_table = False
        """Whether this connection has its temporary per-batch rollup table yet."""
        self.stats = WriterStatistics()
        self._thread = threading.Thread(target=self._run, name="tokenwatch-ledger", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put_nowait(self, event: UsageEvent) -> None:
        """Queue one event without waiting (the hot path: no lock unless the thread sleeps)."""
        if self._closing:
            raise StoreUnavailable(f"the ledger {self._path} is closed")
        self._queue.append(event)
        if self._idle or len(self._queue) == self._batch_size:
            with self._cond:
                self._cond.notify()

    def submit(self, items: Iterable[Item]) -> None:
        """Queue items someone awaits; the thread starts writing at once."""
        with self._cond:
            if self._closing:
                raise StoreUnavailable(f"the ledger {self._path} is closed")
            for item in items:
                self._queue.append(item)
                self._awaited += 1
            self._cond.notify()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def aclose(self) -> None:
        """Write what is queued (retrying a while if the file is unwritable), then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        # Joined from a worker thread: works whichever event loop opened the store.
        await anyio.to_thread.run_sync(self._thread.join)

    # -- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        retry = 0.0
        try:
            while True:
                batch = self._take(retry)
                if batch is None:
                    break
                started = time.thread_time()
                ok = self._write(batch)
                self.stats.cpu_seconds += time.thread_time() - started
                retry = 0.0 if ok else min(_RETRY_MAX, max(0.05, retry * 2))
                if not ok and self._closing:
                    self._give_up()
        finally:
            self._conn.close()

    def _take(self, retry: float) -> list[UsageEvent | Item] | None:
        with self._cond:
            if retry and not self._closing:
                self._cond.wait(retry)
            while not self._queue and not self._closing:
                # The timeout covers a put_nowait that raced past the idle flag.
                self._idle = True
                self._cond.wait(self._flush_interval)
                self._idle = False
            if not self._queue:
                return None
            deadline = time.monotonic() + self._flush_interval
            while len(self._queue) < self._batch_size and not self._awaited and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            queue = self._queue
            batch = [queue.popleft() for _ in range(min(len(queue), self._batch_size))]
            self._awaited -= sum(type(x) is Item for x in batch)
            return batch

    def _give_up(self) -> None:
        with self._cond:
            kept = [x for x in self._queue if type(x) is Item]
            self.stats.lost += len(self._queue) - len(kept)
            self._queue = deque(kept)

    def _requeue(self, events: Sequence[UsageEvent]) -> None:
        with self._cond:
            self._queue.extendleft(reversed(events))

    def _write(self, batch: list[UsageEvent | Item]) -> bool:
        items = [x for x in batch if isinstance(x, Item)]
        events = _events_of(batch) if items else typing.cast(list[UsageEvent], batch)
        outcome = _Outcome()
        try:
            inserted, rejected = self._commit(events, items)
        except sqlite3.Error as exc:
            self._fail(batch, StoreUnavailable(describe(exc, self._path)), outcome, retry=True)
            self._wake(outcome.wake)
            return False
        except Exception as exc:
            # A bug, not the file: fail this batch loudly (never leave its callers hanging)
            # and do not retry what would fail the same way.
            error = StoreUnavailable(
                f"cannot write the ledger {self._path}: internal error {type(exc).__name__}: {exc}"
            )
            self._fail(batch, error, outcome, retry=False)
            self._wake(outcome.wake)
            return True
        self.stats.batches += 1
        self.stats.committed += inserted
        self.stats.duplicates += len(events) - inserted - len(rejected)
        self.stats.rejected += len(rejected)
        if items:
            stored = self._stored_counts(batch, inserted, len(events) - len(rejected), rejected)
            for item in items:
                self._settle(item, stored.get(id(item), 0), rejected, outcome)
        self._wake(outcome.wake)
        return True

    def _settle(self, item: Item, stored: int, rejected: dict[int, str], outcome: _Outcome) -> None:
        waiter = item.waiter
        if waiter is None:
            return
        refusal = _refusal(item, rejected) if rejected else None
        if refusal is not None:
            done = waiter.fail(ValueError(refusal))
        elif item.op is not None:
            done = (
                waiter.fail(item.op.error)
                if item.op.error is not None
                else waiter.settle(value=item.op.value)
            )
        else:
            done = waiter.settle(stored=stored)
        if done:
            outcome.wake.append(waiter)

    def _fail(
        self,
        batch: list[UsageEvent | Item],
        error: StoreUnavailable,
        outcome: _Outcome,
        *,
        retry: bool,
    ) -> None:
        self.stats.failures += 1
        self.stats.last_error = str(error)
        queued = [x for x in batch if not isinstance(x, Item)]
        if retry:
            self._requeue(queued)
        else:
            self.stats.rejected += len(queued)
        for x in batch:
            # Each caller gets its own exception object (they are raised in different tasks).
            if isinstance(x, Item) and x.waiter is not None and x.waiter.fail(copy(error)):
                outcome.wake.append(x.waiter)

    def _commit(self, events: list[UsageEvent], items: list[Item]) -> tuple[int, dict[int, str]]:
        """One transaction: operations, events, rollups. Returns (inserted, rejected by id)."""
        rows = list(map(event_row, events))
        rejected: dict[int, str] = {}
        try:
            return self._transaction(rows, items), rejected
        except _BIND_ERRORS:
            pass  # some event has a field of the wrong type: set those aside, write the rest
        rows, rejected = _drop_unbindable(events, rows)
        return self._transaction(rows, items), rejected

    def _transaction(self, rows: list[tuple[Any, ...]], items: list[Item]) -> int:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            _run_ops(conn, items)
            inserted = self._insert(rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            _reset_ops(items)
            raise
        return inserted

    def _insert(self, rows: list[tuple[Any, ...]]) -> int:
        if not rows:
            return 0
        conn = self._conn
        self._last_id = conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
        inserted = insert_rows(conn, rows)
        if not self._batch_table:
            prepare_rollups(conn)
            self._batch_table = True
        fold_rollups(conn, self._last_id)
        return int(inserted)

    def _stored_counts(
        self,
        batch: list[UsageEvent | Item],
        inserted: int,
        attempted: int,
        rejected: dict[int, str],
    ) -> dict[int, int]:
        """How many of each awaited item's events were stored (the rest repeated a stored
        call_id, or were rejected), by the item's id."""
        if inserted == attempted:
            return {
                id(x): sum(id(e) not in rejected for e in x.events) if rejected else len(x.events)
                for x in batch
                if type(x) is Item and x.events
            }
        new_ids = {
            row[0]
            for row in self._conn.execute(
                "SELECT call_id FROM events WHERE id > ? AND call_id != ''", (self._last_id,)
            )
        }
        counts: dict[int, int] = {}
        for x in batch:
            stored = 0
            for event in x.events if isinstance(x, Item) else (x,):
                if id(event) in rejected:
                    continue
                if event.call_id:
                    if event.call_id not in new_ids:
                        continue
                    new_ids.discard(event.call_id)  # the first in the batch took it
                stored += 1
            if type(x) is Item:
                counts[id(x)] = stored
        return counts

    def _wake(self, waiters: list[Waiter]) -> None:
        loops: dict[int, tuple[EventLoopToken, list[Waiter]]] = {}
        for waiter in waiters:
            loops.setdefault(id(waiter.token.native_token), (waiter.token, []))[1].append(waiter)
        for token, group in loops.values():
            _wake_on(token, group)


def insert_rows(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> int:
    """Insert event rows (duplicates of a stored call_id ignored); returns how many went in.

    Many rows per statement, in chunks of power-of-two sizes so each statement is prepared once:
    sqlite3 lets go of the GIL around every statement it runs, and getting it back waits out a
    busy event loop's switch interval (5 ms), so one statement per row made a batch crawl
    whenever the loop was busy (docs/benchmarks.md, Ingest)."""
    per = _rows_per_insert(conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
    inserted, i = 0, 0
    while i < len(rows):
        size = min(per, 1 << ((len(rows) - i).bit_length() - 1))
        chunk = rows[i : i + size]
        inserted += conn.execute(_insert_sql(size), [v for row in chunk for v in row]).rowcount
        i += size
    return inserted


@cache
def _rows_per_insert(variable_limit: int) -> int:
    fits = max(1, variable_limit // len(EVENT_COLUMNS))
    return 1 << (min(ROWS_PER_INSERT, fits).bit_length() - 1)


@cache
def _insert_sql(rows: int) -> str:
    return f"{_INSERT_INTO} VALUES {', '.join([_ROW_PLACES] * rows)}"


def prepare_rollups(conn: sqlite3.Connection) -> None:
    """Give a write connection the temporary table `fold_rollups` sums a batch in."""
    conn.execute(_CREATE_BATCH)


def fold_rollups(conn: sqlite3.Connection, after_id: int) -> None:
    """Add the events with `id > after_id` to every rollup table (inside the caller's transaction)."""
    conn.execute(_CLEAR_BATCH)
    conn.execute(_FILL_BATCH, (after_id,))
    for sql in _FOLDS:
        conn.execute(sql)


def _wake_on(token: EventLoopToken, waiters: list[Waiter]) -> None:
    native = token.native_token
    # asyncio's loop and trio's token take a callback without making this thread wait for
    # the event loop (which may be busy); anything else goes through anyio, blocking.
    run_soon = getattr(native, "call_soon_threadsafe", None) or getattr(
        native, "run_sync_soon", None
    )
    try:
        if run_soon is not None:
            run_soon(_set_all, waiters)
        else:
            anyio.from_thread.run_sync(_set_all, waiters, token=token)
    except Exception:
        pass  # that event loop is gone: nobody is left to wake


def _events_of(batch: list[UsageEvent | Item]) -> list[UsageEvent]:
    out: list[UsageEvent] = []
    for x in batch:
        if not isinstance(x, Item):
            out.append(x)
        else:
            out.extend(x.events)
    return out


def _refusal(item: Item, rejected: dict[int, str]) -> str | None:
    """Why one of the item's events could not be stored, if one could not."""
    return next((rejected[id(e)] for e in item.events if id(e) in rejected), None)


def _set_all(waiters: list[Waiter]) -> None:
    for waiter in waiters:
        waiter.done.set()


def _run_ops(conn: sqlite3.Connection, items: list[Item]) -> None:
    for item in items:
        op = item.op
        if op is None:
            continue
        conn.execute("SAVEPOINT op")
        try:
            op.value = op.fn(conn)
        except sqlite3.OperationalError:
            raise  # the file itself is in trouble: fail the whole batch
        except Exception as exc:
            conn.execute("ROLLBACK TO op")
            op.error = exc
        conn.execute("RELEASE op")


def _reset_ops(items: list[Item]) -> None:
    for item in items:
        if item.op is not None:
            item.op.value = None
            item.op.error = None


def _drop_unbindable(
    events: list[UsageEvent], rows: list[tuple[Any, ...]]
) -> tuple[list[tuple[Any, ...]], dict[int, str]]:
    kept: list[tuple[Any, ...]] = []
    rejected: dict[int, str] = {}
    for event, row in zip(events, rows, strict=True):
        if _bindable(row):
            kept.append(row)
            continue
        bad = [
            f"{name}={value!r}"
            for name, value in zip(EVENT_COLUMNS, row, strict=True)
            if not _bindable((value,))
        ]
        rejected[id(event)] = f"usage event has fields of the wrong type: {', '.join(bad)}"
    return kept, rejected

"""The ledger's batched writer: one thread, one SQLite connection, many events per transaction."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
from anyio.lowlevel import EventLoopToken

from tokenwatch.core.models import UsageEvent
from tokenwatch.core.schema import EVENT_COLUMNS, ROLLUPS, quoted, rollup_refresh_sql

# UsageEvent -> row tuple in EVENT_COLUMNS order, done in C (the writer's hot path).
event_row: Callable[[UsageEvent], tuple[Any, ...]] = attrgetter(*EVENT_COLUMNS)

INSERT_EVENT = (
    f"INSERT OR IGNORE INTO events ({', '.join(quoted(c) for c in EVENT_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in EVENT_COLUMNS)})"
)
_REFRESH = [rollup_refresh_sql(table, width) for table, width in ROLLUPS]
_INT64 = 2**63
_RETRY_MAX = 2.0


class StoreUnavailable(Exception):
    """The ledger file cannot be written (disk full, read-only, locked too long); names the path."""


class Waiter:
    """What an awaiting caller holds: settled by the writer thread, woken on the event loop."""

    __slots__ = ("done", "error", "remaining", "stored", "value")

    def __init__(self, count: int = 1) -> None:
        self.done = anyio.Event()
        self.remaining = count
        self.stored = 0
        self.value: object = None
        self.error: BaseException | None = None

    async def wait(self) -> Waiter:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self

    def settle(self, stored: bool = False, value: object = None) -> bool:
        """Account one item; True once every item this waiter covers is settled."""
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
    """One queued unit: an event, an operation run in the batch's transaction, or a flush marker."""

    event: UsageEvent | None = None
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


class BatchWriter:
    """Owns the write connection and its thread; items are FIFO, committed in batches.

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
        token: EventLoopToken,
    ) -> None:
        self._conn = conn
        self._path = path
        self._batch_size = max(1, batch_size)
        self._flush_interval = flush_interval
        self._token = token
        self._cond = threading.Condition()
        self._queue: deque[Item] = deque()
        self._awaited = 0
        self._closing = False
        self._closed = Waiter()
        self.stats = WriterStatistics()
        self._thread = threading.Thread(target=self._run, name="tokenwatch-ledger", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, items: Iterable[Item]) -> None:
        with self._cond:
            if self._closing:
                raise StoreUnavailable(f"the ledger {self._path} is closed")
            for item in items:
                self._queue.append(item)
                self._awaited += item.waiter is not None
            self._cond.notify()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def aclose(self) -> None:
        """Write what is queued (retrying a while if the file is unwritable), then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        await self._closed.done.wait()
        self._thread.join()

    # -- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        retry = 0.0
        try:
            while True:
                batch = self._take(retry)
                if batch is None:
                    break
                ok = self._write(batch)
                retry = 0.0 if ok else min(_RETRY_MAX, max(0.05, retry * 2))
                if not ok and self._closing:
                    self._give_up()
        finally:
            self._conn.close()
            self._closed.settle()
            self._wake([self._closed])

    def _take(self, retry: float) -> list[Item] | None:
        with self._cond:
            if retry and not self._closing:
                self._cond.wait(retry)
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            deadline = time.monotonic() + self._flush_interval
            while len(self._queue) < self._batch_size and not self._awaited and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            size = min(len(self._queue), self._batch_size)
            batch = [self._queue.popleft() for _ in range(size)]
            self._awaited -= sum(item.waiter is not None for item in batch)
            return batch

    def _give_up(self) -> None:
        with self._cond:
            lost = [item for item in self._queue if item.waiter is None]
            self.stats.lost += len(lost)
            self._queue = deque(item for item in self._queue if item.waiter is not None)

    def _requeue(self, items: Sequence[Item]) -> None:
        with self._cond:
            self._queue.extendleft(reversed(items))

    def _write(self, batch: list[Item]) -> bool:
        fresh = _first_of_each_call(batch)
        outcome = _Outcome()
        try:
            stored, rejected = self._commit(fresh, batch)
        except sqlite3.Error as exc:
            self._fail(batch, StoreUnavailable(describe(exc, self._path)), outcome)
            self._wake(outcome.wake)
            return False
        self.stats.batches += 1
        self.stats.committed += len(stored)
        events = sum(item.event is not None for item in batch)
        self.stats.duplicates += events - len(stored) - len(rejected)
        self.stats.rejected += len(rejected)
        for item in batch:
            self._settle(item, item.event is not None and id(item) in stored, rejected, outcome)
        self._wake(outcome.wake)
        return True

    def _settle(
        self, item: Item, stored: bool, rejected: dict[int, str], outcome: _Outcome
    ) -> None:
        waiter = item.waiter
        if waiter is None:
            return
        if id(item) in rejected:
            done = waiter.fail(ValueError(rejected[id(item)]))
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

    def _fail(self, batch: list[Item], error: StoreUnavailable, outcome: _Outcome) -> None:
        self.stats.failures += 1
        self.stats.last_error = str(error)
        retry = [item for item in batch if item.waiter is None and item.event is not None]
        self._requeue(retry)
        for item in batch:
            if item.waiter is not None and item.waiter.fail(error):
                outcome.wake.append(item.waiter)

    def _commit(self, fresh: list[Item], batch: list[Item]) -> tuple[set[int], dict[int, str]]:
        """One transaction: operations, events, rollups. Returns stored and rejected items."""
        conn = self._conn
        rejected: dict[int, str] = {}
        rows = [event_row(item.event) for item in fresh if item.event is not None]
        if not all(map(_bindable, rows)):
            fresh, rows, rejected = _drop_unbindable(fresh, rows)
        conn.execute("BEGIN IMMEDIATE")
        try:
            _run_ops(conn, batch)
            stored = self._insert(fresh, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            _reset_ops(batch)
            raise
        return stored, rejected

    def _insert(self, fresh: list[Item], rows: list[tuple[Any, ...]]) -> set[int]:
        if not rows:
            return set()
        conn = self._conn
        last = conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
        inserted = conn.executemany(INSERT_EVENT, rows).rowcount
        for sql in _REFRESH:
            conn.execute(sql, (last,))
        if inserted == len(rows):
            return {id(item) for item in fresh}
        # Some call_ids were already stored by an earlier batch (or another process).
        new_ids = {
            row[0]
            for row in conn.execute(
                "SELECT call_id FROM events WHERE id > ? AND call_id != ''", (last,)
            )
        }
        return {
            id(item)
            for item in fresh
            if item.event is not None and (not item.event.call_id or item.event.call_id in new_ids)
        }

    def _wake(self, waiters: list[Waiter]) -> None:
        if not waiters:
            return
        try:
            anyio.from_thread.run_sync(_set_all, waiters, token=self._token)
        except Exception:
            pass  # the event loop is gone: nobody is left to wake


def _set_all(waiters: list[Waiter]) -> None:
    for waiter in waiters:
        waiter.done.set()


def _run_ops(conn: sqlite3.Connection, batch: list[Item]) -> None:
    for item in batch:
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


def _reset_ops(batch: list[Item]) -> None:
    for item in batch:
        if item.op is not None:
            item.op.value = None
            item.op.error = None


def _first_of_each_call(batch: list[Item]) -> list[Item]:
    """The batch's events, minus those repeating a call_id seen earlier in it (first one wins)."""
    fresh: list[Item] = []
    seen: set[str] = set()
    for item in batch:
        event = item.event
        if event is None:
            continue
        if event.call_id:
            if event.call_id in seen:
                continue
            seen.add(event.call_id)
        fresh.append(item)
    return fresh


def _drop_unbindable(
    fresh: list[Item], rows: list[tuple[Any, ...]]
) -> tuple[list[Item], list[tuple[Any, ...]], dict[int, str]]:
    kept: list[Item] = []
    kept_rows: list[tuple[Any, ...]] = []
    rejected: dict[int, str] = {}
    for item, row in zip(fresh, rows, strict=True):
        if _bindable(row):
            kept.append(item)
            kept_rows.append(row)
        else:
            bad = [
                f"{name}={value!r}"
                for name, value in zip(EVENT_COLUMNS, row, strict=True)
                if not _bindable((value,))
            ]
            rejected[id(item)] = f"usage event has fields of the wrong type: {', '.join(bad)}"
    return kept, kept_rows, rejected

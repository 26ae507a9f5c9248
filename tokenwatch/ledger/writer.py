"""The ledger's batched writer: one queue and one thread feeding a committer (a connection here,
or the writer process), many events per transaction."""

from __future__ import annotations

import sqlite3
import threading
import time
import typing
from collections import deque
from collections.abc import Callable, Sequence
from copy import copy
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.from_thread
import anyio.to_thread
from anyio.lowlevel import EventLoopToken, current_token

from tokenwatch.core.errors import StoreUnavailable
from tokenwatch.core.models import UsageEvent
from tokenwatch.ledger.schema import EVENT_COLUMNS
from tokenwatch.ledger.transaction import (
    Committed,
    Outcome,
    Row,
    Statement,
    describe,
)

__all__ = ["BatchWriter", "Item", "StoreUnavailable", "Waiter", "describe", "event_row"]

# UsageEvent -> row tuple in EVENT_COLUMNS order, done in C (the writer's hot path).
event_row: Callable[[UsageEvent], tuple[Any, ...]] = attrgetter(*EVENT_COLUMNS)
_RETRY_MAX = 2.0


class BatchCommitter(Protocol):
    """Where batches are written: on this thread's connection, or in the writer process."""

    def commit(self, rows: Sequence[Row], statements: Sequence[Statement]) -> Committed: ...

    def close(self) -> None: ...


class Waiter:
    """What an awaiting caller holds: settled by the writer thread, woken on the event loop."""

    __slots__ = ("done", "error", "stored", "token", "value")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.token = current_token()
        """The event loop to wake this waiter on (whichever loop the caller runs in)."""
        self.stored = 0
        """How many of the item's events were stored."""
        self.value: object = None
        self.error: BaseException | None = None

    async def wait(self) -> Waiter:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self


@dataclass(slots=True)
class Item:
    """One queued unit: events someone awaits, a statement run in the batch's transaction, or a
    flush marker."""

    events: Sequence[UsageEvent] = ()
    statement: Statement | None = None
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
    """CPU time spent writing batches (the writer thread, and the writer process if any)."""


class BatchWriter:
    """Owns the committer and a thread that feeds it; the queue is FIFO, committed in batches.

    Awaited items (append, flush, statements) are written as soon as the thread is free, so
    concurrent callers share one commit; queued-only events linger up to `flush_interval`
    to fill a batch of `batch_size`.
    """

    def __init__(
        self,
        committer: BatchCommitter,
        path: Path,
        *,
        batch_size: int,
        flush_interval: float,
    ) -> None:
        self._committer = committer
        self._path = path
        self._batch_size = max(1, batch_size)
        self._flush_interval = max(0.001, flush_interval)
        self._cond = threading.Condition()
        # Plain events (queued without a waiter) or Items; deque appends are thread-safe.
        self._queue: deque[UsageEvent | Item] = deque()
        self._awaited = 0
        self._idle = False
        self._closing = False
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

    def submit(self, item: Item) -> None:
        """Queue an item someone awaits; the thread starts writing at once."""
        with self._cond:
            if self._closing:
                raise StoreUnavailable(f"the ledger {self._path} is closed")
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
            self._committer.close()

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
        wake: list[Waiter] = []
        try:
            done = self._committer.commit(
                list(map(event_row, events)),
                [x.statement for x in items if x.statement is not None],
            )
        except sqlite3.Error as exc:
            self._fail(batch, StoreUnavailable(describe(exc, self._path)), wake, retry=True)
            self._wake(wake)
            return False
        except Exception as exc:
            # A bug, not the file: fail this batch loudly (never leave its callers hanging)
            # and do not retry what would fail the same way.
            error = StoreUnavailable(
                f"cannot write the ledger {self._path}: internal error {type(exc).__name__}: {exc}"
            )
            self._fail(batch, error, wake, retry=False)
            self._wake(wake)
            return True
        self.stats.cpu_seconds += done.cpu_seconds
        self.stats.batches += 1
        self.stats.committed += done.inserted
        self.stats.duplicates += len(done.duplicates)
        self.stats.rejected += len(done.rejected)
        if items:
            self._settle_all(batch, done, wake)
        self._wake(wake)
        return True

    def _settle_all(
        self, batch: list[UsageEvent | Item], done: Committed, wake: list[Waiter]
    ) -> None:
        """Settle each awaited item: its statement's outcome, or how many of its events were
        stored (the others repeated a stored call_id, or were rejected)."""
        missing = set(done.duplicates)
        outcomes = iter(done.outcomes)
        first = 0
        for x in batch:
            if type(x) is not Item:
                first += 1
                continue
            count = len(x.events)
            indices = range(first, first + count)
            first += count
            outcome = next(outcomes) if x.statement is not None else None
            waiter = x.waiter
            if waiter is None:
                continue
            refusal = next((done.rejected[i] for i in indices if i in done.rejected), None)
            if refusal is not None:
                waiter.error = ValueError(refusal)
            elif outcome is not None:
                _settle_statement(waiter, outcome)
            else:
                waiter.stored = count - (sum(i in missing for i in indices) if missing else 0)
            wake.append(waiter)

    def _fail(
        self,
        batch: list[UsageEvent | Item],
        error: StoreUnavailable,
        wake: list[Waiter],
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
            if isinstance(x, Item) and x.waiter is not None:
                x.waiter.error = copy(error)
                wake.append(x.waiter)

    def _wake(self, waiters: list[Waiter]) -> None:
        loops: dict[int, tuple[EventLoopToken, list[Waiter]]] = {}
        for waiter in waiters:
            loops.setdefault(id(waiter.token.native_token), (waiter.token, []))[1].append(waiter)
        for token, group in loops.values():
            _wake_on(token, group)


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


def _set_all(waiters: list[Waiter]) -> None:
    for waiter in waiters:
        waiter.done.set()


def _settle_statement(waiter: Waiter, outcome: Outcome) -> None:
    if not outcome.error_type:
        waiter.value = outcome.value
        return
    # The caller sees the sqlite3 error it would have seen running the statement itself.
    kind = getattr(sqlite3, outcome.error_type, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        waiter.error = kind(outcome.error)
    else:
        waiter.error = RuntimeError(f"{outcome.error_type}: {outcome.error}")

"""The transaction one batch of ledger writes runs in (event rows, statements, rollups), on a
write connection; light enough to load in the ledger's writer process."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Final

from tokenwatch.core.errors import StoreUnavailable
from tokenwatch.core.models import MAX_CALL_TOKENS, over_call_limit
from tokenwatch.ledger.schema import EVENT_COLUMNS, batch_rollup_sql, quoted

BUSY_TIMEOUT: Final = 10.0
"""Seconds a connection waits for another process's lock before giving up."""
CACHE_KIB: Final = 16 * 1024
"""SQLite page cache per connection."""
WAL_AUTOCHECKPOINT: Final = 4000
"""WAL pages (4 KiB each) written before SQLite checkpoints by itself: ~16 MB of WAL."""
LOW_DISK_BYTES: Final = 64 * 1024 * 1024
"""Free space under which the WAL is checkpointed after every commit: room for a WAL that
checkpoints by itself (WAL_AUTOCHECKPOINT) with plenty to spare."""
ROWS_PER_INSERT: Final = 256
"""Rows one INSERT statement carries (fewer where SQLite allows fewer bound values)."""

Row = Sequence[Any]
"""An event row: values in EVENT_COLUMNS order (a tuple, or a list as msgpack decodes it)."""

_INSERT_INTO = f"INSERT OR IGNORE INTO events ({', '.join(quoted(c) for c in EVENT_COLUMNS)})"
_ROW_PLACES = f"({', '.join('?' for _ in EVENT_COLUMNS)})"
_CALL_ID = EVENT_COLUMNS.index("call_id")
_CREATE_BATCH, _CLEAR_BATCH, _FILL_BATCH, _FOLDS = batch_rollup_sql()
_INT64 = 2**63
_COUNTS = [EVENT_COLUMNS.index(name) for name in EVENT_COLUMNS if name.endswith("_tokens")]
OVERFLOW: Final = "integer overflow"
"""SQLite's message when a SUM passes 64 bits."""
# What sqlite3 raises when a value cannot be bound (wrong type, int too large).
BIND_ERRORS = (sqlite3.ProgrammingError, sqlite3.InterfaceError, OverflowError, TypeError)


@dataclass(frozen=True, slots=True)
class Statement:
    """A write run in a batch's transaction, in its own savepoint: SQL with its parameters (a
    list of parameter tuples when `many`); its result is the row count, or the new row's id."""

    sql: str
    params: Sequence[Any] = ()
    many: bool = False
    lastrowid: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one statement came to: its result, or the error it raised (its type's name and
    message; the transaction went on without it)."""

    value: int = 0
    error_type: str = ""
    error: str = ""


@dataclass(slots=True)
class Committed:
    """What one committed batch came to."""

    inserted: int = 0
    duplicates: list[int] = field(default_factory=list)
    """Rows (by index) not stored: their call_id was stored already, or earlier in the batch."""
    rejected: dict[int, str] = field(default_factory=dict)
    """Rows (by index) that could not be stored as given (a field of the wrong type), and why."""
    outcomes: list[Outcome] = field(default_factory=list)
    """One per statement, in order."""
    cpu_seconds: float = 0.0
    """CPU spent in another process on this batch (0 when committed in this one)."""


def connect_writer(path: Path) -> sqlite3.Connection:
    """A write connection to the ledger at `path`: WAL, tuned for batches."""
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT
    )
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreUnavailable(f"cannot use the ledger {path}: WAL mode refused ({mode})")
        # NORMAL survives a killed process (the WAL is in the OS's hands); see docs/ledger.md.
        conn.execute("PRAGMA synchronous = NORMAL")
        # Index pages of a big ledger stay cached, and checkpoints (which fsync) come every
        # ~16 MB of WAL rather than every 4 MB (on a full disk, sooner: Committer._attempt).
        conn.execute(f"PRAGMA cache_size = {-CACHE_KIB}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")
    except BaseException:
        conn.close()
        raise
    return conn


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


class Committer:
    """Writes batches on one connection: each batch one transaction (statements first, then
    event rows, then the rollups they add to). sqlite3.Error means the file is in trouble."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._batch_table = False
        self._directory = _directory_of(conn)

    def commit(self, rows: Sequence[Row], statements: Sequence[Statement]) -> Committed:
        try:
            return self._attempt(rows, statements)
        except BIND_ERRORS:
            pass  # some row has a field of the wrong type: set those aside, write the rest
        except sqlite3.OperationalError as exc:
            if str(exc) != OVERFLOW:
                raise  # the file itself is in trouble
            # Token counts past what a call can use (the capture paths refuse them) summed past
            # 64 bits in the rollups: set those rows aside, or every retry would fail the same.
        kept, rejected = split_unbindable(rows)
        return widen(self._attempt([rows[i] for i in kept], statements), kept, rejected)

    def close(self) -> None:
        self._conn.close()

    def _attempt(self, rows: Sequence[Row], statements: Sequence[Statement]) -> Committed:
        """The batch's transaction (on a full disk, once more after a checkpoint). On a disk
        with less than LOW_DISK_BYTES free, every commit is followed by a checkpoint that moves
        the WAL into the database file and truncates it: left to checkpoint by itself every
        ~16 MB, the WAL filled a nearly full disk long before the data did (79 events on a 2 MB
        disk), and a full WAL cannot be checkpointed into a database that cannot grow."""
        try:
            done = self._transaction(rows, statements)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_FULL or not checkpoint(self._conn):
                raise
            done = self._transaction(rows, statements)
        if self._directory and free_bytes(self._directory) < LOW_DISK_BYTES:
            checkpoint(self._conn)
        return done

    def _transaction(self, rows: Sequence[Row], statements: Sequence[Statement]) -> Committed:
        conn = self._conn
        if not self._batch_table:
            # Outside the transaction: made inside one, a rollback would take it away again.
            prepare_rollups(conn)
            self._batch_table = True
        conn.execute("BEGIN IMMEDIATE")
        try:
            outcomes = [_run(conn, s) for s in statements]
            done = self._insert(rows)
            conn.execute("COMMIT")
        except BaseException:
            self._batch_table = False  # whatever failed, the next batch starts from scratch
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        done.outcomes = outcomes
        return done

    def _insert(self, rows: Sequence[Row]) -> Committed:
        if not rows:
            return Committed()
        conn = self._conn
        last_id = conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
        inserted = insert_rows(conn, rows)
        fold_rollups(conn, last_id)
        duplicates = [] if inserted == len(rows) else self._duplicates(rows, last_id)
        return Committed(inserted=inserted, duplicates=duplicates)

    def _duplicates(self, rows: Sequence[Row], last_id: int) -> list[int]:
        new_ids = {
            row[0]
            for row in self._conn.execute(
                "SELECT call_id FROM events WHERE id > ? AND call_id != ''", (last_id,)
            )
        }
        duplicates: list[int] = []
        for i, row in enumerate(rows):
            call_id = row[_CALL_ID]
            if not call_id:
                continue
            if call_id in new_ids:
                new_ids.discard(call_id)  # the first in the batch took it
            else:
                duplicates.append(i)
        return duplicates


def free_bytes(directory: str) -> int:
    """Bytes an unprivileged process may still write on the disk holding `directory`."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return LOW_DISK_BYTES  # cannot tell: assume the disk is tight
    return st.f_bavail * st.f_frsize


def _directory_of(conn: sqlite3.Connection) -> str:
    """The directory of the connection's main database file ('' in memory)."""
    for _, name, file in conn.execute("PRAGMA database_list"):
        if name == "main" and file:
            return str(os.path.dirname(file))
    return ""


def checkpoint(conn: sqlite3.Connection) -> bool:
    """Move the whole WAL into the database file and truncate it to nothing; False when that
    could not be done (a reader still needs the WAL, or the disk has no room even for that)."""
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.Error:
        return False
    return not busy


def _run(conn: sqlite3.Connection, statement: Statement) -> Outcome:
    conn.execute("SAVEPOINT op")
    try:
        if statement.many:
            cursor = conn.executemany(statement.sql, statement.params)
        else:
            cursor = conn.execute(statement.sql, statement.params)
        value = cursor.lastrowid if statement.lastrowid else max(0, cursor.rowcount)
        outcome = Outcome(value=int(value or 0))
    except sqlite3.OperationalError:
        raise  # the file itself is in trouble: fail the whole batch
    except Exception as exc:
        conn.execute("ROLLBACK TO op")
        outcome = Outcome(error_type=type(exc).__name__, error=str(exc))
    conn.execute("RELEASE op")
    return outcome


def insert_rows(conn: sqlite3.Connection, rows: Sequence[Row]) -> int:
    """Insert event rows (duplicates of a stored call_id ignored); returns how many went in.

    Many rows per statement, in chunks of power-of-two sizes so each statement is prepared once:
    sqlite3 lets go of the GIL around every statement it runs, and getting it back waits out a
    busy event loop's switch interval, so one statement per row made a batch crawl whenever the
    loop was busy (docs/benchmarks.md, Ingest)."""
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


def bindable(value: object) -> bool:
    """Whether SQLite can store `value` in an event column as given."""
    if value is None or isinstance(value, str | float):
        return True
    return isinstance(value, int) and -_INT64 <= value < _INT64


def split_unbindable(rows: Sequence[Row]) -> tuple[list[int], dict[int, str]]:
    """(indices of the rows that can be stored, why each other row cannot, by index): a field
    of the wrong type, or a token count past what one call can use."""
    kept: list[int] = []
    rejected: dict[int, str] = {}
    for i, row in enumerate(rows):
        problem = _unstorable(row)
        if problem:
            rejected[i] = problem
        else:
            kept.append(i)
    return kept, rejected


def _unstorable(row: Row) -> str:
    bad = [
        f"{name}={value!r}"
        for name, value in zip(EVENT_COLUMNS, row, strict=True)
        if not bindable(value)
    ]
    if bad:
        return f"usage event has fields of the wrong type: {', '.join(bad)}"
    over = [
        over_call_limit(EVENT_COLUMNS[c], row[c])
        for c in _COUNTS
        if isinstance(row[c], int) and row[c] > MAX_CALL_TOKENS
    ]
    return f"usage event not stored: {'; '.join(over)}" if over else ""


def widen(done: Committed, kept: list[int], rejected: dict[int, str]) -> Committed:
    """`done`, committed for the kept rows only, in terms of the whole batch's row indices."""
    done.duplicates = [kept[i] for i in done.duplicates]
    done.rejected = {**rejected, **{kept[i]: why for i, why in done.rejected.items()}}
    return done

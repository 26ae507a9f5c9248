"""The exact response cache: answers kept in a size-bounded SQLite file, looked up in memory."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import orjson

from tokenwatch.config import CacheSettings

log = logging.getLogger("tokenwatch.proxy")

KEY_HEADERS = (
    "authorization",
    "x-api-key",
    "anthropic-version",
    "anthropic-beta",
    "openai-organization",
    "openai-project",
)
"""Request headers that are part of the key: another account or API version is another answer.
They go into a hash only; no key is ever written."""
HIT_HEADER = "x-tokenwatch-cache"
"""Set to `hit` on an answer the proxy served from its cache (so a person can see it)."""
WRITE_DELAY = 0.05
"""Seconds new answers wait to be written with the ones that follow (one thread hop and one
transaction per batch); until then they are answered from the queue."""
_SHA256 = hashlib.sha256()
"""Copied for each key: cheaper than a new hash object (no OpenSSL algorithm fetch)."""
_DROP_HEADERS = frozenset({"set-cookie", "date"})
_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key BLOB PRIMARY KEY,
    stored_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    size INTEGER NOT NULL,
    status INTEGER NOT NULL,
    headers TEXT NOT NULL,
    body BLOB NOT NULL,
    model TEXT NOT NULL,
    usage TEXT NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """An answer as the agent received it, and what the call it came from was billed."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    model: str
    usage: tuple[int, int, int, int, int]
    """input, output, cache read, cache write and reasoning tokens of the original call."""


def cache_key(scope: Iterable[str], headers: Mapping[str, str], body: bytes) -> bytes:
    """The digest an identical request has: who may share it (`scope`), the headers that change
    the answer or the account, and the exact body sent upstream."""
    # one encode and two updates (each part NUL-terminated, as the file's keys always were)
    parts = [*scope, *[headers.get(name, "") for name in KEY_HEADERS], ""]
    digest = _SHA256.copy()
    digest.update("\0".join(parts).encode("utf-8", "surrogateescape"))
    digest.update(body)
    return digest.digest()


def storable_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The answer's headers worth replaying (no cookies, no stale date)."""
    return [(k, v) for k, v in headers if k.lower() not in _DROP_HEADERS]


_INSERT = "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_DELETE = "DELETE FROM answers WHERE key = ?"


def answer_size(answer: CachedAnswer) -> int:
    """What an answer counts against the size bound: its body and headers."""
    return len(answer.body) + sum(len(k) + len(v) for k, v in answer.headers)


class ResponseCache:
    """Keys and sizes in memory (a dict lookup on the miss path); answers on disk. Writes go
    through one task, a batch at a time in a worker thread, so the loop never waits on SQLite."""

    def __init__(self, path: Path, settings: CacheSettings, clock: Callable[[], float]) -> None:
        self.path = path
        self.settings = settings
        self._clock = clock
        self._index: OrderedDict[bytes, tuple[float, int]] = OrderedDict()
        """key -> (expires_at, size), oldest first."""
        self._bytes = 0
        self._pending: dict[bytes, tuple[float, CachedAnswer | None]] = {}
        """key -> (when, answer or None to delete), not yet written: only a key's last change
        matters (an expired answer refreshed is one write, not a delete and an insert)."""
        self._wake = anyio.Event()
        self._db: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)

    # -- lifetime --------------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the file, then write what is put until cancelled (and what is left, then)."""
        await self._thread(self._open)
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                await anyio.sleep(WRITE_DELAY)  # a batch per hop to the thread, not a call
                self._wake = anyio.Event()
                await self._write_pending()
        finally:
            with anyio.CancelScope(shield=True):
                await self._write_pending()
                await self._thread(self._close)

    def _open(self) -> None:
        try:
            self._connect()
        except sqlite3.DatabaseError as exc:
            # a cache can always start empty: a damaged file must not stop the proxy
            log.warning("response cache %s unreadable (%s): starting empty", self.path, exc)
            self._close()
            self.path.unlink(missing_ok=True)
            self._connect()

    def _connect(self) -> None:
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        db = self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(_SCHEMA)
        now = self._clock()
        db.execute("DELETE FROM answers WHERE expires_at <= ?", (now,))
        rows = db.execute("SELECT key, expires_at, size FROM answers ORDER BY stored_at")
        for key, expires_at, size in rows:
            self._remember(bytes(key), float(expires_at), int(size))
        self._evict()

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- the index -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    @property
    def size(self) -> int:
        """Bytes of answers kept."""
        return self._bytes

    def has(self, key: bytes) -> bool:
        """True when a fresh answer is kept for `key` (an expired one is dropped)."""
        found = self._index.get(key)
        if found is None:
            return False
        if found[0] > self._clock():
            return True
        self._forget(key)
        return False

    def _remember(self, key: bytes, expires_at: float, size: int) -> None:
        old = self._index.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._index[key] = (expires_at, size)
        self._bytes += size

    def _forget(self, key: bytes) -> None:
        old = self._index.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
            self._queue(key, 0.0, None)

    def _evict(self) -> None:
        while self._bytes > self.settings.max_bytes and self._index:
            self._forget(next(iter(self._index)))

    def _queue(self, key: bytes, now: float, answer: CachedAnswer | None) -> None:
        self._pending[key] = (now, answer)
        self._wake.set()

    # -- reads and writes ------------------------------------------------------------------------

    async def get(self, key: bytes) -> CachedAnswer | None:
        """The answer kept for `key`, read in a worker thread; None when it is gone."""
        if not self.has(key):
            return None
        if key in self._pending:
            return self._pending[key][1]  # None: deleted since
        return await self._thread(self._read, key)  # type: ignore[no-any-return]

    def _read(self, key: bytes) -> CachedAnswer | None:
        if self._db is None:
            return None
        row = self._db.execute(
            "SELECT status, headers, body, model, usage FROM answers WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        status, headers, body, model, usage = row
        pairs = [(str(k), str(v)) for k, v in json.loads(headers)]
        return CachedAnswer(int(status), pairs, bytes(body), str(model), tuple(json.loads(usage)))

    def put_nowait(self, key: bytes, answer: CachedAnswer) -> bool:
        """Keep `answer` for the TTL; False when it is too big to keep."""
        size = answer_size(answer)
        if size > self.settings.max_entry_bytes or size > self.settings.max_bytes:
            return False
        now = self._clock()
        self._remember(key, now + self.settings.ttl, size)
        self._queue(key, now, answer)
        self._evict()
        return True

    async def _write_pending(self) -> None:
        batch, self._pending = self._pending, {}
        if not batch:
            return
        try:
            await self._thread(self._write, batch)
        except sqlite3.Error as exc:
            log.warning("could not write the response cache %s: %s", self.path, exc)
        except BaseException:
            # cancelled before the thread took it (stopping): the shielded final write does it
            self._pending = batch | self._pending  # what changed since wins
            raise

    def _write(self, batch: dict[bytes, tuple[float, CachedAnswer | None]]) -> None:
        db = self._db
        if db is None:
            return
        db.execute("BEGIN")
        try:
            # one executemany for the deletes and one for the rest: this thread holds the GIL
            # the event loop needs for every line of Python it runs per row
            gone = [(key,) for key, (_, answer) in batch.items() if answer is None]
            db.executemany(_DELETE, gone)
            kept = [self._row(key, now, a) for key, (now, a) in batch.items() if a is not None]
            db.executemany(_INSERT, kept)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _row(self, key: bytes, now: float, answer: CachedAnswer) -> tuple[object, ...]:
        headers, usage = orjson.dumps(answer.headers), orjson.dumps(answer.usage)
        size = answer_size(answer)
        return (key, now, now + self.settings.ttl, size, answer.status, headers.decode(),
                answer.body, answer.model, usage.decode())  # fmt: skip

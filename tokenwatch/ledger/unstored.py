"""Usage a stopping supervisor could not store: kept in a file beside the ledger, one event a
JSON line, and stored by the next start (idempotent: each event's call_id is stored once)."""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from tokenwatch.core.models import UsageEvent
from tokenwatch.ledger.importer import parse_lines
from tokenwatch.ledger.store import Store, StoreUnavailable

log = logging.getLogger("tokenwatch.ledger")


def keep(path: Path, events: Sequence[UsageEvent]) -> None:
    """Append `events` to the file at `path` (made private), on disk before returning. Raises
    OSError when that cannot be done."""
    data = "".join(json.dumps(event.to_dict()) + "\n" for event in events).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Replayed:
    """What storing a file of kept usage came to."""

    read: int
    stored: int
    """Newly stored (the others were stored already, by a write that had not said so)."""
    unreadable: int
    """Lines that were not usage events (a write cut by a crash): dropped."""


async def replay(store: Store, path: Path) -> Replayed | None:
    """Store the usage kept in `path`, then remove the file; None when there is none. Raises
    StoreUnavailable (the file stays for the next start) or OSError."""
    kept = await anyio.to_thread.run_sync(_read, path)
    if kept is None:
        return None
    events, unreadable = kept
    stored = await store.append_many(events)
    await anyio.to_thread.run_sync(path.unlink)
    return Replayed(len(events), stored, unreadable)


def _read(path: Path) -> tuple[list[UsageEvent], int] | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    events: list[UsageEvent] = []
    unreadable = 0
    for _, item in parse_lines(text.splitlines(), datetime.UTC):
        if isinstance(item, UsageEvent):
            events.append(item)
        else:
            unreadable += 1
    return events, unreadable


def keep_unstored(path: Path, events: Sequence[UsageEvent], reason: str) -> None:
    """At shutdown: keep `events` (recorded, not stored: `reason`) in `path`, and say so; if
    that fails too, say how many are lost and why."""
    if not events:
        return
    try:
        keep(path, events)
    except OSError as exc:
        log.error(
            "%d recorded calls lost: the ledger could not be written (%s), nor %s (%s)",
            len(events),
            reason,
            path,
            exc.strerror or exc,
        )
        return
    log.warning(
        "the ledger could not be written (%s): %d recorded calls kept in %s; "
        "the next start stores them",
        reason,
        len(events),
        path,
    )


async def store_kept(store: Store, path: Path) -> None:
    """At start: store what the last shutdown kept in `path` (if anything), and say so."""
    try:
        done = await replay(store, path)
    except (StoreUnavailable, OSError) as exc:
        log.warning("calls kept at the last shutdown still wait in %s: %s", path, exc)
        return
    if done is None:
        return
    log.info(
        "stored %d calls kept at the last shutdown in %s (%d of them were stored already%s)",
        done.read,
        path,
        done.read - done.stored,
        f"; {done.unreadable} unreadable lines dropped" if done.unreadable else "",
    )

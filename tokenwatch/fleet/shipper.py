"""Shipping the local ledger to the team's database: batches of events after a cursor kept in
the ledger, stored once by (host, key), the cursor advanced only after the server committed; the
ledger is the buffer while the server is away, so a restart or a kill -9 loses nothing."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
import anyio.to_thread

from tokenwatch.config import FleetSettings
from tokenwatch.fleet import outbox
from tokenwatch.fleet.connection import FleetUnreachable, describe
from tokenwatch.fleet.link import Link

log = logging.getLogger("tokenwatch.fleet")

BATCH: Final = 2000
"""Events per INSERT: one statement, so one round trip and one commit per batch."""
STOP_DEADLINE: Final = 5.0
"""Seconds a clean stop gives the last events to reach the team's table."""
_TYPES: Final = (
    "double precision", "text", "text", "text", "text", "text", "text", "bigint", "bigint",
    "bigint", "bigint", "bigint", "double precision", "text", "text", "boolean",
)  # fmt: skip
_COLUMNS: Final = ", ".join(f'"{c}"' for c in outbox.SHIPPED)
INSERT: Final = (
    f"INSERT INTO fleet_events (host, key, local_id, {_COLUMNS}) "
    "SELECT %s::text, * FROM unnest(%s::text[], %s::bigint[], "
    + ", ".join(f"%s::{t}[]" for t in _TYPES)
    + ") ON CONFLICT (host, key) DO NOTHING"
)


class Shipper:
    """Sends this supervisor's ledger to the team's table, from where it left off: `run` until
    cancelled, then `finish` once the ledger is flushed and closed."""

    def __init__(self, settings: FleetSettings, ledger: Path) -> None:
        self.settings = settings
        self.ledger = ledger
        self.link = Link(settings)
        self.shipped = 0
        """Events the server took since start (repeats it already had included)."""

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect (start-up goes on either way) and ship until cancelled; the connection stays
        open for `finish`."""
        async with anyio.create_task_group() as tg:
            await tg.start(self.link.keep_connected, name="fleet: ledger link")
            tg.start_soon(self._ship_forever, name="fleet: ship ledger")
            task_status.started()

    async def finish(self, deadline: float = STOP_DEADLINE) -> None:
        """At a clean stop, with the ledger flushed: ship what is left (within `deadline`
        seconds, and only if the server is up now; the rest waits for the next start), then
        close the connection."""
        try:
            if self.link.up:
                with outbox.opened(self.ledger) as conn, anyio.move_on_after(deadline):
                    after = await anyio.to_thread.run_sync(outbox.cursor, conn, self.settings.host)
                    while (sent := await self._ship_batch(conn, after)) is not None:
                        if sent[1] == 0:
                            return
                        after = sent[0]
            await self._left_behind()
        except sqlite3.Error as exc:  # a stopping supervisor says so and goes on stopping
            log.warning("the ledger's last events were not shipped: %s", exc)
        finally:
            self.link.closing = True
            with anyio.CancelScope(shield=True):
                await self.link.aclose()

    async def _left_behind(self) -> None:
        with outbox.opened(self.ledger) as conn:
            after = await anyio.to_thread.run_sync(outbox.cursor, conn, self.settings.host)
            left = await anyio.to_thread.run_sync(outbox.backlog, conn, after)
        if left:
            log.warning("%d ledger events not in the fleet database yet: they go at the next "
                        "start", left)  # fmt: skip

    async def _ship_forever(self) -> None:
        with outbox.opened(self.ledger) as conn:
            after = await anyio.to_thread.run_sync(outbox.cursor, conn, self.settings.host)
            while True:
                sent = await self._ship_batch(conn, after) if self.link.up else None
                if sent is None or sent[1] < BATCH:
                    await anyio.sleep(self.settings.ship_interval)
                if sent is not None:
                    after = sent[0]

    async def _ship_batch(self, conn: sqlite3.Connection, after: int) -> tuple[int, int] | None:
        """Send the next batch; (new cursor, events sent), or None when the server is away."""
        batch = await anyio.to_thread.run_sync(outbox.pending, conn, after, BATCH)
        if batch is None:
            return after, 0
        try:
            await self.link.rows(
                INSERT, [self.settings.host, batch.keys, batch.local_ids, *batch.columns]
            )
        except FleetUnreachable:
            return None
        except Exception as exc:  # the server refused the batch: retried, never skipped
            log.warning("the fleet database refused %d events: %s", len(batch), describe(exc))
            return None
        # Shielded: the server has them; a cursor left behind would only resend (stored once).
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(outbox.advance, conn, self.settings.host, batch.last_id)
        self.shipped += len(batch)
        return batch.last_id, len(batch)

"""The supervisor's one connection to the team's database: whether it is up, why not, statements
with a deadline, and reconnecting (migrating on the way) while it is down."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from tokenwatch.config import FleetSettings
from tokenwatch.fleet.connection import FleetUnreachable, connect, describe, where
from tokenwatch.fleet.schema import migrate

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("tokenwatch.fleet")

Row = tuple[Any, ...]
Params = Mapping[str, Any] | Sequence[Any]


class Link:
    """One autocommit connection shared by the supervisor's tasks (psycopg queues their
    statements); each statement is atomic on its own, so none needs a transaction."""

    def __init__(
        self, settings: FleetSettings, *, on_up: Callable[[], None] = lambda: None
    ) -> None:
        self.settings = settings
        self._conn: psycopg.AsyncConnection[Row] | None = None
        self._on_up = on_up
        self._down = anyio.Event()
        self._down.set()
        self.error = "not connected yet"
        """Why the database is unreachable now; empty while it is up."""
        self.closing = False
        """Set by a supervisor on its way out: a statement it cancelled is no outage to log."""

    @property
    def up(self) -> bool:
        return self._conn is not None

    async def open(self) -> bool:
        """Connect (and migrate) once; False, with `error` set, when that fails."""
        try:
            conn = await connect(self.settings)
        except FleetUnreachable as exc:
            self._went_down(str(exc))
            return False
        try:
            with anyio.fail_after(self.settings.connect_timeout * 10):
                await migrate(conn)
        except Exception as exc:  # a timeout, or a server that refuses the statements
            await conn.close()
            self._went_down(f"cannot prepare the fleet tables in {where(self.settings)}: "
                            f"{describe(exc)}")  # fmt: skip
            return False
        if self.error and self.error != "not connected yet" and not self.closing:
            log.warning("the fleet database %s is reachable again", where(self.settings))
        self._conn, self.error = conn, ""
        self._down = anyio.Event()
        self._on_up()
        return True

    async def keep_connected(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect now (start-up goes on either way) and again whenever the link drops."""
        await self.open()
        task_status.started()
        while True:
            await self._down.wait()
            await anyio.sleep(self.settings.retry_interval)
            if self._conn is None:
                await self.open()

    async def rows(self, sql: str, params: Params) -> list[Row]:
        """The statement's rows; FleetUnreachable (and the link marked down) when the server
        cannot be reached or does not answer within connect_timeout."""
        conn = self._conn
        if conn is None:
            raise FleetUnreachable(self.error)
        if conn.closed:  # closed under a cancelled statement
            await self._drop(conn, "the connection was closed")
            raise FleetUnreachable(self.error)
        import psycopg

        try:
            # Shielded: a task cancelled mid-statement would make psycopg close the connection
            # every task shares (and a stopping supervisor could not send its last settlements).
            with anyio.CancelScope(shield=True), anyio.fail_after(self.settings.connect_timeout):
                cur = await conn.execute(sql, params)  # type: ignore[arg-type]
                return await cur.fetchall() if cur.description is not None else []
        except TimeoutError:
            await self._drop(conn, f"no answer in {self.settings.connect_timeout:g} s")
        except psycopg.OperationalError as exc:
            if not conn.broken and not conn.closed:
                raise  # a deadlock or a serialization failure: the server is there
            await self._drop(conn, describe(exc))
        raise FleetUnreachable(self.error)

    async def _drop(self, conn: psycopg.AsyncConnection[Row], why: str) -> None:
        if self._conn is conn:
            self._conn = None
            self._went_down(f"lost the fleet database {where(self.settings)}: {why}")
        with anyio.CancelScope(shield=True), anyio.move_on_after(1):
            await conn.close()

    def _went_down(self, why: str) -> None:
        if self.error != why and not self.closing:
            log.warning("%s", why)
        self.error = why
        self._down.set()

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await conn.close()

"""The team's tables in PostgreSQL: versioned migrations, applied once, in order, by whichever
supervisor connects first (an advisory lock keeps two from applying the same one)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import psycopg

SCHEMA_LOCK: Final = 0x746F6B77
"""pg_advisory_xact_lock key held while migrating ('tokw')."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    what: str
    statements: tuple[str, ...]


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        1,
        "shared budgets: usage per period, reservations with leases, settled calls",
        (
            # One row per shared budget, key (agent, model, ... or "" for global) and period: what
            # is spent and what calls in flight hold. Reservation and settlement update it in
            # one statement each, so the limit check and the write cannot be raced.
            """CREATE TABLE shared_budgets (
                budget text NOT NULL,
                key text NOT NULL,
                period_start double precision NOT NULL,
                spent double precision NOT NULL DEFAULT 0,
                reserved double precision NOT NULL DEFAULT 0,
                updated_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (budget, key, period_start)
            )""",
            # A call in flight: what it holds, and until when unless its supervisor renews it.
            """CREATE TABLE shared_reservations (
                id text NOT NULL,
                budget text NOT NULL,
                key text NOT NULL,
                period_start double precision NOT NULL,
                host text NOT NULL,
                amount double precision NOT NULL,
                expires_at timestamptz NOT NULL,
                PRIMARY KEY (id, budget)
            )""",
            "CREATE INDEX shared_reservations_expiry ON shared_reservations (expires_at)",
            # Each call's settlement once (by call id), so one resent after a lost answer or an
            # outage is not counted twice.
            """CREATE TABLE shared_settlements (
                call_id text NOT NULL,
                budget text NOT NULL,
                key text NOT NULL,
                period_start double precision NOT NULL,
                host text NOT NULL,
                amount double precision NOT NULL,
                settled_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (call_id, budget, key, period_start)
            )""",
        ),
    ),
    Migration(
        2,
        "one ledger for the team: every supervisor's usage events",
        (
            # One row per call a supervisor recorded, keyed by (host, key): the call's id, or for
            # an event without one `row:ROWID:TS` of its local ledger (docs/fleet.md), so a batch
            # sent again after a lost answer or a restart is stored once.
            """CREATE TABLE fleet_events (
                host text NOT NULL,
                key text NOT NULL,
                local_id bigint NOT NULL,
                ts double precision NOT NULL,
                agent text NOT NULL,
                run_id text NOT NULL,
                "user" text NOT NULL,
                task text NOT NULL,
                provider text NOT NULL,
                model text NOT NULL,
                input_tokens bigint NOT NULL,
                output_tokens bigint NOT NULL,
                cache_read_tokens bigint NOT NULL,
                cache_write_tokens bigint NOT NULL,
                reasoning_tokens bigint NOT NULL,
                cost_usd double precision,
                price_source text NOT NULL,
                status text NOT NULL,
                estimated boolean NOT NULL,
                shipped_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (host, key)
            )""",
            "CREATE INDEX fleet_events_ts ON fleet_events (ts)",
        ),
    ),
)
"""Append only: a released migration is never edited (a team's database has run it)."""

LATEST: Final = MIGRATIONS[-1].version


async def migrate(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> int:
    """Bring the team's tables to LATEST; returns the version found before (0: none)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS tokenwatch_schema (
                version integer PRIMARY KEY,
                what text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )"""
        )
        cur = await conn.execute("SELECT coalesce(max(version), 0) FROM tokenwatch_schema")
        row = await cur.fetchone()
        found = int(row[0]) if row is not None else 0  # type: ignore[call-overload]
        for migration in MIGRATIONS:
            if migration.version <= found:
                continue
            for statement in migration.statements:
                await conn.execute(statement)  # type: ignore[arg-type]
            await conn.execute(
                "INSERT INTO tokenwatch_schema (version, what) VALUES (%s, %s)",
                (migration.version, migration.what),
            )
    return found

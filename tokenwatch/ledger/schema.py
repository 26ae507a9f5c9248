"""The ledger's SQLite schema as numbered migrations, applied in order on open (`PRAGMA user_version`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

# Columns of the events table, in UsageEvent field order (the writer binds rows in this order).
EVENT_COLUMNS: tuple[str, ...] = (
    "ts",
    "agent",
    "run_id",
    "pid",
    "session",
    "user",
    "task",
    "step",
    "tool",
    "provider",
    "model",
    "endpoint",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_usd",
    "price_version",
    "latency_ms",
    "ttft_ms",
    "wait_ms",
    "status",
    "http_status",
    "prompt_hash",
    "source",
    "estimated",
    "call_id",
    "prompt_shape",
    "turn_hash",
    "turn_shape",
    "tool_hash",
    "tool_call",
    "answer_hash",
    "overlap",
    "price_source",
    "requested_model",
    "lever",
    "saved_tokens",
    "saved_usd",
    "response_id",
)

# The dimensions a rollup row is keyed by (besides its time bucket); every filter must be one.
ROLLUP_DIMS: tuple[str, ...] = ("agent", "task", "model", "user", "provider")

# Rollup tables and the width of their time buckets in seconds, coarsest first.
ROLLUPS: tuple[tuple[str, int], ...] = (("rollup_hour", 3600), ("rollup_minute", 60))

# The measures of the rollup tables as version 2 created them (its migration must not change).
_V2_MEASURES: tuple[tuple[str, str], ...] = (
    ("requests", "COUNT(*)"),
    ("input_tokens", "SUM(input_tokens)"),
    ("cache_read_tokens", "SUM(cache_read_tokens)"),
    ("cache_write_tokens", "SUM(cache_write_tokens)"),
    ("output_tokens", "SUM(output_tokens)"),
    ("reasoning_tokens", "SUM(reasoning_tokens)"),
    ("cost_usd", "TOTAL(cost_usd)"),
    ("unpriced", "SUM(cost_usd IS NULL)"),
    ("errors", "SUM(status = 'error')"),
    ("denied", "SUM(status = 'denied')"),
    ("estimated", "SUM(estimated != 0)"),
)

ESTIMATED_PRICE_SQL = "price_source LIKE 'estimated:%'"
"""A call to a model no price table knows, priced at the fallback's rates (see core.pricing)."""

# Summed measures of a rollup row, with the SQL that computes each from raw event rows:
# `unpriced` counts calls no table priced (at the fallback's rates, or with no cost at all, as
# before version 5), `estimated_usd` the part of `cost_usd` that is such an estimate.
MEASURES: tuple[tuple[str, str], ...] = (
    *(
        (name, f"SUM(cost_usd IS NULL OR {ESTIMATED_PRICE_SQL})" if name == "unpriced" else sql)
        for name, sql in _V2_MEASURES
    ),
    ("estimated_usd", f"TOTAL(CASE WHEN {ESTIMATED_PRICE_SQL} THEN cost_usd END)"),
)
DOLLAR_MEASURES = frozenset({"cost_usd", "estimated_usd"})


def quoted(column: str) -> str:
    # `user` is a keyword in some SQL dialects; quoting every identifier keeps SQLite unambiguous.
    return f'"{column}"'


def _run_script(db: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it commits first, and each migration must be one transaction.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _v1_events(db: sqlite3.Connection) -> None:
    """The first ledger: one events table indexed by time (no dedup, no rollups)."""
    _run_script(
        db,
        """
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            agent TEXT NOT NULL DEFAULT '',
            run_id TEXT NOT NULL DEFAULT '',
            pid INTEGER,
            session TEXT NOT NULL DEFAULT '',
            "user" TEXT NOT NULL DEFAULT '',
            task TEXT NOT NULL DEFAULT '',
            step TEXT NOT NULL DEFAULT '',
            tool TEXT NOT NULL DEFAULT '',
            provider TEXT NOT NULL DEFAULT '',
            model TEXT NOT NULL DEFAULT '',
            endpoint TEXT NOT NULL DEFAULT '',
            input_tokens INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0,
            cache_read_tokens INTEGER NOT NULL DEFAULT 0,
            cache_write_tokens INTEGER NOT NULL DEFAULT 0,
            reasoning_tokens INTEGER NOT NULL DEFAULT 0,
            cost_usd REAL,
            price_version TEXT NOT NULL DEFAULT '',
            latency_ms REAL,
            ttft_ms REAL,
            status TEXT NOT NULL DEFAULT 'ok',
            http_status INTEGER,
            prompt_hash TEXT NOT NULL DEFAULT '',
            source TEXT NOT NULL DEFAULT 'sdk',
            estimated INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX events_ts ON events (ts);
        """,
    )


def _rollup_parts(
    measures: tuple[tuple[str, str], ...] = MEASURES,
) -> tuple[str, str, str, str]:
    """(dimension columns, measure columns, measures from raw rows, upsert SET clause)."""
    return (
        ", ".join(quoted(d) for d in ROLLUP_DIMS),
        ", ".join(name for name, _ in measures),
        ", ".join(expr for _, expr in measures),
        ", ".join(f"{name} = {name} + excluded.{name}" for name, _ in measures),
    )


def rollup_refresh_sql(
    table: str, width: int, measures: tuple[tuple[str, str], ...] = MEASURES
) -> str:
    """Fold event rows with `id > ?` into a rollup table straight from the raw rows (backfills;
    the writer folds its batches through `batch_rollup_sql`)."""
    dims, names, exprs, updates = _rollup_parts(measures)
    return (
        f"INSERT INTO {table} (bucket, {dims}, {names}) "
        f"SELECT CAST(ts / {width} AS INTEGER) * {width}, {dims}, {exprs} "
        f"FROM events WHERE id > ? GROUP BY 1, {dims} "
        f"ON CONFLICT (bucket, {dims}) DO UPDATE SET {updates}"
    )


BATCH_ROLLUP_TABLE = "temp.batch_rollup"
"""A batch's events summed per finest bucket: each rollup table is folded from it, so the new
rows are grouped once per batch rather than once per rollup table."""


def batch_rollup_sql() -> tuple[str, str, str, list[str]]:
    """(create, clear, fill with events `id > ?`, fold into each rollup table) for the writer."""
    dims, names, exprs, updates = _rollup_parts()
    sums = ", ".join(f"TOTAL({n})" if n in DOLLAR_MEASURES else f"SUM({n})" for n, _ in MEASURES)
    finest = min(width for _, width in ROLLUPS)
    if any(width % finest for _, width in ROLLUPS):
        raise ValueError("every rollup width must be a multiple of the finest")
    create = f"CREATE TEMP TABLE IF NOT EXISTS batch_rollup (bucket INTEGER, {dims}, {names})"
    fill = (
        f"INSERT INTO {BATCH_ROLLUP_TABLE} SELECT CAST(ts / {finest} AS INTEGER) * {finest}, "
        f"{dims}, {exprs} FROM events WHERE id > ? GROUP BY 1, {dims}"
    )
    folds = [
        f"INSERT INTO {table} (bucket, {dims}, {names}) "
        f"SELECT bucket / {width} * {width}, {dims}, {sums} FROM {BATCH_ROLLUP_TABLE} "
        f"GROUP BY 1, {dims} ON CONFLICT (bucket, {dims}) DO UPDATE SET {updates}"
        for table, width in ROLLUPS
    ]
    return create, f"DELETE FROM {BATCH_ROLLUP_TABLE}", fill, folds


def _create_rollup(db: sqlite3.Connection, table: str) -> None:
    """A rollup table as version 2 made it (later versions add columns)."""
    dims = ", ".join(f"{quoted(d)} TEXT NOT NULL" for d in ROLLUP_DIMS)
    measures = ", ".join(
        f"{name} REAL NOT NULL DEFAULT 0"
        if name in DOLLAR_MEASURES
        else f"{name} INTEGER NOT NULL DEFAULT 0"
        for name, _ in _V2_MEASURES
    )
    key = ", ".join(quoted(d) for d in ROLLUP_DIMS)
    db.execute(
        f"CREATE TABLE {table} (bucket INTEGER NOT NULL, {dims}, {measures}, "
        f"PRIMARY KEY (bucket, {key})) WITHOUT ROWID"
    )


def _v2_dedup_rollups_and_supervision(db: sqlite3.Connection) -> None:
    """Idempotency key, queue wait, per-minute/hour rollups, and the supervisor's own tables."""
    _run_script(
        db,
        """
        ALTER TABLE events ADD COLUMN wait_ms REAL NOT NULL DEFAULT 0;
        ALTER TABLE events ADD COLUMN call_id TEXT NOT NULL DEFAULT '';
        CREATE UNIQUE INDEX events_call_id ON events (call_id) WHERE call_id != '';
        CREATE INDEX events_agent_id ON events (agent, id);
        CREATE TABLE agents (name TEXT PRIMARY KEY, data TEXT NOT NULL, updated REAL NOT NULL);
        CREATE TABLE alerts (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            rule TEXT NOT NULL,
            agent TEXT NOT NULL,
            message TEXT NOT NULL,
            severity TEXT NOT NULL,
            action TEXT NOT NULL,
            acknowledged INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX alerts_ts ON alerts (ts);
        CREATE TABLE actions (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            agent TEXT NOT NULL,
            who TEXT NOT NULL,
            why TEXT NOT NULL,
            detail TEXT NOT NULL,
            ok INTEGER NOT NULL
        );
        CREATE INDEX actions_agent_ts ON actions (agent, ts);
        CREATE INDEX actions_ts ON actions (ts);
        """,
    )
    for table, width in ROLLUPS:
        _create_rollup(db, table)
        db.execute(rollup_refresh_sql(table, width, _V2_MEASURES), (0,))


def _v3_prompt_shape(db: sqlite3.Connection) -> None:
    """The near-duplicate prompt hash, so replayed history catches the loops live detection does."""
    db.execute("ALTER TABLE events ADD COLUMN prompt_shape TEXT NOT NULL DEFAULT ''")


def _v4_conversation_signals(db: sqlite3.Connection) -> None:
    """Conversation signals (hashes of new turns, tool calls, answers; overlap), so `rules test`
    replays the loop detectors as live enforcement ran them."""
    for column in ("turn_hash", "turn_shape", "tool_hash", "tool_call", "answer_hash"):
        db.execute(f"ALTER TABLE events ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE events ADD COLUMN overlap INTEGER NOT NULL DEFAULT 0")


def _v5_price_source(db: sqlite3.Connection) -> None:
    """Which table priced each call (or that the provider reported it, or that it is an
    estimate), and the estimated part of each rollup's cost. Calls stored before keep an empty
    source: the bundled table priced them (`price_version` says which) or none did (no cost)."""
    db.execute("ALTER TABLE events ADD COLUMN price_source TEXT NOT NULL DEFAULT ''")
    for table, _ in ROLLUPS:
        db.execute(f"ALTER TABLE {table} ADD COLUMN estimated_usd REAL NOT NULL DEFAULT 0")


def _v6_savings(db: sqlite3.Connection) -> None:
    """What the optimisation levers did: the model asked for, the lever, what it saved."""
    _run_script(
        db,
        """
        ALTER TABLE events ADD COLUMN requested_model TEXT NOT NULL DEFAULT '';
        ALTER TABLE events ADD COLUMN lever TEXT NOT NULL DEFAULT '';
        ALTER TABLE events ADD COLUMN saved_tokens INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE events ADD COLUMN saved_usd REAL;
        CREATE INDEX events_lever_ts ON events (ts) WHERE lever != ''
        """,
    )


def _v7_session_logs(db: sqlite3.Connection) -> None:
    """The provider's answer id (one answer stored once, whether the proxy or a coding agent's
    session log saw it), and how far each session log has been read."""
    _run_script(
        db,
        """
        ALTER TABLE events ADD COLUMN response_id TEXT NOT NULL DEFAULT '';
        CREATE UNIQUE INDEX events_response_id ON events (response_id) WHERE response_id != '';
        CREATE TABLE log_offsets (
            source TEXT NOT NULL,
            path TEXT NOT NULL,
            inode INTEGER NOT NULL,
            offset INTEGER NOT NULL,
            state TEXT NOT NULL,
            PRIMARY KEY (source, path)
        ) WITHOUT ROWID
        """,
    )


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _v1_events,
    _v2_dedup_rollups_and_supervision,
    _v3_prompt_shape,
    _v4_conversation_signals,
    _v5_price_source,
    _v6_savings,
    _v7_session_logs,
)
"""MIGRATIONS[n] takes a database at `user_version` n to n + 1. Never edit one; append."""

VERSION = len(MIGRATIONS)


class SchemaTooNew(Exception):
    """The file was written by a newer tokenwatch than this one."""


def migrate(db: sqlite3.Connection) -> int:
    """Bring `db` (in autocommit mode) to VERSION, one transaction per step; returns the old version.

    The version is read inside each write transaction, so two processes opening a fresh file at
    once do not both run the same step.
    """
    start: int | None = None
    while True:
        db.execute("BEGIN IMMEDIATE")
        try:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            start = version if start is None else start
            if version > VERSION:
                raise SchemaTooNew(
                    f"ledger schema version {version} is newer than this tokenwatch "
                    f"understands ({VERSION}); upgrade tokenwatch"
                )
            if version == VERSION:
                db.execute("COMMIT")
                return start
            MIGRATIONS[version](db)
            db.execute(f"PRAGMA user_version = {version + 1}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

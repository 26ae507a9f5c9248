"""`tokenwatch report --fleet` as a user sees it when it cannot answer: one line on stderr, a
non-zero exit, never the password (no [fleet], no driver, server down, wrong password, a
database no supervisor has shipped to); and glob filters read as the local report reads them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio.to_thread
import pytest

from tests.postgres_fixtures import PgCluster, PgDatabase, pytestmark_postgres
from tokenwatch.fleet.history import similar_pattern


def report(home: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenwatch", "report", *args],
        env={**os.environ, **env}, cwd=home, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def one_line(done: subprocess.CompletedProcess[str], secret: str = "") -> str:
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    if secret:
        assert secret not in done.stderr
    return lines[0]


def fleet_toml(home: Path, url: str) -> None:
    (home / "tokenwatch.toml").write_text(f'[fleet]\nurl = "{url}"\nconnect_timeout = 2\n')


def test_without_fleet_it_says_where_to_configure_it(tokenwatch_home: Path) -> None:
    line = one_line(report(tokenwatch_home, {}, "--fleet"))
    assert (
        line == "tokenwatch: report --fleet: no [fleet] section in tokenwatch.toml (docs/fleet.md)"
    )


def test_hosts_without_fleet_are_a_command_line_mistake(tokenwatch_home: Path) -> None:
    done = report(tokenwatch_home, {}, "--by", "host")
    assert one_line(done) == "tokenwatch: report: hosts are in the team's ledger: add --fleet"
    assert done.returncode == 2


def test_without_the_driver_it_says_what_to_install(tokenwatch_home: Path) -> None:
    fleet_toml(tokenwatch_home, "postgresql://team@db.example/team")
    # A psycopg that cannot be imported, first on the path: as if it were not installed.
    fake = tokenwatch_home / "nodriver" / "psycopg"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named psycopg')\n")
    done = report(tokenwatch_home, {"PYTHONPATH": str(fake.parent)}, "--fleet")
    assert one_line(done) == (
        "tokenwatch: report --fleet needs PostgreSQL's driver: pip install 'tokenwatch[fleet]' "
        "(psycopg)"
    )


@pytest.mark.parametrize(
    ("glob", "similar"),
    [("writer-*", "writer-%"), ("a?c", "a_c"), ("x_y%", "x\\_y\\%"), ("[ab]*", "[ab]%")],
)
def test_globs_become_similar_to_patterns(glob: str, similar: str) -> None:
    assert similar_pattern(glob) == similar


class TestOnARealServer:
    pytestmark = pytestmark_postgres

    def test_a_stopped_server_is_one_line(
        self, tokenwatch_home: Path, pg_cluster: PgCluster, pg_db: PgDatabase
    ) -> None:
        fleet_toml(tokenwatch_home, pg_db.url)
        pg_cluster.stop()
        try:
            done = report(tokenwatch_home, pg_db.env(), "--fleet")
        finally:
            pg_cluster.start()
        line = one_line(done, pg_cluster.password)
        assert line.startswith(f"tokenwatch: cannot reach the fleet database {pg_db.url}: ")
        assert done.returncode == 1

    def test_a_wrong_password_is_one_line_without_it(
        self, tokenwatch_home: Path, pg_db: PgDatabase
    ) -> None:
        fleet_toml(tokenwatch_home, pg_db.url)
        env = {**pg_db.env(), "PGPASSWORD": "not-the-Password-42"}
        line = one_line(report(tokenwatch_home, env, "--fleet"), "not-the-Password-42")
        assert "password authentication failed" in line

    def test_a_database_no_supervisor_shipped_to_says_so(
        self, tokenwatch_home: Path, pg_db: PgDatabase
    ) -> None:
        fleet_toml(tokenwatch_home, pg_db.url)
        line = one_line(report(tokenwatch_home, pg_db.env(), "--fleet"), pg_db.cluster.password)
        assert line == (
            f"tokenwatch: the fleet database {pg_db.url} has no team ledger yet (no supervisor "
            "with [fleet] has connected to it)"
        )

    async def test_a_locked_ledger_is_one_line_after_report_timeout(
        self, tokenwatch_home: Path, pg_db: PgDatabase, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import psycopg

        from tokenwatch.fleet.schema import migrate

        for key, value in pg_db.env().items():
            monkeypatch.setenv(key, value)
        (tokenwatch_home / "tokenwatch.toml").write_text(
            f'[fleet]\nurl = "{pg_db.url}"\nconnect_timeout = 2\nreport_timeout = 1\n'
        )
        async with await psycopg.AsyncConnection.connect(pg_db.url, autocommit=True) as conn:
            await migrate(conn)
            # a migration or a long transaction elsewhere holding the team's table
            async with conn.transaction():
                await conn.execute("LOCK TABLE fleet_events IN ACCESS EXCLUSIVE MODE")
                done = await anyio.to_thread.run_sync(
                    lambda: report(tokenwatch_home, pg_db.env(), "--fleet")
                )
        line = one_line(done, pg_db.cluster.password)
        assert line == (
            f"tokenwatch: the fleet database {pg_db.url} did not answer in 1 s "
            "([fleet] report_timeout)"
        )


class TestSameAsTheLocalReport:
    """One ledger's events shipped by the real shipper: the team's report of them equals the
    local report, for every grouping and a glob filter."""

    pytestmark = pytestmark_postgres

    async def test_every_grouping_matches(
        self, tokenwatch_home: Path, pg_db: PgDatabase, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import datetime

        import anyio
        import psycopg

        from tokenwatch.config import FleetSettings
        from tokenwatch.core.models import UsageEvent
        from tokenwatch.fleet.history import TeamLedger
        from tokenwatch.fleet.shipper import Shipper
        from tokenwatch.ledger.report import build_report
        from tokenwatch.ledger.store import Store

        for key, value in pg_db.env().items():
            monkeypatch.setenv(key, value)
        now = 1_764_900_000.0
        events = [
            UsageEvent(
                ts=now - i * 3917.0,
                agent=f"writer-{i % 3}",
                task=f"t{i % 5}" if i % 4 else "",
                run_id=f"run{i % 6}",
                model=("gpt-4o-mini", "mystery")[i % 7 == 0],
                provider="openai",
                input_tokens=100 + i,
                output_tokens=10 + i % 9,
                cost_usd=None if i % 11 == 0 else 0.001 * (i % 13),
                price_source="estimated:gpt-4o" if i % 7 == 0 else "table",
                status=("ok", "error", "denied")[i % 3 if i % 5 == 0 else 0],
                estimated=i % 8 == 0,
                call_id=f"c{i}",
            )
            for i in range(400)
        ]
        ledger = tokenwatch_home / "usage.db"
        tz = datetime.timezone(datetime.timedelta(hours=-5))
        async with await Store.open(ledger, clock=lambda: now) as store:
            await store.append_many(events)
            await store.flush()
            shipper = Shipper(FleetSettings(url=pg_db.url, host="h"), ledger)
            async with anyio.create_task_group() as tg:
                await tg.start(shipper.run)
                tg.cancel_scope.cancel()
            await shipper.finish()
            async with await psycopg.AsyncConnection.connect(pg_db.url) as conn:
                team = TeamLedger(conn, clock=lambda: now)
                for by in ("agent", "task", "model", "day", "week", "month", "session"):
                    for filters in ({}, {"agent": "writer-[01]"}):
                        kwargs = dict(by=by, since=now - 40 * 86400, until=None, tz=tz)
                        mine = (await build_report(store, **kwargs, **filters)).to_dict()  # type: ignore[arg-type]
                        ours = (await build_report(team, **kwargs, **filters)).to_dict()  # type: ignore[arg-type]
                        assert _close(ours, mine), (by, filters, ours, mine)


def _close(a: object, b: object) -> bool:
    """Equal, floats within 1e-9 (sums in another order), anywhere in nested dicts and lists."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-12)
    return a == b

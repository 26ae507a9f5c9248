"""`tokenwatch report --fleet` as a user sees it when it cannot answer: one line on stderr, a
non-zero exit, never the password (no [fleet], no driver, server down, wrong password, a
database no supervisor has shipped to); and glob filters read as the local report reads them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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

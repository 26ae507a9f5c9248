"""[fleet]: its settings, connecting through libpq's own password sources, the schema's
migrations, and errors that never show a password; against the throwaway cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.postgres_fixtures import PgCluster, PgDatabase, pytestmark_postgres
from tokenwatch.config import ConfigError, FleetSettings, parse_config
from tokenwatch.fleet.connection import FleetUnreachable, connect, scrub
from tokenwatch.fleet.schema import LATEST, migrate


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://team:s3cr3t-pw@db.example/team",
        "postgresql://team@db.example/team?password=s3cr3t-pw",
    ],
)
def test_a_url_with_a_password_is_refused_in_one_line_without_it(url: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"fleet": {"url": url}}, "team.toml")
    message = str(err.value)
    assert "\n" not in message
    assert "s3cr3t-pw" not in message
    assert message.startswith("team.toml: fleet.url: holds a password; give it in PGPASSWORD")


@given(
    st.text(
        alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="@/?#:%[]"),
        min_size=4,
    )
)
def test_no_password_is_ever_echoed(password: str) -> None:
    for url in (
        f"postgresql://team:{password}@db/team",
        f"postgresql://team@db/team?password={password}",
    ):
        with pytest.raises(ConfigError) as err:
            parse_config({"fleet": {"url": url}}, "t.toml")
        assert password not in str(err.value).removeprefix("t.toml: fleet.url: holds a password")
    assert password not in scrub(f"failed: password={password}", {"PGPASSWORD": password})


def test_missing_server_binaries_skip_locally_and_fail_in_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.postgres_fixtures import missing

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no initdb"):
        missing("no initdb")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"no initdb \(CI must run the PostgreSQL"):
        missing("no initdb")


def test_without_fleet_nothing_is_shared_and_the_host_defaults_to_the_machine() -> None:
    import socket

    assert parse_config({}).fleet is None
    fleet = parse_config({"fleet": {}}).fleet
    assert fleet is not None
    assert fleet.host == socket.gethostname()
    assert fleet.url == ""  # libpq's PG* variables


def test_scrub_hides_every_form_of_password() -> None:
    text = "password=hunter2 at postgresql://u:hunter2@h/db and 'pw-in-env'"
    shown = scrub(text, {"PGPASSWORD": "pw-in-env"})
    assert "hunter2" not in shown
    assert "pw-in-env" not in shown
    assert "postgresql://u:***@h/db" in shown


class TestOnARealServer:
    pytestmark = pytestmark_postgres

    async def test_connects_with_pgpassword_and_migrates_once(
        self, pg_db: PgDatabase, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for key, value in pg_db.env().items():
            monkeypatch.setenv(key, value)
        settings = FleetSettings(url=pg_db.url)
        async with await connect(settings) as conn:
            assert await migrate(conn) == 0
            assert await migrate(conn) == LATEST  # idempotent: the second finds it done
            cur = await conn.execute("SELECT count(*) FROM tokenwatch_schema")
            assert await cur.fetchone() == (LATEST,)

    async def test_supervisors_starting_together_migrate_once(
        self, pg_db: PgDatabase, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for key, value in pg_db.env().items():
            monkeypatch.setenv(key, value)
        found: list[int] = []

        async def one() -> None:
            async with await connect(FleetSettings(url=pg_db.url)) as conn:
                found.append(await migrate(conn))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(one)
        assert sorted(found) == [0, LATEST, LATEST, LATEST]

    async def test_a_wrong_password_is_an_error_without_it(
        self, pg_db: PgDatabase, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for key, value in pg_db.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("PGPASSWORD", "not-the-Password-42")
        with pytest.raises(FleetUnreachable) as err:
            await connect(FleetSettings(url=pg_db.url))
        message = str(err.value)
        assert "not-the-Password-42" not in message
        assert "password authentication failed" in message
        assert message.startswith(f"cannot reach the fleet database {pg_db.url}")

    async def test_a_stopped_server_is_unreachable(
        self, pg_cluster: PgCluster, pg_db: PgDatabase, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for key, value in pg_db.env().items():
            monkeypatch.setenv(key, value)
        pg_cluster.stop()
        try:
            with pytest.raises(FleetUnreachable, match="cannot reach the fleet database"):
                await connect(FleetSettings(url=pg_db.url, connect_timeout=1))
        finally:
            pg_cluster.start()


def test_a_password_in_the_url_stops_serve_in_one_line(tokenwatch_home: Path) -> None:
    config = tokenwatch_home / "tokenwatch.toml"
    config.write_text('[fleet]\nurl = "postgresql://team:Hunter2-pw@db.example/team"\n')
    done = subprocess.run(
        [sys.executable, "-m", "tokenwatch", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "Hunter2-pw" not in done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        f"tokenwatch: {config}: fleet.url: holds a password; give it in PGPASSWORD or "
        "~/.pgpass (or a PGSERVICE file), never in the config"
    ]

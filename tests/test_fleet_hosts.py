"""Other hosts' agents, read-only: `tokenwatch status --fleet` and the dashboard's other hosts
screen showing what another supervisor (a `tokenwatch serve` with a home of its own) shipped to
one throwaway PostgreSQL, refusing to act on those agents, and saying so when the server is down
(docs/fleet.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from textual.widgets import DataTable
from textual.widgets._footer import FooterKey

from tests.fleet_fixtures import Member, fire, team, team_toml
from tests.postgres_fixtures import PgCluster, PgDatabase, pytestmark_postgres
from tests.supervisor_fixtures import running_supervisor
from tests.tui_fixtures import (
    NAMES,
    NOW,
    notifications,
    row_names,
    sample_snapshot,
    scripted_app,
    wait_for,
    widget_text,
)
from tokenwatch.client.control import SupervisorClient
from tokenwatch.core.quantities import format_usd
from tokenwatch.demo.fake_llm import running_fake_llm
from tokenwatch.paths import Paths
from tokenwatch.supervisor.policy import load_config
from tokenwatch.tui.app import TokenwatchApp, build_app
from tokenwatch.tui.screens.dialogs import HelpScreen
from tokenwatch.tui.screens.hosts import HostsScreen
from tokenwatch.tui.source import ScriptedSource, SupervisorSource

T = TypeVar("T", bound=Callable[..., Any])
WORK = {"builder": 6, "tester": 3}
"""Calls each agent of host `b` makes."""


@pytest.fixture
def pg_env(pg_db: PgDatabase, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = pg_db.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def member_toml(url: str, upstream: str, host: str) -> str:
    return team_toml(url, upstream, "", host=host).replace(
        "retry_interval = 0.2", "retry_interval = 0.2\nship_interval = 0.2"
    )


def status_fleet(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenwatch", "status", "--fleet", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def shipped(url: str, host: str, calls: int) -> None:
    """Wait until the team's table holds `calls` events of `host`."""
    import psycopg

    with anyio.fail_after(60):
        while True:
            async with await psycopg.AsyncConnection.connect(url) as conn:
                cur = await conn.execute(
                    "SELECT count(*) FROM fleet_events WHERE host = %s", (host,)
                )
                row = await cur.fetchone()
            if row is not None and row[0] == calls:
                return
            await anyio.sleep(0.1)


async def busy(members: Sequence[Member], url: str) -> None:
    """Host `b`'s agents make their calls (and `a`'s one), all shipped to the team's table."""
    outcomes: Counter[str] = Counter()
    by_name = {m.name: m for m in members}
    for agent, calls in WORK.items():
        await fire(by_name["b"], agent, calls, outcomes)
    if "a" in by_name:
        await fire(by_name["a"], "local", 2, outcomes)
    assert outcomes == Counter(ok=sum(WORK.values()) + 2 * ("a" in by_name))
    await shipped(url, "b", sum(WORK.values()))


def needs_postgres(test: T) -> T:
    """The cluster's marks (one xdist group: a test may stop the server) on one test."""
    for mark in (*pytestmark_postgres, pytest.mark.slow):
        test = mark(test)
    return test


@needs_postgres
async def test_status_fleet_shows_another_supervisors_agents_with_their_spend(
    pg_cluster: PgCluster, pg_env: dict[str, str]
) -> None:
    url = pg_cluster.url(pg_env["PGDATABASE"])
    async with running_fake_llm(latency_ms=0) as fake:
        tomls = {name: member_toml(url, fake.url, name) for name in "ab"}
        with team(["a", "b"], pg_env, tomls) as members:
            await busy(members, url)
            a, b = members
            as_json = status_fleet(a.serve.env, a.home, "--json")
            as_text = status_fleet(a.serve.env, a.home)
            spent = {agent: b.ledger_usd(agent) for agent in WORK}
    assert as_json.returncode == 0, as_json.stderr
    roster = json.loads(as_json.stdout)
    assert roster["host"] == "a"
    assert [h["host"] for h in roster["hosts"]] == ["b"]  # not this host's own agents
    agents = {x["agent"]: x for x in roster["hosts"][0]["agents"]}
    assert {name: x["calls_today"] for name, x in agents.items()} == WORK
    for name, usd in spent.items():
        assert usd > 0
        assert agents[name]["spend_today_usd"] == pytest.approx(usd, rel=1e-9)
    assert as_text.returncode == 0, as_text.stderr
    lines = as_text.stdout.splitlines()
    assert lines[0].startswith(f"host b · {format_usd(sum(spent.values()))} today")
    for name, usd in spent.items():
        row = next(line for line in lines if line.startswith(name + " "))
        assert row.split()[1:3] == [format_usd(usd), str(WORK[name])]
    assert "local" not in as_text.stdout


def test_status_fleet_without_a_fleet_is_one_line_and_an_error(tokenwatch_home: Path) -> None:
    (tokenwatch_home / "tokenwatch.toml").write_text("[supervisor]\ntimezone = 'UTC'\n")
    result = status_fleet(dict(os.environ), tokenwatch_home)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("tokenwatch: no [fleet] in ")


def hosts_rows(app: TokenwatchApp) -> list[list[str]]:
    screen = app.screen
    if not isinstance(screen, HostsScreen):
        return []
    table = screen.query_one("#hosts", DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def hosts_title(app: TokenwatchApp) -> str:
    screen = app.screen
    return widget_text(screen.query_one("#hosts-title")) if isinstance(screen, HostsScreen) else ""


@needs_postgres
async def test_the_dashboard_shows_other_hosts_read_only_and_says_when_the_server_is_down(
    pg_cluster: PgCluster, pg_env: dict[str, str], tokenwatch_home: Path
) -> None:
    url = pg_cluster.url(pg_env["PGDATABASE"])
    async with running_fake_llm(latency_ms=0) as fake:
        config_file = tokenwatch_home / "tokenwatch.toml"
        config_file.write_text(member_toml(url, fake.url, "a"))
        paths = Paths.discover()
        with team(["b"], pg_env, member_toml(url, fake.url, "b")) as members:
            await busy(members, url)
            (b,) = members
            spent = {agent: b.ledger_usd(agent) for agent in WORK}
            async with (
                running_supervisor(paths, load_config(config_file, paths), proxy=False,
                                   exporters=False),
                await SupervisorClient.connect(paths, start=False) as client,
            ):  # fmt: skip
                app = build_app(SupervisorSource(client, interval=0.2), min_refresh=0.0)
                async with app.run_test(size=(140, 36)) as pilot:
                    await wait_for(pilot, lambda: app.fleet, "the team's key offered")
                    await pilot.press("h")
                    await wait_for(pilot, lambda: len(hosts_rows(app)) == 2, "b's agents shown")
                    rows = {r[1]: r for r in hosts_rows(app)}
                    for agent, usd in spent.items():
                        assert rows[agent][:4] == ["b", agent, format_usd(usd), str(WORK[agent])]
                    assert "read-only" in hosts_title(app)

                    await pilot.press("p", "k", "t", "enter")
                    await pilot.pause()
                    refused = [n for n in notifications(app) if n.startswith("read-only")]
                    assert len(refused) == 4
                    assert "controlled by b's supervisor" in refused[0]
                    assert isinstance(app.screen, HostsScreen)  # no dialog, no detail
                    async with await SupervisorClient.connect(b.serve.paths) as other:
                        states = {x["agent"]["name"]: x["agent"]["state"]
                                  for x in (await other.request("status"))["agents"]}  # fmt: skip
                    assert states == dict.fromkeys(WORK, "running")

                    received = app.received
                    pg_cluster.stop()
                    try:
                        await wait_for(
                            pilot,
                            lambda: "cannot reach the fleet database" in hosts_title(app),
                            "the view says the server is unreachable",
                        )
                        assert hosts_rows(app) == []
                        assert pg_env["PGPASSWORD"] not in hosts_title(app)
                        await pilot.press("escape")
                        await wait_for(pilot, lambda: app.received > received + 2, "live")
                        assert not [n for n in notifications(app) if "failed" in n]
                    finally:
                        pg_cluster.start()


@needs_postgres
def test_status_fleet_with_the_server_down_is_one_line_without_the_password(
    pg_cluster: PgCluster, pg_env: dict[str, str], tokenwatch_home: Path
) -> None:
    url = pg_cluster.url(pg_env["PGDATABASE"])
    (tokenwatch_home / "tokenwatch.toml").write_text(member_toml(url, "http://127.0.0.1:9", "a"))
    pg_cluster.stop()
    try:
        result = status_fleet(dict(os.environ), tokenwatch_home)
    finally:
        pg_cluster.start()
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("tokenwatch: cannot reach the fleet database")
    assert pg_env["PGPASSWORD"] not in result.stderr


def footer_keys(app: TokenwatchApp) -> list[str]:
    return [key.description for key in app.main.query(FooterKey)]


def scripted(reply: object | None) -> TokenwatchApp:
    snap = sample_snapshot()
    replies = {} if reply is None else {"fleet_hosts": reply}
    return scripted_app(ScriptedSource(snap, replies=replies))


ROSTER = {
    "host": "a", "read_at": NOW, "day_start": NOW - 3600,
    "hosts": [{"host": "b", "last_shipment": NOW - 2, "agents": [
        {"agent": "builder", "spend_today_usd": 1.5, "estimated_today": 0, "calls_today": 7,
         "last_seen": NOW - 65},
    ]}],
}  # fmt: skip


async def test_without_a_fleet_the_hosts_key_is_neither_offered_nor_acts() -> None:
    app = scripted(None)  # the scripted supervisor does not know `fleet_hosts`: an old one
    async with app.run_test(size=(200, 40)) as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == len(NAMES), "rows shown")
        await wait_for(pilot, lambda: bool(app.source.commands_of("fleet_hosts")), "asked")  # type: ignore[attr-defined]
        await pilot.pause()
        assert "Other hosts" not in footer_keys(app)
        await pilot.press("h")
        await pilot.pause()
        assert app.screen is app.main
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), "help open")
        assert "Other hosts" not in widget_text(app.screen.query_one(".help"))
        assert notifications(app) == []  # nothing said about a team that is not there


async def test_with_a_fleet_the_hosts_screen_lists_the_other_hosts_agents() -> None:
    app = scripted(ROSTER)
    async with app.run_test(size=(200, 40)) as pilot:
        await wait_for(pilot, lambda: app.fleet, "the team's key offered")
        await wait_for(pilot, lambda: "Other hosts" in footer_keys(app), "key in the footer")
        await pilot.press("h")
        await wait_for(pilot, lambda: len(hosts_rows(app)) == 1, "row shown")
        assert hosts_rows(app) == [["b", "builder", "$1.50", "7", "1m ago", "2s ago"]]
        assert (
            hosts_title(app)
            .strip()
            .endswith("read-only: each host's agents are controlled on that host · 1 host")
        )
        await pilot.press("P")
        await pilot.pause()
        assert app.source.commands_of("pause_all") == []  # type: ignore[attr-defined]
        await pilot.press("escape")
        assert app.screen is app.main


async def test_a_database_error_shows_in_the_hosts_screen_only() -> None:
    error = "cannot reach the fleet database postgresql://tw@db/team: no answer in 3 s"
    app = scripted({"host": "a", "error": error, "hosts": []})
    async with app.run_test(size=(200, 40)) as pilot:
        await wait_for(pilot, lambda: app.fleet, "the team's key offered")
        await pilot.press("h")
        await wait_for(pilot, lambda: error in hosts_title(app), "error shown")
        assert hosts_rows(app) == []
        assert not [n for n in notifications(app) if "fleet" in n]

"""One ledger for the team: real `tokenwatch serve` processes (homes of their own) shipping their
local ledgers to one throwaway PostgreSQL; nothing lost or doubled across a kill -9 or an outage,
and `tokenwatch report --fleet` adding up to the local ledgers (docs/fleet.md)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
from collections import Counter
from collections.abc import Sequence

import anyio
import pytest

from tests.fleet_fixtures import Member, fire, report_fleet, team, team_toml
from tests.postgres_fixtures import PgCluster, PgDatabase, pytestmark_postgres
from tests.supervisor_fixtures import start_serve, wait_answers
from tokenwatch.demo.fake_llm import running_fake_llm

pytestmark = [*pytestmark_postgres, pytest.mark.slow]

Figures = dict[tuple[str, str], tuple[int, int, int, float]]
"""(host, agent) -> (calls, input tokens, output tokens, $)."""


@pytest.fixture
def pg_env(pg_db: PgDatabase, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = pg_db.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def toml(url: str, upstream: str, host: str, ship_interval: float = 0.2) -> str:
    return team_toml(url, upstream, "", host=host).replace(
        "retry_interval = 0.2", f"retry_interval = 0.2\nship_interval = {ship_interval}"
    )


def local_figures(members: Sequence[Member]) -> Figures:
    figures: Figures = {}
    for member in members:
        with contextlib.closing(sqlite3.connect(member.serve.paths.db)) as db:
            rows = db.execute(
                "SELECT agent, COUNT(*), SUM(input_tokens), SUM(output_tokens), "
                "TOTAL(cost_usd) FROM events GROUP BY agent"
            ).fetchall()
        for agent, calls, inp, out, usd in rows:
            figures[(member.name, agent)] = (calls, inp, out, usd)
    return figures


async def team_ledger(url: str) -> Figures:
    import psycopg

    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT host, agent, COUNT(*), SUM(input_tokens), SUM(output_tokens), "
            "coalesce(SUM(cost_usd), 0) FROM fleet_events GROUP BY host, agent"
        )
        rows = await cur.fetchall()
    return {(h, a): (int(n), int(i), int(o), float(u)) for h, a, n, i, o, u in rows}


async def caught_up(url: str, members: Sequence[Member], calls: int) -> Figures:
    """The team's table once it holds every local event (and the ledgers hold `calls`)."""
    with anyio.fail_after(60):
        while True:
            local = local_figures(members)
            if sum(f[0] for f in local.values()) == calls and await team_ledger(url) == local:
                return local
            await anyio.sleep(0.1)


def assert_same(team: Figures, local: Figures) -> None:
    assert team.keys() == local.keys()
    for key, (calls, inp, out, usd) in local.items():
        assert team[key][:3] == (calls, inp, out), key
        assert team[key][3] == pytest.approx(usd, rel=1e-12), key


def restart(member: Member) -> None:
    member.serve = start_serve(member.serve.env, "--config", str(member.home / "tokenwatch.toml"))
    wait_answers(member.serve)


async def test_three_supervisors_ship_and_the_team_ledger_is_the_sum_of_theirs(
    pg_cluster: PgCluster, pg_env: dict[str, str]
) -> None:
    url = pg_cluster.url(pg_env["PGDATABASE"])
    async with running_fake_llm(latency_ms=0) as fake:
        tomls = {name: toml(url, fake.url, name) for name in ("a", "b", "c")}
        with team(["a", "b", "c"], pg_env, tomls) as members:
            outcomes: Counter[str] = Counter()
            async with anyio.create_task_group() as tg:
                for member in members:
                    tg.start_soon(fire, member, f"writer-{member.name}", 20, outcomes)
                    tg.start_soon(fire, member, "shared-name", 10, outcomes)
            assert outcomes == Counter(ok=90)
            local = await caught_up(url, members, 90)
            by_agent = report_fleet(members[0], "--by", "agent", "--format", "json")
            by_host = report_fleet(members[1], "--by", "host", "--format", "json")
    assert_same(await team_ledger(url), local)
    assert by_agent.returncode == 0, by_agent.stderr
    groups = {g["agent"]: g for g in json.loads(by_agent.stdout)["groups"]}
    assert groups["shared-name"]["requests"] == 30  # one agent name on three hosts, summed
    for agent in ("writer-a", "writer-b", "writer-c", "shared-name"):
        mine = [f for (_, a), f in local.items() if a == agent]
        assert groups[agent]["input_tokens"] == sum(f[1] for f in mine)
        assert groups[agent]["output_tokens"] == sum(f[2] for f in mine)
        assert groups[agent]["cost_usd"] == pytest.approx(sum(f[3] for f in mine), rel=1e-9)
    total = json.loads(by_agent.stdout)["total"]
    assert total["requests"] == 90
    assert total["cost_usd"] == pytest.approx(sum(f[3] for f in local.values()), rel=1e-9)
    hosts = {g["host"]: g for g in json.loads(by_host.stdout)["groups"]}
    assert {h: g["requests"] for h, g in hosts.items()} == {"a": 30, "b": 30, "c": 30}
    for host, group in hosts.items():  # each host's own local ledger, tokens and $
        mine = [f for (h, _), f in local.items() if h == host]
        assert group["input_tokens"] == sum(f[1] for f in mine)
        assert group["output_tokens"] == sum(f[2] for f in mine)
        assert group["cost_usd"] == pytest.approx(sum(f[3] for f in mine), rel=1e-9)


async def test_a_supervisor_killed_before_shipping_ships_once_after_restart(
    pg_cluster: PgCluster, pg_env: dict[str, str]
) -> None:
    url = pg_cluster.url(pg_env["PGDATABASE"])
    async with running_fake_llm(latency_ms=0) as fake:
        # An hour between batches: what it records now stays unsent until the restart.
        with team(["k"], pg_env, toml(url, fake.url, "k", ship_interval=3600)) as (member,):
            outcomes: Counter[str] = Counter()
            await fire(member, "victim", 25, outcomes)
            assert outcomes == Counter(ok=25)
            with anyio.fail_after(30):  # the calls are in its ledger (committed) ...
                while local_figures([member]).get(("k", "victim"), (0,))[0] < 25:
                    await anyio.sleep(0.05)
            assert await team_ledger(url) == {}  # ... and not in the team's
            os.kill(member.serve.pid, signal.SIGKILL)
            member.serve.proc.wait(30)
            (member.home / "tokenwatch.toml").write_text(toml(url, fake.url, "k"))
            restart(member)
            await fire(member, "victim", 5, outcomes)
            local = await caught_up(url, [member], 30)
            # Forget the cursor, as a kill between the server's commit and the cursor's write
            # would: everything is sent again, and stored once.
            member.stop()
            with contextlib.closing(sqlite3.connect(member.serve.paths.db)) as db:
                db.execute("UPDATE fleet_shipped SET last_id = 0")
                db.commit()
            restart(member)
            await _cursor_at_end(member)
            assert_same(await team_ledger(url), local)


async def _cursor_at_end(member: Member) -> None:
    with anyio.fail_after(60):
        while True:
            with contextlib.closing(sqlite3.connect(member.serve.paths.db)) as db:
                (last,) = db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()
                row = db.execute("SELECT last_id FROM fleet_shipped").fetchone()
            if row and row[0] == last:
                return
            await anyio.sleep(0.1)


async def test_database_stopped_mid_run_the_shipper_catches_up_without_doubles(
    pg_cluster: PgCluster, pg_env: dict[str, str]
) -> None:
    url = pg_cluster.url(pg_env["PGDATABASE"])
    async with running_fake_llm(latency_ms=0) as fake:
        with team(["p", "q"], pg_env, {n: toml(url, fake.url, n) for n in "pq"}) as members:
            outcomes: Counter[str] = Counter()
            for member in members:
                await fire(member, "steady", 10, outcomes)
            await caught_up(url, members, 20)
            pg_cluster.stop()
            try:
                for member in members:  # calls go on: no shared budget depends on the server
                    await fire(member, "steady", 15, outcomes)
                assert outcomes == Counter(ok=50)
                failed = report_fleet(members[0])
                assert failed.returncode != 0
                assert failed.stderr.count("\n") == 1, failed.stderr
                assert "cannot reach the fleet database" in failed.stderr
            finally:
                pg_cluster.start()
            local = await caught_up(url, members, 50)
    assert_same(await team_ledger(url), local)


async def test_a_clean_stop_ships_what_is_left(
    pg_cluster: PgCluster, pg_env: dict[str, str]
) -> None:
    url = pg_cluster.url(pg_env["PGDATABASE"])
    async with running_fake_llm(latency_ms=0) as fake:
        # An hour between batches: only the stop itself can send these calls.
        with team(["s"], pg_env, toml(url, fake.url, "s", ship_interval=3600)) as (member,):
            outcomes: Counter[str] = Counter()
            await fire(member, "last-words", 12, outcomes)
            assert outcomes == Counter(ok=12)
            member.stop()
            local = local_figures([member])
            assert local[("s", "last-words")][0] == 12
            assert_same(await team_ledger(url), local)

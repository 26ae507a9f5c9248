"""A team's supervisors (real `tokenwatch serve` processes, homes of their own, one throwaway
PostgreSQL) enforcing one shared budget: concurrent calls, a supervisor killed with holds, and
the database stopped mid-run under each policy (docs/fleet.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import anyio
import pytest

from tests.fleet_fixtures import (
    Member,
    fire,
    report_fleet,
    team,
    team_figures,
    team_toml,
    worst_case_usd,
)
from tests.postgres_fixtures import PgCluster, PgDatabase, pytestmark_postgres
from tokenwatch.demo.fake_llm import running_fake_llm

pytestmark = [*pytestmark_postgres, pytest.mark.slow]

ROUNDS = 2
"""Repetitions here; bench/fleet.py runs 20 (docs/benchmarks.md)."""


def shared_budget(name: str, limit: float, **extra: str) -> str:
    lines = [f'name = "{name}"', f'limit = "${limit:.8f}"', 'action = "deny"', "shared = true"]
    lines += [f"{key} = {value}" for key, value in extra.items()]
    return "[[budget]]\n" + "\n".join(lines) + "\n"


@pytest.fixture
def pg_env(pg_db: PgDatabase, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = pg_db.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.mark.parametrize("round_", range(ROUNDS))
async def test_four_supervisors_fifty_calls_each_stay_within_one_shared_budget(
    pg_cluster: PgCluster, pg_env: dict[str, str], round_: int
) -> None:
    url = pg_cluster.url(pg_env["PGDATABASE"])
    per_call = worst_case_usd()
    limit = per_call * 60.5  # sixty of the two hundred calls fit, not sixty-one
    async with running_fake_llm(latency_ms=2000) as fake:
        toml = team_toml(url, fake.url, shared_budget("team", limit))
        with team(["a", "b", "c", "d"], pg_env, toml) as members:
            outcomes: Counter[str] = Counter()
            async with anyio.create_task_group() as tg:
                for member in members:
                    tg.start_soon(fire, member, f"crowd-{member.name}", 50, outcomes)
            for member in members:
                member.stop()  # its ledger flushed, its settlements sent, its events shipped
            recorded = sum(member.ledger_usd() for member in members)
            local_calls = sum(member.ledger_calls() for member in members)
            report = report_fleet(members[0], "--format", "json")
        spent, reserved = await team_figures(url, "team")
    assert outcomes["ok"] + outcomes["refused"] == 200, outcomes
    assert outcomes["refused"] > 0  # the budget was reached across the fleet
    # Every call reserved its whole max_tokens (no agent had history), so the documented bound
    # (the excess of the calls in flight over their reservations) is 0 here.
    assert recorded <= limit * (1 + 1e-9)
    assert spent == pytest.approx(recorded, rel=1e-9, abs=1e-12)  # the team counted each once
    assert reserved == pytest.approx(0, abs=1e-12)
    assert report.returncode == 0, report.stderr  # the team's ledger: the four local ones summed
    total = json.loads(report.stdout)["total"]
    assert total["requests"] == local_calls
    assert total["cost_usd"] == pytest.approx(recorded, rel=1e-9, abs=1e-12)


async def test_a_killed_supervisors_holds_expire_and_the_budget_recovers(
    pg_cluster: PgCluster, pg_env: dict[str, str]
) -> None:
    url = pg_cluster.url(pg_env["PGDATABASE"])
    per_call = worst_case_usd()
    lease = 3.0
    budget = shared_budget("team", per_call * 10.5)
    async with (
        running_fake_llm(latency_ms=120_000) as slow,
        running_fake_llm(latency_ms=0) as fast,
    ):
        tomls = {
            "doomed": team_toml(url, slow.url, budget, lease=lease, host="doomed"),
            "alive": team_toml(url, fast.url, budget, lease=lease, host="alive"),
        }
        with team(["doomed", "alive"], pg_env, tomls) as (doomed, alive):
            outcomes: Counter[str] = Counter()
            async with anyio.create_task_group() as tg:
                tg.start_soon(fire, doomed, "holder", 10, outcomes)
                with anyio.fail_after(60):  # ten calls in flight, holding the whole budget
                    while (await team_figures(url, "team"))[1] < per_call * 9.99:
                        await anyio.sleep(0.05)
                messages: list[str] = []
                await fire(alive, "waiter", 1, outcomes, messages)
                assert outcomes["refused"] == 1
                assert messages[0].startswith("shared budget team (")
                killed_at = time.monotonic()
                os.kill(doomed.serve.pid, signal.SIGKILL)
                recovered = await _first_admitted(alive)
                tg.cancel_scope.cancel()
    waited = recovered - killed_at
    # Its holds count until their lease runs out (at most `lease` after its last renewal),
    # then the next refused call sweeps them: generous slack for a loaded machine.
    assert waited < lease + 15, f"budget recovered {waited:.1f} s after the kill"


async def _first_admitted(member: Member) -> float:
    with anyio.fail_after(60):
        while True:
            outcomes: Counter[str] = Counter()
            await fire(member, "waiter", 1, outcomes)
            if outcomes["ok"]:
                return time.monotonic()
            await anyio.sleep(0.1)


async def test_database_stopped_mid_run_each_policy_as_documented(
    pg_cluster: PgCluster, pg_env: dict[str, str]
) -> None:
    url = pg_cluster.url(pg_env["PGDATABASE"])
    per_call = worst_case_usd()
    budgets = shared_budget("strict", per_call * 100).replace(
        "shared = true", 'shared = true\nscope = "agent"\ntarget = "careful"'
    ) + shared_budget(
        "sliced", per_call * 100, when_unreachable='"local-slice"', slice=f'"${per_call * 3.5:.8f}"'
    ).replace("shared = true", 'shared = true\nscope = "agent"\ntarget = "brave"')
    async with running_fake_llm(latency_ms=0) as fake:
        with team(["solo"], pg_env, team_toml(url, fake.url, budgets)) as (solo,):
            before: Counter[str] = Counter()
            await fire(solo, "careful", 2, before)
            await fire(solo, "brave", 2, before)
            assert before == Counter(ok=4)
            pg_cluster.stop()
            try:
                careful: Counter[str] = Counter()
                messages: list[str] = []
                await fire(solo, "careful", 3, careful, messages)
                assert careful == Counter(unreachable=3), solo.serve.output()[-3000:]
                assert messages[0].startswith(
                    "shared budget strict cannot be checked: the fleet database is unreachable"
                )
                brave: Counter[str] = Counter()
                spent_before = solo.ledger_usd("brave")
                while not brave["unreachable"] and brave["ok"] < 10:  # one by one
                    await fire(solo, "brave", 1, brave)
                # the slice holds three and a half calls' reservations: what they spend counts
                assert 3 <= brave["ok"] <= 5, brave
                assert brave["unreachable"] == 1
                assert solo.ledger_usd("brave") - spent_before <= per_call * 3.5
                lines = _status(solo)
                assert "fleet unreachable: refusing strict" in lines, lines
                assert any(
                    line.startswith("fleet unreachable: spending from the local slice of sliced")
                    for line in lines
                )
            finally:
                pg_cluster.start()
            with anyio.fail_after(60):  # the queued settlements arrive once it is back
                while (await team_figures(url, "sliced"))[0] < solo.ledger_usd("brave") * 0.999:
                    await anyio.sleep(0.1)
            after: Counter[str] = Counter()
            await fire(solo, "careful", 1, after)
            assert after == Counter(ok=1)
            assert not any(line.startswith("fleet unreachable") for line in _status(solo))
            solo.stop()
            careful_usd, brave_usd = solo.ledger_usd("careful"), solo.ledger_usd("brave")
        # after the outage, nothing missing or doubled: the team counted what the ledger holds
        assert (await team_figures(url, "strict"))[0] == pytest.approx(careful_usd)
        assert (await team_figures(url, "sliced"))[0] == pytest.approx(brave_usd)


def _status(member: Member) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "tokenwatch", "status"],
        env=member.serve.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()

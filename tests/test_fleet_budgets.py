"""Shared budgets on a real PostgreSQL: what two supervisors' books hold and refuse, leases that
run out, outages under each policy, and settlements counted once (tokenwatch/fleet/budgets.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.postgres_fixtures import PgCluster, PgDatabase, pytestmark_postgres
from tokenwatch.config import BudgetSettings, ConfigError, FleetSettings, parse_config
from tokenwatch.core.admission import CallRequest
from tokenwatch.core.models import BudgetStatus, UsageEvent
from tokenwatch.fleet.budgets import SharedBook
from tokenwatch.supervisor.policy import build_policy

pytestmark = pytestmark_postgres

TEAM = BudgetSettings(name="team", limit=1000, action="deny", shared=True, period="day")


def call(agent: str = "a") -> CallRequest:
    return CallRequest(agent=agent, provider="openai", model="gpt-4o-mini")


def used(tokens: int, call_id: str, agent: str = "a") -> UsageEvent:
    return UsageEvent(agent=agent, provider="openai", model="gpt-4o-mini", input_tokens=tokens,
                      call_id=call_id)  # fmt: skip


@pytest.fixture
def pg_env(pg_db: PgDatabase, monkeypatch: pytest.MonkeyPatch) -> PgDatabase:
    for key, value in pg_db.env().items():
        monkeypatch.setenv(key, value)
    return pg_db


@contextlib.asynccontextmanager
async def book(
    db: PgDatabase,
    *budgets: BudgetSettings,
    host: str = "one",
    lease: float = 30,
    keep: Path | None = None,
) -> AsyncIterator[SharedBook]:
    settings = FleetSettings(url=db.url, host=host, lease=lease, retry_interval=0.1,
                             connect_timeout=2)  # fmt: skip
    shared = SharedBook(settings, list(budgets or [TEAM]), tz="UTC", keep=keep)
    async with anyio.create_task_group() as tg:
        await tg.start(shared.run)
        try:
            yield shared
        finally:
            tg.cancel_scope.cancel()


async def settled(shared: SharedBook) -> None:
    with anyio.fail_after(30):
        while shared.queued:
            await anyio.sleep(0.01)


async def team_spent(db: PgDatabase, budget: str = "team") -> tuple[float, float]:
    import psycopg

    async with await psycopg.AsyncConnection.connect(db.url) as conn:
        cur = await conn.execute(
            "SELECT coalesce(sum(spent), 0), coalesce(sum(reserved), 0) FROM shared_budgets "
            "WHERE budget = %s",
            (budget,),
        )
        row = await cur.fetchone()
    assert row is not None
    return float(row[0]), float(row[1])


def status(shared: SharedBook, name: str = "team") -> BudgetStatus:
    local = BudgetStatus(name=name, scope="global", target="*", period="day", limit=1000,
                         unit="tokens", used=0, action="deny")  # fmt: skip
    (row,) = shared.statuses([local])
    return row


async def test_two_supervisors_share_one_limit(pg_env: PgDatabase) -> None:
    async with book(pg_env, host="one") as one, book(pg_env, host="two") as two:
        assert await one.reserve(call(), 400, None, "", "b1") is None
        assert await two.reserve(call(), 400, None, "", "b1") is None
        refusal = await two.reserve(call(), 400, None, "", "b2")
        assert refusal is not None
        assert refusal.status == 429
        assert refusal.message.startswith(
            "shared budget team (1k tokens per day, across the fleet) would be exceeded: "
            "0 tokens spent by the team, 800 tokens in flight, this call may use 400 tokens."
        )
        one.settle("b1", used(100, "c1"))
        await settled(one)
        assert await two.reserve(call(), 400, None, "", "b2") is None  # 100 + 400 + 400
        assert await team_spent(pg_env) == (100.0, 800.0)
        assert status(two).used == 100
        assert status(two).fleet == "shared"


async def test_concurrent_reservations_never_pass_the_limit(pg_env: PgDatabase) -> None:
    async with book(pg_env, host="one") as one, book(pg_env, host="two") as two:
        allowed: list[str] = []

        async def ask(shared: SharedBook, rid: str) -> None:
            if await shared.reserve(call(), 30, None, "", rid) is None:
                allowed.append(rid)

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(ask, one, f"x{i}")
                tg.start_soon(ask, two, f"x{i}")
        assert len(allowed) == 1000 // 30
        assert await team_spent(pg_env) == (0.0, 30.0 * len(allowed))


async def test_a_settlement_sent_twice_counts_once(pg_env: PgDatabase) -> None:
    async with book(pg_env) as one:
        await one.reserve(call(), 300, None, "", "b1")
        one.settle("b1", used(120, "same-call"))
        one.settle("", used(120, "same-call"))  # the SDK reported it too
        await settled(one)
        assert await team_spent(pg_env) == (120.0, 0.0)


async def test_a_dead_supervisors_holds_stop_counting_after_its_lease(
    pg_env: PgDatabase,
) -> None:
    async with book(pg_env, host="two", lease=1) as two:
        async with book(pg_env, host="dies", lease=1) as dies:
            assert await dies.reserve(call(), 900, None, "", "b1") is None
            dies._holds.clear()  # as if killed: nothing renews or releases its hold
        assert await two.reserve(call(), 900, None, "", "b1") is not None
        with anyio.fail_after(30):
            while await two.reserve(call(), 900, None, "", "b1") is not None:
                await anyio.sleep(0.2)
        assert await team_spent(pg_env) == (0.0, 900.0)


async def test_unreachable_refuse_fails_closed_with_a_503(
    pg_cluster: PgCluster, pg_env: PgDatabase
) -> None:
    async with book(pg_env) as one:
        await one.reserve(call(), 100, None, "", "b1")
        pg_cluster.stop()
        try:
            one.settle("b1", used(80, "c1"))  # kept until the server is back
            refusal = await one.reserve(call(), 100, None, "", "b2")
            assert refusal is not None
            assert refusal.status == 503
            assert refusal.message.startswith(
                "shared budget team cannot be checked: the fleet database is unreachable"
            )
            assert "(when_unreachable = refuse)" in refusal.message
            assert status(one).fleet_note == "fleet unreachable: refusing team"
        finally:
            pg_cluster.start()
        await settled(one)
        assert await team_spent(pg_env) == (80.0, 0.0)
        assert status(one).fleet == "shared"


async def test_unreachable_local_slice_spends_its_slice_then_reconciles(
    pg_cluster: PgCluster, pg_env: PgDatabase
) -> None:
    sliced = BudgetSettings(name="team", limit=1000, action="deny", shared=True,
                            when_unreachable="local-slice", slice=250)  # fmt: skip
    async with book(pg_env, sliced) as one:
        pg_cluster.stop()
        try:
            assert await one.reserve(call(), 100, None, "", "b1") is None
            assert await one.reserve(call(), 100, None, "", "b2") is None
            refusal = await one.reserve(call(), 100, None, "", "b3")
            assert refusal is not None
            assert refusal.status == 503
            assert "local slice of it is spent" in refusal.message
            one.settle("b1", used(90, "c1"))
            one.settle("b2", used(60, "c2"))
            assert await one.reserve(call(), 100, None, "", "b3") is None  # 150 + 100 <= 250
            one.release("b3")
            assert status(one).fleet_note == (
                "fleet unreachable: spending from the local slice of team (150 tokens of 250 tokens)"
            )
        finally:
            pg_cluster.start()
        await settled(one)
        assert await team_spent(pg_env) == (150.0, 0.0)  # each call once, none missing


def test_shared_budgets_are_checked_in_the_config() -> None:
    def refused(budget: dict[str, Any], **extra: Any) -> str:
        with pytest.raises(ConfigError) as err:
            build_policy(parse_config({"budget": [budget], **extra}, "t.toml"))
        return str(err.value)

    assert refused({"limit": "$5", "shared": True}) == (
        "t.toml: budget global:*:day is shared, but there is no [fleet] section to share it in "
        "(docs/fleet.md)"
    )
    assert "counts a calendar hour, day, week, month or total, not a rolling day" in refused(
        {"limit": "$5", "shared": True, "rolling": True}, fleet={}
    )
    assert 'give a slice like "$1"' in refused(
        {"limit": "$5", "shared": True, "when_unreachable": "local-slice", "slice": "5k"}, fleet={}
    )


async def test_sdk_admissions_over_the_socket_are_held_in_the_shared_budget(
    pg_env: PgDatabase,
) -> None:
    # The SDK path (`admit` / `settle` on the socket) takes the same shared step as the proxy.
    from pathlib import Path

    from tests.supervisor_fixtures import quiet_config, raw_client, running_supervisor
    from tokenwatch.paths import Paths

    config = quiet_config(budget=[TEAM], fleet=FleetSettings(url=pg_env.url))
    async with (
        book(pg_env, host="other") as other,
        running_supervisor(Paths.discover(), config, proxy=False, exporters=False) as sup,
        raw_client(Path(sup.paths.socket)) as raw,
    ):
        assert await other.reserve(call(), 600, None, "", "b1") is None
        name = (await raw.call("register", name="sdk"))["data"]["name"]
        await raw.call("hello", name=name)
        first = (await raw.call("admit", model="gpt-4o-mini", input_tokens=300))["data"]
        assert first["allowed"] is True
        assert await team_spent(pg_env) == (0.0, 900.0)
        second = (await raw.call("admit", model="gpt-4o-mini", input_tokens=300))["data"]
        assert second["allowed"] is False  # this supervisor alone would have let it go
        assert second["status"] == 429
        assert second["budget"] == "team"
        assert second["message"].startswith("shared budget team (1k tokens per day")
        event = {"agent": name, "call_id": "s1", "provider": "openai", "model": "gpt-4o-mini",
                 "input_tokens": 200, "output_tokens": 0}  # fmt: skip
        await raw.call("settle", reservation=first["reservation"], event=event)
        with anyio.fail_after(30):
            while await team_spent(pg_env) != (200.0, 600.0):
                await anyio.sleep(0.02)


async def test_the_team_spending_a_budget_makes_its_action_due_once(pg_env: PgDatabase) -> None:
    pausing = BudgetSettings(name="team", limit=1000, action="pause", shared=True)
    async with book(pg_env, pausing, host="one") as one, book(pg_env, pausing, host="two") as two:
        assert await one.reserve(call(), 500, None, "", "b1") is None
        assert await two.reserve(call("b"), 600, None, "", "b1") is not None
        assert two.signals_nowait() == []  # refused for calls in flight only: nothing is due
        one.settle("b1", used(900, "c1"))
        await settled(one)
        refusal = await two.reserve(call("b"), 200, None, "", "b2")
        assert refusal is not None
        (signal,) = two.signals_nowait()
        assert (signal.agent, signal.action) == ("b", "pause")
        assert signal.alert.message == f"b: {refusal.message}; paused"
        assert await two.reserve(call("b"), 200, None, "", "b3") is not None
        assert two.signals_nowait() == []  # once a period


async def test_settlements_unsent_at_exit_are_sent_by_the_next_start(
    pg_cluster: PgCluster, pg_env: PgDatabase, short_tmp: Path
) -> None:
    keep = short_tmp / "fleet-unsent.jsonl"
    async with book(pg_env, keep=keep) as first:
        await first.reserve(call(), 300, None, "", "b1")
        pg_cluster.stop()
        first.settle("b1", used(250, "c1"))
        first.settle("", used(40, "c2"))
    assert len(keep.read_text().splitlines()) == 2  # kept, not lost
    pg_cluster.start()
    async with book(pg_env, keep=keep) as second:
        await settled(second)
        assert not keep.exists()
        second.settle("", used(40, "c2"))  # arriving again changes nothing
        await settled(second)
    spent, _ = await team_spent(pg_env)
    assert spent == 290.0

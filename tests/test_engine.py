"""The engine as the proxy and SDK see it: holds, refusals, settling, store outages, signals acted on,
duplicates, snapshots. Real ledger; budgets and rules scripted behind their protocols."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.standins import NoBudgets, NoPrices, NoRules
from tokenwatch.config import BudgetSettings, SupervisorSettings
from tokenwatch.core.admission import Admission, CallRequest, Refusal, Reservation, Signal
from tokenwatch.core.budgets import Budgets
from tokenwatch.core.errors import StoreUnavailable
from tokenwatch.core.models import Action, Agent, Alert, UsageEvent
from tokenwatch.core.pricing import PriceTable
from tokenwatch.engine.engine import Engine
from tokenwatch.ledger.store import Store

pytestmark = pytest.mark.anyio


class ScriptedRules(NoRules):
    """Fires `signal_for(event)` for every event it observes."""

    def __init__(self, action: str = "") -> None:
        self.action = action

    def observe(self, event: UsageEvent) -> list[Signal]:
        if not self.action:
            return []
        alert = Alert(rule="runaway", agent=event.agent, message=f"{event.agent} loops")
        return [Signal(alert=alert, action=self.action, agent=event.agent)]


class CappedBudget(NoBudgets):
    """One budget of `limit` tokens: reserve refuses past it; settle replaces the reservation."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used, self.reserved = limit, 0, 0

    def reserve(
        self, call: CallRequest, tokens: int, usd: float | None, estimated_from: str = ""
    ) -> Reservation | Refusal:
        if self.used + self.reserved + tokens > self.limit:
            return Refusal(
                "day-cap", "day-cap: 1000 tokens a day (raise it: tokenwatch budget set)", 60.0
            )
        self.reserved += tokens
        return Reservation(
            id=f"r{self.reserved}-{tokens}", tokens=tokens, usd=0.0, budgets=("day-cap",)
        )

    def settle(self, reservation: Reservation | None, event: UsageEvent) -> list[Signal]:
        if reservation is not None:
            self.reserved -= reservation.tokens
        self.used += event.total_tokens
        return []

    def release(self, reservation: Reservation) -> None:
        self.reserved -= reservation.tokens


class FlakyStore:
    """A real Store whose event writes fail while `broken` is set."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.broken = False
        self.slow: anyio.Event | None = None
        """When set, writes wait for it (a disk that answers late)."""
        self.writing = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def append_many(self, events: Sequence[UsageEvent]) -> int:
        if self.broken:
            raise StoreUnavailable("disk full (simulated)")
        self.writing += 1
        try:
            if self.slow is not None:
                await self.slow.wait()
            return await self._store.append_many(events)
        finally:
            self.writing -= 1


@contextlib.asynccontextmanager
async def running_engine(db: Path, **kwargs: Any) -> AsyncIterator[tuple[Engine, Store]]:
    async with await Store.open(db) as store:
        ledger = kwargs.pop("ledger", store)
        engine = Engine(
            ledger,
            NoPrices(),
            kwargs.pop("budgets", NoBudgets()),
            kwargs.pop("rules", NoRules()),
            **kwargs,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            yield engine, store
            tg.cancel_scope.cancel()


def call(agent: str, tokens: int = 100) -> CallRequest:
    return CallRequest(agent=agent, provider="openai", model="gpt-4o-mini", input_tokens=tokens,
                       max_output_tokens=tokens)  # fmt: skip


def event(agent: str, call_id: str, tokens: int = 100) -> UsageEvent:
    return UsageEvent(agent=agent, call_id=call_id, model="gpt-4o-mini", input_tokens=tokens,
                      output_tokens=tokens, source="proxy")  # fmt: skip


async def call_while_paused(
    engine: Engine, name: str, then: Callable[[], Awaitable[object]]
) -> tuple[bool, Admission]:
    """Pause `name`, send a call, run `then()` once the call is held; (was it held, its answer)."""
    engine.register(name)
    await engine.pause(name, who="key")
    answers: list[Admission] = []

    async def ask() -> None:
        answers.append(await engine.admit(call(name)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask)
        await anyio.wait_all_tasks_blocked()
        held = answers == []
        await then()
    return held, answers[0]


async def test_a_paused_agent_s_calls_wait_until_it_is_resumed(short_tmp: Path) -> None:
    async with running_engine(short_tmp / "u.db") as (engine, _):
        held, answer = await call_while_paused(
            engine, "held", lambda: engine.resume("held", who="key")
        )
    assert held
    assert answer.allowed


async def test_killing_an_agent_refuses_its_held_calls(short_tmp: Path) -> None:
    async with running_engine(short_tmp / "u.db") as (engine, _):
        held, answer = await call_while_paused(
            engine, "doomed", lambda: engine.kill("doomed", who="cli")
        )
    assert held
    assert not answer.allowed
    assert answer.status == 429
    assert "killed by cli" in answer.message


async def test_a_budget_refusal_names_the_budget_and_when_to_retry(short_tmp: Path) -> None:
    budget = CappedBudget(limit=1000)
    async with running_engine(short_tmp / "u.db", budgets=budget) as (engine, store):
        first = await engine.admit(call("spender", 400))
        second = await engine.admit(call("spender", 400))
        await engine.settle(first, event("spender", "c1", 100))
        third = await engine.admit(call("spender", 400))
        history = await store.history(agent="spender")
    assert first.allowed
    assert not second.allowed
    assert (second.status, second.budget, second.retry_after) == (429, "day-cap", 60.0)
    assert "tokenwatch budget set" in second.message
    assert third.allowed, "settling gave back what the first call did not use"
    assert [h.event.call_id for h in history] == ["c1"]


async def test_a_call_reserves_its_likely_output_not_its_max_tokens(short_tmp: Path) -> None:
    budget = CappedBudget(limit=10**9)
    claude_code = CallRequest(agent="claude", provider="anthropic", model="claude-opus-4-5",
                              input_tokens=20_000, max_output_tokens=32_000)  # fmt: skip
    async with running_engine(short_tmp / "u.db", budgets=budget) as (engine, _):
        first = await engine.admit(claude_code)
        assert budget.reserved == 52_000  # nothing known yet: the worst case
        done = UsageEvent(agent="claude", call_id="c1", model="claude-opus-4-5",
                          input_tokens=20_000, output_tokens=800)  # fmt: skip
        await engine.settle(first, done)
        await engine.admit(claude_code)
    assert budget.reserved == 20_000 + 1_200  # 1.5 x the largest recent output


async def test_an_unknown_model_is_refused_at_a_dollar_budget_naming_the_fallback(
    short_tmp: Path,
) -> None:
    budgets = Budgets([BudgetSettings(name="tiny", limit="$0.01", action="deny")], tz="UTC")
    async with await Store.open(short_tmp / "u.db") as store:
        engine = Engine(store, PriceTable.load(), budgets, NoRules())
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            answer = await engine.admit(CallRequest(agent="a", provider="openai",
                                                    model="acme-coder-7", input_tokens=2_000,
                                                    max_output_tokens=1_000))  # fmt: skip
            alerts = engine.live.alerts
            with anyio.fail_after(10):
                while not alerts:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert (answer.allowed, answer.status, answer.budget) == (False, 429, "tiny")
    # gpt-5.5 stands in for an unknown model on the OpenAI route: 2000*5 + 1000*30 -> $0.04
    assert "this call may use $0.0400 (price: estimated from gpt-5.5)" in answer.message
    assert alerts[0].message == f"a: {answer.message}; its calls are refused"


@contextlib.asynccontextmanager
async def in_an_outage(tmp: Path) -> AsyncIterator[tuple[Engine, FlakyStore, Store]]:
    """An engine whose ledger broke just before a call settled: its usage is kept in memory."""
    async with await Store.open(tmp / "u.db") as real:
        flaky = FlakyStore(real)
        async with running_engine(tmp / "other.db", ledger=flaky) as (engine, _):
            ok = await engine.admit(call("a"))
            flaky.broken = True
            await engine.settle(ok, event("a", "kept"))  # returns: the proxy keeps serving
            yield engine, flaky, real


async def test_store_outage_refuses_calls_but_loses_no_settled_usage(short_tmp: Path) -> None:
    async with in_an_outage(short_tmp) as (engine, flaky, real):
        refused = await engine.admit(call("a"))
        engine.settings = SupervisorSettings(fail_open=True)
        let_through = await engine.admit(call("a"))
        flaky.broken = False
        with anyio.fail_after(30):
            while engine.statistics().pending_store:
                await anyio.sleep(0.01)
        back = await engine.admit(call("a"))
        stored = [h.event.call_id for h in await real.history()]
    assert refused.status == 503
    assert "fail_open" in refused.message
    assert let_through.allowed
    assert back.allowed
    assert stored == ["kept"]


async def test_usage_being_written_back_after_an_outage_is_still_pending(short_tmp: Path) -> None:
    async with in_an_outage(short_tmp) as (engine, flaky, _):
        flaky.slow = anyio.Event()
        flaky.broken = False  # the store is back, but slow to take the usage kept meanwhile
        with anyio.fail_after(30):
            while not flaky.writing:
                await anyio.sleep(0.01)
        during = engine.statistics()
        refused = await engine.admit(call("a"))
        flaky.slow.set()
        with anyio.fail_after(30):
            while engine.statistics().pending_store:
                await anyio.sleep(0.01)
        after = engine.statistics()
        back = await engine.admit(call("a"))
    assert during.pending_store == 1
    assert refused.status == 503  # fail closed until what was kept is stored
    assert (after.pending_store, after.store_error) == (0, "")
    assert back.allowed


async def test_usage_the_ledger_refuses_is_logged_and_the_rest_is_stored(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    huge = [event("a", f"huge-{i}", tokens=2**62) for i in range(2)]  # past what a call can use
    async with running_engine(short_tmp / "u.db") as (engine, store):
        await engine.ingest([*huge, event("a", "fine")])
        await engine.ingest([event("a", "next")])
        stored = [h.event.call_id for h in await store.history()]
    assert sorted(stored) == ["fine", "next"]
    assert "the ledger refused usage: usage event not stored: 'input_tokens' is" in caplog.text


async def test_the_same_call_reported_twice_counts_once(short_tmp: Path) -> None:
    budget = CappedBudget(limit=10_000)
    async with running_engine(short_tmp / "u.db", budgets=budget) as (engine, store):
        admission = await engine.admit(call("twice"))
        await engine.settle(admission, event("twice", "same-id"))
        await engine.ingest([event("twice", "same-id")])  # the SDK saw it too
        rec = engine.roster.find("twice")
        stored = await store.history(agent="twice")
    assert rec.requests == 1
    assert budget.used == 200
    assert budget.reserved == 0
    assert len(stored) == 1


async def test_the_oldest_call_ids_are_forgotten_first_and_the_ledger_still_stores_once(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tokenwatch.engine.recorder.RECENT_CALL_IDS", 3)
    async with running_engine(short_tmp / "w.db") as (engine, store):
        await engine.ingest([event("a", f"c{i}") for i in range(1, 5)])
        await engine.ingest([event("a", "c2"), event("a", "c3"), event("a", "c4")])
        remembered = engine.statistics().duplicates
        await engine.ingest([event("a", "c1")])  # out of the window: the engine counts it again
        stored = await store.history(agent="a")
    assert remembered == 3
    assert engine.statistics().duplicates == 3
    assert sorted(s.event.call_id for s in stored) == ["c1", "c2", "c3", "c4"]


async def test_a_rule_s_pause_is_done_recorded_and_published(short_tmp: Path) -> None:
    published: list[tuple[str, Any]] = []
    async with running_engine(short_tmp / "u.db", rules=ScriptedRules("pause")) as (engine, store):
        engine.add_listener(lambda kind, obj: published.append((kind, obj)))
        engine.register("looper")
        await engine.ingest([event("looper", "l1")])
        with anyio.fail_after(30):
            while not any(kind == "action" for kind, _ in published):
                await anyio.sleep(0.01)
        actions = await store.list_actions(agent="looper")
        alerts = await store.list_alerts()
    kinds = [k for k, _ in published]
    assert [(a.kind, a.who, a.why) for a in actions] == [("pause", "rule:runaway", "looper loops")]
    assert [a.message for a in alerts] == ["looper loops"]
    assert kinds.index("usage") < kinds.index("alert") < kinds.index("action")
    assert any(k == "agent" and isinstance(o, Agent) and o.state == "paused" for k, o in published)


async def test_a_critical_agent_is_only_alerted_on(short_tmp: Path) -> None:
    async with running_engine(short_tmp / "u.db", rules=ScriptedRules("kill")) as (engine, store):
        engine.register("prod", critical=True)
        await engine.ingest([event("prod", "p1")])
        with anyio.fail_after(30):
            while not (alerts := await store.list_alerts()):
                await anyio.sleep(0.01)
        await anyio.wait_all_tasks_blocked()
        actions = await store.list_actions(agent="prod")
        state = engine.roster.find("prod").agent.state
    assert [a.agent for a in alerts] == ["prod"]
    assert actions == []
    assert state == "running"


async def test_a_throttled_sdk_agent_is_told_how_long_to_wait(short_tmp: Path) -> None:
    async with running_engine(short_tmp / "u.db") as (engine, _):
        engine.register("sdk")
        action = await engine.throttle("sdk", "600/min", who="cli")  # 10 tokens/s, 600 burst
        # a new throttle holds a tenth of its burst (not a whole minute's, on top of the rate)
        _, first_wait = engine.admit_nowait(call("sdk", 60))
        await anyio.wait_all_tasks_blocked()
        _, second_wait = engine.admit_nowait(call("sdk", 300))
        state = engine.roster.find("sdk").agent
    assert isinstance(action, Action)
    assert (state.state, state.throttle) == ("throttled", "600/min")
    assert first_wait == 0
    assert second_wait == pytest.approx(30, rel=0.05), "300 tokens at 10 tokens/s"


async def test_snapshot_adds_up_what_was_recorded(short_tmp: Path) -> None:
    async with running_engine(short_tmp / "u.db") as (engine, _):
        engine.register("a")
        engine.register("b")
        await engine.ingest([event("a", "a1", 100), event("a", "a2", 100), event("b", "b1", 50)])
        snap = engine.snapshot()
    rows = {v.agent.name: v for v in snap.agents}
    assert snap.tokens_per_min == 500
    assert rows["a"].tokens_per_min == 400
    assert rows["a"].requests_per_min == 2
    assert rows["b"].period_tokens == 100
    assert sum(snap.burn) == 500


async def test_names_stay_unique_among_live_agents(short_tmp: Path) -> None:
    async with running_engine(short_tmp / "u.db") as (engine, _):
        first = engine.register("coder")
        second = engine.register("coder")
        engine.exited(first.name, 0)
        third = engine.register("coder")
    assert (first.name, second.name, third.name) == ("coder", "coder-2", "coder")


async def test_a_pause_budget_pauses_the_agent_it_refuses_at_once(short_tmp: Path) -> None:
    from tokenwatch.config import BudgetSettings
    from tokenwatch.core.budgets import Budgets

    cap = BudgetSettings(name="cap", scope="agent", target="spender", period="total",
                         limit="1k", action="pause")  # fmt: skip
    published: list[tuple[str, Any]] = []
    async with running_engine(short_tmp / "u.db", budgets=Budgets([cap], tz="UTC")) as (
        engine,
        store,
    ):
        engine.add_listener(lambda kind, obj: published.append((kind, obj)))
        engine.register("spender")
        refused = await engine.admit(call("spender", 800))  # worst case 1,600 > 1,000
        # No call settles after this one: the refusal alone must stop the agent.
        with anyio.fail_after(30):
            while not any(kind == "action" for kind, _ in published):
                await anyio.sleep(0.01)
        actions = await store.list_actions(agent="spender")
    assert not refused.allowed
    assert refused.budget == "cap"
    assert [(a.kind, a.who) for a in actions] == [("pause", "budget:cap")]


def test_each_rows_gauge_is_the_agents_own_fullest_budget_never_the_global_one() -> None:
    from tokenwatch.core.models import AgentView, BudgetStatus
    from tokenwatch.engine.figures import LiveFigures

    budgets = [
        BudgetStatus("global:*:day", "global", "*", "day", 10.0, "usd", 9.0, "alert"),
        BudgetStatus("agent:coder:day", "agent", "coder", "day", 1000, "tokens", 200, "pause"),
        BudgetStatus("agent:coder:hour", "agent", "coder", "hour", 100, "tokens", 50, "pause"),
    ]
    views = [AgentView(agent=Agent(name)) for name in ("coder", "writer")]
    snap = LiveFigures(tz="UTC", clock=lambda: 1_767_000_000.0).snapshot(views, budgets)
    gauges = {v.agent.name: v.budget_fraction for v in snap.agents}
    assert gauges == {"coder": 0.5, "writer": None}
    assert snap.daily_budget_usd == 10.0  # the global one is the summary bar's

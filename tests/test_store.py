"""The ledger: round trips, dedup, batching, window/period/group queries, supervisor tables."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio
import pytest

from tokenwatch.core.errors import StoreUnavailable
from tokenwatch.core.models import Action, Agent, AgentState, Alert, UsageEvent
from tokenwatch.ledger.store import Store

# A fixed "now": 2026-03-10 14:30:20 UTC (a Tuesday), so periods and windows are hand-computable.
NOW = dt.datetime(2026, 3, 10, 14, 30, 20, tzinfo=dt.UTC).timestamp()


def ev(ts: float, **kw: object) -> UsageEvent:
    base: dict[str, object] = {"agent": "a", "model": "gpt-4o", "provider": "openai"}
    base.update(kw)
    return UsageEvent(ts=ts, **base)  # type: ignore[arg-type]


@pytest.fixture(params=[False, True], ids=["thread", "process"])
async def store(tokenwatch_home: Path, request: pytest.FixtureRequest) -> Store:
    """The ledger, written by its thread or by its writer process (what the supervisor uses)."""
    s = await Store.open(
        tokenwatch_home / "ledger.db", clock=lambda: NOW, writer_process=request.param
    )
    yield s  # type: ignore[misc]
    await s.aclose()


async def test_round_trip_keeps_every_field(store: Store) -> None:
    original = UsageEvent(
        ts=NOW - 5,
        agent="researcher",
        run_id="r1",
        pid=4242,
        session="s",
        user="ana",
        task="t-1",
        step="plan",
        tool="search",
        provider="anthropic",
        model="claude-sonnet-4-5",
        endpoint="/v1/messages",
        input_tokens=1200,
        output_tokens=300,
        cache_read_tokens=1000,
        cache_write_tokens=100,
        reasoning_tokens=50,
        cost_usd=0.0123,
        price_version="2026-11-01",
        latency_ms=812.5,
        ttft_ms=120.0,
        wait_ms=3.5,
        status="error",
        http_status=529,
        prompt_hash="abc",
        source="proxy",
        estimated=True,
        call_id="call-1",
        prompt_shape="shape",
        requested_model="claude-opus-4-1",
        lever="switch+trim",
        saved_tokens=900,
        saved_usd=0.02,
        response_id="msg_1",
        turn_hash="turn",
        turn_shape="turn-shape",
        tool_hash="tool",
        tool_call='search_files(pattern="payment*.yaml")',
        answer_hash="answer",
        overlap=2,
        price_source="genai-prices",
    )
    defaults = UsageEvent(ts=original.ts)
    unset = [f for f in UsageEvent.field_names() if getattr(original, f) == getattr(defaults, f)]
    assert unset == ["ts"], f"give these fields a value so the round trip covers them: {unset}"
    assert await store.append(original) is True
    [stored] = await store.history()
    assert stored.event == original
    [again] = [e async for e in store.iter_events()]
    assert again == original


async def test_same_call_id_is_stored_once(store: Store) -> None:
    assert await store.append(ev(NOW - 1, call_id="x", input_tokens=10)) is True
    assert await store.append(ev(NOW - 1, call_id="x", input_tokens=10)) is False
    # Within one batch too: the first wins, and events without call_id are never deduplicated.
    added = await store.append_many(
        [ev(NOW, call_id="y"), ev(NOW, call_id="y"), ev(NOW), ev(NOW), ev(NOW, call_id="x")]
    )
    assert added == 3
    totals = await store.totals(0)
    assert totals.requests == 4
    assert totals.input_tokens == 10
    assert store.statistics().duplicates == 3


async def test_a_batch_of_any_size_is_stored_whole_and_in_order(store: Store) -> None:
    # 300 rows go in as statements of 256, 32, 8 and 4 rows; two repeat a call id of the batch.
    events = [ev(NOW - 300 + i, call_id=f"k{i}", input_tokens=i) for i in range(298)]
    events += [ev(NOW, call_id="k7"), ev(NOW, call_id="k200")]
    assert await store.append_many(events) == 298
    stored = await store.history(limit=1000)
    assert [s.event.input_tokens for s in reversed(stored)] == list(range(298))
    assert (await store.totals(0)).input_tokens == sum(range(298))


async def test_queued_events_are_committed_by_flush_and_by_close(tokenwatch_home: Path) -> None:
    path = tokenwatch_home / "l.db"
    store = await Store.open(path, flush_interval=30.0, batch_size=10_000)
    for i in range(25):
        store.append_nowait(ev(NOW - i))
    await store.flush()
    assert (await store.totals(0)).requests == 25
    for i in range(7):
        store.append_nowait(ev(NOW - i))
    await store.aclose()
    # A plain sqlite3 reader (another process's view) sees all 32.
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 32


async def test_batches_group_many_events_per_transaction(store: Store) -> None:
    for i in range(5000):
        store.append_nowait(ev(NOW - i % 600, input_tokens=1))
    await store.flush()
    stats = store.statistics()
    assert stats.committed == 5000
    assert stats.batches < 50  # thousands of rows per commit, not one each
    assert stats.pending == 0


async def test_totals_sum_exactly_the_window(store: Store) -> None:
    # Events straddling hour and minute boundaries, so every rollup piece is exercised.
    events = [
        ev(NOW - 3 * 3600 - 7, input_tokens=1, output_tokens=1, cost_usd=1.0, task="old"),
        ev(NOW - 3 * 3600 + 7, input_tokens=10, output_tokens=2, cost_usd=0.5, task="t1"),
        ev(
            NOW - 1800,
            input_tokens=100,
            output_tokens=20,
            cache_read_tokens=40,
            task="t1",
            cost_usd=0.25,
        ),
        ev(
            NOW - 61,
            input_tokens=1000,
            output_tokens=200,
            reasoning_tokens=50,
            cost_usd=0.5,
            price_source="estimated:claude-opus-4-5",
            model="mystery",
            task="t2",
        ),
        ev(NOW - 1, input_tokens=5, output_tokens=5, status="error", cost_usd=0.0, task=""),
        ev(NOW, input_tokens=3, output_tokens=3, status="denied", cost_usd=0.0, estimated=True),
    ]
    await store.append_many(events)
    totals = await store.totals(NOW - 3 * 3600, NOW + 1)
    assert totals.requests == 5
    assert totals.input_tokens == 10 + 100 + 1000 + 5 + 3
    assert totals.output_tokens == 2 + 20 + 200 + 5 + 3
    assert totals.cache_read_tokens == 40
    assert totals.reasoning_tokens == 50
    assert totals.cost_usd == pytest.approx(1.25)
    assert totals.unpriced_requests == 1  # the model no table knows, counted at the fallback
    assert totals.estimated_usd == pytest.approx(0.5)
    assert (totals.errors, totals.denied, totals.estimated_requests) == (1, 1, 1)
    assert totals.tasks == 2
    assert totals.total_tokens == 1118 + 230
    assert totals.cost_per_task == pytest.approx(0.625)
    # Half-open: an event exactly at `until` is outside.
    assert (await store.totals(NOW - 3 * 3600, NOW)).requests == 4
    assert (await store.totals(0)).requests == 6
    assert (await store.totals(0, agent="nobody")).requests == 0


async def test_window_rates_over_rolling_windows(store: Store) -> None:
    await store.append_many(
        [
            ev(NOW - 30, input_tokens=600, output_tokens=0, cost_usd=0.01),
            ev(NOW - 59.5, input_tokens=0, output_tokens=600, cost_usd=0.02),
            ev(NOW - 90, input_tokens=6000, cost_usd=1.0),
            ev(NOW - 7200, input_tokens=60_000, cost_usd=3.0),
        ]
    )
    minute = await store.window_rates(60)
    assert minute.tokens_per_min == pytest.approx(1200)
    assert minute.requests_per_min == pytest.approx(2)
    assert minute.usd_per_hour == pytest.approx(0.03 * 60)
    hour = await store.window_rates(3600)
    assert hour.tokens_per_min == pytest.approx(7200 / 60)
    assert hour.usd_per_hour == pytest.approx(1.03)
    day = await store.window_rates(86400)
    assert day.totals.requests == 4


async def test_period_totals_follow_the_calendar_in_the_given_zone(store: Store) -> None:
    paris = ZoneInfo("Europe/Paris")  # 14:30 UTC on 2026-03-10 is 15:30 in Paris (UTC+1)
    day_start_paris = dt.datetime(2026, 3, 10, tzinfo=paris).timestamp()
    await store.append_many(
        [
            ev(day_start_paris - 1, input_tokens=1),  # yesterday in Paris
            ev(day_start_paris + 1, input_tokens=10),
            ev(dt.datetime(2026, 3, 9, 9, tzinfo=paris).timestamp(), input_tokens=100),  # Monday
            ev(dt.datetime(2026, 3, 1, 9, tzinfo=paris).timestamp(), input_tokens=1000),
            ev(dt.datetime(2026, 2, 28, 9, tzinfo=paris).timestamp(), input_tokens=10_000),
            ev(NOW - 10, input_tokens=100_000),
        ]
    )
    day = await store.period_totals("day", paris)
    assert day.input_tokens == 10 + 100_000
    week = await store.period_totals("week", paris)
    assert week.input_tokens == 1 + 10 + 100 + 100_000
    month = await store.period_totals("month", paris)
    assert month.input_tokens == 1 + 10 + 100 + 1000 + 100_000
    hour = await store.period_totals("hour", paris)
    assert hour.input_tokens == 100_000
    assert (await store.period_totals("total", paris)).input_tokens == 111_111
    with pytest.raises(ValueError, match="calendar period"):
        await store.period_totals("fortnight", paris)


async def test_aggregate_groups_sorts_and_cuts_top(store: Store) -> None:
    await store.append_many(
        [
            ev(NOW - 100, agent="cheap", input_tokens=10, cost_usd=0.01, task="a"),
            ev(NOW - 200, agent="dear", input_tokens=10, cost_usd=2.0, task="b"),
            ev(NOW - 300, agent="dear", input_tokens=10, cost_usd=1.0, task="c"),
            ev(NOW - 400, agent="mid", input_tokens=10, cost_usd=0.5, model="gpt-4o-mini"),
            ev(NOW - 90_000, agent="ancient", cost_usd=99.0),
        ]
    )
    groups = await store.aggregate("agent", NOW - 86400)
    assert [(g.key, g.requests, round(g.cost_usd, 2), g.tasks) for g in groups] == [
        ("dear", 2, 3.0, 2),
        ("mid", 1, 0.5, 0),
        ("cheap", 1, 0.01, 1),
    ]
    top = await store.aggregate("agent", NOW - 86400, top=1)
    assert [g.key for g in top] == ["dear"]
    models = await store.aggregate("model", NOW - 86400, agent="mid")
    assert [(g.key, g.requests) for g in models] == [("gpt-4o-mini", 1)]
    globbed = await store.aggregate("agent", NOW - 86400, agent="*ea*")
    assert {g.key for g in globbed} == {"dear", "cheap"}
    with pytest.raises(ValueError, match="group by"):
        await store.aggregate("colour", 0)
    with pytest.raises(ValueError, match="filter on"):
        await store.totals(0, colour="red")


async def test_aggregate_by_day_uses_local_dates(store: Store) -> None:
    tokyo = ZoneInfo("Asia/Tokyo")  # UTC+9: 2026-03-10 14:30 UTC is 23:30 on the 10th
    await store.append_many(
        [
            ev(NOW - 10, input_tokens=1),
            ev(NOW + 3600, input_tokens=2),  # 00:30 on the 11th in Tokyo
            ev(NOW - 86400, input_tokens=4),
        ]
    )
    days = await store.aggregate("day", NOW - 2 * 86400, tz=tokyo)
    # Days stop at now: an event stamped later (a skewed clock) counts in today's row.
    assert [(d.key, d.input_tokens) for d in days] == [
        ("2026-03-09", 4),
        ("2026-03-10", 3),
    ]


async def test_by_day_over_years_sums_every_day(store: Store) -> None:
    # More days than SQLite unions in one query (500) each get their row.
    await store.append_many([ev(NOW - d * 86400 - 60, input_tokens=d) for d in range(800)])
    days = await store.aggregate("day", NOW - 800 * 86400, tz=dt.UTC)
    assert len(days) == 800
    assert [d.input_tokens for d in days] == list(range(799, -1, -1))
    total = await store.totals(NOW - 800 * 86400)
    assert sum(d.input_tokens for d in days) == total.input_tokens


async def test_far_future_event_counts_today_without_a_window_per_day(store: Store) -> None:
    year_9999 = dt.datetime(9999, 6, 1, tzinfo=dt.UTC).timestamp()
    await store.append_many([ev(NOW - 60, input_tokens=1), ev(year_9999, input_tokens=2)])
    with anyio.fail_after(5):  # a window per day up to 9999 takes minutes
        days = await store.aggregate("day", NOW - 3600, tz=dt.UTC)
    assert [(d.key, d.input_tokens) for d in days] == [("2026-03-10", 3)]
    bounded = await store.aggregate("day", NOW - 3600, NOW, tz=dt.UTC)
    assert [(d.key, d.input_tokens) for d in bounded] == [("2026-03-10", 1)]


async def test_history_pages_newest_first(store: Store) -> None:
    await store.append_many(
        [ev(NOW - i, agent="a" if i % 2 else "b", step=str(i)) for i in range(7)]
    )
    first = await store.history(limit=3)
    assert [s.event.step for s in first] == ["6", "5", "4"]
    second = await store.history(limit=3, before_id=first[-1].id)
    assert [s.event.step for s in second] == ["3", "2", "1"]
    only_a = await store.history(agent="a")
    assert [s.event.step for s in only_a] == ["5", "3", "1"]


async def test_iter_events_oldest_first_across_pages(store: Store) -> None:
    await store.append_many([ev(NOW - (i * 7) % 50, step=str(i)) for i in range(50)])
    seen = [e.ts async for e in store.iter_events(batch=7)]
    assert len(seen) == 50
    assert seen == sorted(seen)
    window = [e async for e in store.iter_events(since=NOW - 10, until=NOW - 5, batch=2)]
    assert sorted(e.ts for e in window) == [NOW - s for s in range(10, 5, -1)]


async def test_agents_alerts_and_actions(store: Store) -> None:
    agent = Agent(name="coder", pid=123, command=["python", "x.py"], tags={"team": "ml"})
    await store.save_agent(agent)
    agent.state = AgentState.PAUSED.value
    await store.save_agent(agent)
    await store.save_agent(Agent(name="alpha"))
    assert [a.name for a in await store.load_agents()] == ["alpha", "coder"]
    assert (await store.load_agents())[1] == agent
    await store.forget_agent("alpha")
    assert [a.name for a in await store.load_agents()] == ["coder"]

    first = await store.add_alert(Alert(rule="runaway", agent="coder", message="m1", ts=NOW - 5))
    second = await store.add_alert(Alert(rule="spike", agent="coder", message="m2", ts=NOW))
    alerts = await store.list_alerts()
    assert [(a.id, a.message) for a in alerts] == [(second, "m2"), (first, "m1")]
    assert await store.ack_alerts([first]) == 1
    assert await store.ack_alerts([first]) == 0
    assert await store.ack_alerts() == 1
    assert all(a.acknowledged for a in await store.list_alerts())
    assert [a.id for a in await store.list_alerts(since=NOW - 1)] == [second]

    await store.add_action(Action(kind="pause", agent="coder", who="key", why="p", ts=NOW - 3))
    await store.add_action(Action(kind="kill", agent="other", who="rule:x", ok=False, ts=NOW))
    actions = await store.list_actions()
    assert [(a.kind, a.ok) for a in actions] == [("kill", False), ("pause", True)]
    assert [a.kind for a in await store.list_actions(agent="coder")] == ["pause"]


async def test_wrongly_typed_event_is_rejected_alone(store: Store) -> None:
    bad = ev(NOW, input_tokens=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_tokens"):
        await store.append(bad)
    store.append_nowait(ev(NOW, input_tokens={"x": 1}))  # type: ignore[arg-type]
    store.append_nowait(ev(NOW, input_tokens=7))
    await store.flush()
    assert (await store.totals(0)).input_tokens == 7
    assert store.statistics().rejected == 2


async def test_counts_that_overflow_the_sums_are_set_aside_and_the_next_batch_is_stored(
    store: Store,
) -> None:
    # Two calls of 2**62 tokens in one minute sum past 64 bits; the capture paths refuse such
    # counts, so this is the ledger's own guard. The first batch of a connection also made the
    # temporary rollup table, which its rollback took away: every later batch failed on it.
    huge = [ev(NOW, call_id=f"huge-{i}", input_tokens=2**62) for i in range(2)]
    with pytest.raises(ValueError, match="'input_tokens' is 4,611,686,018,427,387,904, over"):
        await store.append_many([*huge, ev(NOW, call_id="fine", input_tokens=5)])
    assert await store.append(ev(NOW, call_id="next", input_tokens=7))
    totals = await store.totals(0)
    assert (totals.requests, totals.input_tokens) == (2, 12)
    assert store.statistics().rejected == 2


async def test_unwritable_location_raises_store_unavailable(tokenwatch_home: Path) -> None:
    blocker = tokenwatch_home / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailable, match=str(blocker)):
        await Store.open(blocker / "sub" / "l.db")
    garbage = tokenwatch_home / "garbage.db"
    garbage.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreUnavailable, match="not a tokenwatch ledger"):
        await Store.open(garbage)


async def test_append_is_visible_to_other_connections_on_return(store: Store) -> None:
    for i in range(20):
        assert await store.append(ev(NOW, call_id=f"v{i}"))
        with sqlite3.connect(store.path) as other:
            count = other.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        assert count == i + 1


async def test_a_long_reader_never_blocks_the_writer(store: Store) -> None:
    await store.append(ev(NOW - 10, input_tokens=1))
    reader = sqlite3.connect(store.path, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT SUM(input_tokens) FROM events").fetchone()[0] == 1
    with anyio.fail_after(30):
        assert await store.append(ev(NOW, input_tokens=10))
    # The reader keeps its snapshot; the store's own reads see the new row.
    assert reader.execute("SELECT SUM(input_tokens) FROM events").fetchone()[0] == 1
    assert (await store.totals(0)).input_tokens == 11
    reader.execute("COMMIT")
    reader.close()


async def test_concurrent_appenders_share_commits(store: Store) -> None:
    results: list[bool] = []

    async def caller(k: int) -> None:
        for j in range(20):
            results.append(await store.append(ev(NOW - j, agent=f"a{k}", call_id=f"{k}-{j % 10}")))

    async with anyio.create_task_group() as tg:
        for k in range(25):
            tg.start_soon(caller, k)
    assert results.count(True) == 25 * 10  # the second half repeat call_ids
    assert results.count(False) == 25 * 10
    assert (await store.totals(0)).requests == 250
    assert store.statistics().batches < 250  # callers were grouped into shared commits


def test_store_can_be_used_from_a_later_event_loop(tokenwatch_home: Path) -> None:
    # A command may open the ledger in one anyio.run and use or close it in another.
    store = anyio.run(Store.open, tokenwatch_home / "loops.db")

    async def use() -> bool:
        with anyio.fail_after(30):
            return await store.append(ev(NOW, call_id="later"))

    assert anyio.run(use) is True
    anyio.run(store.aclose)
    with sqlite3.connect(tokenwatch_home / "loops.db") as db:
        assert db.execute("SELECT call_id FROM events").fetchall() == [("later",)]


async def test_two_writers_on_one_file_both_land(tokenwatch_home: Path) -> None:
    # Like `tokenwatch import` running while the supervisor writes: two write connections.
    path = tokenwatch_home / "shared.db"
    async with await Store.open(path) as first, await Store.open(path) as second:

        async def fill(store: Store, name: str) -> None:
            for i in range(100):
                await store.append(ev(NOW - i, agent=name, call_id=f"{name}-{i % 50}"))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(fill, first, "one")
                tg.start_soon(fill, second, "two")
        groups = await first.aggregate("agent", 0)
        assert [(g.key, g.requests) for g in sorted(groups, key=lambda g: g.key)] == [
            ("one", 50),
            ("two", 50),
        ]
        # Each sees the other's rows, and the rollups agree with the raw rows.
        assert (await second.totals(0)).requests == 100
        assert (await second.totals(NOW - 30, NOW + 1)).requests == 62


async def test_the_same_provider_answer_is_stored_once_whichever_path_saw_it(store: Store) -> None:
    # the proxy's call (its own call id) and the session log's (another) name one answer
    assert await store.append(ev(NOW, call_id="proxy-1", response_id="msg_1")) is True
    assert (
        await store.append(ev(NOW, call_id="claude-code:msg_1:req_1", response_id="msg_1")) is False
    )
    assert await store.stored_ids(["msg_1", "proxy-1", "other"]) == {"msg_1", "proxy-1"}
    assert (await store.totals(0)).requests == 1

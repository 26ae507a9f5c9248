"""The SDK's link to the supervisor: report(), tasks, totals, buffering, reconnects, restarts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import tokenwatch
from tests.client_fixtures import event_keys, installed_reporter, running_supervisor
from tokenwatch.client import tracking
from tokenwatch.client.reporter import Identity, LinkState, script_name


@pytest.fixture(autouse=True)
def fresh_totals() -> Iterator[None]:
    tracking.reset_usage()
    yield
    tracking.reset_usage()


def sock(short_tmp: Path) -> Path:
    return short_tmp / "sup.sock"


async def test_report_says_hello_then_delivers_the_event(short_tmp: Path) -> None:
    async with running_supervisor(sock(short_tmp)) as sup:
        with installed_reporter(sock(short_tmp), name="researcher") as rep:
            sent = tokenwatch.report(
                model="claude-x",
                provider="anthropic",
                input_tokens=1200,
                output_tokens=300,
                cache_read_tokens=1000,
            )
            await sup.wait_until(lambda: len(sup.events()) == 1)
            await anyio.to_thread.run_sync(rep.wait_flushed, 30.0)
            assert rep.statistics().pending == 0
    hello = sup.messages[0]
    assert hello["type"] == "hello"
    assert hello["name"] == "researcher"
    (event,) = sup.events()
    assert event["model"] == "claude-x"
    assert event["provider"] == "anthropic"
    assert (event["input_tokens"], event["output_tokens"], event["cache_read_tokens"]) == (
        1200,
        300,
        1000,
    )
    assert event["agent"] == "researcher"
    assert event["source"] == "sdk"
    assert event["call_id"] == sent.call_id


async def test_report_rejects_inconsistent_cache_counts_before_counting() -> None:
    with pytest.raises(ValueError, match="must include cache reads"):
        tokenwatch.report(model="m", input_tokens=10, output_tokens=1, cache_read_tokens=20)
    assert tokenwatch.usage().requests == 0


@pytest.mark.parametrize("field", ["input_tokens", "output_tokens", "reasoning_tokens"])
async def test_report_refuses_more_tokens_than_one_call_can_use(field: str) -> None:
    counts = {"input_tokens": 10, "output_tokens": 10, field: 2**62}
    with pytest.raises(
        ValueError, match=f"'{field}' is 4,611,686,018,427,387,904, over 100,000,000"
    ):
        tokenwatch.report(model="gpt-4o-mini", **counts)
    assert tokenwatch.usage().requests == 0


async def test_task_attribution_and_start_end_messages(short_tmp: Path) -> None:
    async with running_supervisor(sock(short_tmp)) as sup:
        with installed_reporter(sock(short_tmp)):
            tokenwatch.report(model="m", input_tokens=1, output_tokens=1)
            with tokenwatch.task("t-42"):
                tokenwatch.report(model="m", input_tokens=2, output_tokens=2)
                with tokenwatch.task("t-43"):
                    tokenwatch.report(model="m", input_tokens=3, output_tokens=3)
                tokenwatch.report(model="m", input_tokens=4, output_tokens=4)
            await sup.wait_until(lambda: len(sup.of_type("task")) == 4 and len(sup.events()) == 4)
    tasks = [(m["name"], m["state"]) for m in sup.of_type("task")]
    assert tasks == [("t-42", "start"), ("t-43", "start"), ("t-43", "end"), ("t-42", "end")]
    assert [e["task"] for e in sup.events()] == ["", "t-42", "t-43", "t-42"]
    assert tokenwatch.usage("t-42").input_tokens == 6
    assert tokenwatch.usage("t-43").requests == 1


async def test_concurrent_async_tasks_keep_their_own_task(short_tmp: Path) -> None:
    async def work(name: str, started: asyncio.Event, other: asyncio.Event) -> None:
        async with tokenwatch.task(name):
            started.set()
            await other.wait()  # both tasks are inside their `task()` at the same time
            tokenwatch.report(model=name, input_tokens=1, output_tokens=1)

    async with running_supervisor(sock(short_tmp)) as sup:
        with installed_reporter(sock(short_tmp)):
            a, b = asyncio.Event(), asyncio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(work, "alpha", a, b)
                tg.start_soon(work, "beta", b, a)
            await sup.wait_until(lambda: len(sup.events()) == 2)
    assert {e["model"]: e["task"] for e in sup.events()} == {"alpha": "alpha", "beta": "beta"}
    assert tracking.current_task() == ""


async def test_usage_totals_split_cost(monkeypatch: pytest.MonkeyPatch, short_tmp: Path) -> None:
    rates = {"model-a": tracking.Rates(input=2.0, output=8.0, cache_read=0.5, cache_write=2.5)}
    monkeypatch.setattr(tracking, "rates_for", rates.get)
    with installed_reporter(short_tmp / "absent.sock"):
        tokenwatch.report(
            model="model-a",
            input_tokens=1_000_000,
            output_tokens=500_000,
            cache_read_tokens=400_000,
            cache_write_tokens=100_000,
            reasoning_tokens=1000,
        )
        tokenwatch.report(model="model-b", input_tokens=10, output_tokens=5, status="error")
    totals = tokenwatch.usage()
    assert totals.requests == 2
    assert totals.errors == 1
    assert totals.unpriced_requests == 1
    assert totals.total_tokens == 1_000_000 + 500_000 + 15
    assert totals.reasoning_tokens == 1000
    # 500k uncached x $2 + 100k writes x $2.5; 400k reads x $0.5; 500k out x $8 (per million)
    assert totals.input_cost_usd == pytest.approx(1.0 + 0.25)
    assert totals.cached_cost_usd == pytest.approx(0.2)
    assert totals.output_cost_usd == pytest.approx(4.0)
    assert totals.cost_usd == pytest.approx(5.45)
    assert totals.models == {"model-a": 1, "model-b": 1}


async def test_each_call_logged_at_info(caplog: pytest.LogCaptureFixture, short_tmp: Path) -> None:
    caplog.set_level(logging.INFO, logger="tokenwatch")
    with installed_reporter(short_tmp / "absent.sock"), tokenwatch.task("t-7"):
        tokenwatch.report(model="gpt-x", input_tokens=120, output_tokens=45, provider="p")
    (line,) = [r.getMessage() for r in caplog.records if "gpt-x" in r.getMessage()]
    assert "120 in" in line
    assert "45 out" in line
    assert "t-7" in line


async def test_absent_supervisor_bounded_buffer_then_dropped_count_reported(
    short_tmp: Path,
) -> None:
    path = sock(short_tmp)
    with installed_reporter(path, max_buffer=50, heartbeat_s=0.2) as rep:
        sent = [tokenwatch.report(model="m", input_tokens=i, output_tokens=0) for i in range(80)]
        with anyio.fail_after(30):
            while rep.state is not LinkState.DOWN:
                await anyio.sleep(0.01)
        stats = rep.statistics()
        assert stats.pending == 50
        assert stats.dropped == 30
        async with running_supervisor(path) as sup:
            await sup.wait_until(lambda: len(sup.events()) == 50)
            await sup.wait_until(lambda: any(m.get("dropped") for m in sup.of_type("heartbeat")))
    assert event_keys(sup.events()) == [e.call_id for e in sent[30:]]
    reported = [m["dropped"] for m in sup.of_type("heartbeat") if m.get("dropped")]
    # Repeated until the supervisor acks it; never more than what was dropped.
    assert set(reported) == {30}


async def test_supervisor_restart_delivers_unacked_events_exactly_once(short_tmp: Path) -> None:
    path = sock(short_tmp)
    with installed_reporter(path) as rep:
        async with running_supervisor(path) as first:
            acked = [
                tokenwatch.report(model="m", input_tokens=1, output_tokens=1) for _ in range(5)
            ]
            await first.wait_until(lambda: len(first.events()) == 5)
            await anyio.to_thread.run_sync(rep.wait_flushed, 30.0)
            first.ack = False  # the supervisor now receives but dies before storing
            unacked = [
                tokenwatch.report(model="m", input_tokens=2, output_tokens=2) for _ in range(5)
            ]
            await first.wait_until(lambda: len(first.events()) == 10)
        while_down = [
            tokenwatch.report(model="m", input_tokens=3, output_tokens=3) for _ in range(5)
        ]
        async with running_supervisor(path) as second:
            await second.wait_until(lambda: len(second.events()) == 10)
            await anyio.to_thread.run_sync(rep.wait_flushed, 30.0)
            assert rep.statistics().pending == 0
    assert event_keys(first.events()) == [e.call_id for e in acked + unacked]
    assert sorted(event_keys(second.events())) == sorted(e.call_id for e in unacked + while_down)
    assert second.of_type("hello"), "the reporter says hello again after reconnecting"


async def test_store_unavailable_reply_is_retried(short_tmp: Path) -> None:
    path = sock(short_tmp)
    async with running_supervisor(path) as sup:
        refusals: list[Any] = []

        original = sup._answer

        async def flaky(stream: Any, msg: dict[str, Any]) -> None:
            if msg["type"] == "usage" and not refusals:
                refusals.append(msg["id"])
                sup.messages.append(msg)
                from tokenwatch.core import protocol

                await stream.send(
                    protocol.dumps(protocol.reply_error(msg["id"], "store_unavailable", "disk"))
                )
                return
            await original(stream, msg)

        sup._answer = flaky  # type: ignore[method-assign]
        with installed_reporter(path) as rep:
            event = tokenwatch.report(model="m", input_tokens=1, output_tokens=1)
            await sup.wait_until(lambda: len(sup.events()) == 2)
            await anyio.to_thread.run_sync(rep.wait_flushed, 30.0)
            assert rep.statistics().pending == 0
    assert event_keys(sup.events()) == [event.call_id, event.call_id]


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["/home/me/agents/researcher.py", "--fast"], "researcher"),
        (["/venv/lib/python3.11/site-packages/swe_agent/__main__.py"], "swe_agent"),
        (["-c"], "python"),
        ([], "python"),
    ],
)
def test_default_agent_name_is_recognisable(argv: list[str], name: str) -> None:
    assert script_name(argv) == name


def test_identity_comes_from_the_environment() -> None:
    ident = Identity.from_env(
        {"TOKENWATCH_AGENT": "coder", "TOKENWATCH_RUN_ID": "r-9", "TOKENWATCH_TASK": "t-1"}
    )
    assert (ident.name, ident.run_id, ident.task) == ("coder", "r-9", "t-1")


async def test_many_threads_reporting_lose_nothing(short_tmp: Path) -> None:
    path = sock(short_tmp)

    def burst(n: int) -> list[str]:
        return [
            tokenwatch.report(model="m", input_tokens=1, output_tokens=1).call_id for _ in range(n)
        ]

    async with running_supervisor(path) as sup:
        with installed_reporter(path) as rep:
            sent: list[list[str]] = []

            async def worker() -> None:
                sent.append(await anyio.to_thread.run_sync(burst, 300))

            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(worker)
            await sup.wait_until(lambda: len(sup.events()) == 2400)
            await anyio.to_thread.run_sync(rep.wait_flushed, 30.0)
    assert sorted(event_keys(sup.events())) == sorted(c for ids in sent for c in ids)
    assert tokenwatch.usage().requests == 2400


def report_in_forked_child(path: str) -> None:
    tokenwatch.report(model="from-child", input_tokens=1, output_tokens=1)


async def test_forked_child_reports_on_its_own_connection(short_tmp: Path) -> None:
    import multiprocessing

    path = sock(short_tmp)
    async with running_supervisor(path) as sup:
        with installed_reporter(path):
            tokenwatch.report(model="from-parent", input_tokens=1, output_tokens=1)
            await sup.wait_until(lambda: len(sup.events()) == 1)
            ctx = multiprocessing.get_context("fork")
            child = ctx.Process(target=report_in_forked_child, args=(str(path),))
            child.start()
            await anyio.to_thread.run_sync(child.join, 30)
            assert child.exitcode == 0
            await sup.wait_until(lambda: len(sup.events()) == 2)
    by_model = {e["model"]: e["pid"] for e in sup.events()}
    assert by_model["from-child"] == child.pid
    assert by_model["from-parent"] != child.pid
    assert len(sup.of_type("hello")) == 2


async def test_usage_cost_matches_the_ledgers_pricing(short_tmp: Path) -> None:
    from tokenwatch.core.pricing import PriceTable

    with installed_reporter(short_tmp / "absent.sock"):
        event = tokenwatch.report(
            model="gpt-4o-mini",
            provider="openai",
            input_tokens=3000,
            output_tokens=700,
            cache_read_tokens=1024,
            reasoning_tokens=0,
        )
    expected = PriceTable.load().cost(event)
    assert expected is not None
    assert tokenwatch.usage().cost_usd == pytest.approx(expected)
    assert tokenwatch.usage().cached_cost_usd > 0

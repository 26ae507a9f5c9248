"""The SDK against the real supervisor: usage stored once, tasks attributed, a deny budget obeyed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import openai
import pytest

import tokenwatch
from tests.client_fixtures import installed_reporter
from tests.supervisor_fixtures import running_supervisor, stored
from tokenwatch.client import tracking
from tokenwatch.client.control import SupervisorClient
from tokenwatch.config import BudgetSettings, Config, ProxySettings
from tokenwatch.demo.fake_llm import FakeLLM, running_fake_llm
from tokenwatch.paths import Paths

MESSAGES = [{"role": "user", "content": "Summarise the plot of Hamlet in one line."}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    async with running_fake_llm() as server:
        yield server


@pytest.fixture(autouse=True)
def sdk() -> Iterator[None]:
    tracking.reset_usage()
    tokenwatch.instrument()
    yield
    tokenwatch.uninstrument()


@pytest.mark.slow
async def test_usage_reaches_the_ledger_once_with_its_task(fake: FakeLLM) -> None:
    async with running_supervisor(Paths.discover(), Config(), proxy=False, exporters=False) as sup:
        with installed_reporter(Path(sup.paths.socket), name="e2e-agent") as rep:
            async with openai.AsyncOpenAI(
                base_url=fake.url + "/v1", api_key="sk-test", max_retries=0
            ) as client:
                async with tokenwatch.task("t-42"):
                    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            await anyio.to_thread.run_sync(rep.wait_flushed, 30.0)
            events = await stored(sup, "e2e-agent", 2)
    assert [e.task for e in events] == ["t-42", ""]
    assert [(e.input_tokens, e.output_tokens) for e in events] == [
        (c.input_tokens, c.output_tokens) for c in fake.calls
    ]
    assert all(e.source == "sdk" for e in events)


@pytest.mark.slow
async def test_deny_budget_raises_budget_exceeded(fake: FakeLLM) -> None:
    budget = BudgetSettings(
        name="tiny", scope="agent", target="e2e-deny", period="day", limit=5, action="deny"
    )
    async with running_supervisor(
        Paths.discover(), Config(budget=[budget]), proxy=False, exporters=False
    ) as sup:
        with installed_reporter(Path(sup.paths.socket), name="e2e-deny"):
            async with openai.AsyncOpenAI(
                base_url=fake.url + "/v1", api_key="sk-test", max_retries=0
            ) as client:
                with pytest.raises(tokenwatch.BudgetExceeded) as caught:
                    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.budget == "tiny"
    assert fake.calls == []


@pytest.mark.slow
async def test_call_through_the_proxy_is_counted_once(
    fake: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    async def on_request(request: Any) -> None:
        seen.append(request.headers["x-tokenwatch-call-id"])

    config = Config(proxy=ProxySettings(openai_upstream=fake.url + "/v1"))
    async with running_supervisor(Paths.discover(), config, proxy=True, exporters=False) as sup:
        socket = Path(sup.paths.socket)
        async with await SupervisorClient.connect(socket_path=socket, start=False) as ctl:
            registered = await ctl.request("register", name="proxied")
        env = registered["env"]
        monkeypatch.setenv("TOKENWATCH_PROXY_URL", env["TOKENWATCH_PROXY_URL"])
        with installed_reporter(socket, name=registered["name"]) as rep:
            async with openai.AsyncOpenAI(
                base_url=env["OPENAI_BASE_URL"],
                api_key="sk-test",
                max_retries=0,
                http_client=httpx2.AsyncClient(event_hooks={"request": [on_request]}),
            ) as client:
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            tokenwatch.report(model="marker", input_tokens=1, output_tokens=1)
            await anyio.to_thread.run_sync(rep.wait_flushed, 30.0)
            events = await stored(sup, registered["name"], 2)
    calls = [e for e in events if e.model != "marker"]
    assert len(calls) == 1
    assert calls[0].source == "proxy"
    assert [calls[0].call_id] == seen
    assert (calls[0].input_tokens, calls[0].output_tokens) == (
        fake.calls[0].input_tokens,
        fake.calls[0].output_tokens,
    )
    assert tokenwatch.usage().requests == 2, "usage() counts the proxied call too"


@pytest.mark.slow
async def test_throttled_agent_is_told_to_wait(
    fake: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenwatch.client import gate

    waits: list[float] = []

    async def record_wait(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(gate, "sleep_async", record_wait)
    async with running_supervisor(Paths.discover(), Config(), proxy=False, exporters=False) as sup:
        socket = Path(sup.paths.socket)
        with installed_reporter(socket, name="slowpoke") as rep:
            async with openai.AsyncOpenAI(
                base_url=fake.url + "/v1", api_key="sk-test", max_retries=0
            ) as client:
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
                async with await SupervisorClient.connect(socket_path=socket, start=False) as ctl:
                    await ctl.request("throttle", agent="slowpoke", rate="60/min", who="test")
                for _ in range(3):
                    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            await anyio.to_thread.run_sync(rep.wait_flushed, 30.0)
    assert waits, "the supervisor's throttle reached the SDK as a wait before a call"
    assert all(w > 0 for w in waits)
    assert len(fake.calls) == 4, "throttled, not refused"

"""Fifty concurrent SDK calls through the real proxy and supervisor never take a hard budget over."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest
from budget_fixtures import call, event
from supervisor_fixtures import quiet_config, running_supervisor

from tokenwatch.client.control import SupervisorClient
from tokenwatch.config import BudgetSettings, ProxySettings, SupervisorSettings
from tokenwatch.core.admission import Refusal
from tokenwatch.core.request_tokens import CHAT, count_request
from tokenwatch.demo.fake_llm import running_fake_llm
from tokenwatch.demo.fault_load import TOOLS
from tokenwatch.paths import Paths

MAX_TOKENS = 300


def worst_case(i: int, tools: list[Any] | None = None) -> int:
    """What the proxy reserves for call `i` before sending it: its input (prompt and tool
    definitions) plus its max output."""
    body = {"messages": [question(i)], "tools": tools}
    return count_request(CHAT, body, "gpt-4o-mini").tokens + MAX_TOKENS


def question(i: int) -> dict[str, str]:
    return {"role": "user", "content": f"Question {i}: why?"}


def limit(tools: list[Any] | None) -> int:
    """A limit that admits ten of the fifty calls in flight together, not eleven."""
    return worst_case(0, tools) * 10 + worst_case(0, tools) // 2


@pytest.mark.slow
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["prompt", "tools"])
async def test_fifty_concurrent_proxied_calls_stay_within_a_deny_budget(
    tools: list[Any] | None,
) -> None:
    cap = limit(tools)
    assert {worst_case(i, tools) for i in range(50)} == {worst_case(0, tools)}
    # The provider takes a while to answer, so the fifty calls are in flight together even on a
    # loaded machine (answered one by one, their spend could fit the limit and none be refused).
    async with running_fake_llm(latency_ms=1500) as fake:
        # Rules off: fifty near-identical prompts would rightly look like a loop and be paused,
        # holding the remaining calls; this test is about the budget alone.
        config = quiet_config(
            supervisor=SupervisorSettings(timezone="UTC"),
            proxy=ProxySettings(openai_upstream=fake.url + "/v1"),
            budget=[BudgetSettings(scope="agent", target="crowd", limit=cap, action="deny")],
        )
        async with running_supervisor(Paths.discover(), config, exporters=False) as sup:
            async with await SupervisorClient.connect(socket_path=sup.paths.socket) as ctl:
                registered = await ctl.request("register", name="crowd")
            outcomes: list[str] = []
            refusals: list[str] = []
            async with openai.AsyncOpenAI(
                base_url=registered["env"]["OPENAI_BASE_URL"], api_key="sk-test", max_retries=0
            ) as client:

                async def one(i: int) -> None:
                    try:
                        await client.chat.completions.create(
                            model="gpt-4o-mini",
                            messages=[question(i)],  # type: ignore[list-item]
                            max_tokens=MAX_TOKENS,
                            tools=tools or openai.NOT_GIVEN,  # type: ignore[arg-type]
                        )
                        outcomes.append("ok")
                    except openai.RateLimitError as exc:
                        outcomes.append("refused")
                        refusals.append(str(exc))

                async with anyio.create_task_group() as tg:
                    for i in range(50):
                        tg.start_soon(one, i)

            (status,) = [s for s in sup.engine.budgets.statuses() if s.target == "crowd"]  # type: ignore[union-attr]
            assert sup.store is not None
            await sup.store.flush()
            stored = await sup.store.totals(0, agent="crowd")

    assert outcomes.count("ok") == 10
    assert outcomes.count("refused") == 40
    # What the provider reported for the calls that went is what was counted, and within the limit.
    sent = sum(c.input_tokens + c.output_tokens for c in fake.calls)
    assert len(fake.calls) == outcomes.count("ok")
    assert status.used == stored.total_tokens == sent
    assert sent <= cap
    assert "budget agent:crowd:day" in refusals[0]
    assert f"this call may use {worst_case(0, tools)} tokens" in refusals[0]
    assert re.search(r"`tokenwatch budget set agent:crowd [\d.]+k --period day`$", refusals[0])


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        data = fh.read()
    return chr(data[data.rindex(b")") + 2])


async def test_a_pause_budget_stops_a_real_agent_and_it_goes_on_once_raised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tokenwatch.cli import main

    monkeypatch.chdir(tmp_path)  # no project tokenwatch.toml: the user's overlay is edited
    config = quiet_config(  # rules off: the pause must come from the budget
        supervisor=SupervisorSettings(timezone="UTC"),
        budget=[BudgetSettings(scope="agent", target="looper", limit="5k", action="pause")],
    )
    child = await anyio.open_process(["sleep", "600"], start_new_session=True)
    try:
        async with running_supervisor(
            Paths.discover(), config, proxy=False, exporters=False
        ) as sup:
            engine = sup.engine
            assert engine is not None
            engine.register("looper", pid=child.pid)
            await engine.ingest([event(time.time(), "looper", tokens=6000)])
            with anyio.fail_after(30):
                while process_state(child.pid) != "T":
                    await anyio.sleep(0.01)
            # Paused, its calls are held; the budget itself would refuse them too.
            refusal = engine.budgets.reserve(call("looper"), 200, None)
            assert isinstance(refusal, Refusal)

            argv = ["budget", "set", "agent:looper", "50k"]
            assert await anyio.to_thread.run_sync(main, argv) == 0
            await engine.resume("looper", who="test")
            assert process_state(child.pid) in "SR"
            admitted = await engine.admit(call("looper", input_tokens=100, max_output_tokens=100))
            assert admitted.allowed
            (alert,) = await sup.store.list_alerts()  # type: ignore[union-attr]
            assert alert.action == "pause"
            assert alert.message.startswith("looper reached budget agent:looper:day (6k tokens")
    finally:
        child.kill()
        await child.wait()

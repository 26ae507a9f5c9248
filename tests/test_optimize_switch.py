"""The model switch: `tokenwatch route` and a budget-threshold rule change the model fake-llm
receives, the ledger keeps both models, and undo restores the one asked for."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest

from tests.process_fixtures import start_sleeper
from tests.proxy_fixtures import API_KEY
from tests.supervisor_fixtures import running_supervisor, stored
from tokenwatch.client.control import SupervisorClient
from tokenwatch.config import (
    BudgetSettings,
    Config,
    OptimizeSettings,
    ProxySettings,
    SwitchSettings,
)
from tokenwatch.demo.fake_llm import running_fake_llm
from tokenwatch.paths import Paths
from tokenwatch.proxy.switch import STATUS_TTL

MESSAGES = [{"role": "user", "content": "Summarise the plot of Hamlet."}]


async def register(sup: Any, name: str, **fields: Any) -> str:
    async with await SupervisorClient.connect(socket_path=Path(sup.paths.socket), start=False) as c:
        registered = await c.request("register", name=name, **fields)
    return str(registered["env"]["OPENAI_BASE_URL"])


async def ask(url: str, model: str = "gpt-4o") -> None:
    async with openai.AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0) as client:
        await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=50)  # type: ignore[arg-type]


async def tokenwatch(*args: str) -> str:
    done = await anyio.run_process(
        [sys.executable, "-m", "tokenwatch", *args], env=dict(os.environ)
    )
    return done.stdout.decode()


async def test_route_switches_the_model_and_undo_restores_it() -> None:
    async with running_fake_llm() as fake:
        config = Config(proxy=ProxySettings(openai_upstream=fake.url + "/v1"))
        async with running_supervisor(Paths.discover(), config, proxy=True, exporters=False) as sup:
            url = await register(sup, "researcher")
            await ask(url)
            said = await tokenwatch("route", "researcher", "--model", "gpt-4o-mini")
            assert said == (
                "researcher: calls go to gpt-4o-mini (tokenwatch route researcher --undo)\n"
            )
            await ask(url)
            said = await tokenwatch("route", "researcher", "--undo")
            assert said == "researcher: calls go to the models it asks for\n"
            await ask(url)
            events = await stored(sup, "researcher", 3)
            alerts = await sup.engine.alerts() if sup.engine else []
    assert [c.model for c in fake.calls] == ["gpt-4o", "gpt-4o-mini", "gpt-4o"]
    assert [(e.requested_model, e.model, e.lever) for e in events] == [
        ("", "gpt-4o", ""),
        ("gpt-4o", "gpt-4o-mini", "switch"),
        ("", "gpt-4o", ""),
    ]
    assert events[1].saved_usd is not None
    assert events[1].saved_usd > 0  # gpt-4o-mini is the cheaper of the two
    assert any("now go to gpt-4o-mini (cli)" in a.message for a in alerts)


@pytest.mark.slow
async def test_a_switch_survives_a_supervisor_restart() -> None:
    sleeper = start_sleeper()  # the agent: it outlives the first supervisor
    try:
        async with running_fake_llm() as fake:
            config = Config(proxy=ProxySettings(openai_upstream=fake.url + "/v1"))
            paths = Paths.discover()
            async with running_supervisor(paths, config, proxy=True, exporters=False) as first:
                url = await register(first, "researcher", pid=sleeper.pid)
                await tokenwatch(
                    "route", "researcher", "--model", "gpt-4o-mini", "--only", "gpt-4o"
                )
            async with running_supervisor(paths, config, proxy=True, exporters=False) as second:
                assert second.recovered == ["researcher"]
                shown = await tokenwatch("route", "researcher")
                await ask(url)
                await ask(url, "o3-mini")  # not a model the switch names
                await tokenwatch("route", "researcher", "--undo")
            async with running_supervisor(paths, config, proxy=True, exporters=False) as third:
                await ask(url)  # undone: a third supervisor serves it as asked
                records = (
                    {a.name: a for a in await third.store.load_agents()} if third.store else {}
                )
    finally:
        sleeper.kill()
        sleeper.wait()
    assert shown == (
        "researcher: calls asking for gpt-4o go to gpt-4o-mini (tokenwatch route researcher --undo)\n"
    )
    assert [c.model for c in fake.calls] == ["gpt-4o-mini", "o3-mini", "gpt-4o"]
    assert (records["researcher"].route_model, records["researcher"].route_only) == ("", "")


async def test_route_names_an_unknown_agent_in_one_line() -> None:
    async with running_supervisor(Paths.discover(), Config(), proxy=True, exporters=False):
        done = await anyio.run_process(
            [sys.executable, "-m", "tokenwatch", "route", "ghost", "--model", "gpt-4o-mini"],
            env=dict(os.environ),
            check=False,
        )
    assert done.returncode != 0
    assert done.stderr.decode().startswith("tokenwatch: no agent named 'ghost'")
    assert done.stderr.decode().count("\n") == 1


async def test_a_budget_rule_switches_at_its_fraction() -> None:
    budget = BudgetSettings(name="daily", scope="agent", target="researcher", limit="1M")
    rule = SwitchSettings(budget="daily", at=0.001, model="gpt-4o", to="gpt-4o-mini")
    async with running_fake_llm() as fake:
        config = Config(
            proxy=ProxySettings(openai_upstream=fake.url + "/v1"),
            budget=[budget],
            optimize=OptimizeSettings(switch=[rule]),
        )
        async with running_supervisor(Paths.discover(), config, proxy=True, exporters=False) as sup:
            url = await register(sup, "researcher")
            await ask(url)  # 0 % used: served as asked
            await stored(sup, "researcher", 1)
            await anyio.sleep(STATUS_TTL)  # the rules read budget figures at most once a second
            await ask(url)  # past 0.001 %: switched
            await ask(url, "o3-mini")  # a model the rule does not name
            events = await stored(sup, "researcher", 3)
    assert [c.model for c in fake.calls] == ["gpt-4o", "gpt-4o-mini", "o3-mini"]
    assert [(e.requested_model, e.model) for e in events] == [
        ("", "gpt-4o"),
        ("gpt-4o", "gpt-4o-mini"),
        ("", "o3-mini"),
    ]

"""Benchmark: what each lever saves on a scripted day of three agents, replayed through the real
proxy to fake-llm with every lever off, each lever alone, and all of them on.

Method: one process, one event loop: fake-llm (prompt caching simulated as the providers do it),
the ProxyServer with the response cache, model switch and trimming configured as the scenario
says, a gate that prices every call with the bundled price table and keeps a per-agent daily
budget (the switch and trimming read its use, as in the supervisor), and the official openai
SDK as each agent's client. The day, identical in every run:

- coder (gpt-4o, temperature 0): 120 calls, a test-fix loop that asks the same 40 questions
  three times (the repeats are what the response cache can answer);
- researcher (gpt-4o): 80 independent questions, budget $0.05; the switch rule sends its gpt-4o
  calls to gpt-4o-mini past 50 % of it;
- chatter (gpt-4o-mini): one conversation of 80 turns that grows; trimming keeps the last 8 turns
  past 30 % of its $0.02 budget.

Billed tokens and dollars are what fake-llm billed (the proxy's recorded usage); "saved" is the
difference to the run with every lever off, and the proxy's own saved figures are printed beside.

    .venv/bin/python bench/optimize.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import anyio
import openai

from tokenwatch.config import (
    CacheSettings,
    OptimizeSettings,
    ProxySettings,
    SwitchSettings,
    TrimSettings,
)
from tokenwatch.core.admission import Admission, CallRequest
from tokenwatch.core.models import BudgetStatus, UsageEvent
from tokenwatch.core.pricing import PriceTable
from tokenwatch.demo.fake_llm import running_fake_llm
from tokenwatch.proxy.levers import Levers
from tokenwatch.proxy.server import AgentRoute, ProxyServer, RouteTable

PRICES = PriceTable.load({})
BUDGETS = {"researcher": 0.05, "chatter": 0.02}
KEY = "sk-bench"


class PricingGate:
    """Admits every call, prices what settles, and keeps each agent's spend for its budget."""

    def __init__(self) -> None:
        self.events: list[UsageEvent] = []
        self.spent: dict[str, float] = defaultdict(float)

    async def admit(self, call: CallRequest) -> Admission:
        return Admission(True)

    async def settle(self, admission: Admission, event: UsageEvent) -> None:
        PRICES.price(event)
        self.spent[event.agent] += event.cost_usd or 0.0
        self.events.append(dataclasses.replace(event))

    def statuses(self) -> list[BudgetStatus]:
        return [
            BudgetStatus(a, "agent", a, "day", limit, "usd", self.spent[a], "alert")
            for a, limit in BUDGETS.items()
        ]


def optimize(levers: set[str]) -> OptimizeSettings:
    return OptimizeSettings(
        cache=CacheSettings(enabled="cache" in levers, agents="coder"),
        switch=[
            SwitchSettings(
                budget="researcher", at=50, agents="researcher", model="gpt-4o", to="gpt-4o-mini"
            )
        ]
        if "switch" in levers
        else [],
        trim=TrimSettings(
            enabled="trim" in levers, budget="chatter", at=30, agents="chatter", keep_turns=8
        ),
    )


async def coder(client: openai.AsyncOpenAI) -> None:
    for _ in range(3):
        for i in range(40):
            q = f"Test {i} fails with an assertion on line {i * 7}. What is the likely cause?"
            await client.chat.completions.create(
                model="gpt-4o",
                temperature=0,
                max_tokens=120,
                messages=[{"role": "user", "content": q}],
            )


async def researcher(client: openai.AsyncOpenAI) -> None:
    for i in range(80):
        q = f"Summarise what is known about topic number {i} in three paragraphs. " * 4
        await client.chat.completions.create(
            model="gpt-4o", max_tokens=300, messages=[{"role": "user", "content": q}]
        )


async def chatter(client: openai.AsyncOpenAI) -> None:
    history: list[Any] = [{"role": "system", "content": "You are a patient tutor."}]
    for i in range(80):
        history.append(
            {"role": "user", "content": f"Next question {i}: " + "explain it again " * 20}
        )
        reply = await client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=150, messages=history
        )
        history.append({"role": "assistant", "content": reply.choices[0].message.content})


async def day(levers: set[str]) -> PricingGate:
    gate = PricingGate()
    with tempfile.TemporaryDirectory(prefix="tw-bench-") as directory:
        async with running_fake_llm() as fake:
            lever_set = Levers(
                optimize(levers),
                cache_path=Path(directory) / "cache.db",
                price=PRICES.cost,
                statuses=gate.statuses,
                clock=time.monotonic,
                status_ttl=0.0,  # budget figures read at every call: the day runs in seconds
            )
            routes = RouteTable()
            proxy = ProxyServer(
                gate, routes, ProxySettings(openai_upstream=fake.url + "/v1"), levers=lever_set
            )
            async with anyio.create_task_group() as tg:
                await tg.start(proxy.serve)
                async with anyio.create_task_group() as agents:
                    for name, script in (
                        ("coder", coder),
                        ("researcher", researcher),
                        ("chatter", chatter),
                    ):
                        url = proxy.base_urls(routes.add(AgentRoute(agent=name)))["OPENAI_BASE_URL"]
                        client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0)
                        agents.start_soon(script, client)
                while len(gate.events) < 280:
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
    return gate


def totals(gate: PricingGate) -> dict[str, tuple[int, float, float]]:
    """Per agent: tokens billed, dollars billed, dollars the proxy says it saved."""
    out: dict[str, tuple[int, float, float]] = {}
    for agent in ("coder", "researcher", "chatter"):
        events = [e for e in gate.events if e.agent == agent]
        out[agent] = (
            sum(e.total_tokens for e in events),
            sum(e.cost_usd or 0.0 for e in events),
            sum(e.saved_usd or 0.0 for e in events),
        )
    return out


async def main() -> None:
    runs = {"none": set(), "cache": {"cache"}, "switch": {"switch"}, "trim": {"trim"}}
    runs["all"] = {"cache", "switch", "trim"}
    base: dict[str, tuple[int, float, float]] = {}
    print(
        f"{'levers':8} {'agent':11} {'tokens':>9} {'billed':>9} {'saved':>9} {'saved %':>8} {'recorded':>9}"
    )
    for label, levers in runs.items():
        started = time.perf_counter()
        figures = totals(await day(levers))
        base = base or figures
        for agent, (tokens, usd, recorded) in figures.items():
            saved = base[agent][1] - usd
            share = saved / base[agent][1] if base[agent][1] else 0.0
            print(
                f"{label:8} {agent:11} {tokens:>9,} ${usd:>8.4f} ${saved:>8.4f} {share:>8.0%} ${recorded:>8.4f}"
            )
        all_usd = sum(f[1] for f in figures.values())
        all_base = sum(f[1] for f in base.values())
        print(
            f"{label:8} {'ALL':11} {sum(f[0] for f in figures.values()):>9,} ${all_usd:>8.4f} "
            f"${all_base - all_usd:>8.4f} {(all_base - all_usd) / all_base:>8.0%}"
            f"   ({time.perf_counter() - started:.1f} s)"
        )


if __name__ == "__main__":
    asyncio.run(main())

"""Prompt-cache health: a long prefix re-sent without cache reads raises one alert saying what it
cost; the same conversation with a warm cache stays quiet."""

from __future__ import annotations

import re
from typing import Any

import anthropic

from tests.proxy_fixtures import API_KEY, running_proxy
from tokenwatch.config import CacheHealthSettings, OptimizeSettings
from tokenwatch.core.models import UsageEvent
from tokenwatch.core.pricing import PriceTable
from tokenwatch.proxy.levers import Levers

SYSTEM = "You review code carefully and answer in one line. " * 400  # about 4k tokens
PRICES = PriceTable.load({})


async def conversation(*, breakpoint: bool, calls: int = 4) -> list[tuple[str, str]]:
    """`calls` turns of one growing conversation through the proxy; the alerts raised."""
    alerts: list[tuple[str, str]] = []
    settings = OptimizeSettings(
        cache_health=CacheHealthSettings(min_prefix_tokens=2000, repeats=3, window=600)
    )

    def price(event: UsageEvent) -> float | None:
        return PRICES.cost(event)

    levers = Levers(settings, price=price, alert=lambda agent, text: alerts.append((agent, text)))
    system: Any = [{"type": "text", "text": SYSTEM}]
    if breakpoint:
        system[0]["cache_control"] = {"type": "ephemeral"}
    messages: list[dict[str, Any]] = []
    async with running_proxy(levers=levers) as rig:
        async with anthropic.AsyncAnthropic(
            base_url=rig.anthropic_url, api_key=API_KEY, max_retries=0
        ) as client:
            for i in range(calls):
                messages.append({"role": "user", "content": f"Review change {i}."})
                reply = await client.messages.create(
                    model="claude-sonnet-4-5", max_tokens=50, system=system, messages=messages
                )
                messages.append({"role": "assistant", "content": reply.content[0].text})  # type: ignore[union-attr]
        events = await rig.gate.wait_settled(calls)
    assert all(e.input_tokens > 4000 for e in events)
    return alerts


async def test_a_cold_prefix_resent_raises_one_alert_with_its_cost() -> None:
    alerts = await conversation(breakpoint=False)
    assert len(alerts) == 1
    agent, text = alerts[0]
    assert agent == "coder"
    match = re.fullmatch(
        r"coder re-sent a (\d+,?\d*k?)-token prefix uncached 3 times in 1 min: "
        r"\$(\d+\.\d\d) that a warm cache would have billed at \$(\d+\.\d\d)",
        text,
    )
    assert match, text
    assert float(match[2]) > float(match[3])


async def test_a_warm_cache_stays_quiet() -> None:
    assert await conversation(breakpoint=True) == []

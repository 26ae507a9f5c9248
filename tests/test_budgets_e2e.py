"""Fifty concurrent SDK calls through the real proxy and supervisor never take a hard budget over."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import openai
import pytest

from tokenwatch.client.control import SupervisorClient
from tokenwatch.config import BudgetSettings, Config, ProxySettings, SupervisorSettings
from tokenwatch.core.supervisor import Supervisor
from tokenwatch.demo.fake_llm import running_fake_llm
from tokenwatch.paths import Paths

LIMIT = 8000


@contextlib.asynccontextmanager
async def supervisor_with_proxy(config: Config) -> AsyncIterator[Supervisor]:
    sup = Supervisor(Paths.discover(), config, exporters=False)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(30):
            await tg.start(sup.run)
        try:
            yield sup
        finally:
            sup.request_shutdown()


@pytest.mark.slow
async def test_fifty_concurrent_proxied_calls_stay_within_a_deny_budget() -> None:
    async with running_fake_llm() as fake:
        config = Config(
            supervisor=SupervisorSettings(timezone="UTC"),
            proxy=ProxySettings(openai_upstream=fake.url + "/v1"),
            budget=[BudgetSettings(scope="agent", target="crowd", limit=LIMIT, action="deny")],
        )
        async with supervisor_with_proxy(config) as sup:
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
                            messages=[{"role": "user", "content": f"Question {i}: why?"}],
                            max_tokens=300,
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

    assert outcomes.count("ok") + outcomes.count("refused") == 50
    assert 0 < outcomes.count("ok") < 50
    # What the provider reported for the calls that went is what was counted, and within the limit.
    sent = sum(c.input_tokens + c.output_tokens for c in fake.calls)
    assert len(fake.calls) == outcomes.count("ok")
    assert status.used == stored.total_tokens == sent
    assert sent <= LIMIT
    assert "budget agent:crowd:day" in refusals[0]
    assert "tokenwatch budget set agent:crowd 16k --period day" in refusals[0]

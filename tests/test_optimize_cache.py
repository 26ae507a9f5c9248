"""The response cache: identical requests answered locally, byte for byte, to the official SDKs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anthropic
import anyio
import openai
import pytest

from tests.proxy_fixtures import API_KEY, ProxyRig, RecordingGate, running_proxy
from tests.supervisor_fixtures import running_supervisor, stored
from tokenwatch.client.control import SupervisorClient
from tokenwatch.config import CacheSettings, Config, OptimizeSettings, ProxySettings
from tokenwatch.core.models import UsageEvent
from tokenwatch.core.pricing import PriceTable
from tokenwatch.demo.fake_llm import running_fake_llm
from tokenwatch.paths import Paths
from tokenwatch.proxy.cache import CachedAnswer, ResponseCache
from tokenwatch.proxy.levers import Levers
from tokenwatch.proxy.server import AgentRoute, ProxyServer, RouteTable

MESSAGES = [{"role": "user", "content": "Name three prime numbers."}]
PRICES = PriceTable.load({})


def price(event: UsageEvent) -> float | None:
    return PRICES.cost(event)


def levers(path: Path, **cache: Any) -> Levers:
    settings = OptimizeSettings(cache=CacheSettings(enabled=True, **cache))
    return Levers(settings, cache_path=path / "response-cache.db", price=price)


@asynccontextmanager
async def cached_proxy(path: Path, **cache: Any) -> AsyncIterator[ProxyRig]:
    async with running_proxy(levers=levers(path, **cache)) as rig:
        yield rig


def oai(rig: ProxyRig, token: str = "") -> openai.AsyncOpenAI:
    url = rig.proxy.base_urls(token)["OPENAI_BASE_URL"] if token else rig.openai_url
    return openai.AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0)


def ant(rig: ProxyRig) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=rig.anthropic_url, api_key=API_KEY, max_retries=0)


async def chat(client: openai.AsyncOpenAI, **extra: Any) -> Any:
    args: dict[str, Any] = {"model": "gpt-4o", "messages": MESSAGES, "temperature": 0}
    return await client.chat.completions.create(**{**args, **extra})


def assert_hit(event: UsageEvent, first: UsageEvent) -> None:
    """A hit is recorded: nothing billed, the first call's tokens and dollars saved."""
    assert (event.lever, event.status, event.http_status) == ("cache", "ok", 200)
    assert event.input_tokens == event.output_tokens == 0
    assert event.saved_tokens == first.input_tokens + first.output_tokens > 0
    assert event.saved_usd == pytest.approx(price(first))
    assert event.saved_usd > 0


async def test_openai_json_and_stream_served_from_the_cache(tmp_path: Path) -> None:
    async with cached_proxy(tmp_path) as rig, oai(rig) as client:
        first = await chat(client)
        again = await client.chat.completions.with_raw_response.create(
            model="gpt-4o",
            messages=MESSAGES,
            temperature=0,  # type: ignore[arg-type]
        )
        assert again.headers["x-tokenwatch-cache"] == "hit"
        assert again.parse().model_dump() == first.model_dump()
        streamed = [c.model_dump() async for c in await chat(client, stream=True)]
        replayed = [c.model_dump() async for c in await chat(client, stream=True)]
        assert replayed == streamed
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in replayed)
        events = await rig.gate.wait_settled(4)
        assert len(rig.fake.calls) == 2  # one JSON, one stream: the repeats never left
        assert_hit(events[1], events[0])
        assert_hit(events[3], events[2])


async def test_anthropic_json_and_stream_served_from_the_cache(tmp_path: Path) -> None:
    args: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": MESSAGES,
        "extra_body": {"temperature": 0},  # this SDK has no temperature argument
    }
    async with cached_proxy(tmp_path) as rig, ant(rig) as client:
        first = await client.messages.create(**args)
        assert (await client.messages.create(**args)).model_dump() == first.model_dump()
        async with client.messages.stream(**args) as stream:
            texts = [t async for t in stream.text_stream]
            final = await stream.get_final_message()
        async with client.messages.stream(**args) as stream:
            assert [t async for t in stream.text_stream] == texts
            assert (await stream.get_final_message()).model_dump() == final.model_dump()
        events = await rig.gate.wait_settled(4)
        assert len(rig.fake.calls) == 2
        assert_hit(events[1], events[0])
        assert_hit(events[3], events[2])


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.0001},
        {"top_p": 0.5},
        {"max_tokens": 7},
        {"seed": 3},
        {"model": "gpt-4o-mini"},
    ],
)
async def test_a_request_differing_in_any_parameter_misses(tmp_path: Path, change: Any) -> None:
    async with cached_proxy(tmp_path, any_temperature=True) as rig, oai(rig) as client:
        await chat(client)
        await chat(client, **change)
        events = await rig.gate.wait_settled(2)
        assert len(rig.fake.calls) == 2
        assert [e.lever for e in events] == ["", ""]


async def test_sampled_and_no_store_requests_are_never_cached(tmp_path: Path) -> None:
    async with cached_proxy(tmp_path) as rig, oai(rig) as client:
        for _ in range(2):
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
            await chat(client, temperature=0.7)
            await chat(client, extra_headers={"Cache-Control": "no-store"})
        await rig.gate.wait_settled(6)
        assert len(rig.fake.calls) == 6


async def test_entries_are_not_shared_between_agents_unless_asked(tmp_path: Path) -> None:
    async with cached_proxy(tmp_path) as rig:
        other = rig.routes.add(AgentRoute(agent="reviewer"))
        async with oai(rig) as mine, oai(rig, other) as theirs:
            await chat(mine)
            await chat(theirs)
        await rig.gate.wait_settled(2)
        assert len(rig.fake.calls) == 2
    (tmp_path / "shared").mkdir()
    async with cached_proxy(tmp_path / "shared", shared=True) as rig:
        other = rig.routes.add(AgentRoute(agent="reviewer"))
        stranger = rig.routes.add(AgentRoute(agent="reviewer", user="bob"))
        async with oai(rig) as mine, oai(rig, other) as theirs, oai(rig, stranger) as bobs:
            await chat(mine)
            await chat(theirs)  # the same user's other agent: shared
            await chat(bobs)  # another user: never
        await rig.gate.wait_settled(3)
        assert len(rig.fake.calls) == 2


async def test_the_cache_survives_a_restart(tmp_path: Path) -> None:
    """A second proxy (a restarted supervisor) on the same file answers from it; the upstream
    URL is part of the key, so both talk to the same fake-llm."""
    async with running_fake_llm() as fake:
        answers = []
        for _ in range(2):
            gate = RecordingGate()
            settings = ProxySettings(openai_upstream=fake.url + "/v1")
            routes = RouteTable()
            proxy = ProxyServer(gate, routes, settings, levers=levers(tmp_path))
            async with anyio.create_task_group() as tg:
                await tg.start(proxy.serve)
                url = proxy.base_urls(routes.add(AgentRoute(agent="coder")))["OPENAI_BASE_URL"]
                async with openai.AsyncOpenAI(base_url=url, api_key=API_KEY) as client:
                    answers.append((await chat(client)).model_dump())
                await gate.wait_settled(1)
                tg.cancel_scope.cancel()
        assert answers[0] == answers[1]
        assert len(fake.calls) == 1
        assert gate.events[0].lever == "cache"


async def test_the_store_stays_within_its_size_bound(tmp_path: Path) -> None:
    settings = CacheSettings(enabled=True, max_bytes=1 << 20, max_entry_bytes=1 << 20)
    path = tmp_path / "cache.db"
    body = b"x" * 100_000
    cache = ResponseCache(path, settings, clock=lambda: 1000.0)
    async with anyio.create_task_group() as tg:
        await tg.start(cache.run)
        for i in range(40):
            assert cache.put_nowait(
                i.to_bytes(4, "big"), CachedAnswer(200, [], body, "m", (1, 1, 0, 0, 0))
            )
        assert cache.size <= settings.max_bytes
        assert cache.has((39).to_bytes(4, "big"))
        assert not cache.has((0).to_bytes(4, "big"))  # the oldest went first
        tg.cancel_scope.cancel()
    assert path.stat().st_size <= 2 * settings.max_bytes
    again = ResponseCache(path, settings, clock=lambda: 1000.0)
    async with anyio.create_task_group() as tg:
        await tg.start(again.run)
        assert len(again) == len(cache)
        assert again.size <= settings.max_bytes
        answer = await again.get((39).to_bytes(4, "big"))
        assert answer is not None
        assert answer.body == body
        tg.cancel_scope.cancel()
    late = ResponseCache(path, settings, clock=lambda: 1000.0 + settings.ttl + 1)
    async with anyio.create_task_group() as tg:
        await tg.start(late.run)
        assert len(late) == 0  # expired entries are not served after a restart either
        tg.cancel_scope.cancel()


async def test_an_answer_refreshed_before_its_write_is_the_one_served_and_kept(
    tmp_path: Path,
) -> None:
    settings = CacheSettings(enabled=True, ttl=10.0)
    path, key = tmp_path / "cache.db", b"k" * 32
    now = [1000.0]
    cache = ResponseCache(path, settings, clock=lambda: now[0])

    def answer(body: bytes) -> CachedAnswer:
        return CachedAnswer(200, [("content-type", "application/json")], body, "m", (1, 1, 0, 0, 0))

    async with anyio.create_task_group() as tg:
        await tg.start(cache.run)
        assert cache.put_nowait(key, answer(b"first"))
        now[0] += 11  # expired: the next lookup drops it
        assert await cache.get(key) is None
        assert cache.put_nowait(key, answer(b"second"))  # all before the writer's next batch
        served = await cache.get(key)
        tg.cancel_scope.cancel()
    assert served is not None
    assert served.body == b"second"
    again = ResponseCache(path, settings, clock=lambda: now[0])
    async with anyio.create_task_group() as tg:
        await tg.start(again.run)
        kept = await again.get(key)
        tg.cancel_scope.cancel()
    assert kept is not None
    assert kept.body == b"second"


async def test_inside_the_supervisor_a_hit_is_stored_with_its_saving() -> None:
    """The supervisor keeps the cache beside the ledger, private, and prices the saving."""
    async with running_fake_llm() as fake:
        config = Config(
            proxy=ProxySettings(openai_upstream=fake.url + "/v1"),
            optimize=OptimizeSettings(cache=CacheSettings(enabled=True)),
        )
        paths = Paths.discover()
        async with running_supervisor(paths, config, proxy=True, exporters=False) as sup:
            async with await SupervisorClient.connect(socket_path=paths.socket, start=False) as c:
                url = (await c.request("register", name="coder"))["env"]["OPENAI_BASE_URL"]
            async with openai.AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0) as client:
                await chat(client)
                await chat(client)
            first, hit = await stored(sup, "coder", 2)
    assert (first.lever, hit.lever) == ("", "cache")
    assert hit.cost_usd == 0
    assert hit.saved_usd == pytest.approx(first.cost_usd)
    assert len(fake.calls) == 1
    assert paths.response_cache.parent == paths.db.parent
    assert paths.response_cache.stat().st_mode & 0o777 == 0o600

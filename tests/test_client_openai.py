"""instrument() with the official openai SDK against fake-llm: what is reported is what was billed."""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import openai
import pytest

import tokenwatch
from tests.client_fixtures import FakeSupervisor, installed_reporter, running_supervisor
from tokenwatch.client import gate, session, tracking
from tokenwatch.client.instrument import instrumented
from tokenwatch.demo.fake_llm import FakeLLM, running_fake_llm

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three prime numbers and explain why they are prime."},
]


@pytest.fixture(autouse=True)
def sdk_instrumented(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(gate, "_skip_until", 0.0)
    tracking.reset_usage()
    tokenwatch.instrument()
    yield
    tokenwatch.uninstrument()
    tracking.reset_usage()
    while _opened:
        _opened.pop().close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    async with running_fake_llm() as server:
        yield server


@pytest.fixture
async def sup(short_tmp: Path) -> AsyncIterator[FakeSupervisor]:
    path = short_tmp / "sup.sock"
    async with running_supervisor(path) as server:
        with installed_reporter(path, name="researcher"):
            yield server


@pytest.fixture
async def aclient(fake: FakeLLM) -> AsyncIterator[openai.AsyncOpenAI]:
    async with async_client(fake) as client:
        yield client


_opened: list[openai.OpenAI] = []
"""Sync clients made by a test, closed when it ends (their sockets must not outlive it)."""


def sync_client(fake: FakeLLM, **kwargs: Any) -> openai.OpenAI:
    client = openai.OpenAI(base_url=fake.url + "/v1", api_key="sk-test", max_retries=0, **kwargs)
    _opened.append(client)
    return client


def async_client(fake: FakeLLM) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=fake.url + "/v1", api_key="sk-test", max_retries=0)


def assert_billed(event: dict[str, Any], fake: FakeLLM, *, estimated: bool = False) -> None:
    billed = fake.calls[-1]
    got = tuple(event[k] for k in ("input_tokens", "output_tokens", "cache_read_tokens"))
    assert got == (billed.input_tokens, billed.output_tokens, billed.cache_read_tokens)
    assert event["reasoning_tokens"] == billed.reasoning_tokens
    assert event["endpoint"] == billed.endpoint
    assert event["estimated"] is estimated
    assert event["status"] == "ok"


async def one_event(sup: FakeSupervisor, count: int = 1) -> dict[str, Any]:
    await sup.wait_until(lambda: len(sup.events()) >= count)
    return sup.events()[count - 1]


async def run_sync(fn: Callable[[], Any]) -> Any:
    return await anyio.to_thread.run_sync(fn)


async def test_sync_chat_completion(fake: FakeLLM, sup: FakeSupervisor) -> None:
    client = sync_client(fake)
    reply = await run_sync(
        lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    )
    event = await one_event(sup)
    assert_billed(event, fake)
    assert event["input_tokens"] == reply.usage.prompt_tokens
    assert event["agent"] == "researcher"
    assert event["model"] == reply.model
    assert event["prompt_hash"]
    assert event["prompt_shape"]
    assert event["latency_ms"] > 0
    assert event["http_status"] == 200


async def test_async_chat_completion_and_usage_totals(
    aclient: openai.AsyncOpenAI, fake: FakeLLM, sup: FakeSupervisor
) -> None:
    for _ in range(3):
        await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await one_event(sup, 3)
    totals = tokenwatch.usage()
    assert totals.requests == 3
    assert totals.input_tokens == sum(c.input_tokens for c in fake.calls)
    assert totals.output_tokens == sum(c.output_tokens for c in fake.calls)


async def test_sync_stream_with_include_usage_is_exact(fake: FakeLLM, sup: FakeSupervisor) -> None:
    client = sync_client(fake)

    def call() -> str:
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    text = await run_sync(call)
    event = await one_event(sup)
    assert text
    assert_billed(event, fake)
    assert event["ttft_ms"] is not None
    assert event["ttft_ms"] <= event["latency_ms"]


async def test_stream_without_usage_is_counted_locally(
    aclient: openai.AsyncOpenAI, fake: FakeLLM, sup: FakeSupervisor
) -> None:
    stream = await aclient.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    )
    chunks = [chunk async for chunk in stream]
    event = await one_event(sup)
    assert all(chunk.usage is None for chunk in chunks), "the SDK's request was not changed"
    assert_billed(event, fake, estimated=True)


async def test_abandoned_stream_is_recorded_cancelled(
    aclient: openai.AsyncOpenAI, fake: FakeLLM, sup: FakeSupervisor
) -> None:
    stream = await aclient.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, max_tokens=200
    )
    async for _ in stream:
        break
    await stream.close()
    event = await one_event(sup)
    assert event["status"] == "cancelled"
    assert event["estimated"] is True
    assert event["input_tokens"] > 0


async def test_chat_stream_helper(fake: FakeLLM, sup: FakeSupervisor) -> None:
    client = sync_client(fake)

    def call() -> None:
        with client.chat.completions.stream(
            model="gpt-4o-mini", messages=MESSAGES, stream_options={"include_usage": True}
        ) as stream:
            stream.until_done()

    await run_sync(call)
    assert_billed(await one_event(sup), fake)


async def test_responses_api_json_and_streaming(
    aclient: openai.AsyncOpenAI, fake: FakeLLM, sup: FakeSupervisor
) -> None:
    await aclient.responses.create(model="gpt-4o-mini", input="Write a haiku about tokens.")
    assert_billed(await one_event(sup, 1), fake)
    stream = await aclient.responses.create(
        model="gpt-4o-mini", input="Write a haiku about budgets.", stream=True
    )
    async for _ in stream:
        pass
    event = await one_event(sup, 2)
    assert_billed(event, fake)
    assert event["ttft_ms"] is not None


async def test_responses_stream_helper_sync(fake: FakeLLM, sup: FakeSupervisor) -> None:
    client = sync_client(fake)

    def call() -> None:
        with client.responses.stream(model="gpt-4o-mini", input="Count to five.") as stream:
            stream.until_done()

    await run_sync(call)
    assert_billed(await one_event(sup), fake)


async def test_reasoning_model_reports_reasoning_tokens(
    aclient: openai.AsyncOpenAI, fake: FakeLLM, sup: FakeSupervisor
) -> None:
    await aclient.chat.completions.create(model="o3-mini", messages=MESSAGES)
    event = await one_event(sup)
    assert_billed(event, fake)
    assert event["reasoning_tokens"] > 0


async def test_embeddings_and_legacy_completions(fake: FakeLLM, sup: FakeSupervisor) -> None:
    client = sync_client(fake)
    await run_sync(
        lambda: client.embeddings.create(model="text-embedding-3-small", input=["a b c", "d e"])
    )
    assert_billed(await one_event(sup, 1), fake)
    await run_sync(
        lambda: client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")
    )
    assert_billed(await one_event(sup, 2), fake)


async def test_raw_response_is_reported(fake: FakeLLM, sup: FakeSupervisor) -> None:
    client = sync_client(fake)
    raw = await run_sync(
        lambda: client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
    )
    assert raw.parse().usage.total_tokens > 0
    assert_billed(await one_event(sup), fake)


async def test_streaming_response_json_is_reported_when_read(
    fake: FakeLLM, sup: FakeSupervisor
) -> None:
    client = sync_client(fake)

    def call() -> int:
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=MESSAGES
        ) as response:
            return int(response.parse().usage.total_tokens)

    total = await run_sync(call)
    event = await one_event(sup)
    assert_billed(event, fake)
    assert event["input_tokens"] + event["output_tokens"] == total
    assert event["http_status"] == 200


async def test_streaming_response_of_a_stream_is_read_line_by_line(
    aclient: openai.AsyncOpenAI, fake: FakeLLM, sup: FakeSupervisor
) -> None:
    async with aclient.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        lines = [line async for line in response.iter_lines()]
    event = await one_event(sup)
    assert any(line.startswith("data: ") and '"usage"' in line for line in lines)
    assert_billed(event, fake)
    assert event["ttft_ms"] is not None
    async with aclient.responses.with_streaming_response.create(
        model="gpt-4o-mini", input="Write a haiku about tokens.", stream=True
    ) as response:
        async for _ in response.iter_bytes():
            pass
    assert_billed(await one_event(sup, 2), fake)


async def test_streaming_response_left_unread_is_recorded_cancelled(
    aclient: openai.AsyncOpenAI, fake: FakeLLM, sup: FakeSupervisor
) -> None:
    async with aclient.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, max_tokens=200
    ) as response:
        assert response.status_code == 200
    event = await one_event(sup)
    assert event["status"] == "cancelled"
    assert event["estimated"] is True
    assert event["input_tokens"] == fake.calls[-1].input_tokens


async def test_streaming_response_abandoned_mid_read_is_recorded_at_close(
    aclient: openai.AsyncOpenAI, fake: FakeLLM, sup: FakeSupervisor
) -> None:
    client = sync_client(fake)
    kept: list[Any] = []

    def call() -> None:
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, max_tokens=200
        ) as response:
            stream = response.parse()
            for _ in stream:
                break
        kept.append(stream)  # the agent still holds the half-read stream

    await run_sync(call)
    async with aclient.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, max_tokens=200
    ) as response:
        lines = response.iter_lines()
        async for _ in lines:
            break
    await sup.wait_until(lambda: len(sup.events()) >= 2)
    assert [e["status"] for e in sup.events()] == ["cancelled", "cancelled"]
    assert all(e["input_tokens"] > 0 for e in sup.events())
    assert kept


async def test_error_call_reported_and_raised(
    aclient: openai.AsyncOpenAI, fake: FakeLLM, sup: FakeSupervisor
) -> None:
    with pytest.raises(openai.RateLimitError):
        await aclient.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"x-fake-llm-fault": "429"}
        )
    event = await one_event(sup)
    assert (event["status"], event["http_status"]) == ("error", 429)
    assert tokenwatch.usage().errors == 1


async def test_call_id_header_equals_event_call_id(fake: FakeLLM, sup: FakeSupervisor) -> None:
    seen: list[str] = []
    http = httpx2.Client(
        event_hooks={"request": [lambda r: seen.append(r.headers["x-tokenwatch-call-id"])]}
    )
    client = sync_client(fake, http_client=http)
    await run_sync(lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
    assert [(await one_event(sup))["call_id"]] == seen


async def test_through_the_proxy_nothing_is_reported(
    fake: FakeLLM, sup: FakeSupervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENWATCH_PROXY_URL", fake.url)
    seen: list[str] = []
    http = httpx2.AsyncClient(
        event_hooks={"request": [lambda r: _async_append(seen, r.headers["x-tokenwatch-call-id"])]}
    )
    async with openai.AsyncOpenAI(
        base_url=fake.url + "/v1", api_key="sk-test", max_retries=0, http_client=http
    ) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    tokenwatch.report(model="marker", input_tokens=1, output_tokens=1)
    await sup.wait_until(lambda: len(sup.events()) == 1)
    assert [e["model"] for e in sup.events()] == ["marker"], "the proxy records proxied calls"
    assert not sup.of_type("admit"), "the proxy gates proxied calls"
    assert len(seen) == 1, "the call id still goes out for the proxy to dedup"
    assert seen[0]
    assert tokenwatch.usage().requests == 2, "usage() still counts this agent's calls"


async def _async_append(seen: list[str], value: str) -> None:
    seen.append(value)


async def test_instrument_is_idempotent_and_uninstrument_restores(
    aclient: openai.AsyncOpenAI, fake: FakeLLM, sup: FakeSupervisor
) -> None:
    from openai.resources.chat.completions.completions import Completions

    wrapped = Completions.create
    tokenwatch.instrument()
    assert Completions.create is wrapped
    await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    tokenwatch.uninstrument()
    assert not instrumented()
    assert Completions.create is not wrapped
    await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    tokenwatch.report(model="marker", input_tokens=1, output_tokens=1)
    await sup.wait_until(lambda: len(sup.events()) == 2)
    assert [e["model"] for e in sup.events()][1] == "marker"
    assert len(fake.calls) == 2


async def test_budget_deny_raises_and_sends_nothing_upstream(
    aclient: openai.AsyncOpenAI, fake: FakeLLM, sup: FakeSupervisor
) -> None:
    sup.admit = lambda msg: {
        "allowed": False,
        "wait": 0,
        "reservation": "",
        "budget": "daily",
        "message": "budget 'daily' is spent: raise it with `tokenwatch budget set ...`",
    }
    with pytest.raises(tokenwatch.BudgetExceeded) as caught:
        await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.budget == "daily"
    assert "tokenwatch budget set" in str(caught.value)
    assert fake.calls == []
    (admit,) = sup.of_type("admit")
    assert admit["model"] == "gpt-4o-mini"
    assert admit["input_tokens"] > 0
    assert admit["prompt_hash"]


async def test_admission_reservation_is_settled(fake: FakeLLM, sup: FakeSupervisor) -> None:
    sup.admit = lambda msg: {"allowed": True, "wait": 0, "reservation": "r-1", "budget": ""}
    client = sync_client(fake)
    await run_sync(
        lambda: client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_completion_tokens=64
        )
    )
    await sup.wait_until(lambda: bool(sup.of_type("settle")))
    (admit,) = sup.of_type("admit")
    assert admit["max_output_tokens"] == 64
    (settle,) = sup.of_type("settle")
    assert settle["reservation"] == "r-1"
    assert_billed(settle["event"], fake)
    assert not sup.of_type("usage")


@pytest.mark.parametrize("use_async", [False, True])
async def test_admit_wait_is_obeyed_before_the_call(
    fake: FakeLLM, sup: FakeSupervisor, monkeypatch: pytest.MonkeyPatch, use_async: bool
) -> None:
    sup.admit = lambda msg: {"allowed": True, "wait": 7.5, "reservation": "", "budget": ""}
    timeline = sup.sequence

    def fake_sleep(seconds: float) -> None:
        timeline.append(("sleep", seconds))

    async def fake_sleep_async(seconds: float) -> None:
        timeline.append(("sleep", seconds))

    monkeypatch.setattr(gate, "sleep", fake_sleep)
    monkeypatch.setattr(gate, "sleep_async", fake_sleep_async)

    def on_request(request: Any) -> None:
        timeline.append(("http", str(request.url)))

    async def on_request_async(request: Any) -> None:
        on_request(request)

    if use_async:
        async with openai.AsyncOpenAI(
            base_url=fake.url + "/v1",
            api_key="sk-test",
            max_retries=0,
            http_client=httpx2.AsyncClient(event_hooks={"request": [on_request_async]}),
        ) as aclient:
            await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    else:
        client = sync_client(fake, http_client=httpx2.Client(event_hooks={"request": [on_request]}))
        await run_sync(
            lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
    event = await one_event(sup)
    order = [
        kind for kind, _ in timeline if kind in ("admit", "admit-reply", "sleep", "http", "usage")
    ]
    assert order == ["admit", "admit-reply", "sleep", "http", "usage"]
    assert ("sleep", 7.5) in timeline
    assert event["wait_ms"] == 7500


async def test_throttle_push_delays_the_next_call(
    aclient: openai.AsyncOpenAI, fake: FakeLLM, sup: FakeSupervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []

    async def fake_sleep_async(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(gate, "sleep_async", fake_sleep_async)
    await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await one_event(sup)
    await sup.push("throttle", {"agent": "researcher", "wait": 60})
    rep = session.current_reporter()
    assert rep is not None
    with anyio.fail_after(30):
        while rep.throttle_wait() == 0:
            await anyio.sleep(0.01)
    await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert len(slept) == 1
    assert 50 < slept[0] <= 60


async def test_admit_unanswered_lets_the_call_go(
    aclient: openai.AsyncOpenAI, fake: FakeLLM, sup: FakeSupervisor
) -> None:
    sup.admit = lambda msg: None
    reply = await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert reply.choices[0].message.content
    assert_billed(await one_event(sup), fake)
    await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert_billed(await one_event(sup, 2), fake)
    assert len(sup.of_type("admit")) == 1, "a hung supervisor costs one timeout, not one per call"


def one_call_s(client: openai.OpenAI) -> float:
    start = time.perf_counter()
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    return time.perf_counter() - start


def paired_medians(client: openai.OpenAI, pairs: int) -> tuple[float, float]:
    """(bare, instrumented) median call times, alternating so both see the same machine load."""
    bare, instrumented = [], []
    for _ in range(pairs):
        tokenwatch.uninstrument()
        bare.append(one_call_s(client))
        tokenwatch.instrument()
        instrumented.append(one_call_s(client))
    return statistics.median(bare), statistics.median(instrumented)


async def test_absent_supervisor_costs_little(fake: FakeLLM, short_tmp: Path) -> None:
    client = sync_client(fake)
    with installed_reporter(short_tmp / "nobody-home.sock") as rep:
        await run_sync(lambda: paired_medians(client, 3))  # warm up connections and encodings
        baseline, instrumented = await run_sync(lambda: paired_medians(client, 21))
        assert rep.statistics().pending == 24, "every instrumented call waits in the buffer"
    assert tokenwatch.usage().requests == 24
    assert instrumented < baseline * 2, (instrumented, baseline)


async def test_api_key_and_prompt_never_leave_the_process(
    fake: FakeLLM, sup: FakeSupervisor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tokenwatch")
    secret = "sk-live-DO-NOT-LEAK-1234"
    prompt = "my private prompt about project nightingale"
    async with openai.AsyncOpenAI(
        base_url=fake.url + "/v1", api_key=secret, max_retries=0
    ) as client:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
        )
    await one_event(sup)
    wire = json.dumps(sup.messages)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "gpt-4o-mini" in logged
    for text in (wire, logged):
        assert secret not in text
        assert "nightingale" not in text


async def test_cut_stream_is_recorded_estimated(
    aclient: openai.AsyncOpenAI, fake: FakeLLM, sup: FakeSupervisor
) -> None:
    stream = await aclient.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-fake-llm-fault": "cut:3"},
    )

    async def read_all() -> list[Any]:
        return [chunk async for chunk in stream]

    with pytest.raises(openai.APIError):
        await read_all()
    event = await one_event(sup)
    assert (event["status"], event["estimated"]) == ("error", True)
    assert event["input_tokens"] > 0
    assert event["output_tokens"] > 0

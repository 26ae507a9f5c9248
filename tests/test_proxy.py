"""The proxy with the official SDKs as clients and fake-llm as upstream: usage recorded exactly."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import openai
import pytest

from tests.proxy_fixtures import API_KEY, ProxyRig, running_proxy
from tokenwatch.proxy.routes import AgentRoute

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three prime numbers and say why they are prime."},
]


def assert_matches_fake(rig: ProxyRig) -> None:
    """Each recorded event carries exactly the tokens fake-llm billed for that call."""
    events = rig.gate.events
    billed = rig.fake.calls
    assert len(events) == len(billed)
    for event, call in zip(events, billed, strict=True):
        assert event.estimated is False
        assert event.endpoint == call.endpoint
        assert event.model == call.model
        assert (event.input_tokens, event.output_tokens) == (call.input_tokens, call.output_tokens)
        assert event.cache_read_tokens == call.cache_read_tokens
        assert event.cache_write_tokens == call.cache_write_tokens
        assert event.reasoning_tokens == call.reasoning_tokens
        assert event.input_tokens > 0


@pytest.fixture
async def rig() -> AsyncIterator[ProxyRig]:
    async with running_proxy() as r:
        yield r


@pytest.fixture
async def oai(rig: ProxyRig) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=rig.openai_url, api_key=API_KEY, max_retries=0
    ) as client:
        yield client


async def test_chat_completion_json(rig: ProxyRig, oai: openai.AsyncOpenAI) -> None:
    reply = await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    (event,) = await rig.gate.wait_settled(1)
    assert (event.agent, event.run_id, event.task) == ("coder", "run-1", "t1")
    assert (event.source, event.status, event.http_status) == ("proxy", "ok", 200)
    assert reply.usage is not None
    assert event.input_tokens == reply.usage.prompt_tokens
    assert event.output_tokens == reply.usage.completion_tokens
    assert event.latency_ms is not None
    assert event.latency_ms > 0
    assert event.prompt_hash
    assert_matches_fake(rig)


async def test_an_upstream_url_with_a_query_string_keeps_it_after_the_path(
    rig: ProxyRig,
) -> None:
    # as Azure OpenAI's `...?api-version=...` bases are written
    own = AgentRoute(agent="azure", openai_upstream=rig.fake.url + "/v1?api-version=2024-10-21")
    base = rig.proxy.base_urls(rig.routes.add(own))["OPENAI_BASE_URL"]
    async with openai.AsyncOpenAI(base_url=base, api_key=API_KEY, max_retries=0) as client:
        reply = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    (event,) = await rig.gate.wait_settled(1)
    assert (event.agent, event.status) == ("azure", "ok")
    assert reply.usage is not None
    assert event.input_tokens == reply.usage.prompt_tokens


async def test_streaming_chat_without_include_usage_hides_the_usage_chunk(
    rig: ProxyRig,
    oai: openai.AsyncOpenAI,
) -> None:
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,  # type: ignore[arg-type]
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    # the client did not ask for usage: it never sees the chunk the proxy asked for
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    (event,) = await rig.gate.wait_settled(1)
    assert event.output_tokens > 0
    assert event.ttft_ms is not None
    assert_matches_fake(rig)


async def test_streaming_chat_with_include_usage_keeps_it(
    rig: ProxyRig,
    oai: openai.AsyncOpenAI,
) -> None:
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    usage = chunks[-1].usage
    assert usage is not None
    assert not chunks[-1].choices
    (event,) = await rig.gate.wait_settled(1)
    assert (event.input_tokens, event.output_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert_matches_fake(rig)


async def test_legacy_completions_and_embeddings(rig: ProxyRig, oai: openai.AsyncOpenAI) -> None:
    await oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", max_tokens=20)
    stream = await oai.completions.create(
        model="gpt-3.5-turbo-instruct", prompt=["one", "two"], max_tokens=20, stream=True
    )
    assert [c async for c in stream]
    await oai.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta gamma"])
    events = await rig.gate.wait_settled(3)
    assert [e.endpoint for e in events] == [
        "/v1/completions",
        "/v1/completions",
        "/v1/embeddings",
    ]
    assert events[2].output_tokens == 0
    assert_matches_fake(rig)


async def test_responses_api_json_and_stream(rig: ProxyRig, oai: openai.AsyncOpenAI) -> None:
    reply = await oai.responses.create(model="o4-mini", input="Why is the sky blue?")
    assert reply.usage is not None
    async with oai.responses.stream(
        model="o4-mini", input="Count to five.", instructions="Be brief."
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()
    assert final.usage is not None
    events = await rig.gate.wait_settled(2)
    assert events[0].output_tokens == reply.usage.output_tokens
    assert events[1].input_tokens == final.usage.input_tokens
    assert events[1].reasoning_tokens == final.usage.output_tokens_details.reasoning_tokens
    assert_matches_fake(rig)


@pytest.fixture
async def ant(rig: ProxyRig) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=rig.anthropic_url, api_key=API_KEY, max_retries=0
    ) as client:
        yield client


async def test_anthropic_messages_json_and_stream(
    rig: ProxyRig, ant: anthropic.AsyncAnthropic
) -> None:
    client = ant
    system = "You answer in one line. " * 300  # long enough to be cached on the second call
    msg = [{"role": "user", "content": "What is a token?"}]
    first = await client.messages.create(
        model="claude-haiku-4-5",
        max_tokens=200,
        system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
        messages=msg,  # type: ignore[arg-type]
    )
    assert first.usage.output_tokens > 0
    async with client.messages.stream(
        model="claude-haiku-4-5",
        max_tokens=200,
        system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
        messages=msg,  # type: ignore[arg-type]
    ) as stream:
        final = await stream.get_final_message()
    events = await rig.gate.wait_settled(2)
    assert all(e.provider == "anthropic" and e.endpoint == "/v1/messages" for e in events)
    u = final.usage
    expected = (
        u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
    )
    assert events[1].input_tokens == expected
    assert events[1].output_tokens == u.output_tokens
    assert events[0].cache_write_tokens + events[1].cache_read_tokens > 0
    assert_matches_fake(rig)
    # count_tokens is free: relayed, not recorded
    counted = await client.messages.count_tokens(model="claude-haiku-4-5", messages=msg)  # type: ignore[arg-type]
    assert counted.input_tokens > 0
    assert len(rig.gate.events) == 2


async def test_sync_openai_client_in_a_thread(rig: ProxyRig) -> None:
    import anyio.to_thread

    def call() -> int:
        with openai.OpenAI(base_url=rig.openai_url, api_key=API_KEY, max_retries=0) as client:
            reply = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
            models = client.models.list()
            assert any(m.id for m in models)
            assert reply.usage is not None
            return reply.usage.total_tokens

    total = await anyio.to_thread.run_sync(call)
    (event,) = await rig.gate.wait_settled(1)
    assert event.total_tokens == total
    assert_matches_fake(rig)


async def test_curl_gets_the_upstream_bytes(rig: ProxyRig) -> None:
    import json
    import shutil

    import anyio

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 30})
    done = await anyio.run_process(
        [
            "curl",
            "-sS",
            "--fail-with-body",
            rig.openai_url + "/chat/completions",
            "-H",
            f"Authorization: Bearer {API_KEY}",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ]
    )
    reply = json.loads(done.stdout)
    (event,) = await rig.gate.wait_settled(1)
    assert event.output_tokens == reply["usage"]["completion_tokens"]
    assert_matches_fake(rig)


async def test_client_that_did_not_ask_for_usage_sees_no_trace_of_it(rig: ProxyRig) -> None:
    import aiohttp

    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(rig.openai_url + "/chat/completions", json=body, headers=headers) as resp,
    ):
        text = (await resp.read()).decode()
    assert "usage" not in text
    assert text.rstrip().endswith("data: [DONE]")
    (event,) = await rig.gate.wait_settled(1)
    assert event.output_tokens == rig.fake.calls[0].output_tokens


async def test_near_duplicate_prompts_share_a_shape_but_not_a_hash(
    rig: ProxyRig, oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    # A loop that only bumps a counter or a timestamp must look the same to the runaway detector.
    for attempt in (1, 2):
        prompt = f"Attempt {attempt} at 2026-11-23T10:0{attempt}:00Z: fix the failing test"
        await oai.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
        )
        await ant.messages.create(
            model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": prompt}]
        )
    events = await rig.gate.wait_settled(4)
    openai_calls = [e for e in events if e.provider == "openai"]
    claude_calls = [e for e in events if e.provider == "anthropic"]
    for first, second in (openai_calls, claude_calls):
        assert first.prompt_hash != second.prompt_hash
        assert first.prompt_shape == second.prompt_shape != ""

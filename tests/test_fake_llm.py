"""The fake LLM speaks OpenAI and Anthropic well enough that the official async SDKs report its usage."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import aiohttp
import anthropic
import anyio
import httpx2
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fake_llm_fixtures import API_KEY, anthropic_client, fake_llm, openai_client
from tokenwatch.demo.fake_exchange import DEFAULT_SLOW_MS, Fault, parse_fault
from tokenwatch.demo.fake_llm import CountedCall, FakeLLM, running_fake_llm

__all__ = ["anthropic_client", "fake_llm", "openai_client"]

HELLO: list[Any] = [{"role": "user", "content": "Say hello to the tokenwatch test suite."}]
CLAUDE = "claude-haiku-4-5"
# ~1,500 tokens: long enough for provider-side prompt caching (>= 1024 tokens)
LONG_SYSTEM = "You are a careful assistant. " * 250


def only_call(fake: FakeLLM) -> CountedCall:
    assert len(fake.calls) == 1, fake.calls
    return fake.calls[0]


def billed(call: CountedCall) -> tuple[int, int]:
    """(input, output) tokens as the server counted them: what the SDK must report."""
    return call.input_tokens, call.output_tokens


async def test_chat_completion_usage_matches_what_the_server_counted(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    reply = await openai_client.chat.completions.create(model="gpt-4o", messages=HELLO)
    call = only_call(fake_llm)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == call.input_tokens > 0
    assert reply.usage.completion_tokens == call.output_tokens > 0
    assert reply.usage.total_tokens == call.input_tokens + call.output_tokens
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion"
    assert (call.endpoint, call.model, call.stream, call.status) == (
        "/v1/chat/completions",
        "gpt-4o",
        False,
        200,
    )


async def test_replies_are_deterministic(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    first = await openai_client.chat.completions.create(model="gpt-4o", messages=HELLO)
    second = await openai_client.chat.completions.create(model="gpt-4o", messages=HELLO)
    other = await openai_client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Something else entirely."}]
    )
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content


async def test_replies_to_the_last_message_answer_a_question_asked_again_alike() -> None:
    question = {"role": "user", "content": "Is the deployment healthy?"}
    history: list[Any] = [{"role": "user", "content": "Check service-42."}]
    answers: dict[bool, list[str | None]] = {}
    for to_last in (False, True):
        async with (
            running_fake_llm(reply_to_last=to_last) as fake,
            openai.AsyncOpenAI(base_url=fake.url + "/v1", api_key=API_KEY) as client,
        ):
            got = answers[to_last] = []
            messages = list(history)
            for _ in range(3):
                messages.append(question)
                reply = await client.chat.completions.create(model="gpt-4o", messages=messages)
                got.append(reply.choices[0].message.content)
                messages.append({"role": "assistant", "content": got[-1]})
    assert len(set(answers[True])) == 1
    assert len(set(answers[False])) == 3  # by default the whole conversation chooses


async def test_stream_with_include_usage_ends_with_a_usage_chunk(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    stream = await openai_client.chat.completions.create(
        model="gpt-4o-mini",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    *body, last = chunks
    assert last.choices == []
    assert last.usage is not None
    call = only_call(fake_llm)
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == billed(call)
    assert all(c.usage is None for c in body)
    assert body[0].choices[0].delta.role == "assistant"
    assert body[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text
    assert call.stream is True


async def test_stream_without_include_usage_has_no_usage_chunk(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    stream = await openai_client.chat.completions.create(
        model="gpt-4o", messages=HELLO, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert only_call(fake_llm).output_tokens > 0


async def test_reasoning_model_reports_reasoning_inside_completion_tokens(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    reply = await openai_client.chat.completions.create(model="o3", messages=HELLO)
    call = only_call(fake_llm)
    assert reply.usage is not None
    details = reply.usage.completion_tokens_details
    assert details is not None
    assert details.reasoning_tokens == call.reasoning_tokens > 0
    assert reply.usage.completion_tokens == call.output_tokens > call.reasoning_tokens


async def test_max_tokens_truncates_with_finish_reason_length(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    reply = await openai_client.chat.completions.create(
        model="gpt-4o", messages=HELLO, max_completion_tokens=3
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 3
    assert reply.choices[0].finish_reason == "length"
    reasoning = await openai_client.chat.completions.create(
        model="gpt-5-mini", messages=HELLO, max_completion_tokens=40
    )
    assert reasoning.usage is not None
    assert reasoning.usage.completion_tokens <= 40


async def test_repeated_long_prefix_gets_cached_tokens(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    system = {"role": "system", "content": LONG_SYSTEM}
    first = await openai_client.chat.completions.create(
        model="gpt-4.1", messages=[system, {"role": "user", "content": "First question?"}]
    )
    second = await openai_client.chat.completions.create(
        model="gpt-4.1", messages=[system, {"role": "user", "content": "Second question?"}]
    )
    assert first.usage is not None
    assert second.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None
    assert 1024 <= cached <= second.usage.prompt_tokens
    assert cached % 128 == 0
    assert [c.cache_read_tokens for c in fake_llm.calls] == [0, cached]
    # prompt_tokens include the cached ones, the OpenAI way
    assert fake_llm.calls[1].input_tokens == second.usage.prompt_tokens


async def test_short_prompts_are_never_cached(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    for _ in range(2):
        await openai_client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert [c.cache_read_tokens for c in fake_llm.calls] == [0, 0]


async def test_responses_api_json(fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI) -> None:
    response = await openai_client.responses.create(
        model="gpt-4.1", input="Say hello.", instructions="Be brief."
    )
    call = only_call(fake_llm)
    assert response.id.startswith("resp_")
    assert response.status == "completed"
    assert response.output_text
    assert response.usage is not None
    assert response.usage.input_tokens == call.input_tokens > 0
    assert response.usage.output_tokens == call.output_tokens > 0
    assert response.usage.total_tokens == call.input_tokens + call.output_tokens
    assert call.endpoint == "/v1/responses"


RESPONSE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


async def test_responses_api_stream_has_the_real_event_sequence(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    stream = await openai_client.responses.create(model="gpt-4.1", input="Say hello.", stream=True)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert collapsed == RESPONSE_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    assert deltas == done.text
    final = events[-1].response  # type: ignore[union-attr]
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == billed(only_call(fake_llm))


async def test_responses_stream_helper_and_reasoning(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    async with openai_client.responses.stream(model="o4-mini", input="Think, then answer.") as s:
        text = [e.delta async for e in s if e.type == "response.output_text.delta"]
        final = await s.get_final_response()
    call = only_call(fake_llm)
    assert "".join(text) == final.output_text
    assert final.output[0].type == "reasoning"
    assert final.usage is not None
    assert final.usage.output_tokens_details.reasoning_tokens == call.reasoning_tokens > 0
    assert final.usage.output_tokens == call.output_tokens


async def test_responses_max_output_tokens_marks_incomplete(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    response = await openai_client.responses.create(
        model="gpt-4.1", input="Say hello.", max_output_tokens=16
    )
    full = await openai_client.responses.create(model="gpt-4.1", input="Say hello.")
    assert full.usage is not None
    assert response.usage is not None
    if full.usage.output_tokens > 16:
        assert response.status == "incomplete"
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens <= 16


async def test_embeddings_base64_and_float(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    default = await openai_client.embeddings.create(
        model="text-embedding-3-small", input=["hello world", "tiktoken is great!"]
    )
    floats = await openai_client.embeddings.create(
        model="text-embedding-3-small", input="hello world", encoding_format="float", dimensions=8
    )
    assert [len(d.embedding) for d in default.data] == [1536, 1536]
    assert math.isclose(sum(v * v for v in default.data[0].embedding), 1.0, rel_tol=1e-4)
    assert len(floats.data[0].embedding) == 8
    # 2 + 6 tokens (hand-checked), then 2
    assert default.usage.prompt_tokens == 8
    assert floats.usage.prompt_tokens == 2
    assert [c.input_tokens for c in fake_llm.calls] == [8, 2]


async def test_models_list(fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI) -> None:
    models = [m.id async for m in openai_client.models.list()]
    assert "gpt-4o" in models
    assert fake_llm.calls == []


async def test_legacy_completions_json_and_stream(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    done = await openai_client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="Once upon a time", max_tokens=5
    )
    assert done.usage is not None
    assert done.usage.completion_tokens == 5
    assert done.choices[0].finish_reason == "length"
    stream = await openai_client.completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt="Once upon a time",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert [c.output_tokens for c in fake_llm.calls] == [5, 5]


async def test_anthropic_message_usage_matches_what_the_server_counted(
    fake_llm: FakeLLM, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    message = await anthropic_client.messages.create(model=CLAUDE, max_tokens=200, messages=HELLO)
    call = only_call(fake_llm)
    assert message.usage.input_tokens == call.input_tokens > 0
    assert message.usage.output_tokens == call.output_tokens > 0
    assert message.stop_reason == "end_turn"
    assert message.id.startswith("msg_")
    assert message.content[0].type == "text"


async def test_anthropic_max_tokens_stop_reason(
    fake_llm: FakeLLM, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    message = await anthropic_client.messages.create(model=CLAUDE, max_tokens=4, messages=HELLO)
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 4


ANTHROPIC_EVENTS = [
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
]


async def test_anthropic_raw_stream_events(
    fake_llm: FakeLLM, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    stream = await anthropic_client.messages.create(
        model=CLAUDE, max_tokens=200, messages=HELLO, stream=True
    )
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert collapsed == ANTHROPIC_EVENTS
    call = only_call(fake_llm)
    start = events[0]
    end = next(e for e in events if e.type == "message_delta")
    assert start.message.usage.input_tokens == call.input_tokens  # type: ignore[union-attr]
    assert end.usage.output_tokens == call.output_tokens  # type: ignore[union-attr]
    assert end.delta.stop_reason == "end_turn"  # type: ignore[union-attr]


async def test_anthropic_stream_helper(
    fake_llm: FakeLLM, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    async with anthropic_client.messages.stream(
        model=CLAUDE, max_tokens=200, messages=HELLO
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == final.content[0].text  # type: ignore[union-attr]
    assert (final.usage.input_tokens, final.usage.output_tokens) == billed(only_call(fake_llm))


async def test_anthropic_cache_control_writes_then_reads(
    fake_llm: FakeLLM, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    system: Any = [{"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}]
    first = await anthropic_client.messages.create(
        model=CLAUDE, max_tokens=50, system=system, messages=HELLO
    )
    second = await anthropic_client.messages.create(
        model=CLAUDE,
        max_tokens=50,
        system=system,
        messages=[{"role": "user", "content": "A different question."}],
    )
    written = first.usage.cache_creation_input_tokens
    assert written is not None
    assert written >= 1024
    assert first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_read_input_tokens == written
    assert second.usage.cache_creation_input_tokens == 0
    # Anthropic's input_tokens exclude the cache; the normalised figure includes it
    for reply, call in zip((first, second), fake_llm.calls, strict=True):
        u = reply.usage
        assert call.input_tokens == (
            u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
        )
        assert u.input_tokens < 100
    assert [c.cache_write_tokens for c in fake_llm.calls] == [written, 0]
    assert [c.cache_read_tokens for c in fake_llm.calls] == [0, written]


async def test_anthropic_count_tokens_matches_messages_input(
    fake_llm: FakeLLM, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    counted = await anthropic_client.messages.count_tokens(
        model=CLAUDE, system="Be brief.", messages=HELLO
    )
    message = await anthropic_client.messages.create(
        model=CLAUDE, max_tokens=20, system="Be brief.", messages=HELLO
    )
    assert counted.input_tokens == message.usage.input_tokens
    assert [c.endpoint for c in fake_llm.calls] == ["/v1/messages"]


async def test_injected_429_raises_rate_limit_error(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    fault = {"x-fake-llm-fault": "429"}
    with pytest.raises(openai.RateLimitError) as caught:
        await openai_client.chat.completions.create(
            model="gpt-4o", messages=HELLO, extra_headers=fault
        )
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.code == "rate_limit_exceeded"
    with pytest.raises(anthropic.RateLimitError) as anthropic_caught:
        await anthropic_client.messages.create(
            model=CLAUDE, max_tokens=10, messages=HELLO, extra_headers=fault
        )
    assert anthropic_caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert [c.status for c in fake_llm.calls] == [429, 429]


async def test_injected_500_raises_internal_server_error(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.InternalServerError):
        await openai_client.chat.completions.create(
            model="gpt-4o", messages=HELLO, extra_headers={"x-fake-llm-fault": "500"}
        )


async def test_sdk_retries_through_a_scheduled_failure() -> None:
    async with (
        running_fake_llm(fail_every=2, retry_after_s=0.01) as fake,
        openai.AsyncOpenAI(base_url=fake.url + "/v1", api_key=API_KEY, max_retries=2) as client,
    ):
        for _ in range(2):
            await client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert [c.status for c in fake.calls] == [200, 500, 200]


async def consume(stream: Any, into: list[Any]) -> None:
    async for chunk in stream:
        into.append(chunk)


async def test_cut_stream_raises_and_is_counted_incomplete(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    cut3 = {"x-fake-llm-fault": "cut:3"}
    stream = await openai_client.chat.completions.create(
        model="gpt-4o", messages=HELLO, stream=True, extra_headers=cut3
    )
    received: list[Any] = []
    with pytest.raises(openai.APIConnectionError):
        await consume(stream, received)
    assert len(received) == 3
    raw = await anthropic_client.messages.create(
        model=CLAUDE, max_tokens=100, messages=HELLO, stream=True, extra_headers=cut3
    )
    events: list[Any] = []
    # the Anthropic SDK lets the transport's error through while iterating
    with pytest.raises((anthropic.APIConnectionError, httpx2.TransportError)):
        await consume(raw, events)
    # three events were sent before the cut; the SDK swallows the third, a ping
    assert [e.type for e in events] == ["message_start", "content_block_start"]
    assert [c.complete for c in fake_llm.calls] == [False, False]


async def test_server_wide_cut_every() -> None:
    async with (
        running_fake_llm(cut_every=2, cut_after=1) as fake,
        openai.AsyncOpenAI(base_url=fake.url + "/v1", api_key=API_KEY, max_retries=0) as client,
    ):
        for _ in range(2):
            stream = await client.chat.completions.create(
                model="gpt-4o", messages=HELLO, stream=True
            )
            try:
                await consume(stream, [])
            except openai.APIConnectionError:
                pass
    assert [c.complete for c in fake.calls] == [True, False]


async def raw_post(
    fake: FakeLLM, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(fake.url + path, data=body, headers=headers) as resp,
    ):
        return resp.status, json.loads(await resp.read())


async def test_missing_api_key_is_401_in_each_providers_shape(fake_llm: FakeLLM) -> None:
    body = json.dumps({"model": "gpt-4o", "messages": HELLO, "max_tokens": 5}).encode()
    status, openai_err = await raw_post(fake_llm, "/v1/chat/completions", body, {})
    assert status == 401
    assert set(openai_err["error"]) == {"message", "type", "param", "code"}
    status, anthropic_err = await raw_post(fake_llm, "/v1/messages", body, {})
    assert status == 401
    assert anthropic_err["type"] == "error"
    assert anthropic_err["error"]["type"] == "authentication_error"
    # like the real APIs, the key is checked before the body is even read
    status, _ = await raw_post(fake_llm, "/v1/chat/completions", b"{not json", {})
    assert status == 401


async def test_bad_requests_are_400_and_say_why(fake_llm: FakeLLM) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    status, err = await raw_post(fake_llm, "/v1/chat/completions", b"{not json", auth)
    assert status == 400
    assert "JSON" in err["error"]["message"]
    no_messages = json.dumps({"model": "gpt-4o"}).encode()
    status, err = await raw_post(fake_llm, "/v1/chat/completions", no_messages, auth)
    assert status == 400
    assert "messages" in err["error"]["message"]
    bad_fault = {**auth, "x-fake-llm-fault": "explode"}
    status, err = await raw_post(fake_llm, "/v1/chat/completions", no_messages, bad_fault)
    assert status == 400
    assert "x-fake-llm-fault" in err["error"]["message"]
    assert [c.status for c in fake_llm.calls] == [400, 400, 400]


async def test_anthropic_requires_max_tokens(fake_llm: FakeLLM) -> None:
    body = json.dumps({"model": CLAUDE, "messages": HELLO}).encode()
    status, err = await raw_post(fake_llm, "/v1/messages", body, {"x-api-key": API_KEY})
    assert status == 400
    assert err["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in err["error"]["message"]
    assert [c.status for c in fake_llm.calls] == [400]


async def test_calls_endpoint_lists_what_was_billed(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    await openai_client.chat.completions.create(model="gpt-4o", messages=HELLO)
    async with (
        aiohttp.ClientSession() as session,
        session.get(fake_llm.url + "/_fake/calls") as resp,
    ):
        listed = await resp.json()
    assert [CountedCall(**c) for c in listed] == fake_llm.calls
    async with aiohttp.ClientSession() as session, session.post(fake_llm.url + "/_fake/reset"):
        pass
    assert fake_llm.calls == []


def test_fault_header_forms() -> None:
    assert parse_fault("429") == Fault(status=429)
    assert parse_fault("cut") == Fault(cut_after=1)
    assert parse_fault(" cut:3 , slow:50 ") == Fault(cut_after=3, delay_ms=50.0)
    assert parse_fault("slow") == Fault(delay_ms=DEFAULT_SLOW_MS)
    for bad in ("200", "cut:-1", "slow:nan", "slow:inf", "boom", "429:1", ""):
        with pytest.raises(ValueError, match="x-fake-llm-fault"):
            parse_fault(bad)


@settings(max_examples=300)
@given(st.text(max_size=20))
def test_any_fault_header_parses_or_is_refused_clearly(value: str) -> None:
    try:
        fault = parse_fault(value)
    except ValueError as exc:
        refusal = str(exc)
        assert "x-fake-llm-fault" in refusal
        return
    assert fault.status == 0 or 400 <= fault.status <= 599
    assert fault.cut_after is None or fault.cut_after >= 0
    assert 0 <= fault.delay_ms < math.inf


async def test_cut_json_reply_breaks_the_body(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.APIConnectionError):
        await openai_client.chat.completions.create(
            model="gpt-4o", messages=HELLO, extra_headers={"x-fake-llm-fault": "cut:10"}
        )
    assert [(c.status, c.complete) for c in fake_llm.calls] == [(200, False)]


async def test_client_hanging_up_mid_stream_is_counted_incomplete_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = json.dumps({"model": "gpt-4o", "stream": True, "messages": HELLO}).encode()
    async with running_fake_llm(chunk_ms=50) as fake:
        async with aiohttp.ClientSession() as session:
            resp = await session.post(
                fake.url + "/v1/chat/completions",
                data=body,
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
            assert (await resp.content.readline()).startswith(b"data: ")
            resp.close()
        with anyio.fail_after(30):
            while not fake.calls:
                await anyio.sleep(0.01)
    assert [(c.stream, c.complete) for c in fake.calls] == [(True, False)]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
CHAT_TOOLS: Any = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]


async def test_forced_chat_tool_call_json_and_stream(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    reply = await openai_client.chat.completions.create(
        model="gpt-4o", messages=HELLO, tools=CHAT_TOOLS, tool_choice="required"
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert set(arguments) == {"city", "days"}
    async with openai_client.chat.completions.stream(
        model="gpt-4o",
        messages=HELLO,
        tools=CHAT_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        stream_options={"include_usage": True},
    ) as stream:
        final = await stream.get_final_completion()
    (streamed,) = final.choices[0].message.tool_calls or []
    assert streamed.function.name == "get_time"  # type: ignore[union-attr]
    assert streamed.function.arguments == "{}"  # type: ignore[union-attr]
    assert reply.usage is not None
    assert final.usage is not None
    assert [c.output_tokens for c in fake_llm.calls] == [
        reply.usage.completion_tokens,
        final.usage.completion_tokens,
    ]


async def test_auto_tool_choice_answers_in_text(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    reply = await openai_client.chat.completions.create(
        model="gpt-4o", messages=HELLO, tools=CHAT_TOOLS
    )
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"


async def test_forced_responses_function_call(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    tools: Any = [{"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA}]
    response = await openai_client.responses.create(
        model="gpt-4.1", input="Weather?", tools=tools, tool_choice="required"
    )
    (item,) = response.output
    assert item.type == "function_call"
    assert item.name == "get_weather"
    async with openai_client.responses.stream(
        model="gpt-4.1", input="Weather?", tools=tools, tool_choice="required"
    ) as stream:
        deltas = [
            e.delta async for e in stream if e.type == "response.function_call_arguments.delta"
        ]
        final = await stream.get_final_response()
    (streamed,) = final.output
    assert streamed.type == "function_call"
    assert "".join(deltas) == streamed.arguments == item.arguments
    assert final.usage is not None
    assert final.usage.output_tokens == fake_llm.calls[-1].output_tokens


async def test_forced_anthropic_tool_use(
    fake_llm: FakeLLM, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    tools: Any = [{"name": "get_weather", "input_schema": WEATHER_SCHEMA}]
    message = await anthropic_client.messages.create(
        model=CLAUDE, max_tokens=100, messages=HELLO, tools=tools, tool_choice={"type": "any"}
    )
    (block,) = message.content
    assert message.stop_reason == "tool_use"
    assert block.type == "tool_use"
    assert set(block.input) == {"city", "days"}  # type: ignore[arg-type]
    async with anthropic_client.messages.stream(
        model=CLAUDE,
        max_tokens=100,
        messages=HELLO,
        tools=tools,
        tool_choice={"type": "tool", "name": "get_weather"},
    ) as stream:
        final = await stream.get_final_message()
    (streamed,) = final.content
    assert streamed.type == "tool_use"
    assert streamed.input == block.input
    assert [c.output_tokens for c in fake_llm.calls] == [
        message.usage.output_tokens,
        final.usage.output_tokens,
    ]


async def test_forcing_an_unknown_tool_is_400(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.BadRequestError, match="not in 'tools'"):
        await openai_client.chat.completions.create(
            model="gpt-4o",
            messages=HELLO,
            tools=CHAT_TOOLS,
            tool_choice={"type": "function", "function": {"name": "launch_rockets"}},
        )


async def test_stopping_does_not_wait_for_a_slow_request() -> None:
    body = json.dumps({"model": "gpt-4o", "messages": HELLO}).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "x-fake-llm-fault": "slow:600000"}
    outcome: list[str] = []

    async def ask(url: str) -> None:
        try:
            async with aiohttp.ClientSession() as session:
                await session.post(url, data=body, headers=headers)
            outcome.append("answered")
        except aiohttp.ClientError:
            outcome.append("dropped")

    # a 10-minute request in flight: stopping must drop it, not wait (aiohttp would wait 60 s)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg, running_fake_llm() as fake:
            tg.start_soon(ask, fake.url + "/v1/chat/completions")
            while fake.statistics()["requests"] == 0:
                await anyio.sleep(0.01)
    assert outcome == ["dropped"]
    assert fake.calls == []


async def test_anthropic_extended_thinking(
    fake_llm: FakeLLM, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    thinking: Any = {"type": "enabled", "budget_tokens": 2048}
    message = await anthropic_client.messages.create(
        model=CLAUDE, max_tokens=4096, messages=HELLO, thinking=thinking
    )
    thought, answer = message.content
    assert thought.type == "thinking"
    assert answer.type == "text"
    assert thought.thinking
    assert thought.signature
    async with anthropic_client.messages.stream(
        model=CLAUDE, max_tokens=4096, messages=HELLO, thinking=thinking
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == answer.text
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == thought.thinking  # type: ignore[union-attr]
    first, second = fake_llm.calls
    # Anthropic bills thinking inside output_tokens; the normalised call also says how much
    assert message.usage.output_tokens == first.output_tokens > first.reasoning_tokens > 0
    assert final.usage.output_tokens == second.output_tokens


@pytest.mark.parametrize(
    ("budget", "max_tokens", "complaint"),
    [(100, 4096, "budget_tokens"), (2000, 2000, "max_tokens")],
)
async def test_anthropic_thinking_budget_is_checked(
    fake_llm: FakeLLM,
    anthropic_client: anthropic.AsyncAnthropic,
    budget: int,
    max_tokens: int,
    complaint: str,
) -> None:
    with pytest.raises(anthropic.BadRequestError, match=complaint):
        await anthropic_client.messages.create(
            model=CLAUDE,
            max_tokens=max_tokens,
            messages=HELLO,
            thinking={"type": "enabled", "budget_tokens": budget},
        )


async def sse_payloads(fake: FakeLLM, body: dict[str, Any]) -> list[Any]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(fake.url + "/v1/chat/completions", json=body, headers=headers) as resp,
    ):
        raw = (await resp.read()).decode()
    data = [line.removeprefix("data: ") for line in raw.splitlines() if line.startswith("data: ")]
    return [json.loads(d) for d in data if d != "[DONE]"]


async def test_stream_deltas_carry_obfuscation_unless_declined(fake_llm: FakeLLM) -> None:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": HELLO, "stream": True}
    padded = await sse_payloads(fake_llm, body)
    assert all(chunk["obfuscation"] for chunk in padded)
    declined = await sse_payloads(
        fake_llm, {**body, "stream_options": {"include_obfuscation": False}}
    )
    assert not any("obfuscation" in chunk for chunk in declined)
    assert [c["choices"] for c in declined] == [c["choices"] for c in padded]

"""The fake LLM speaks OpenAI and Anthropic well enough that the official async SDKs report its usage."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.fake_llm_fixtures import anthropic_client, fake_llm, openai_client
from tokenwatch.demo.fake_llm import CountedCall, FakeLLM

__all__ = ["anthropic_client", "fake_llm", "openai_client"]

HELLO = [{"role": "user", "content": "Say hello to the tokenwatch test suite."}]


def only_call(fake: FakeLLM) -> CountedCall:
    assert len(fake.calls) == 1, fake.calls
    return fake.calls[0]


async def test_chat_completion_usage_matches_what_the_server_counted(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    reply = await openai_client.chat.completions.create(model="gpt-4o", messages=HELLO)
    call = only_call(fake_llm)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == call.input_tokens > 0
    assert reply.usage.completion_tokens == call.output_tokens > 0
    assert reply.choices[0].message.content
    assert reply.id.startswith("chatcmpl-")
    assert (call.endpoint, call.model, call.stream, call.status) == (
        "/v1/chat/completions", "gpt-4o", False, 200,
    )


async def test_anthropic_message_usage_matches_what_the_server_counted(
    fake_llm: FakeLLM, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    message = await anthropic_client.messages.create(
        model="claude-sonnet-4-5", max_tokens=200, messages=HELLO
    )
    call = only_call(fake_llm)
    assert message.usage.input_tokens == call.input_tokens > 0
    assert message.usage.output_tokens == call.output_tokens > 0
    assert message.stop_reason == "end_turn"
    assert message.id.startswith("msg_")


async def test_injected_429_raises_rate_limit_error(
    fake_llm: FakeLLM, openai_client: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await openai_client.chat.completions.create(
            model="gpt-4o", messages=HELLO, extra_headers={"x-fake-llm-fault": "429"}
        )
    assert caught.value.response.headers["retry-after"] == "1"
    assert only_call(fake_llm).status == 429

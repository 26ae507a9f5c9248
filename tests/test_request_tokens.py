"""Every part a provider bills as input counts toward a call's reservation, in every wire format,
whichever path counts it: the proxy (a JSON body) or the SDK (the call's keyword arguments)."""

from __future__ import annotations

import copy
from typing import Any

import openai
import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwatch.client import prompt
from tokenwatch.core.request_tokens import (
    ANTHROPIC_TOOL_PROMPT,
    CHAT,
    COMPLETIONS,
    MESSAGES,
    RESPONSES,
    billed_parts,
    count_request,
)
from tokenwatch.proxy import anthropic_usage, openai_usage

PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "The city, e.g. Paris"}},
    "required": ["city"],
}
SCHEMA = {"name": "weather", "schema": PARAMETERS, "strict": True}
IMAGE_URL = "https://example.com/cat.png"
HI = [{"role": "user", "content": "What is the weather in Paris?"}]

CHAT_PARTS: dict[str, Any] = {
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather now",
                "parameters": PARAMETERS,
            },
        }
    ],
    "functions": [{"name": "get_weather", "description": "Weather now", "parameters": PARAMETERS}],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "function_call": {"name": "get_weather"},
    "response_format": {"type": "json_schema", "json_schema": SCHEMA},
}
RESPONSES_PARTS: dict[str, Any] = {
    "instructions": "You are a terse weather bot.",
    "tools": [{"type": "function", "name": "get_weather", "parameters": PARAMETERS}],
    "tool_choice": {"type": "function", "name": "get_weather"},
    "text": {"format": {"type": "json_schema", **SCHEMA}},
    "prompt": {"id": "pmpt_123", "variables": {"city": "Paris"}},
}
ANTHROPIC_PARTS: dict[str, Any] = {
    "system": [{"type": "text", "text": "You are a terse weather bot."}],
    "tools": [{"name": "get_weather", "description": "Weather now", "input_schema": PARAMETERS}],
    "tool_choice": {"type": "tool", "name": "get_weather"},
    "output_format": {"type": "json_schema", "schema": PARAMETERS},
}
BASES: dict[str, dict[str, Any]] = {
    CHAT: {"model": "gpt-4o-mini", "messages": HI},
    RESPONSES: {"model": "gpt-4o-mini", "input": "What is the weather in Paris?"},
    MESSAGES: {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": HI},
    COMPLETIONS: {"model": "gpt-3.5-turbo-instruct", "prompt": "The weather in Paris is"},
}
CASES = [
    *[(CHAT, key, value) for key, value in CHAT_PARTS.items()],
    *[(RESPONSES, key, value) for key, value in RESPONSES_PARTS.items()],
    *[(MESSAGES, key, value) for key, value in ANTHROPIC_PARTS.items()],
    (MESSAGES, "system", "You are a terse weather bot."),
    (COMPLETIONS, "suffix", " and that is all."),
]


def proxy_count(endpoint: str, body: dict[str, Any]) -> int:
    """What the proxy reserves for this body as input."""
    read = anthropic_usage.read_request if endpoint == MESSAGES else openai_usage.read_request
    facts = read(endpoint, body)
    assert facts.prompt is not None
    return facts.prompt().tokens


def sdk_count(endpoint: str, body: dict[str, Any]) -> int:
    """What the SDK reserves for these keyword arguments as input."""
    tokens, _ = prompt.count_prompt(endpoint, body, str(body["model"]))
    return tokens


@pytest.mark.parametrize(("endpoint", "key", "value"), CASES, ids=[f"{e}:{k}" for e, k, _ in CASES])
def test_each_billed_part_adds_to_the_count(endpoint: str, key: str, value: Any) -> None:
    base = BASES[endpoint]
    more = {**base, key: value}
    model = str(base["model"])
    grown = count_request(endpoint, more, model)
    assert grown.tokens > count_request(endpoint, base, model).tokens
    assert proxy_count(endpoint, more) == grown.tokens > proxy_count(endpoint, base)
    assert sdk_count(endpoint, more) == grown.tokens > sdk_count(endpoint, base)


IMAGES = [
    (CHAT, {"type": "image_url", "image_url": {"url": IMAGE_URL}}),
    (MESSAGES, {"type": "image", "source": {"type": "url", "url": IMAGE_URL}}),
    (MESSAGES, {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}),
]


@pytest.mark.parametrize(("endpoint", "part"), IMAGES, ids=["chat", "anthropic-image", "pdf"])
def test_images_and_documents_in_messages_add_to_the_count(
    endpoint: str, part: dict[str, Any]
) -> None:
    base = BASES[endpoint]
    with_image = copy.deepcopy(base)
    with_image["messages"][0]["content"] = [{"type": "text", "text": HI[0]["content"]}, part]
    assert proxy_count(endpoint, with_image) > proxy_count(endpoint, base)


def test_responses_input_items_and_images_add_to_the_count() -> None:
    base = {"model": "gpt-4o-mini", "input": [{"role": "user", "content": "Weather?"}]}
    image = {"type": "input_image", "image_url": IMAGE_URL}
    pictured = {**base, "input": [{"role": "user", "content": [image]}, *base["input"]]}
    output = {"type": "function_call_output", "call_id": "c1", "output": '{"temp": 21}'}
    answered = {**base, "input": [*base["input"], output]}
    assert proxy_count(RESPONSES, pictured) > proxy_count(RESPONSES, base)
    assert proxy_count(RESPONSES, answered) > proxy_count(RESPONSES, base)


def test_anthropic_tools_add_the_tool_use_system_prompt() -> None:
    base = BASES[MESSAGES]
    tools = ANTHROPIC_PARTS["tools"]
    definitions = count_request(MESSAGES, {**base, "tools": tools}).tokens
    assert definitions >= count_request(MESSAGES, base).tokens + ANTHROPIC_TOOL_PROMPT


def test_the_sdks_not_given_markers_count_nothing() -> None:
    base = BASES[CHAT]
    unset = {**base, "tools": openai.NOT_GIVEN, "response_format": openai.NOT_GIVEN}
    assert count_request(CHAT, unset).tokens == count_request(CHAT, base).tokens


def test_a_pydantic_response_format_counts_its_schema() -> None:
    class Weather(pydantic.BaseModel):
        city: str
        temperature_celsius: float
        summary: str

    base = BASES[CHAT]
    parsed = count_request(CHAT, {**base, "response_format": Weather}).tokens
    assert parsed > count_request(CHAT, base).tokens + 20  # the schema, not just a class name


def test_the_sdks_rough_count_before_its_tokenizer_loads_takes_every_billed_part() -> None:
    kwargs = {**BASES[CHAT], **CHAT_PARTS, "max_tokens": 50, "extra_headers": {"x-a": "b"}}
    assert set(billed_parts(CHAT, kwargs)) == {"messages", *CHAT_PARTS}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


@given(
    st.sampled_from([CHAT, RESPONSES, MESSAGES, COMPLETIONS]),
    st.dictionaries(
        st.sampled_from(["messages", "input", "instructions", "system", "prompt", "tools", "text"]),
        json_values,
    ),
)
def test_any_body_counts_or_raises_what_the_proxy_catches(
    endpoint: str, body: dict[str, Any]
) -> None:
    try:
        assert count_request(endpoint, body).tokens >= 0
    except (TypeError, ValueError):
        pass

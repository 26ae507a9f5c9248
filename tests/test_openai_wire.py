"""The SDK client and the proxy read the same OpenAI answer the same way: one home for the wire's fields."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tokenwatch.client.openai_usage import StreamReading, counted
from tokenwatch.core.request_tokens import CHAT, RESPONSES
from tokenwatch.proxy.openai_usage import OpenAIReader, usage_from
from tokenwatch.proxy.sse import SseEvent

_text = st.text(min_size=0, max_size=12)
_tool_call = st.fixed_dictionaries(
    {"index": st.just(0), "function": st.fixed_dictionaries({"name": _text, "arguments": _text})}
)
_delta = st.fixed_dictionaries(
    {},
    optional={
        "content": _text,
        "reasoning_content": _text,
        "refusal": _text,
        "tool_calls": st.lists(_tool_call, max_size=2),
    },
)
_chunk = st.builds(
    lambda delta: {
        "object": "chat.completion.chunk",
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": delta}],
    },
    _delta,
)
_count = st.integers(min_value=0, max_value=10**6)


def _event(doc: dict[str, Any]) -> SseEvent:
    data = json.dumps(doc).encode()
    return SseEvent(raw=b"data: " + data + b"\n\n", name="", data=data)


@given(st.lists(_chunk, min_size=1, max_size=8))
def test_both_readers_collect_the_same_generated_text(chunks: list[dict[str, Any]]) -> None:
    client = StreamReading()
    proxy = OpenAIReader(CHAT)
    for chunk in chunks:
        client.see(chunk)
        proxy.read_event(_event(chunk))
    assert client.text == proxy.output_text()


@given(_count, _count, _count, _count, st.booleans())
def test_both_readers_normalise_usage_alike(
    prompt: int, completion: int, cached: int, reasoning: int, responses: bool
) -> None:
    if responses:
        usage = {
            "input_tokens": prompt,
            "output_tokens": completion,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens_details": {"reasoning_tokens": reasoning},
        }
    else:
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }
    client = counted(usage)
    proxy = usage_from(usage, RESPONSES if responses else CHAT)
    assert client is not None
    assert proxy is not None
    figures = (prompt, completion, cached, reasoning)
    assert (
        client.input_tokens,
        client.output_tokens,
        client.cache_read_tokens,
        client.reasoning_tokens,
    ) == figures
    assert (
        proxy.input_tokens,
        proxy.output_tokens,
        proxy.cache_read_tokens,
        proxy.reasoning_tokens,
    ) == figures

"""Whatever JSON a client sends, the fake LLM answers 200 or a clear 400 in the provider's shape."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tokenwatch.demo.fake_llm import FakeLLM, fake_llm_in_thread

OPENAI_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"]
ANTHROPIC_PATHS = ["/v1/messages", "/v1/messages/count_tokens"]
KEYS = [
    "role",
    "content",
    "type",
    "text",
    "name",
    "function",
    "parameters",
    "properties",
    "cache_control",
    "input_schema",
    "image_url",
    "tool_calls",
    "include_usage",
]

leaves = st.none() | st.booleans() | st.integers(-3, 2000) | st.text(max_size=12)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)
    ),
    max_leaves=12,
)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)})
content = st.text(max_size=40) | st.lists(text_part | values, min_size=1, max_size=3) | values
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]), "content": content}
)
tool = st.fixed_dictionaries(
    {"type": st.just("function"), "name": st.sampled_from(["f", "g"])},
    optional={"function": values, "parameters": values, "input_schema": values},
)
bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-4o", "o3", "claude-haiku-4-5", "text-embedding-3-small"])},
    optional={
        "messages": st.lists(message, min_size=1, max_size=3) | values,
        "input": st.text(max_size=30) | st.lists(message, max_size=2) | values,
        "prompt": st.text(max_size=30) | values,
        "system": st.text(max_size=30) | values,
        "instructions": st.text(max_size=30) | values,
        "tools": st.lists(tool, max_size=2) | values,
        "tool_choice": st.sampled_from(["required", "auto", {"type": "any"}]) | values,
        "stream": st.booleans(),
        "stream_options": st.just({"include_usage": True}) | values,
        "max_tokens": st.integers(-2, 30),
        "max_output_tokens": st.integers(-2, 30),
        "dimensions": st.integers(-2, 16),
    },
)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLM]:
    with fake_llm_in_thread() as server:
        yield server


def post(url: str, body: Any) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer fuzz", "x-api-key": "fuzz"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@settings(
    max_examples=200,
    suppress_health_check=[
        *settings.default.suppress_health_check,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(path=st.sampled_from(OPENAI_PATHS + ANTHROPIC_PATHS), body=bodies)
def test_any_body_gets_a_reply_or_a_clear_400(
    fake: FakeLLM, path: str, body: dict[str, Any]
) -> None:
    status, raw = post(fake.url + path, body)
    event(f"{path} {status}")
    assert status in (200, 400), raw[:300]
    if status == 400:
        error = json.loads(raw)
        message = error["error"]["message"]
        assert isinstance(message, str)
        assert message
        if path in ANTHROPIC_PATHS:
            assert error["type"] == "error"
        else:
            assert set(error["error"]) == {"message", "type", "param", "code"}
    elif not body.get("stream") or path in ("/v1/embeddings", "/v1/messages/count_tokens"):
        assert isinstance(json.loads(raw), dict)
    else:
        assert raw.endswith(b"\n\n")

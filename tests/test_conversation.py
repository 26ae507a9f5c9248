"""Conversation signals: what a call adds to its conversation, its tool calls and the model's
answer, hashed alike in every wire format, JSON or streamed, and never holding prompt text."""

from __future__ import annotations

import json
from typing import Any

import anyio
import anyio.lowlevel
import orjson
from hypothesis import given
from hypothesis import strategies as st

from bench.traces.wire import WIRES, Talk
from tokenwatch.core import conversation
from tokenwatch.proxy.anthropic_usage import AnthropicReader
from tokenwatch.proxy.openai_usage import CHAT, RESPONSES, OpenAIReader
from tokenwatch.proxy.sse import SseEvent
from tokenwatch.proxy.usage import answer_hash_off_loop

SEARCH = {"pattern": "payment*.yaml"}


def searched(wire: str, times: int, result: str = "no files found") -> Talk:
    talk = Talk(wire)
    talk.user("Find the payment config. The secret word is swordfish.")
    for _ in range(times):
        talk.tool_answer("search_files", SEARCH)
        talk.tool_result(result)
    return talk


def test_a_call_without_history_adds_no_turn() -> None:
    for wire in WIRES:
        talk = Talk(wire)
        talk.user("hello")
        assert conversation.request_signals(wire, talk.body()) == conversation.Signals()


def test_the_same_tool_call_and_result_hash_alike_in_every_wire_whatever_the_history() -> None:
    seen = set()
    for wire in WIRES:
        for times in (1, 2, 5):  # the history grows; the tail repeats; ids change every call
            s = conversation.request_signals(wire, searched(wire, times).body())
            assert s.tool_call == 'search_files(pattern="payment*.yaml")'
            seen.add(s.tool_hash)
    assert len(seen) == 1
    other = conversation.request_signals("chat", searched("chat", 2, "found 1 file").body())
    assert other.tool_hash not in seen


def test_tool_arguments_are_compared_as_data_not_text() -> None:
    talk = searched("chat", 1)
    body = talk.body()
    call = body["messages"][-2]["tool_calls"][0]["function"]
    before = conversation.request_signals("chat", body)
    call["arguments"] = '{ "pattern" :  "payment*.yaml" }'
    assert conversation.request_signals("chat", body) == before


def test_the_new_turn_drops_the_shared_prefix() -> None:
    for wire in WIRES:
        talk = Talk(wire)
        talk.user("Write a tutorial.")
        turns = []
        for _ in range(3):
            talk.text_answer("I cannot.")
            talk.user("Please try.")
            turns.append(conversation.request_signals(wire, talk.body()).turn_hash)
        assert len(set(turns)) == 1
        assert turns[0]


def test_signals_hold_hashes_and_the_tool_label_never_prompt_text() -> None:
    for wire in WIRES:
        s = conversation.request_signals(wire, searched(wire, 2, "secret result text").body())
        text = json.dumps([s.turn_hash, s.turn_shape, s.tool_hash, s.tool_call])
        assert "swordfish" not in text
        assert "secret result" not in text


def test_a_long_tool_label_is_cut() -> None:
    talk = Talk("chat")
    talk.user("go")
    talk.tool_answer("write_file", {"path": "a.txt", "content": "x" * 500})
    talk.tool_result("ok")
    label = conversation.request_signals("chat", talk.body()).tool_call
    assert len(label) == conversation.LABEL_CHARS
    assert label.startswith('write_file(path="a.txt", content="xxx')
    assert label.endswith("…)")


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(["role", "content", "type", "tool_calls", "function", "input"]),
                inner,
                max_size=4,
            )
        ),
        max_leaves=20,
    ),
    st.sampled_from(WIRES),
)
def test_any_json_gives_signals_or_nothing_never_an_error(value: Any, wire: str) -> None:
    for key in ("messages", "input"):
        conversation.request_signals(wire, {key: value})
    conversation.answer_hash(conversation.answer_of(wire, {"choices": value, "content": value}))
    stream = conversation.StreamAnswer(wire)
    for doc in (
        value,
        {"choices": [{"delta": value}]},
        {"type": "content_block_delta", "delta": value},
        {"type": "content_block_start", "content_block": value},
        {"response": value},
    ):
        stream.feed(doc)
    conversation.answer_hash(stream.parts())


# -- answers, as the proxy reads them ---------------------------------------------------------------


def _sse(name: str, doc: Any) -> SseEvent:
    data = orjson.dumps(doc)
    return SseEvent(b"", name, data)


def test_a_tool_call_answer_hashes_alike_from_json_and_from_each_stream() -> None:
    args = json.dumps(SEARCH)
    chat_json = {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "search_files", "arguments": args}}
    ]}}]}  # fmt: skip
    reader = OpenAIReader(CHAT)
    reader.read_json(orjson.dumps(chat_json))
    expected = reader.answer_hash()
    assert expected

    stream = OpenAIReader(CHAT)
    first = {"index": 0, "id": "c", "function": {"name": "search_files", "arguments": ""}}
    stream.read_event(_sse("", {"choices": [{"delta": {"tool_calls": [first]}}]}))
    for piece in (args[:8], args[8:]):
        delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
        stream.read_event(_sse("", {"choices": [{"delta": delta}]}))
    assert stream.answer_hash() == expected

    item = {"type": "function_call", "call_id": "c", "name": "search_files", "arguments": args}
    responses = OpenAIReader(RESPONSES)
    responses.read_event(
        _sse("response.completed", {"type": "response.completed", "response": {"output": [item]}})
    )
    assert responses.answer_hash() == expected

    anthropic = AnthropicReader()
    block = {"type": "tool_use", "id": "t", "name": "search_files", "input": {}}
    anthropic.read_event(_sse("content_block_start", {"type": "content_block_start", "index": 1,
                                                     "content_block": block}))  # fmt: skip
    delta = {"type": "input_json_delta", "partial_json": args}
    anthropic.read_event(
        _sse("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": delta})
    )
    assert anthropic.answer_hash() == expected
    whole = AnthropicReader()
    whole.read_json(orjson.dumps({"type": "message", "content": [{**block, "input": SEARCH}]}))
    assert whole.answer_hash() == expected


async def test_a_long_answer_is_hashed_while_other_calls_go_on() -> None:
    # a file written through a tool call: its shape hash takes milliseconds of regexes
    content = "def step_%d(x):\n    return x + %d  # 2026-12-05T10:00:00Z\n" * 2000
    reader = OpenAIReader(CHAT)
    reader.read_json(orjson.dumps({"choices": [{"message": {"content": content}}]}))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        await anyio.lowlevel.checkpoint()
        before = ticks
        short = await answer_hash_off_loop(reader, output_tokens=10)  # taken as short: inline
        inline_ticks, before = ticks - before, ticks
        long = await answer_hash_off_loop(reader, output_tokens=len(content) // 4)
        threaded_ticks = ticks - before
        tg.cancel_scope.cancel()
    assert long == short == reader.answer_hash() != ""
    assert inline_ticks == 0
    assert threaded_ticks > 0

"""Context trimming: old turns go whole (system prompt kept, tool calls with their results), and
the prompt fake-llm counts shrinks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
from hypothesis import given
from hypothesis import strategies as st

from tests.proxy_fixtures import API_KEY, running_proxy
from tokenwatch.config import OptimizeSettings, TrimSettings
from tokenwatch.proxy.levers import Levers
from tokenwatch.proxy.trim import trim_messages, turns

# -- random conversations, in both wires' shapes ----------------------------------------------

_ids = iter(range(10**9))


@st.composite
def openai_turn(draw: st.DrawFn) -> list[dict[str, Any]]:
    turn: list[dict[str, Any]] = [{"role": "user", "content": draw(st.text(max_size=8))}]
    for _ in range(draw(st.integers(0, 3))):
        ids = [f"call_{next(_ids)}" for _ in range(draw(st.integers(1, 3)))]
        calls = [
            {"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in ids
        ]
        turn.append({"role": "assistant", "content": None, "tool_calls": calls})
        turn.extend({"role": "tool", "tool_call_id": i, "content": "ok"} for i in ids)
    if draw(st.booleans()):
        turn.append({"role": "assistant", "content": draw(st.text(max_size=8))})
    return turn


@st.composite
def anthropic_turn(draw: st.DrawFn) -> list[dict[str, Any]]:
    turn: list[dict[str, Any]] = [{"role": "user", "content": draw(st.text(max_size=8))}]
    for _ in range(draw(st.integers(0, 3))):
        ids = [f"toolu_{next(_ids)}" for _ in range(draw(st.integers(1, 3)))]
        uses = [{"type": "tool_use", "id": i, "name": "f", "input": {}} for i in ids]
        turn.append({"role": "assistant", "content": [{"type": "text", "text": "x"}, *uses]})
        results = [{"type": "tool_result", "tool_use_id": i, "content": "ok"} for i in ids]
        turn.append({"role": "user", "content": results})
    turn.append({"role": "assistant", "content": [{"type": "text", "text": "done"}]})
    return turn


@st.composite
def conversation(draw: st.DrawFn) -> list[dict[str, Any]]:
    shape = draw(st.sampled_from([openai_turn(), anthropic_turn()]))
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": "You are terse."})
    for turn in draw(st.lists(shape, max_size=12)):
        messages.extend(turn)
    return messages


def call_ids(messages: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """(ids of tool calls made, ids of tool results given) in either wire."""
    made: set[str] = set()
    answered: set[str] = set()
    for m in messages:
        made.update(c["id"] for c in m.get("tool_calls") or [])
        if m["role"] == "tool":
            answered.add(m["tool_call_id"])
        for block in m["content"] if isinstance(m["content"], list) else []:
            if block["type"] == "tool_use":
                made.add(block["id"])
            elif block["type"] == "tool_result":
                answered.add(block["tool_use_id"])
    return made, answered


@given(conversation(), st.integers(1, 8))
def test_trimming_keeps_system_prompt_and_every_tool_call_with_its_result(
    messages: list[dict[str, Any]], keep: int
) -> None:
    kept, dropped = trim_messages(messages, keep)
    made, answered = call_ids(kept)
    assert made == answered  # no call without its result, no result without its call
    assert [m for m in kept if m["role"] == "system"] == [
        m for m in messages if m["role"] == "system"
    ]
    assert all(any(k is m for m in messages) for k in kept)  # whole messages, never cut
    rest = [m for m in messages if m["role"] != "system"]
    tail = [m for m in kept if m["role"] != "system"]
    assert tail == rest[len(rest) - len(tail) :]  # the latest turns, in order, unchanged
    assert len(kept) + dropped == len(messages)
    assert len(turns(kept)) == min(keep, len(turns(messages)))
    if dropped:
        assert next(m for m in kept if m["role"] != "system")["role"] == "user"


async def test_trimming_reduces_the_prompt_fake_llm_counts(tmp_path: Path) -> None:
    history: list[dict[str, Any]] = [{"role": "system", "content": "You are terse."}]
    for i in range(10):
        history += [
            {"role": "user", "content": f"Question {i}: " + "tell me more " * 40},
            {"role": "assistant", "content": "More. " * 40},
        ]
    history.append({"role": "user", "content": "And finally?"})
    settings = OptimizeSettings(trim=TrimSettings(enabled=True, keep_turns=2))
    prices = {"gpt-4o": 2.5}
    levers = Levers(settings, price=lambda e: e.input_tokens * prices.get(e.model, 0) / 1e6)
    async with running_proxy(levers=levers) as rig:
        async with openai.AsyncOpenAI(base_url=rig.openai_url, api_key=API_KEY, max_retries=0) as c:
            await c.chat.completions.create(model="gpt-4o", messages=history)  # type: ignore[arg-type]
            await c.chat.completions.create(model="gpt-4o", messages=history[:1] + history[-3:])  # type: ignore[arg-type]
        trimmed, short = await rig.gate.wait_settled(2)
        counted = [call.input_tokens for call in rig.fake.calls]
    assert counted[0] == counted[1]  # the first was cut to the system prompt and the last 2 turns
    assert (trimmed.lever, short.lever) == ("trim", "")
    assert trimmed.saved_tokens > 500
    assert trimmed.saved_usd == trimmed.saved_tokens * 2.5 / 1e6

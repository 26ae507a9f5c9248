"""Context trimming: old turns go whole (system prompt kept, tool calls with their results), and
the prompt fake-llm counts shrinks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.proxy_fixtures import API_KEY, running_proxy
from tokenwatch.config import OptimizeSettings, TrimSettings
from tokenwatch.core.models import UsageEvent
from tokenwatch.proxy.levers import Levers
from tokenwatch.proxy.summary import HEADER, length_key, summary_message, summary_request
from tokenwatch.proxy.trim import cut_request, trim_messages, turns

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
    cut = cut_request({"messages": messages}, keep)
    if cut is None:
        assert not dropped
        return
    assert cut.doc["messages"] == kept
    assert sum(len(turn) for turn in cut.dropped) == dropped
    summarised = cut.summarised(summary_message("what happened"))["messages"]
    made, answered = call_ids(summarised)
    assert made == answered  # the summary stands between whole turns
    assert [m for m in summarised if m["content"] != HEADER + "what happened"] == kept
    first = next(m for m in summarised if m["role"] != "system")
    assert first == summary_message("what happened")  # after the system prompt, where they were


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


# -- a summary of the dropped turns -------------------------------------------------------------

PRICES = {"gpt-4o": 2.5, "gpt-4o-mini": 0.15}
"""USD per million input tokens; output is priced the same here (enough to check the sums)."""


def price(event: UsageEvent) -> float:
    return (event.input_tokens + event.output_tokens) * PRICES.get(event.model, 0) / 1e6


def tool_conversation(questions: int) -> list[dict[str, Any]]:
    """A system prompt and `questions` turns, each a tool call, its result and an answer."""
    history: list[dict[str, Any]] = [{"role": "system", "content": "You are terse."}]
    for i in range(questions):
        calls = [
            {"id": f"call_{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ]
        history += [
            {"role": "user", "content": f"Question {i}: " + "tell me more " * 40},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": "found " * 30},
            {"role": "assistant", "content": "More. " * 40},
        ]
    return history


async def prompt_tokens(url: str, messages: list[dict[str, Any]]) -> int:
    """The prompt tokens fake-llm counts for these messages, sent to it directly."""
    async with openai.AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0) as direct:
        done = await direct.chat.completions.create(model="gpt-4o", messages=messages)  # type: ignore[arg-type]
    assert done.usage is not None
    return done.usage.prompt_tokens


async def test_a_summary_replaces_the_dropped_turns_and_is_charged_to_the_agent() -> None:
    trim = TrimSettings(enabled=True, keep_turns=2, summary_model="gpt-4o-mini")
    levers = Levers(OptimizeSettings(trim=trim), price=price)
    history = tool_conversation(8)
    async with running_proxy(levers=levers) as rig:
        async with openai.AsyncOpenAI(base_url=rig.openai_url, api_key=API_KEY, max_retries=0) as c:
            await c.chat.completions.create(model="gpt-4o", messages=history)  # type: ignore[arg-type]
            longer = tool_conversation(9)  # one turn more: only that one is summarised
            await c.chat.completions.create(model="gpt-4o", messages=longer)  # type: ignore[arg-type]
        summary, trimmed, again, trimmed_again = await rig.gate.wait_settled(4)
        billed = list(rig.fake.calls)
        cut = cut_request({"messages": history}, 2)
        assert cut is not None
        covered, text = levers.summaries.best("coder", "gpt-4o-mini", cut.dropped)
        expected = cut.summarised(summary_message(text))["messages"]
        direct = rig.fake.url + "/v1"
        whole, as_sent = await prompt_tokens(direct, history), await prompt_tokens(direct, expected)
    assert [c.model for c in billed[:4]] == ["gpt-4o-mini", "gpt-4o", "gpt-4o-mini", "gpt-4o"]
    assert covered == len(cut.dropped) == 6
    assert made_by_fake(text)
    assert billed[1].input_tokens == as_sent < whole  # the summary and the last 2 turns, whole
    made, _ = call_ids(expected)
    assert made == {"call_6", "call_7"} == call_ids(expected)[1]  # kept calls with their results
    assert (summary.agent, summary.model, summary.lever, summary.status) == (
        "coder",
        "gpt-4o-mini",
        "summary",
        "ok",
    )
    assert summary.input_tokens == billed[0].input_tokens > 0
    assert summary.output_tokens == billed[0].output_tokens > 0
    assert trimmed.lever == "trim"
    assert trimmed.saved_tokens == whole - as_sent
    assert trimmed.saved_usd == pytest.approx(trimmed.saved_tokens * 2.5 / 1e6 - price(summary))
    assert billed[2].input_tokens < billed[0].input_tokens  # the summary so far and one turn
    assert again.lever == "summary"
    assert trimmed_again.saved_usd == pytest.approx(
        trimmed_again.saved_tokens * 2.5 / 1e6 - price(again)
    )


def made_by_fake(text: str) -> bool:
    return bool(text) and not text.startswith(HEADER)


async def test_a_summary_that_fails_drops_the_turns_plainly_with_an_alert() -> None:
    trim = TrimSettings(
        enabled=True, keep_turns=2, summary_model="gpt-4o-mini", summary_timeout=0.05
    )
    alerts: list[tuple[str, str]] = []
    levers = Levers(
        OptimizeSettings(trim=trim),
        price=price,
        trim_alert=lambda agent, message: alerts.append((agent, message)),
    )
    history = tool_conversation(8)
    async with running_proxy(levers=levers, fake_kwargs={"latency_ms": 500}) as rig:
        async with openai.AsyncOpenAI(base_url=rig.openai_url, api_key=API_KEY, max_retries=0) as c:
            await c.chat.completions.create(model="gpt-4o", messages=history)  # type: ignore[arg-type]
        events = await rig.gate.wait_settled(2)
        cut = cut_request({"messages": history}, 2)
        assert cut is not None
        plain = await prompt_tokens(rig.fake.url + "/v1", cut.doc["messages"])
        served = next(c for c in rig.fake.calls if c.model == "gpt-4o")
    assert [(e.model, e.lever, e.status) for e in events] == [
        ("gpt-4o-mini", "summary", "cancelled"),
        ("gpt-4o", "trim", "ok"),
    ]
    assert served.input_tokens == plain  # trimmed without a summary: the call still went
    # the summary request went out: its prompt may be billed, so it is counted, as estimated
    summary = next(c for c in rig.fake.calls if c.model == "gpt-4o-mini")
    assert (events[0].input_tokens, events[0].estimated) == (summary.input_tokens, True)
    assert alerts == [
        (
            "coder",
            "coder's trimmed turns were dropped without a summary: gpt-4o-mini failed "
            "(TimeoutError)",
        )
    ]


async def test_an_anthropic_conversation_is_summarised_on_its_own_wire() -> None:
    trim = TrimSettings(enabled=True, keep_turns=1, summary_model="claude-3-5-haiku-latest")
    levers = Levers(OptimizeSettings(trim=trim), price=price)
    messages: list[dict[str, Any]] = []
    for i in range(4):
        uses = [{"type": "tool_use", "id": f"toolu_{i}", "name": "f", "input": {}}]
        messages += [
            {"role": "user", "content": f"Question {i}: " + "tell me more " * 30},
            {"role": "assistant", "content": [{"type": "text", "text": "Looking."}, *uses]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": "ok"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "More. " * 30}]},
        ]
    messages.append({"role": "user", "content": "And finally?"})
    async with running_proxy(levers=levers) as rig:
        async with anthropic.AsyncAnthropic(
            base_url=rig.anthropic_url, api_key=API_KEY, max_retries=0
        ) as client:
            await client.messages.create(
                model="claude-sonnet-4-5",
                max_tokens=50,
                system="You are terse.",
                messages=messages,  # type: ignore[arg-type]
            )
        summary, trimmed = await rig.gate.wait_settled(2)
        billed = list(rig.fake.calls)
    cut = cut_request({"messages": messages}, 1)
    assert cut is not None
    covered, text = levers.summaries.best("coder", "claude-3-5-haiku-latest", cut.dropped)
    assert covered == 4
    assert made_by_fake(text)
    assert [(c.endpoint, c.model) for c in billed] == [
        ("/v1/messages", "claude-3-5-haiku-latest"),
        ("/v1/messages", "claude-sonnet-4-5"),
    ]
    assert (summary.provider, summary.lever, summary.status) == ("anthropic", "summary", "ok")
    assert summary.input_tokens == billed[0].input_tokens
    assert trimmed.lever == "trim"
    assert trimmed.saved_tokens > 0


def test_a_summary_names_its_output_limit_as_the_agent_or_its_model_would() -> None:
    # OpenAI's reasoning models refuse max_tokens on chat completions
    asked = [{"role": "user", "content": "hi"}]
    cases = [
        ({"messages": asked, "max_completion_tokens": 500}, "gpt-4o-mini"),
        ({"messages": asked, "max_tokens": 500}, "gpt-5-mini"),
        ({"messages": asked}, "gpt-5-nano"),
        ({"messages": asked}, "o4-mini"),
        ({"messages": asked}, "gpt-4o-mini"),
    ]
    keys = [
        sorted(set(summary_request(False, model, "t", "", length_key(doc, model))) - {"model"})
        for doc, model in cases
    ]
    assert keys == [
        ["max_completion_tokens", "messages"],
        ["max_tokens", "messages"],  # what the agent's own upstream takes wins
        ["max_completion_tokens", "messages"],
        ["max_completion_tokens", "messages"],
        ["max_tokens", "messages"],
    ]
    assert "max_tokens" in summary_request(True, "claude-3-5-haiku-latest", "t", "")

"""Summaries of trimmed turns (`[optimize.trim] summary_model`): the request that asks a cheap
model for one, the message that replaces the dropped turns, and the summaries already made."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from tokenwatch.core.models import UsageEvent

PROMPT = (
    "You summarise the earlier part of a conversation between a user and an AI assistant so the "
    "assistant can continue without it. Keep facts, decisions, names, numbers, file paths, open "
    "questions and what tool calls returned; leave out pleasantries. Answer with the summary only."
)
HEADER = "[Summary of the earlier conversation, made by tokenwatch]\n"
"""Opens the message that stands for the dropped turns, so neither model nor reader takes it for
the user's own words."""
MAX_SUMMARY_TOKENS = 1024
KEPT_SUMMARIES = 512
"""Summaries remembered (by the turns they cover), across agents."""


class SummaryFailed(Exception):
    """No summary could be made (the reason is the message); the turns are dropped plainly."""


@dataclass(slots=True)
class Made:
    """A summary fresh from the model, and its call as recorded."""

    text: str
    event: UsageEvent


Summarise = Callable[[dict[str, Any]], Awaitable[Made]]
"""Sends a summary request through the agent's upstream and records it as the agent's call;
raises SummaryFailed."""


def transcript(turns: list[list[Any]]) -> str:
    """The turns as plain lines for the summarising model: `role: text`, other content as JSON."""
    lines = []
    for turn in turns:
        for message in turn:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            text = content if isinstance(content, str) else _json(content) if content else ""
            calls = message.get("tool_calls")
            if calls:
                text = f"{text} tool calls: {_json(calls)}".strip()
            lines.append(f"{message.get('role', '?')}: {text}")
    return "\n".join(lines)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


# OpenAI's reasoning models refuse `max_tokens` on chat completions and ask for this one.
_COMPLETION_LIMIT = "max_completion_tokens"
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")


def length_key(agent_doc: dict[str, Any], model: str) -> str:
    """The output limit's name for a summary on the OpenAI wire: the one the agent's own request
    uses (its upstream takes it), else the one `model` takes."""
    for key in (_COMPLETION_LIMIT, "max_tokens"):
        if key in agent_doc:
            return key
    return _COMPLETION_LIMIT if model.startswith(_REASONING_PREFIXES) else "max_tokens"


def summary_request(
    anthropic: bool, model: str, new: str, previous: str, limit: str = "max_tokens"
) -> dict[str, Any]:
    """The request for a summary of `new` (carrying on from a `previous` one, when there is one),
    on the wire the agent uses; `limit` names the OpenAI wire's output limit (`length_key`)."""
    ask = f"Summary so far:\n{previous}\n\nThe conversation since:\n{new}" if previous else new
    if anthropic:
        return {
            "model": model,
            "max_tokens": MAX_SUMMARY_TOKENS,
            "system": PROMPT,
            "messages": [{"role": "user", "content": ask}],
        }
    return {
        "model": model,
        limit: MAX_SUMMARY_TOKENS,
        "messages": [{"role": "system", "content": PROMPT}, {"role": "user", "content": ask}],
    }


def answer_text(anthropic: bool, doc: dict[str, Any] | None) -> str:
    """The text of a JSON answer on either wire ('' when it holds none)."""
    if doc is None:
        return ""
    if anthropic:
        blocks = doc.get("content")
    else:
        choices = doc.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        message = first.get("message") if isinstance(first, dict) else None
        blocks = message.get("content") if isinstance(message, dict) else None
    if isinstance(blocks, str):
        return blocks.strip()
    if not isinstance(blocks, list):
        return ""
    parts = [b.get("text") for b in blocks if isinstance(b, dict)]
    return "".join(p for p in parts if isinstance(p, str)).strip()


def summary_message(text: str) -> dict[str, Any]:
    """The one message that replaces the dropped turns (a user message: both wires accept it
    before the first kept turn, and it cannot part a tool call from its result)."""
    return {"role": "user", "content": HEADER + text}


class Summaries:
    """Summaries made, by the agent and the turns they cover: a conversation that drops one more
    turn at its next call has only that turn summarised (with the summary before it)."""

    def __init__(self, size: int = KEPT_SUMMARIES) -> None:
        self._size = size
        self._made: OrderedDict[bytes, str] = OrderedDict()

    @staticmethod
    def _keys(agent: str, model: str, turns: list[list[Any]]) -> list[bytes]:
        """One key per leading run of turns: the first turn, the first two, ..."""
        digest = hashlib.sha256(f"{agent}\0{model}\0".encode())
        keys = []
        for turn in turns:
            digest.update(orjson.dumps(turn, option=orjson.OPT_SORT_KEYS))
            keys.append(digest.copy().digest())
        return keys

    def best(self, agent: str, model: str, turns: list[list[Any]]) -> tuple[int, str]:
        """How many of the leading `turns` a remembered summary covers, and that summary."""
        keys = self._keys(agent, model, turns)
        for covered in range(len(keys), 0, -1):
            text = self._made.get(keys[covered - 1])
            if text is not None:
                self._made.move_to_end(keys[covered - 1])
                return covered, text
        return 0, ""

    def keep(self, agent: str, model: str, turns: list[list[Any]], text: str) -> None:
        if not turns:
            return
        self._made[self._keys(agent, model, turns)[-1]] = text
        while len(self._made) > self._size:
            self._made.popitem(last=False)

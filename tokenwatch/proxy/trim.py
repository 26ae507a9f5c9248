"""Context trimming: a conversation's oldest turns dropped, whole, keeping the system prompt and
every tool call with its result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SYSTEM_ROLES = frozenset({"system", "developer"})


def _is_tool_result(message: Any) -> bool:
    """An OpenAI `tool` (or legacy `function`) message, or an Anthropic user message made of
    `tool_result` blocks: it belongs to the assistant message before it."""
    if not isinstance(message, dict):
        return False
    role = message.get("role")
    if role in ("tool", "function"):
        return True
    content = message.get("content")
    if role != "user" or not isinstance(content, list) or not content:
        return False
    return all(isinstance(b, dict) and b.get("type") == "tool_result" for b in content)


def _starts_turn(message: Any) -> bool:
    return (
        isinstance(message, dict) and message.get("role") == "user" and not _is_tool_result(message)
    )


def turns(messages: list[Any]) -> list[list[int]]:
    """Indexes of the non-system messages grouped in turns: a turn starts at a user message
    (not a tool result) and runs to the next; what comes before the first is its own turn."""
    groups: list[list[int]] = []
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") in SYSTEM_ROLES:
            continue
        if not groups or _starts_turn(message):
            groups.append([])
        groups[-1].append(i)
    return groups


def trim_messages(messages: list[Any], keep_turns: int) -> tuple[list[Any], int]:
    """The messages without the turns before the last `keep_turns`, and how many were dropped.

    System and developer messages are always kept; turns go whole, so no message is cut and an
    assistant's tool calls are never parted from their results (they sit in the same turn).
    """
    groups = turns(messages)
    if len(groups) <= keep_turns:
        return messages, 0
    drop = {i for group in groups[:-keep_turns] for i in group}
    kept = [m for i, m in enumerate(messages) if i not in drop]
    return kept, len(drop)


@dataclass(frozen=True, slots=True)
class Cut:
    """A trimmed request and what it lost: the dropped turns, whole, and where they stood."""

    doc: dict[str, Any]
    dropped: list[list[Any]]
    at: int
    """Index in the kept `messages` where the first dropped message was."""

    def summarised(self, message: dict[str, Any]) -> dict[str, Any]:
        """The trimmed request with `message` standing where the dropped turns were."""
        kept = self.doc["messages"]
        return {**self.doc, "messages": [*kept[: self.at], message, *kept[self.at :]]}


def cut_request(doc: dict[str, Any], keep_turns: int) -> Cut | None:
    """The request with its `messages` trimmed (OpenAI chat and Anthropic Messages both keep the
    conversation there), and the turns it dropped; None when there is nothing to drop."""
    messages = doc.get("messages")
    if not isinstance(messages, list):
        return None
    groups = turns(messages)
    if len(groups) <= keep_turns:
        return None
    gone = groups[:-keep_turns]
    drop = {i for group in gone for i in group}
    kept = [m for i, m in enumerate(messages) if i not in drop]
    at = sum(1 for i in range(gone[0][0]) if i not in drop)
    return Cut({**doc, "messages": kept}, [[messages[i] for i in g] for g in gone], at)

"""Gemini CLI's chat records (~/.gemini/tmp/PROJECT/chats/): one event per model message that
carries its call's token figures, whether the chat is JSON lines (0.61: appended, a message
written again whenever it changes) or one JSON document rewritten whole (older versions)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenwatch.core.models import Source, UsageEvent
from tokenwatch.ledger.session_logs import count, ts_of


def is_chat(path: Path) -> bool:
    """A chat record: `chats/session-*.json[l]`, or a subagent's `chats/PARENT/ID.jsonl`."""
    if path.suffix not in (".json", ".jsonl") or "chats" not in path.parts[:-1]:
        return False
    return path.name.startswith("session-") or path.suffix == ".jsonl"


def line(record: dict[str, Any], state: dict[str, Any]) -> list[UsageEvent]:
    """The calls one JSON-lines record holds: a message, or a `$set` of the whole list."""
    if isinstance(record.get("sessionId"), str):
        state["session"] = record["sessionId"]
    update = record.get("$set")
    if isinstance(update, dict):
        messages = update.get("messages")
        return messages_of(messages if isinstance(messages, list) else [], state)
    return messages_of([record], state)


def whole(path: Path, state: dict[str, Any]) -> list[UsageEvent]:
    """The calls of a chat kept as one JSON document (rewritten whole as the chat goes on)."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return []  # being rewritten: read again once it has changed
    if not isinstance(doc, dict):
        return []
    state["session"] = str(doc.get("sessionId") or state.get("session", ""))
    messages = doc.get("messages")
    return messages_of(messages if isinstance(messages, list) else [], state)


def messages_of(messages: Iterable[Any], state: dict[str, Any]) -> list[UsageEvent]:
    """One event per model message with tokens, the first time it is seen in this file."""
    seen: list[str] = state.setdefault("seen", [])
    found: list[UsageEvent] = []
    for message in messages:
        event = _event(message, str(state.get("session", "")))
        if event is not None and event.call_id not in seen:
            seen.append(event.call_id)
            found.append(event)
    return found


def _event(message: Any, session: str) -> UsageEvent | None:
    if not isinstance(message, dict) or message.get("type") != "gemini":
        return None
    tokens, model = message.get("tokens"), message.get("model")
    if not isinstance(tokens, dict) or not isinstance(message.get("id"), str):
        return None
    prompt = count(tokens, "input") + count(tokens, "tool")
    thoughts = count(tokens, "thoughts")
    return UsageEvent(
        ts=ts_of(message.get("timestamp")),
        agent="gemini",
        session=session,
        provider="google",
        model=model if isinstance(model, str) else "",
        endpoint="generateContent",
        input_tokens=prompt,
        output_tokens=count(tokens, "output") + thoughts,
        cache_read_tokens=min(count(tokens, "cached"), prompt),
        reasoning_tokens=thoughts,
        source=Source.IMPORT.value,
        call_id=f"gemini:{session}:{message['id']}",
    )

"""Usage from coding agents' own session logs (Claude Code's projects, Codex's sessions), as usage
events: each call once, however many lines or files repeat it."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenwatch.core.models import Source, UsageEvent

SOURCES = ("claude-code", "codex")


def events(source: str, root: Path, since: float = 0.0) -> list[UsageEvent]:
    """The calls logged under `root` by `source` (one of SOURCES) at or after `since`."""
    found = claude_code(root) if source == "claude-code" else codex(root)
    return sorted((e for e in found if e.ts >= since), key=lambda e: e.ts)


def _records(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; a line being written (cut short) is not one yet."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def _ts(value: object) -> float:
    if not isinstance(value, str):
        return 0.0
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _count(usage: dict[str, Any], key: str) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


# -- Claude Code: ~/.claude/projects/PROJECT/SESSION.jsonl (subagents' transcripts included) -------


def claude_code(root: Path) -> list[UsageEvent]:
    """One event per API message: Claude Code writes a line per content block of a message, all
    with its usage, and a resumed or forked session copies lines into another file; message.id
    with requestId names the call (the last line seen for it wins: it has the final figures)."""
    calls: dict[str, UsageEvent] = {}
    for path in sorted(root.rglob("*.jsonl")):
        for record in _records(path):
            event = _claude_event(record)
            if event is not None:
                calls[event.call_id] = event
    return list(calls.values())


def _claude_event(record: dict[str, Any]) -> UsageEvent | None:
    message = record.get("message")
    if record.get("type") != "assistant" or not isinstance(message, dict):
        return None
    usage, model = message.get("usage"), message.get("model")
    if not isinstance(usage, dict) or not isinstance(model, str) or model.startswith("<"):
        return None  # "<synthetic>": a message Claude Code made up, never billed
    cache_read = _count(usage, "cache_read_input_tokens")
    cache_write = _count(usage, "cache_creation_input_tokens")
    return UsageEvent(
        ts=_ts(record.get("timestamp")),
        agent="claude-code",
        session=str(record.get("sessionId") or ""),
        provider="anthropic",
        model=model,
        endpoint="/v1/messages",
        input_tokens=_count(usage, "input_tokens") + cache_read + cache_write,
        output_tokens=_count(usage, "output_tokens"),
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        source=Source.IMPORT.value,
        call_id=f"claude-code:{message.get('id')}:{record.get('requestId')}",
    )


# -- Codex: ~/.codex/sessions/YYYY/MM/DD/rollout-*.jsonl -------------------------------------------


def codex(root: Path) -> list[UsageEvent]:
    """One event per turn: a `token_count` event carries the session's running total, which may
    be repeated unchanged; a turn is what the total grew by since the one before."""
    found: list[UsageEvent] = []
    for path in sorted(root.rglob("rollout-*.jsonl")):
        found += _codex_file(path)
    return found


def _codex_file(path: Path) -> list[UsageEvent]:
    session, model, before = path.stem, "", (0, 0, 0, 0)
    found: list[UsageEvent] = []
    for record in _records(path):
        payload = record.get("payload")
        if not isinstance(payload, dict):
            continue
        kind = record.get("type")
        if kind == "session_meta":
            session = str(payload.get("id") or session)
        elif kind == "turn_context":
            model = str(payload.get("model") or model)
        elif kind == "event_msg" and payload.get("type") == "token_count":
            total = _codex_total(payload)
            if total is None or total[0] + total[2] <= before[0] + before[2]:
                continue
            turn = [now - then for now, then in zip(total, before, strict=True)]
            found.append(_codex_event(record, session, model, turn, total[0] + total[2]))
            before = total
    return found


def _codex_total(payload: dict[str, Any]) -> tuple[int, int, int, int] | None:
    info = payload.get("info")
    total = info.get("total_token_usage") if isinstance(info, dict) else None
    if not isinstance(total, dict):
        return None
    keys = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_output_tokens")
    a, b, c, d = (_count(total, key) for key in keys)
    return a, b, c, d


def _codex_event(
    record: dict[str, Any], session: str, model: str, turn: list[int], running: int
) -> UsageEvent:
    input_tokens, cached, output, reasoning = (max(0, n) for n in turn)
    return UsageEvent(
        ts=_ts(record.get("timestamp")),
        agent="codex",
        session=session,
        provider="openai",
        model=model,
        endpoint="/v1/responses",
        input_tokens=input_tokens,
        output_tokens=output,
        cache_read_tokens=min(cached, input_tokens),
        reasoning_tokens=min(reasoning, output),
        source=Source.IMPORT.value,
        call_id=f"codex:{session}:{running}",
    )

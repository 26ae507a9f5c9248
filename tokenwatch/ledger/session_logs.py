"""Usage from coding agents' own session logs (Claude Code's projects, Codex's sessions, Gemini
CLI's chats), read a file at a time from where the last read stopped: each call once, however
many lines or files repeat it, and a line still being written read once it is complete."""

from __future__ import annotations

import datetime
import fnmatch
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tokenwatch.core.models import Source, UsageEvent

SOURCES: Final = ("claude-code", "codex", "gemini")
PATTERNS: Final = {"claude-code": "*.jsonl", "codex": "rollout-*.jsonl", "gemini": "*.json*"}
"""The files of each source under its root (any depth)."""
MAX_READ: Final = 16 << 20
"""Bytes one read takes from a log; the rest waits for the next read."""


@dataclass(slots=True)
class LogFile:
    """How far one log has been read, and what its reader remembers between reads (JSON-able)."""

    path: Path
    inode: int = 0
    offset: int = 0
    """Bytes read: complete lines only (for a log rewritten whole, its size when last read)."""
    state: dict[str, Any] = field(default_factory=dict)


def read_new(source: str, log: LogFile, *, final: bool = False) -> list[UsageEvent]:
    """The calls written to `log` since its last read; `final` also gives what waits for a
    line that may never come (a message whose last line was never written)."""
    from tokenwatch.ledger import gemini_chats

    if source == "gemini" and log.path.suffix == ".json":
        return gemini_chats.whole(log.path, log.state) if _changed(log, whole=True) else []
    handle = {"claude-code": _claude_line, "codex": _codex_line}.get(source, gemini_chats.line)
    found: list[UsageEvent] = []
    while data := _new_lines(log):
        found += [e for record in _records(data) for e in handle(record, log.state)]
    if final or (source == "claude-code" and _quiet(log)):
        found += [UsageEvent(**d) for d in log.state.pop("pending", {}).values()]
    return found


def events(source: str, root: Path, since: float = 0.0) -> list[UsageEvent]:
    """Every call logged under `root` by `source` (one of SOURCES) at or after `since`, once."""
    calls: dict[str, UsageEvent] = {}
    for path in sorted(log_files(source, root)):
        for event in read_new(source, LogFile(path), final=True):
            calls.setdefault(event.call_id, event)  # the first final line of a call wins
    return sorted((e for e in calls.values() if e.ts >= since), key=lambda e: e.ts)


def log_files(source: str, root: Path) -> Iterator[Path]:
    """The log files of `source` under `root`, at any depth."""
    return (Path(path) for path in log_paths(source, root))


def log_paths(source: str, root: Path) -> Iterator[str]:
    """The same as strings: a poll walks thousands of them (pathlib's objects cost more than
    the stat each one needs)."""
    from tokenwatch.ledger.gemini_chats import is_chat

    pattern = PATTERNS[source]
    for top, _, names in os.walk(root):  # scandir underneath: several times faster than rglob
        for name in fnmatch.filter(names, pattern):
            path = os.path.join(top, name)
            if source != "gemini" or is_chat(Path(path)):
                yield path


# -- reading ------------------------------------------------------------------------------------


def _changed(log: LogFile, *, whole: bool) -> bool:
    """Whether the file has more to read (or, `whole`, changed) since `log` last read it; a file
    replaced (new inode) or cut shorter is read again from its start."""
    try:
        st = os.stat(log.path)
    except OSError:
        return False
    if st.st_ino != log.inode or st.st_size < log.offset:
        log.inode, log.offset = st.st_ino, 0
        if not whole:  # a document rewritten whole keeps what it has seen: it is the same chat
            log.state = {}
    if not whole:
        return st.st_size > log.offset
    changed = st.st_size != log.offset or st.st_mtime != log.state.get("mtime")
    log.offset, log.state["mtime"] = st.st_size, st.st_mtime
    return changed


def _new_lines(log: LogFile) -> bytes:
    """The complete lines written after `log.offset` (at most MAX_READ bytes); advances it."""
    if not _changed(log, whole=False):
        return b""
    try:
        with open(log.path, "rb") as f:
            f.seek(log.offset)
            data = f.read(MAX_READ)
    except OSError:
        return b""
    end = data.rfind(b"\n") + 1
    if end:
        log.offset += end
        log.state["read_at"] = time.time()
    return data[:end]


def _records(data: bytes) -> Iterator[dict[str, Any]]:
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # not a record (a line of another kind, or damaged): nothing to count
        if isinstance(record, dict):
            yield record


def _quiet(log: LogFile) -> bool:
    return time.time() - float(log.state.get("read_at", 0.0)) >= SETTLE_SECONDS


SETTLE_SECONDS: Final = 1.0
"""Quiet time after which a Claude Code message with no final line is taken as it stands."""


def ts_of(value: object) -> float:
    """Unix seconds of an ISO 8601 time; now when there is none."""
    if isinstance(value, str):
        try:
            return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return time.time()


def count(usage: dict[str, Any], key: str) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


# -- Claude Code: ~/.claude/projects/PROJECT/SESSION.jsonl (subagents' transcripts included) -------


def _claude_line(record: dict[str, Any], state: dict[str, Any]) -> list[UsageEvent]:
    """A line per content block of an API message, each with the message's usage; a resumed or
    forked session copies lines into another file. message.id with requestId names the call;
    its first line with a stop_reason has the final figures. A message with none yet waits, until
    a later message starts (it is done then) or the file has been quiet a while."""
    if isinstance(record.get("cwd"), str):
        state["cwd"] = record["cwd"]
    fields = _claude_fields(record)
    if fields is None:
        return []
    pending: dict[str, dict[str, Any]] = state.setdefault("pending", {})
    key = fields["call_id"]
    done = [UsageEvent(**pending.pop(k)) for k in list(pending) if k != key]
    if record["message"].get("stop_reason") is None:
        pending[key] = fields
        return done
    pending.pop(key, None)
    return [*done, UsageEvent(**fields)]


def _claude_fields(record: dict[str, Any]) -> dict[str, Any] | None:
    message = record.get("message")
    if record.get("type") != "assistant" or not isinstance(message, dict):
        return None
    usage, model = message.get("usage"), message.get("model")
    if not isinstance(usage, dict) or not isinstance(model, str) or model.startswith("<"):
        return None  # "<synthetic>": a message Claude Code made up, never billed
    reads, writes = (
        count(usage, "cache_read_input_tokens"),
        count(usage, "cache_creation_input_tokens"),
    )
    message_id = message.get("id")
    return {
        "ts": ts_of(record.get("timestamp")),
        "agent": "claude-code",
        "session": str(record.get("sessionId") or ""),
        "provider": "anthropic",
        "model": model,
        "endpoint": "/v1/messages",
        "input_tokens": count(usage, "input_tokens") + reads + writes,
        "output_tokens": count(usage, "output_tokens"),
        "cache_read_tokens": reads,
        "cache_write_tokens": writes,
        "source": Source.IMPORT.value,
        "call_id": f"claude-code:{message_id}:{record.get('requestId')}",
        "response_id": message_id if isinstance(message_id, str) else "",
    }


# -- Codex: ~/.codex/sessions/YYYY/MM/DD/rollout-*.jsonl -------------------------------------------


_CODEX_KEYS: Final = (
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_output_tokens",
)


def _codex_line(record: dict[str, Any], state: dict[str, Any]) -> list[UsageEvent]:
    """Codex 0.171 writes a `token_usage_record` per model response (its id and figures); older
    versions only `token_count` events carrying the session's running total, sometimes repeated
    unchanged: a turn is then what the total grew by since the one before."""
    payload, kind = record.get("payload"), record.get("type")
    event = _codex_event(kind, payload, record, state) if isinstance(payload, dict) else None
    return [] if event is None else [event]


def _codex_event(
    kind: Any, payload: dict[str, Any], record: dict[str, Any], state: dict[str, Any]
) -> UsageEvent | None:
    if kind == "session_meta":
        state["session"] = str(payload.get("id") or state.get("session", ""))
        if isinstance(payload.get("cwd"), str):
            state["cwd"] = payload["cwd"]
    elif kind == "turn_context":
        state["model"] = str(payload.get("model") or state.get("model", ""))
    elif kind == "token_usage_record":
        state["records"] = True
        return _codex_record(record, payload, state)
    elif kind == "event_msg" and payload.get("type") == "token_count":
        return _codex_count(record, payload, state)
    return None


def _codex_record(
    record: dict[str, Any], payload: dict[str, Any], state: dict[str, Any]
) -> UsageEvent | None:
    usage, answer = payload.get("usage"), payload.get("response_id")
    if not isinstance(usage, dict) or not isinstance(answer, str) or not answer:
        return None
    turn = [count(usage, key) for key in _CODEX_KEYS]
    fields = _codex_fields(record, state, turn, f"codex:{answer}")
    fields["response_id"] = answer
    fields["cache_write_tokens"] = min(
        count(usage, "cache_write_input_tokens"),
        fields["input_tokens"] - fields["cache_read_tokens"],
    )
    return UsageEvent(**fields)


def _codex_count(
    record: dict[str, Any], payload: dict[str, Any], state: dict[str, Any]
) -> UsageEvent | None:
    info = payload.get("info")
    total = info.get("total_token_usage") if isinstance(info, dict) else None
    if not isinstance(total, dict):
        return None
    now = [count(total, key) for key in _CODEX_KEYS]
    before = state.get("before") or [0, 0, 0, 0]
    if now[0] + now[2] <= before[0] + before[2]:
        return None  # the same total again (a rate-limit update): no new turn
    state["before"] = now
    if state.get("records"):
        return None  # this version names each response: counted from its token_usage_record
    turn = [max(0, n - b) for n, b in zip(now, before, strict=True)]
    running = now[0] + now[2]
    return UsageEvent(
        **_codex_fields(record, state, turn, f"codex:{state.get('session', '')}:{running}")
    )


def _codex_fields(
    record: dict[str, Any], state: dict[str, Any], turn: list[int], call_id: str
) -> dict[str, Any]:
    input_tokens, cached, output, reasoning = turn
    return {
        "ts": ts_of(record.get("timestamp")),
        "agent": "codex",
        "session": str(state.get("session", "")),
        "provider": "openai",
        "model": str(state.get("model", "")),
        "endpoint": "/v1/responses",
        "input_tokens": input_tokens,
        "output_tokens": output,
        "cache_read_tokens": min(cached, input_tokens),
        "reasoning_tokens": min(reasoning, output),
        "source": Source.IMPORT.value,
        "call_id": call_id,
    }

"""The supervisor's wire format: versioned, size-limited, validated newline-delimited JSON.

Standard library only (msgspec and orjson when present), so the agent-side client can use it.
See docs/protocol.md for the messages and their replies.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

from tokenwatch.core.nesting import MAX_NESTING, nested_deeper_than

try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - the client may run without it
    _orjson = None  # type: ignore[assignment]
try:
    import msgspec.json as _msgspec_json

    # Not orjson for writing: its 3.13 bytes each keep about 4 KB allocated, so a backlog of
    # small replies and pushes held hundreds of MB (docs/benchmarks.md, Ingest).
    _encode: Any = _msgspec_json.Encoder().encode
except ImportError:  # pragma: no cover - the client may run without it
    _encode = None

VERSION: Final = 1
PUSH_KINDS: Final = ("snapshot", "usage", "alert", "action", "agent")
"""What a subscriber can be sent; `subscribe` takes a list of them (default: all)."""
MAX_LINE_BYTES: Final = 1024 * 1024
"""A longer line closes the connection: it cannot be a legitimate message."""


class ErrorCode(enum.StrEnum):
    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_TYPE = "unknown_type"
    UNKNOWN_AGENT = "unknown_agent"
    NAME_TAKEN = "name_taken"
    TOO_LARGE = "too_large"
    FORBIDDEN = "forbidden"
    NOT_PERMITTED = "not_permitted"
    STORE_UNAVAILABLE = "store_unavailable"
    DENIED = "denied"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A message that breaks the protocol; `code` goes back to the peer in the error reply."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_STR = (str,)
_INT = (int,)
_NUM = (int, float)
_DICT = (dict,)
_LIST = (list,)
_BOOL = (bool,)

# type -> {field: (accepted python types, required)}
SCHEMAS: Final[dict[str, dict[str, tuple[tuple[type, ...], bool]]]] = {
    # from agents
    "hello": {
        "name": (_STR, True),
        "pid": (_INT, False),
        "run_id": (_STR, False),
        "task": (_STR, False),
        "user": (_STR, False),
        "session": (_STR, False),
        "tags": (_DICT, False),
    },
    "usage": {"event": (_DICT, True)},
    "task": {"name": (_STR, True), "state": (_STR, True)},
    "heartbeat": {"dropped": (_INT, False)},
    "admit": {
        "model": (_STR, False),
        "provider": (_STR, False),
        "input_tokens": (_INT, False),
        "max_output_tokens": (_INT, False),
        "prompt_hash": (_STR, False),
    },
    "settle": {"reservation": (_STR, True), "event": (_DICT, False)},
    # from clients
    "list": {},
    "status": {},
    "subscribe": {"interval": (_NUM, False), "kinds": (_LIST, False)},
    "register": {
        "name": (_STR, False),
        "pid": (_INT, False),
        "command": (_LIST, False),
        "task": (_STR, False),
        "tags": (_DICT, False),
        "budget": (_STR, False),
        "launched": (_BOOL, False),
        "critical": (_BOOL, False),
        "openai_upstream": (_STR, False),
        "anthropic_upstream": (_STR, False),
        "owner_pid": (_INT, False),
    },
    "started": {"name": (_STR, True), "pid": (_INT, True)},
    "exited": {"name": (_STR, True), "code": (_INT, True)},
    "attach": {"pid": (_INT, True), "name": (_STR, False)},
    "pause": {"agent": (_STR, True), "who": (_STR, False), "why": (_STR, False)},
    "resume": {"agent": (_STR, True), "who": (_STR, False), "why": (_STR, False)},
    "kill": {"agent": (_STR, True), "who": (_STR, False), "why": (_STR, False)},
    "throttle": {
        "agent": (_STR, True),
        "rate": (_STR, True),
        "who": (_STR, False),
        "why": (_STR, False),
    },
    "pause_all": {"who": (_STR, False), "why": (_STR, False)},
    "route": {
        "agent": (_STR, True),
        "model": (_STR, False),
        "only": (_STR, False),
        "undo": (_BOOL, False),
        "who": (_STR, False),
    },
    "resume_all": {"who": (_STR, False), "why": (_STR, False)},
    "set_budget": {"budget": (_DICT, True)},
    "remove_budget": {"name": (_STR, True)},
    "budgets": {},
    "alerts": {"since": (_NUM, False), "limit": (_INT, False)},
    "ack_alerts": {"ids": (_LIST, False)},
    "env": {"agent": (_STR, True)},
    "adopt": {"agent": (_STR, True), "decision": (_STR, True)},
    "launch": {"name": (_STR, True)},
    "history": {"agent": (_STR, True), "limit": (_INT, False)},
    "report": {"since": (_NUM, False), "by": (_STR, False)},
    "fleet_hosts": {},
    "shutdown": {},
    "reload": {},
}


def dumps(obj: Any) -> bytes:
    """One message as a line of UTF-8 JSON ending in a newline."""
    if _encode is not None:
        return _encode(obj) + b"\n"  # type: ignore[no-any-return]
    return (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode()


def loads(line: bytes | str) -> Any:
    if _orjson is not None:
        return _orjson.loads(line)
    return json.loads(line)


def decode(line: bytes | str) -> dict[str, Any]:
    """Parse and validate one line; raises ProtocolError with the reply code."""
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"line over {MAX_LINE_BYTES} bytes")
    if nested_deeper_than(line):
        # before decoding: decoders recurse once a level, and give up differently
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"nested deeper than {MAX_NESTING} levels")
    try:
        msg = loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a message is a JSON object")
    validate(msg)
    # A null optional field means "not given", so handlers' defaults apply.
    for name in SCHEMAS[msg["type"]]:
        if name in msg and msg[name] is None:
            del msg[name]
    return msg


def validate(msg: Mapping[str, Any]) -> None:
    version = msg.get("v")
    if version != VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION, f"protocol version {version!r}, want {VERSION}"
        )
    mid = msg.get("id")
    if mid is not None and (isinstance(mid, bool) or not isinstance(mid, int | str)):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "'id' must be an integer or a string")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "'type' must be a string")
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}")
    for name, (types_, required) in schema.items():
        if name not in msg or msg[name] is None:
            if required:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{kind}: '{name}' is required")
            continue
        value = msg[name]
        if isinstance(value, bool) and bool not in types_:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{kind}: '{name}' has the wrong type")
        if not isinstance(value, types_):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{kind}: '{name}' has the wrong type")


def request(kind: str, mid: int | str | None = None, **fields: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"v": VERSION, "type": kind}
    if mid is not None:
        msg["id"] = mid
    msg.update({k: v for k, v in fields.items() if v is not None})
    return msg


def reply_ok(mid: int | str | None, data: Any = None) -> dict[str, Any]:
    return {"v": VERSION, "type": "reply", "re": mid, "ok": True, "data": data}


_ACK: Final = b'{"v":%d,"type":"reply","re":%%d,"ok":true,"data":null}\n' % VERSION


def acks(mids: Iterable[int | str | None]) -> list[bytes]:
    """`dumps(reply_ok(mid))` for each id, integer ids without building a dict each (usage is
    acknowledged one line per event, tens of thousands a second)."""
    return [_ACK % mid if type(mid) is int else dumps(reply_ok(mid)) for mid in mids]


def reply_error(mid: int | str | None, code: ErrorCode | str, message: str) -> dict[str, Any]:
    return {
        "v": VERSION,
        "type": "reply",
        "re": mid,
        "ok": False,
        "error": {"code": str(code), "message": message},
    }


def push(kind: str, data: Any) -> dict[str, Any]:
    """A message the supervisor sends unasked to a subscriber: snapshot, usage, alert, action, agent."""
    return {"v": VERSION, "type": "push", "kind": kind, "data": data}

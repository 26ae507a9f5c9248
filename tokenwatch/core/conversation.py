"""Conversation signals of one call, hashed: the turns it adds, its tail's tool calls and results,
and the model's answer; one home for the proxy and the SDK, for every wire format."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from tokenwatch.core.tokens import normalise_prompt, prompt_hash, prompt_hashes, prompt_shape_hash

CHAT: Final = "chat"
RESPONSES: Final = "responses"
ANTHROPIC: Final = "anthropic"
LABEL_CHARS: Final = 60
"""A tool call's label (name and arguments, for the alert) is cut at this many characters."""
_MODEL, _CLIENT = "model", "client"
_TEXT, _CALL, _RESULT = "text", "call", "result"


@dataclass(frozen=True, slots=True)
class Signals:
    """What a request adds to its conversation, as hashes (and the label of its tool call)."""

    turn_hash: str = ""
    """The new turns: everything since the model's last answer in the history, that answer
    included (the shared prefix dropped); '' for a call with no history."""
    turn_shape: str = ""
    """The same with numbers, ids and times masked."""
    tool_hash: str = ""
    """The tail's tool calls (name, normalised arguments) with their results (by shape)."""
    tool_call: str = ""
    """`name(arg="value")` of the tail's first tool call, cut at LABEL_CHARS: the alert's words."""


@dataclass(frozen=True, slots=True)
class _Entry:
    side: str
    kind: str
    role: str = ""
    text: Any = None
    call_id: str = ""
    name: str = ""
    args: Any = None


def get(obj: Any, name: str) -> Any:
    """A key of a dict or an attribute of an SDK object (messages may be either)."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _string(obj: Any, name: str = "type") -> str:
    """A field that must be a string (a kind, a piece of text): itself, else ''."""
    value = get(obj, name)
    return value if isinstance(value, str) else ""


def _index(obj: Any) -> int:
    value = get(obj, "index")
    return value if isinstance(value, int) else 0


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


# -- requests -------------------------------------------------------------------------------------


def request_signals(wire: str, body: Mapping[str, Any]) -> Signals:
    """The signals of a request body (or SDK keyword arguments) of `wire`; empty when it has no
    conversation (legacy completions, embeddings, a bare prompt)."""
    if wire == CHAT:
        return signals_of(_chat_entries(get(body, "messages")))
    if wire == RESPONSES:
        continued = bool(get(body, "previous_response_id"))
        return signals_of(_responses_entries(get(body, "input")), continued=continued)
    if wire == ANTHROPIC:
        return signals_of(_anthropic_entries(get(body, "messages")))
    return Signals()


def signals_of(entries: list[_Entry], *, continued: bool = False) -> Signals:
    """`continued`: the history is kept by the provider (Responses' previous_response_id), so
    the whole input is new."""
    last = max((i for i, e in enumerate(entries) if e.side == _MODEL), default=-1)
    if last < 0 and not continued:
        return Signals()
    first = last
    while first > 0 and entries[first - 1].side == _MODEL:
        first -= 1
    block, tail = entries[max(first, 0) : last + 1], entries[last + 1 :]
    names = {e.call_id: e.name for e in block if e.kind == _CALL}
    turn = [_turn_part(e, names) for e in (*block, *tail)]
    exact, shape = prompt_hashes(turn)
    calls = [e for e in block if e.kind == _CALL]
    results = [e for e in tail if e.kind == _RESULT]
    if not calls and not results:
        return Signals(exact, shape)
    return Signals(exact, shape, _tool_hash(calls, results), _label(calls, results))


def _turn_part(e: _Entry, names: dict[str, str]) -> list[Any]:
    # ids are left out: a provider gives every tool call a new one, a loop repeats the rest
    if e.kind == _CALL:
        return [_CALL, e.name, normalised_args(e.args)]
    if e.kind == _RESULT:
        return [_RESULT, names.get(e.call_id, ""), _plain(e.text)]
    return [e.role or e.side, _plain(e.text)]


def _tool_hash(calls: list[_Entry], results: list[_Entry]) -> str:
    by_id = {r.call_id: r for r in results}
    parts: list[Any] = []
    for i, c in enumerate(calls):
        r = by_id.get(c.call_id) if c.call_id else (results[i] if i < len(results) else None)
        outcome = normalise_prompt(_plain(r.text)) if r is not None else None
        parts.append([c.name, normalised_args(c.args), outcome])
    if not calls:  # the calls are kept by the provider: the results are all there is
        parts = [[None, None, normalise_prompt(_plain(r.text))] for r in results]
    return prompt_hash(parts)


def _label(calls: list[_Entry], results: list[_Entry]) -> str:
    if not calls:
        return "a tool"
    first = calls[0]
    args = normalised_args(first.args)
    if isinstance(args, dict):
        inside = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in args.items())
    else:
        inside = "" if args in (None, "") else str(args)
    label = f"{first.name or 'a tool'}({inside})"
    if len(label) > LABEL_CHARS:
        label = label[: LABEL_CHARS - 2] + "…)"
    more = len(calls) - 1
    return label + (f" and {more} other call{'s' if more > 1 else ''}" if more else "")


def normalised_args(args: Any) -> Any:
    """Tool arguments as data: JSON text decoded (key order and spacing no longer matter)."""
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return " ".join(args.split())
    return _data(args)


def _data(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_none=True)
    return value


def _plain(value: Any) -> str:
    """Content as text: a string, or parts (text blocks, images) as canonical JSON."""
    if isinstance(value, str):
        return value
    parts = _list(value)
    if parts and all(get(p, "type") in ("text", "input_text", "output_text") for p in parts):
        return "".join(str(get(p, "text") or "") for p in parts)
    return json.dumps(_data(value), sort_keys=True, ensure_ascii=False, default=str)


def _chat_entries(messages: Any) -> list[_Entry]:
    out: list[_Entry] = []
    for m in _list(messages):
        role = get(m, "role")
        if role == "assistant":
            content = get(m, "content")
            if content or not get(m, "tool_calls"):
                out.append(_Entry(_MODEL, _TEXT, "assistant", content))
            for call in _list(get(m, "tool_calls")):
                fn = get(call, "function")
                out.append(_call(get(call, "id"), get(fn, "name"), get(fn, "arguments")))
        elif role in ("tool", "function"):
            ref = get(m, "tool_call_id") or ""
            out.append(_Entry(_CLIENT, _RESULT, "tool", get(m, "content"), str(ref)))
        else:
            out.append(_Entry(_CLIENT, _TEXT, str(role or ""), get(m, "content")))
    return out


def _call(ref: Any, name: Any, arguments: Any) -> _Entry:
    """A tool call the model made: its id (which its result refers to), name and arguments."""
    return _Entry(_MODEL, _CALL, "", None, str(ref or ""), str(name or ""), arguments)


_RESPONSE_CALLS: Final = frozenset({"function_call", "custom_tool_call"})
_RESPONSE_RESULTS: Final = frozenset({"function_call_output", "custom_tool_call_output"})


def _responses_entries(given: Any) -> list[_Entry]:
    if isinstance(given, str):
        return [_Entry(_CLIENT, _TEXT, "user", given)]
    out: list[_Entry] = []
    for item in _list(given):
        kind, role = _string(item), get(item, "role")
        if kind in _RESPONSE_CALLS:
            args = get(item, "arguments") if kind == "function_call" else get(item, "input")
            out.append(_call(get(item, "call_id"), get(item, "name"), args))
        elif kind in _RESPONSE_RESULTS:
            ref = str(get(item, "call_id") or "")
            out.append(_Entry(_CLIENT, _RESULT, "tool", get(item, "output"), ref))
        elif role == "assistant" or kind == "reasoning":
            out.append(_Entry(_MODEL, _TEXT, "assistant", get(item, "content")))
        elif role is not None or kind == "message":
            out.append(_Entry(_CLIENT, _TEXT, str(role or "user"), get(item, "content")))
        else:
            out.append(_Entry(_CLIENT, _TEXT, str(kind or ""), _data(item)))
    return out


def _anthropic_entries(messages: Any) -> list[_Entry]:
    out: list[_Entry] = []
    for m in _list(messages):
        role, content = get(m, "role"), get(m, "content")
        side = _MODEL if role == "assistant" else _CLIENT
        if isinstance(content, str):
            out.append(_Entry(side, _TEXT, str(role or ""), content))
            continue
        for block in _list(content):
            kind = get(block, "type")
            if kind == "tool_use":
                out.append(_call(get(block, "id"), get(block, "name"), get(block, "input")))
            elif kind == "tool_result":
                ref = str(get(block, "tool_use_id") or "")
                out.append(_Entry(_CLIENT, _RESULT, "tool", get(block, "content"), ref))
            elif kind in ("thinking", "redacted_thinking"):
                out.append(_Entry(_MODEL, _TEXT, "thinking", None))
            else:
                out.append(_Entry(side, _TEXT, str(role or ""), _data(block)))
    return out


# -- answers --------------------------------------------------------------------------------------


def answer_hash(parts: Iterable[list[Any]]) -> str:
    """Hash of what the model answered (text and tool calls), by shape; '' for no answer."""
    kept = [p for p in parts if p[1:] != [""]]
    return prompt_shape_hash(kept) if kept else ""


def answer_of(wire: str, doc: Any) -> list[list[Any]]:
    """The answer in a whole response: a chat.completion, a Responses `response`, an Anthropic
    `message` (dicts or SDK objects)."""
    if wire == CHAT:
        choices = _list(get(doc, "choices"))
        message = get(choices[0], "message") if choices else None
        parts: list[list[Any]] = [[_TEXT, get(message, "content") or ""]]
        for call in _list(get(message, "tool_calls")):
            fn = get(call, "function")
            parts.append([_CALL, get(fn, "name") or "", normalised_args(get(fn, "arguments"))])
        return parts
    if wire == RESPONSES:
        return _responses_output(get(doc, "output"))
    if wire == ANTHROPIC:
        return _anthropic_blocks(get(doc, "content"))
    return []


def _responses_output(items: Any) -> list[list[Any]]:
    parts: list[list[Any]] = []
    for item in _list(items):
        kind = _string(item)
        if kind == "message":
            parts.append([_TEXT, _plain(get(item, "content"))])
        elif kind in _RESPONSE_CALLS:
            args = get(item, "arguments") if kind == "function_call" else get(item, "input")
            parts.append([_CALL, get(item, "name") or "", normalised_args(args)])
    return parts


def _anthropic_blocks(blocks: Any) -> list[list[Any]]:
    parts: list[list[Any]] = []
    for block in _list(blocks):
        kind = get(block, "type")
        if kind == "text":
            parts.append([_TEXT, get(block, "text") or ""])
        elif kind == "tool_use":
            parts.append([_CALL, get(block, "name") or "", normalised_args(get(block, "input"))])
    return parts


class StreamAnswer:
    """The answer gathered from a stream's decoded chunks or events, any wire."""

    __slots__ = ("_calls", "_final", "_text", "_wire")

    def __init__(self, wire: str) -> None:
        self._wire = wire
        self._text: list[str] = []
        self._calls: dict[int, list[str]] = {}
        self._final: list[list[Any]] | None = None

    def feed(self, doc: Any) -> None:
        """One decoded chunk (chat), event (Responses) or event (Anthropic)."""
        if self._wire == CHAT:
            self._chat(doc)
        elif self._wire == RESPONSES:
            response = get(doc, "response")
            if response is not None and get(response, "output"):
                self._final = _responses_output(get(response, "output"))
        elif self._wire == ANTHROPIC:
            self._anthropic(doc)

    def _chat(self, doc: Any) -> None:
        for choice in _list(get(doc, "choices")):
            delta = get(choice, "delta")
            content = get(delta, "content")
            if isinstance(content, str):
                self._text.append(content)
            for call in _list(get(delta, "tool_calls")):
                slot = self._calls.setdefault(_index(call), ["", ""])
                fn = get(call, "function")
                slot[0] += _string(fn, "name")
                slot[1] += _string(fn, "arguments")

    def _anthropic(self, doc: Any) -> None:
        kind = get(doc, "type")
        if kind == "content_block_start":
            block = get(doc, "content_block")
            if get(block, "type") == "tool_use":
                self._calls[_index(doc)] = [str(get(block, "name") or ""), ""]
        elif kind == "content_block_delta":
            delta = get(doc, "delta")
            slot = self._calls.get(_index(doc))
            if get(delta, "type") == "input_json_delta" and slot is not None:
                slot[1] += _string(delta, "partial_json")
            elif get(delta, "type") == "text_delta":
                self._text.append(_string(delta, "text"))

    def parts(self) -> list[list[Any]]:
        if self._final is not None:
            return self._final
        parts: list[list[Any]] = [[_TEXT, "".join(self._text)]]
        for _, (name, args) in sorted(self._calls.items()):
            parts.append([_CALL, name, normalised_args(args or "{}")])
        return parts

"""Anthropic Messages calls: what a request asks for, and the usage in its JSON or SSE response."""

from __future__ import annotations

import logging
from typing import Any

from tokenwatch.core import conversation
from tokenwatch.core.request_tokens import MESSAGES, count_request
from tokenwatch.proxy.sse import SseEvent
from tokenwatch.proxy.usage import (
    BadCount,
    CallFacts,
    TextParts,
    Usage,
    answer_id,
    fingerprint,
    int_field,
    json_object,
    model_of,
    number,
)

log = logging.getLogger(__name__)


def read_request(endpoint: str, body: dict[str, Any]) -> CallFacts:
    """The model, stream flag, max_tokens, prompt hash and prompt counter of a request."""
    model = model_of(body)
    facts = CallFacts(model=model, stream=body.get("stream") is True)
    if endpoint != MESSAGES:
        facts.metered = False  # count_tokens and batches listing are free
        return facts
    system, messages = body.get("system"), body.get("messages")
    facts.max_output_tokens = int_field(body, "max_tokens")
    fingerprint(facts, [system, messages] if system else messages, conversation.ANTHROPIC, body)
    facts.prompt = lambda: count_request(MESSAGES, body, model)
    return facts


def usage_from(doc: Any, base: Usage | None = None) -> Usage | None:
    """Normalised usage: Anthropic's input_tokens excludes cache reads and writes; ours includes them.

    `base` is what `message_start` said; a later `message_delta` overrides the figures it carries.
    """
    if not isinstance(doc, dict):
        return base
    try:
        return _usage(doc, base or Usage())
    except BadCount as exc:
        log.warning("/v1/messages: the upstream's %s; the call is estimated", exc)
        return None


def _usage(doc: dict[str, Any], known: Usage) -> Usage:
    fresh = input_tokens = number(doc, "input_tokens")
    reads = number(doc, "cache_read_input_tokens")
    writes = number(doc, "cache_creation_input_tokens")
    if "input_tokens" in doc or "cache_read_input_tokens" in doc:
        input_tokens = fresh + reads + writes
    else:
        input_tokens, reads, writes = (
            known.input_tokens,
            known.cache_read_tokens,
            known.cache_write_tokens,
        )
    output = number(doc, "output_tokens") if "output_tokens" in doc else known.output_tokens
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output,
        cache_read_tokens=reads,
        cache_write_tokens=writes,
    )


_USAGE_EVENTS = frozenset({"message_start", "message_delta", "message_stop"})
_CONTENT_EVENTS = frozenset({"content_block_start", "content_block_delta"})


class AnthropicReader:
    """Usage and generated text of one Messages response (JSON, or SSE events).

    Only the events that carry usage are decoded as they pass (Anthropic names each event);
    text deltas are kept as bytes and decoded only when the usage must be estimated.
    """

    __slots__ = ("_id", "_message", "_raw", "complete", "usage")

    def __init__(self) -> None:
        self._raw: list[bytes] = []
        self._message: dict[str, Any] | None = None
        self._id = ""
        self.usage: Usage | None = None
        self.complete = False

    def read_json(self, body: bytes) -> None:
        doc = json_object(body)
        if doc is not None and doc.get("type") == "message":
            self._message = doc
            self._id = answer_id(doc)
            self._set_usage(usage_from(doc.get("usage")))
            self.complete = True

    def _set_usage(self, usage: Usage | None) -> None:
        if usage is not None:
            usage.response_id = self._id
        self.usage = usage

    def read_event(self, event: SseEvent) -> bool:
        if not event.data:
            return True
        if event.name in _CONTENT_EVENTS:
            self._raw.append(event.data)  # decoded only for an estimate or the answer's hash
            return True
        if event.name and event.name not in _USAGE_EVENTS:
            return True
        doc = json_object(event.data)
        if doc is None:
            return True
        kind = doc.get("type")
        if kind == "message_start":
            message = doc.get("message")
            if isinstance(message, dict):
                self._id = answer_id(message)
                self._set_usage(usage_from(message.get("usage")))
        elif kind == "message_delta":
            self._set_usage(usage_from(doc.get("usage"), self.usage))
        elif kind in _CONTENT_EVENTS:
            self._raw.append(event.data)
        elif kind == "message_stop":
            self.complete = True
        return True

    def answer_hash(self) -> str:
        if self._message is not None:
            return conversation.answer_hash(
                conversation.answer_of(conversation.ANTHROPIC, self._message)
            )
        stream = conversation.StreamAnswer(conversation.ANTHROPIC)
        for data in self._raw:
            stream.feed(json_object(data))
        return conversation.answer_hash(stream.parts())

    def output_text(self) -> str:
        text = TextParts()
        for data in self._raw:
            doc = json_object(data)
            delta = doc.get("delta") if doc is not None else None
            if isinstance(delta, dict):
                for key in ("text", "partial_json", "thinking"):
                    text.add(delta.get(key))
        return text.text()

"""Anthropic Messages calls: what a request asks for, and the usage in its JSON or SSE response."""

from __future__ import annotations

from typing import Any

import orjson

from tokenwatch.core import tokens
from tokenwatch.proxy.sse import SseEvent
from tokenwatch.proxy.usage import CallFacts, TextParts, Usage, int_field, model_of, number

MESSAGES = "/v1/messages"


def read_request(endpoint: str, body: dict[str, Any]) -> CallFacts:
    """The model, stream flag, max_tokens, prompt hash and prompt counter of a request."""
    model = model_of(body)
    facts = CallFacts(model=model, stream=body.get("stream") is True)
    if endpoint != MESSAGES:
        facts.metered = False  # count_tokens and batches listing are free
        return facts
    system, messages = body.get("system"), body.get("messages")
    facts.max_output_tokens = int_field(body, "max_tokens")
    facts.prompt_hash = tokens.prompt_hash([system, messages] if system else messages)
    facts.prompt = lambda: tokens.count_anthropic(system, messages, model)  # type: ignore[arg-type]
    return facts


def usage_from(doc: Any, base: Usage | None = None) -> Usage | None:
    """Normalised usage: Anthropic's input_tokens excludes cache reads and writes; ours includes them.

    `base` is what `message_start` said; a later `message_delta` overrides the figures it carries.
    """
    if not isinstance(doc, dict):
        return base
    known = base or Usage()
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


class AnthropicReader:
    """Usage and generated text of one Messages response (JSON, or SSE events)."""

    __slots__ = ("_text", "complete", "usage")

    def __init__(self) -> None:
        self._text = TextParts()
        self.usage: Usage | None = None
        self.complete = False

    def read_json(self, body: bytes) -> None:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        if isinstance(doc, dict) and doc.get("type") == "message":
            self.usage = usage_from(doc.get("usage"))
            self.complete = True

    def read_event(self, event: SseEvent) -> bool:
        if not event.data:
            return True
        try:
            doc = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(doc, dict):
            return True
        kind = doc.get("type")
        if kind == "message_start":
            message = doc.get("message")
            if isinstance(message, dict):
                self.usage = usage_from(message.get("usage"))
        elif kind == "message_delta":
            self.usage = usage_from(doc.get("usage"), self.usage)
        elif kind == "content_block_delta":
            delta = doc.get("delta")
            if isinstance(delta, dict):
                for key in ("text", "partial_json", "thinking"):
                    self._text.add(delta.get(key))
        elif kind == "message_stop":
            self.complete = True
        return True

    def output_text(self) -> str:
        return self._text.text()

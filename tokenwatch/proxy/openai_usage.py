"""OpenAI-shaped calls: what a request asks for, and the usage in its JSON or SSE response."""

from __future__ import annotations

from typing import Any

import orjson

from tokenwatch.core import tokens
from tokenwatch.proxy.sse import SseEvent
from tokenwatch.proxy.usage import CallFacts, TextParts, Usage, int_field, model_of, number

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
EMBEDDINGS = "/v1/embeddings"
METERED = frozenset({CHAT, COMPLETIONS, RESPONSES, EMBEDDINGS})
_STREAM_USAGE = frozenset({CHAT, COMPLETIONS})
"""Endpoints whose streams carry usage only when asked with `stream_options.include_usage`."""
_FINAL_RESPONSE = frozenset({"response.completed", "response.incomplete", "response.failed"})


def read_request(endpoint: str, body: dict[str, Any]) -> CallFacts:
    """The model, stream flag, output limit, prompt hash and prompt counter of a request."""
    model = model_of(body)
    facts = CallFacts(model=model, stream=body.get("stream") is True)
    if endpoint not in METERED:
        facts.metered = False
        return facts
    if endpoint == CHAT:
        messages = body.get("messages")
        facts.max_output_tokens = int_field(body, "max_completion_tokens", "max_tokens")
        facts.prompt_hash = tokens.prompt_hash(messages)
        facts.prompt = lambda: tokens.count_messages(messages, model)  # type: ignore[arg-type]
    elif endpoint == RESPONSES:
        given, instructions = body.get("input", ""), body.get("instructions")
        facts.max_output_tokens = int_field(body, "max_output_tokens")
        facts.prompt_hash = tokens.prompt_hash([instructions, given] if instructions else given)
        facts.prompt = lambda: tokens.count_responses_input(given, instructions, model)
    else:
        text = body.get("prompt" if endpoint == COMPLETIONS else "input")
        facts.max_output_tokens = int_field(body, "max_tokens") if endpoint == COMPLETIONS else 0
        facts.prompt_hash = tokens.prompt_hash(text)
        facts.prompt = lambda: _count_texts(text, model)
    return facts


def _count_texts(value: Any, model: str) -> tokens.TokenCount:
    """A prompt or embedding input: text, list of texts, or token ids (counted as given)."""
    items = value if isinstance(value, list) else [value]
    total, estimated, encoding = 0, False, ""
    for item in items:
        if isinstance(item, str):
            count = tokens.count_text(item, model)
            total, estimated, encoding = total + count.tokens, count.estimated, count.encoding
        elif isinstance(item, int):
            total += 1
        elif isinstance(item, list):
            total += len(item)
        else:
            raise TypeError("prompt must be text, texts or token ids")
    return tokens.TokenCount(total, estimated, encoding or "token ids")


def ask_for_usage(endpoint: str, body: dict[str, Any]) -> bytes | None:
    """The body re-encoded to ask a stream for its usage, or None when it already does (or can't)."""
    if endpoint not in _STREAM_USAGE or body.get("stream") is not True:
        return None
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None
    if options is not None and not isinstance(options, dict):
        return None
    body = {**body, "stream_options": {**(options or {}), "include_usage": True}}
    return orjson.dumps(body)


def usage_from(doc: Any, endpoint: str) -> Usage | None:
    """Normalised usage from a response's `usage` object (chat, completions, responses, embeddings)."""
    if not isinstance(doc, dict):
        return None
    if endpoint == RESPONSES:
        return Usage(
            input_tokens=number(doc, "input_tokens"),
            output_tokens=number(doc, "output_tokens"),
            cache_read_tokens=number(doc, "input_tokens_details", "cached_tokens"),
            reasoning_tokens=number(doc, "output_tokens_details", "reasoning_tokens"),
        )
    return Usage(
        input_tokens=number(doc, "prompt_tokens"),
        output_tokens=number(doc, "completion_tokens"),
        cache_read_tokens=number(doc, "prompt_tokens_details", "cached_tokens"),
        reasoning_tokens=number(doc, "completion_tokens_details", "reasoning_tokens"),
    )


class OpenAIReader:
    """Usage and generated text of one OpenAI-shaped response."""

    __slots__ = ("_endpoint", "_strip", "_text", "complete", "usage")

    def __init__(self, endpoint: str, strip_usage: bool = False) -> None:
        self._endpoint = endpoint
        self._strip = strip_usage
        self._text = TextParts()
        self.usage: Usage | None = None
        self.complete = False

    def read_json(self, body: bytes) -> None:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        if isinstance(doc, dict):
            self.usage = usage_from(doc.get("usage"), self._endpoint)
            self.complete = True

    def read_event(self, event: SseEvent) -> bool:
        data = event.data
        if not data:
            return True
        if data == b"[DONE]":
            self.complete = True
            return True
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(doc, dict):
            return True
        if self._endpoint == RESPONSES:
            self._read_responses_event(doc)
            return True
        return self._read_chunk(doc)

    def _read_chunk(self, doc: dict[str, Any]) -> bool:
        usage = doc.get("usage")
        choices = doc.get("choices")
        if isinstance(usage, dict):
            self.usage = usage_from(usage, self._endpoint)
            if self._strip and not choices:
                return False
        if isinstance(choices, list):
            for choice in choices:
                self._read_choice(choice)
        return True

    def _read_choice(self, choice: Any) -> None:
        if not isinstance(choice, dict):
            return
        self._text.add(choice.get("text"))
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        for key in ("content", "reasoning_content", "refusal"):
            self._text.add(delta.get(key))
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                self._text.add(function.get("name"))
                self._text.add(function.get("arguments"))

    def _read_responses_event(self, doc: dict[str, Any]) -> None:
        kind = doc.get("type")
        if isinstance(kind, str) and kind.endswith(".delta"):
            self._text.add(doc.get("delta"))
        elif kind in _FINAL_RESPONSE:
            response = doc.get("response")
            if isinstance(response, dict):
                self.usage = usage_from(response.get("usage"), RESPONSES)
            self.complete = True

    def output_text(self) -> str:
        return self._text.text()

"""OpenAI-shaped calls: what a request asks for, and the usage in its JSON or SSE response."""

from __future__ import annotations

import logging
from typing import Any

import orjson

from tokenwatch.core import conversation
from tokenwatch.core.openai_wire import (
    CHAT_USAGE,
    FINAL_RESPONSE_EVENTS,
    RESPONSES_USAGE,
    choice_texts,
)
from tokenwatch.core.request_tokens import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, count_request
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
    reported_cost,
)

log = logging.getLogger(__name__)

METERED = frozenset({CHAT, COMPLETIONS, RESPONSES, EMBEDDINGS})
_STREAM_USAGE = frozenset({CHAT, COMPLETIONS})
"""Endpoints whose streams carry usage only when asked with `stream_options.include_usage`."""
_WIRE = {CHAT: conversation.CHAT, RESPONSES: conversation.RESPONSES}


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
        fingerprint(facts, messages, conversation.CHAT, body)
    elif endpoint == RESPONSES:
        given, instructions = body.get("input", ""), body.get("instructions")
        facts.max_output_tokens = int_field(body, "max_output_tokens")
        fingerprint(facts, [instructions, given] if instructions else given, _WIRE[RESPONSES], body)
    else:
        text = body.get("prompt" if endpoint == COMPLETIONS else "input")
        facts.max_output_tokens = int_field(body, "max_tokens") if endpoint == COMPLETIONS else 0
        fingerprint(facts, text)
    facts.prompt = lambda: count_request(endpoint, body, model)
    return facts


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
    """Normalised usage from a response's `usage` object (chat, completions, responses,
    embeddings); None when there is none or its figures are not counts (the call is estimated)."""
    if not isinstance(doc, dict):
        return None
    try:
        return _usage(doc, endpoint)
    except BadCount as exc:
        log.warning("%s: the upstream's %s; the call is estimated", endpoint, exc)
        return None


def _usage(doc: dict[str, Any], endpoint: str) -> Usage:
    paths = RESPONSES_USAGE if endpoint == RESPONSES else CHAT_USAGE
    return Usage(
        input_tokens=number(doc, *paths.input_tokens),
        output_tokens=number(doc, *paths.output_tokens),
        cache_read_tokens=number(doc, *paths.cache_read_tokens),
        reasoning_tokens=number(doc, *paths.reasoning_tokens),
        # OpenRouter (and gateways speaking its dialect) add what the call cost: `usage.cost`.
        cost_usd=reported_cost(doc.get("cost")),
    )


def _has_usage(data: bytes) -> bool:
    # bytes search first: only the chunk that carries usage is worth parsing on the hot path
    return b'"usage":{' in data or b'"usage": {' in data


class OpenAIReader:
    """Usage and generated text of one OpenAI-shaped response.

    Streams are parsed lazily: only events that may carry usage are decoded as they pass; the
    others are kept as bytes and decoded only if the usage never comes and must be estimated.
    """

    __slots__ = ("_answer", "_endpoint", "_raw", "_strip", "complete", "usage")

    def __init__(self, endpoint: str, strip_usage: bool = False) -> None:
        self._endpoint = endpoint
        self._strip = strip_usage
        self._raw: list[bytes] = []
        self._answer: Any = None
        """The whole answer (a JSON body, the final Responses event's response), once seen."""
        self.usage: Usage | None = None
        self.complete = False

    def read_json(self, body: bytes) -> None:
        doc = json_object(body)
        if doc is not None:
            self._answer = doc
            self.usage = _with_id(usage_from(doc.get("usage"), self._endpoint), doc)
            self.complete = True
            if self.usage is None:
                self._raw.append(body)  # its text is then what the estimate counts

    def read_event(self, event: SseEvent) -> bool:
        data = event.data
        if not data:
            return True
        if data == b"[DONE]":
            self.complete = True
            return True
        if self._endpoint == RESPONSES:
            return self._read_responses_event(event.name, data)
        if not _has_usage(data):
            self._raw.append(data)
            return True
        doc = json_object(data)
        if doc is None:
            return True
        usage, choices = doc.get("usage"), doc.get("choices")
        self.usage = _with_id(usage_from(usage, self._endpoint), doc)
        self.complete = True  # the usage chunk is the last before [DONE]
        if choices:
            self._raw.append(data)
        return not (self._strip and not choices)

    def _read_responses_event(self, name: str, data: bytes) -> bool:
        if name and name not in FINAL_RESPONSE_EVENTS:
            self._raw.append(data)
            return True
        doc = json_object(data)
        if doc is None or doc.get("type") not in FINAL_RESPONSE_EVENTS:
            self._raw.append(data)
            return True
        response = doc.get("response")
        if isinstance(response, dict):
            self._answer = response
            self.usage = _with_id(usage_from(response.get("usage"), RESPONSES), response)
        self.complete = True
        return True

    def answer_hash(self) -> str:
        wire = _WIRE.get(self._endpoint)
        if wire is None:
            return ""
        if self._answer is not None:
            return conversation.answer_hash(conversation.answer_of(wire, self._answer))
        stream = conversation.StreamAnswer(wire)
        for data in self._raw:
            stream.feed(json_object(data))
        return conversation.answer_hash(stream.parts())

    def output_text(self) -> str:
        text = TextParts()
        for data in self._raw:
            doc = json_object(data)
            if doc is None:
                continue
            if self._endpoint == RESPONSES:
                if str(doc.get("type", "")).endswith(".delta"):
                    text.add(doc.get("delta"))
                continue
            choices = doc.get("choices")
            for choice in choices if isinstance(choices, list) else ():
                _choice_text(choice, text)
        return text.text()


def _with_id(usage: Usage | None, doc: Any) -> Usage | None:
    if usage is not None:
        usage.response_id = answer_id(doc)
    return usage


def _choice_text(choice: Any, text: TextParts) -> None:
    for value in choice_texts(choice, _key):
        text.add(value)


def _key(doc: Any, name: str) -> Any:
    return doc.get(name) if isinstance(doc, dict) else None

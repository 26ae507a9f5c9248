"""What the proxy learns about one call: the request's facts, and the usage its response reports."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import anyio.to_thread
import orjson

from tokenwatch.core import conversation, tokens
from tokenwatch.core.conversation import Signals
from tokenwatch.core.models import MAX_CALL_TOKENS, UsageEvent
from tokenwatch.core.pricing import PROVIDER
from tokenwatch.core.tokens import TokenCount
from tokenwatch.proxy.sse import SseEvent

INLINE_CHARS = 16_384
"""Request bodies smaller than this are counted on the event loop; bigger ones in a thread."""

log = logging.getLogger("tokenwatch.proxy")


@dataclass(slots=True)
class Usage:
    """Token figures normalised the OpenTelemetry way (see core.models.UsageEvent)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float | None = None
    """What the provider says it billed (OpenRouter's `usage.cost`), stored as reported."""
    response_id: str = ""
    """The provider's id of the answer (`msg_...`, `resp_...`): a coding agent's session log
    names its calls by it, so a call both saw is stored once."""


COST_HEADERS: Final = ("x-litellm-response-cost",)
"""Response headers in which an upstream gateway reports what a call cost, in USD."""


def reported_cost(value: Any) -> float | None:
    """A cost as reported (a number of USD, or its text in a header); None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def cost_from_headers(headers: Any) -> float | None:
    """The cost a gateway put in the response's headers (`COST_HEADERS`), if any."""
    for name, value in headers:
        if name.lower() in COST_HEADERS:
            return reported_cost(value)
    return None


@dataclass(slots=True)
class CallFacts:
    """What a request says about itself before it is sent."""

    model: str = ""
    stream: bool = False
    max_output_tokens: int = 0
    """The request's own output limit; 0 when it sets none."""
    prompt_hash: str = ""
    prompt_shape: str = ""
    """Hash with numbers, ids and times blanked, so near-duplicate prompts (a loop) collide."""
    metered: bool = True
    """False for calls that cost nothing and are only relayed (count_tokens, models, files)."""
    prompt: Callable[[], TokenCount] | None = None
    """Counts the prompt locally (tiktoken); None when there is nothing to count."""
    hashes: Callable[[], tuple[str, str]] | None = None
    """The exact and near-duplicate hashes of the prompt (the shape's regexes cost ms per 100 KB)."""
    signals: Signals = field(default_factory=Signals)
    """The conversation signals (core.conversation), worked out with the hashes."""
    conversation: Callable[[], Signals] | None = None


def fingerprint(facts: CallFacts, prompt: Any, wire: str = "", body: Any = None) -> None:
    """Hash the prompt (and read the conversation of a `wire` request `body`) when it is
    measured (`count_prompt`): off the loop when it is big."""
    facts.hashes = lambda: tokens.prompt_hashes(prompt)
    if wire:
        facts.conversation = lambda: conversation.request_signals(wire, body)


class Reader(Protocol):
    """Reads one response's usage (and, for estimates, its generated text)."""

    usage: Usage | None
    complete: bool
    """True once the response said it had ended (final usage, `[DONE]`, `message_stop`)."""

    def read_json(self, body: bytes) -> None: ...

    def read_event(self, event: SseEvent) -> bool:
        """Take in one SSE event; False when the client must not see it (usage it did not ask for)."""
        ...

    def output_text(self) -> str: ...

    def answer_hash(self) -> str:
        """Hash of what the model answered (core.conversation.answer_hash); '' if unknown."""
        ...


@dataclass(slots=True)
class TextParts:
    """Generated text collected from stream deltas, for counting when no usage comes."""

    parts: list[str] = field(default_factory=list)

    def add(self, value: Any) -> None:
        if isinstance(value, str) and value:
            self.parts.append(value)

    def text(self) -> str:
        return "".join(self.parts)


class BadCount(ValueError):
    """A usage figure that is there but is not a count of tokens: the call is estimated instead."""


def number(doc: Any, *keys: str) -> int:
    """The count found by walking `keys` into nested objects; 0 when absent (or null). Raises
    BadCount for a figure that is present but negative, fractional, not a number, or more than
    one call can use (MAX_CALL_TOKENS: garbage, not usage)."""
    for key in keys:
        if not isinstance(doc, dict):
            return 0
        doc = doc.get(key)
    if doc is None:
        return 0
    if isinstance(doc, float) and doc.is_integer():
        doc = int(doc)
    if isinstance(doc, int) and not isinstance(doc, bool) and 0 <= doc <= MAX_CALL_TOKENS:
        return doc
    raise BadCount(f"usage {'.'.join(keys)} is {doc!r}")


def json_object(data: bytes) -> dict[str, Any] | None:
    """A JSON object decoded from bytes; None for anything else (invalid JSON, arrays, scalars)."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    return model if isinstance(model, str) else ""


def int_field(body: dict[str, Any], *names: str) -> int:
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


async def count_prompt(facts: CallFacts, body_size: int) -> TokenCount:
    """The prompt's tokens (and its hashes) without blocking the loop; a chars/4 estimate if it
    cannot be read."""
    if facts.prompt is None:
        return TokenCount(0, True, "none")
    count = facts.prompt

    def measure() -> TokenCount:
        if facts.hashes is not None:
            facts.prompt_hash, facts.prompt_shape = facts.hashes()
        if facts.conversation is not None:
            facts.signals = facts.conversation()
        return count()

    try:
        if body_size < INLINE_CHARS and tokens.encoding_ready(facts.model):
            return measure()
        return await anyio.to_thread.run_sync(measure)
    except (TypeError, ValueError, AttributeError):
        return TokenCount(max(1, body_size // tokens.CHARS_PER_TOKEN), True, "chars/4")


def fill_event(event: UsageEvent, usage: Usage) -> None:
    """Put the token figures an answer reported on its call's event (and its cost, when the
    provider reported one)."""
    event.input_tokens = usage.input_tokens
    event.output_tokens = usage.output_tokens
    event.cache_read_tokens = usage.cache_read_tokens
    event.cache_write_tokens = usage.cache_write_tokens
    event.reasoning_tokens = usage.reasoning_tokens
    event.response_id = usage.response_id
    if usage.cost_usd is not None:  # the provider's own bill wins over our price tables
        event.cost_usd, event.price_source = usage.cost_usd, PROVIDER


def answer_hash(reader: Reader) -> str:
    """The answer's hash; '' for an answer it cannot make out (the usage is still good)."""
    try:
        return reader.answer_hash()
    except Exception as exc:
        log.debug("could not hash an answer (%s)", type(exc).__name__)
        return ""


def answer_id(doc: Any) -> str:
    """The `id` a provider gave its answer (a JSON object's), or ""."""
    value = doc.get("id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and len(value) <= 200 else ""

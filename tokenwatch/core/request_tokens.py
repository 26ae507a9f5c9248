"""What a provider bills as input for one request, counted locally: every part, every wire format.

The proxy (from the JSON body) and the SDK (from the call's keyword arguments) both count here,
so a reservation covers the same parts whichever path a call takes (docs/budgets.md).
"""

from __future__ import annotations

import json
from typing import Any, Final

from tokenwatch.core import tokens
from tokenwatch.core.tokens import TokenCount

CHAT: Final = "/v1/chat/completions"
COMPLETIONS: Final = "/v1/completions"
RESPONSES: Final = "/v1/responses"
EMBEDDINGS: Final = "/v1/embeddings"
MESSAGES: Final = "/v1/messages"

ANTHROPIC_TOOL_PROMPT: Final = 346
"""Tokens Anthropic adds for its tool-use system prompt when a request carries tools: its
published figure for Claude 4 and 3.7 models with `tool_choice` auto or none (313 otherwise)."""

_DEFINITIONS: Final[dict[str, tuple[str, ...]]] = {
    CHAT: ("tools", "functions", "tool_choice", "function_call", "response_format"),
    RESPONSES: ("tools", "tool_choice", "text", "prompt"),
    COMPLETIONS: ("suffix",),
    MESSAGES: ("tools", "tool_choice", "output_format"),
}
"""Billed input beside the prompt: tool and function definitions, forced tool choices, response
formats and their JSON schemas, reusable prompt variables."""
_PROMPT: Final[dict[str, tuple[str, ...]]] = {
    CHAT: ("messages",),
    RESPONSES: ("instructions", "input"),
    COMPLETIONS: ("prompt",),
    EMBEDDINGS: ("input",),
    MESSAGES: ("system", "messages"),
}


def billed_parts(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """The parts of a request (JSON body or SDK keyword arguments) the provider bills as input."""
    keys = _PROMPT.get(endpoint, ()) + _DEFINITIONS.get(endpoint, ())
    return {key: body[key] for key in keys if _given(body.get(key))}


def count_request(endpoint: str, body: dict[str, Any], model: str = "") -> TokenCount:
    """Input tokens of a request to `endpoint`: its prompt in that endpoint's shape, plus every
    definition it carries (counted as JSON, more than providers' own renderings of them). Raises
    TypeError or ValueError for a prompt of the wrong shape."""
    prompt = _count_prompt(endpoint, body, model)
    extra = _definitions(endpoint, body, model)
    if endpoint == MESSAGES and _given(body.get("tools")):
        extra += ANTHROPIC_TOOL_PROMPT
    if not extra:
        return prompt
    return TokenCount(prompt.tokens + extra, True, prompt.encoding)


def _count_prompt(endpoint: str, body: dict[str, Any], model: str) -> TokenCount:
    if endpoint == CHAT:
        return tokens.count_messages(body.get("messages"), model)  # type: ignore[arg-type]
    if endpoint == RESPONSES:
        # `or`: the SDKs' NOT_GIVEN and omit markers are falsy
        given, instructions = body.get("input") or "", body.get("instructions") or None
        return tokens.count_responses_input(given, instructions, model)
    if endpoint == MESSAGES:
        system, messages = body.get("system") or None, body.get("messages")
        return tokens.count_anthropic(system, messages, model)  # type: ignore[arg-type]
    return count_texts(body.get("prompt" if endpoint == COMPLETIONS else "input"), model)


def count_texts(value: Any, model: str = "") -> TokenCount:
    """A legacy prompt or an embedding input: text, list of texts, or token ids (counted as given)."""
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
    return TokenCount(total, estimated, encoding or "token ids")


def _definitions(endpoint: str, body: dict[str, Any], model: str) -> int:
    total = 0
    for key in _DEFINITIONS.get(endpoint, ()):
        value = body.get(key)
        if _given(value):
            total += tokens.count_text(_as_json(value), model).tokens
    return total


def _given(value: Any) -> bool:
    """Present: not None, not empty, and not the SDKs' falsy NOT_GIVEN / omit markers."""
    return bool(value)


def _as_json(value: Any) -> str:
    """JSON with the usual spaces after `,` and `:` (a generous count of a definition)."""
    return json.dumps(value, ensure_ascii=False, default=_jsonable)


def _jsonable(value: Any) -> Any:
    """What the SDKs send for a value JSON cannot hold: a pydantic model class (a structured
    output's `response_format`) as its JSON schema, an instance as its fields."""
    schema = getattr(value, "model_json_schema", None)
    if isinstance(value, type) and callable(schema):
        return schema()
    dump = getattr(value, "model_dump", None)
    return dump() if callable(dump) else str(value)

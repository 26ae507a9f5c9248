"""Where the OpenAI wire keeps its usage figures and generated text: one home for the SDK
client's reader and the proxy's, which walk the same fields over SDK objects and raw JSON."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

Get = Callable[[Any, str], Any]
"""Reads one field of an object: a dict key for raw JSON, an attribute for an SDK model."""

FINAL_RESPONSE_EVENTS: Final = frozenset(
    {"response.completed", "response.incomplete", "response.failed"}
)
"""Responses API stream events that carry the whole response, usage included."""


@dataclass(frozen=True, slots=True)
class UsagePaths:
    """The path of each normalised figure inside a `usage` object of one API family."""

    input_tokens: tuple[str, ...]
    output_tokens: tuple[str, ...]
    cache_read_tokens: tuple[str, ...]
    reasoning_tokens: tuple[str, ...]


CHAT_USAGE: Final = UsagePaths(
    input_tokens=("prompt_tokens",),
    output_tokens=("completion_tokens",),
    cache_read_tokens=("prompt_tokens_details", "cached_tokens"),
    reasoning_tokens=("completion_tokens_details", "reasoning_tokens"),
)
"""Chat completions, legacy completions and embeddings. OpenAI counts cached tokens inside the
prompt figure and reasoning inside the completion figure, which is already the normalised shape."""

RESPONSES_USAGE: Final = UsagePaths(
    input_tokens=("input_tokens",),
    output_tokens=("output_tokens",),
    cache_read_tokens=("input_tokens_details", "cached_tokens"),
    reasoning_tokens=("output_tokens_details", "reasoning_tokens"),
)
"""The Responses API, same normalisation as chat."""


def usage_paths_of(usage: Any, get: Get) -> UsagePaths | None:
    """Which family a `usage` object belongs to, by the figure it carries; None if neither."""
    if get(usage, "prompt_tokens") is not None:
        return CHAT_USAGE
    if get(usage, "input_tokens") is not None:
        return RESPONSES_USAGE
    return None


def choice_texts(choice: Any, get: Get) -> Iterator[Any]:
    """The generated text of one choice: a legacy `text`, a stream chunk's `delta` or a whole
    answer's `message` (content, reasoning, refusal), and its tool calls' names and arguments.
    Values are yielded as found; the caller keeps the non-empty strings."""
    yield get(choice, "text")
    delta = get(choice, "delta") or get(choice, "message")
    if delta is None:
        return
    for key in ("content", "reasoning_content", "refusal"):
        yield get(delta, key)
    calls = get(delta, "tool_calls")
    for call in calls if isinstance(calls, list | tuple) else ():
        function = get(call, "function")
        if function is not None:
            yield get(function, "name")
            yield get(function, "arguments")

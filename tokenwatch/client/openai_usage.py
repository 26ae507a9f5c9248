"""Reading usage from OpenAI SDK results and stream items, normalised as UsageEvent says."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenwatch.core.openai_wire import FINAL_RESPONSE_EVENTS, choice_texts, usage_paths_of

_TEXT_EVENTS = {
    "response.output_text.delta",
    "response.refusal.delta",
    "response.function_call_arguments.delta",
    "response.reasoning_summary_text.delta",
}


@dataclass(frozen=True, slots=True)
class Counted:
    """Token figures as the provider reported them, normalised (input includes cached)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    reasoning_tokens: int = 0


def field(obj: Any, name: str) -> Any:
    """An attribute of an SDK model or a key of a plain dict (raw JSON)."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def items(obj: Any, name: str) -> list[Any]:
    """A list-valued field, or [] when it is absent or not a list."""
    value = field(obj, name)
    return list(value) if isinstance(value, list | tuple) else []


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def counted(usage: Any) -> Counted | None:
    """Chat/legacy usage (prompt_tokens...) or Responses usage (input_tokens...); None if absent."""
    if usage is None:
        return None
    paths = usage_paths_of(usage, field)
    if paths is None:
        return None
    return Counted(
        input_tokens=_int(_walk(usage, paths.input_tokens)),
        output_tokens=_int(_walk(usage, paths.output_tokens)),
        cache_read_tokens=_int(_walk(usage, paths.cache_read_tokens)),
        reasoning_tokens=_int(_walk(usage, paths.reasoning_tokens)),
    )


def _walk(obj: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        obj = field(obj, name)
    return obj


class StreamReading:
    """What a stream showed so far: usage if it came, the model, and the generated text."""

    def __init__(self) -> None:
        self.usage: Counted | None = None
        self.model = ""
        self.parts: list[str] = []
        self.saw_content = False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def see(self, item: Any) -> bool:
        """Take one stream item; True when it carried generated content (for time to first token)."""
        kind = field(item, "type")
        if isinstance(kind, str) and kind.startswith("response."):
            return self._see_response_event(kind, item)
        return self._see_chunk(item)

    def _see_chunk(self, chunk: Any) -> bool:
        model = field(chunk, "model")
        if isinstance(model, str) and model:
            self.model = model
        found = counted(field(chunk, "usage"))
        if found is not None:
            self.usage = found
        before = len(self.parts)
        for choice in items(chunk, "choices"):
            self._take_choice(choice)
        return self._content_seen(before)

    def _take_choice(self, choice: Any) -> None:
        for value in choice_texts(choice, field):
            if isinstance(value, str) and value:
                self.parts.append(value)

    def _see_response_event(self, kind: str, event: Any) -> bool:
        before = len(self.parts)
        if kind in _TEXT_EVENTS:
            delta = field(event, "delta")
            if isinstance(delta, str) and delta:
                self.parts.append(delta)
        response = field(event, "response")
        model = field(response, "model")
        if isinstance(model, str) and model:
            self.model = model
        if kind in FINAL_RESPONSE_EVENTS:
            found = counted(field(response, "usage"))
            if found is not None:
                self.usage = found
        return self._content_seen(before)

    def _content_seen(self, before: int) -> bool:
        if len(self.parts) > before and not self.saw_content:
            self.saw_content = True
            return True
        return False

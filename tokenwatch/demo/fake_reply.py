"""The fake model's mind: deterministic replies, reasoning counts, embeddings and prompt caches."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenwatch.core.tokens import count_text

# Every word is a single token (with its leading space) in cl100k_base and o200k_base, so a
# reply of N words is N tokens and truncating to max_tokens is exact.
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "at",
    "by",
    "this",
    "had",
    "not",
    "are",
    "but",
    "from",
    "or",
    "have",
    "an",
    "they",
    "which",
    "one",
    "you",
    "were",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
]
MIN_WORDS = 8
SPREAD_WORDS = 40
REASONING_MODEL_PREFIXES = ("o1", "o3", "o4", "gpt-5", "openai/o", "openai/gpt-5")
OPENAI_CACHE_MIN = 1024
OPENAI_CACHE_STEP = 128


def _digest(seed: str) -> bytes:
    return hashlib.sha256(seed.encode()).digest()


@dataclass(frozen=True, slots=True)
class Reply:
    """What the fake model says: the pieces a stream sends, and the whole."""

    pieces: tuple[str, ...]
    truncated: bool
    """True when the caller's output limit cut the reply short."""

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def compose_reply(seed: str, limit: int | None = None, model: str = "") -> Reply:
    """A lorem-like reply whose length depends on a hash of `seed`, at most `limit` tokens."""
    digest = _digest(seed)
    n_words = MIN_WORDS + digest[0] % SPREAD_WORDS
    words = [WORDS[digest[(i % 31) + 1] % len(WORDS)] for i in range(n_words)]
    pieces = [words[0].capitalize()] + [" " + w for w in words[1:]] + ["."]
    truncated = False
    if limit is not None and limit >= 0 and len(pieces) > limit:
        pieces = pieces[:limit]
        truncated = True
    while pieces and limit is not None and count_text("".join(pieces), model).tokens > limit:
        pieces.pop()
        truncated = True
    return Reply(tuple(pieces), truncated)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the fake model makes to one of the request's tools."""

    name: str
    arguments: str
    """The arguments as JSON text, as the APIs send them."""

    @property
    def pieces(self) -> tuple[str, ...]:
        """The arguments in the small pieces a stream sends."""
        step = ARGUMENT_PIECE_CHARS
        return tuple(self.arguments[i : i + step] for i in range(0, len(self.arguments), step))


ARGUMENT_PIECE_CHARS = 8
_SAMPLE_VALUES: dict[str, Any] = {
    "integer": 3,
    "number": 0.5,
    "boolean": True,
    "array": [],
    "object": {},
    "null": None,
}


def compose_tool_call(seed: str, name: str, schema: Any) -> ToolCall:
    """Arguments filling each property of the tool's JSON schema with a value of its type."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    arguments: dict[str, Any] = {}
    for i, (key, spec) in enumerate(properties.items() if isinstance(properties, dict) else []):
        kind = spec.get("type", "string") if isinstance(spec, dict) else "string"
        enum = spec.get("enum") if isinstance(spec, dict) else None
        if isinstance(enum, list) and enum:
            arguments[key] = enum[0]
        elif kind in _SAMPLE_VALUES:
            arguments[key] = _SAMPLE_VALUES[kind]
        else:
            arguments[key] = " ".join(WORDS[b % len(WORDS)] for b in _digest(f"{seed}{i}")[:3])
    return ToolCall(name, json.dumps(arguments, separators=(",", ":")))


def is_reasoning_model(model: str) -> bool:
    return model.startswith(REASONING_MODEL_PREFIXES)


def reasoning_tokens(model: str, prompt_tokens: int, limit: int | None = None) -> int:
    """Hidden reasoning a reasoning model spends: a quarter of the prompt plus 64, within half the limit."""
    if not is_reasoning_model(model):
        return 0
    spent = 64 + prompt_tokens // 4
    if limit is not None:
        spent = min(spent, max(limit, 0) // 2)
    return spent


def embedding(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector derived from the text."""
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        block = _digest(f"{counter}:{text}")
        values.extend((b - 127.5) / 127.5 for b in block)
        counter += 1
    del values[dimensions:]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


@dataclass(frozen=True, slots=True)
class Segment:
    """One cacheable piece of a prompt (a message, a tool list, a content block)."""

    key: str
    tokens: int
    breakpoint: bool = False
    """Anthropic: the block carries cache_control, so the prefix ending here may be cached."""


def _prefixes(segments: Sequence[Segment]) -> list[tuple[str, int, bool]]:
    """(hash of the prefix ending at each segment, its cumulative tokens, breakpoint)."""
    out: list[tuple[str, int, bool]] = []
    running = hashlib.sha256()
    total = 0
    for seg in segments:
        running.update(seg.key.encode())
        running.update(b"\x00")
        total += seg.tokens
        out.append((running.copy().hexdigest(), total, seg.breakpoint))
    return out


class PromptCache:
    """Remembers prompt prefixes, the way provider-side prompt caching would, deterministically."""

    def __init__(self, anthropic_min_tokens: int = 1024) -> None:
        self.anthropic_min_tokens = anthropic_min_tokens
        self._openai: set[str] = set()
        self._anthropic: set[str] = set()

    def clear(self) -> None:
        self._openai.clear()
        self._anthropic.clear()

    def openai_cached(self, segments: Sequence[Segment], prompt_tokens: int) -> int:
        """Cached tokens: the longest seen prefix of >= 1024 tokens, in 128-token increments."""
        prefixes = _prefixes(segments)
        hit = max((tokens for key, tokens, _ in prefixes if key in self._openai), default=0)
        self._openai.update(key for key, tokens, _ in prefixes if tokens >= OPENAI_CACHE_MIN)
        if hit < OPENAI_CACHE_MIN:
            return 0
        return min(hit - hit % OPENAI_CACHE_STEP, prompt_tokens - prompt_tokens % OPENAI_CACHE_STEP)

    def anthropic_cached(self, segments: Sequence[Segment]) -> tuple[int, int]:
        """(cache read, cache write) tokens for a prompt whose breakpoints are marked."""
        marks = [
            (key, tokens)
            for key, tokens, bp in _prefixes(segments)
            if bp and tokens >= self.anthropic_min_tokens
        ]
        read = max((tokens for key, tokens in marks if key in self._anthropic), default=0)
        last = marks[-1][1] if marks else 0
        write = last - read if last > read else 0
        self._anthropic.update(key for key, _ in marks)
        return read, write

"""Prompt hashes and local token counts for the SDK, via core.tokens when present, else a fallback."""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

CHARS_PER_TOKEN = 4


def _canonical(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def prompt_hash(prompt: Any) -> str:
    """Stable hash of a prompt (never the prompt itself)."""
    try:
        from tokenwatch.core.tokens import prompt_hash as core_hash

        return core_hash(prompt)
    except Exception:  # tokens.py absent or broken: the hash must still be stable
        return hashlib.sha256(_canonical(prompt).encode()).hexdigest()[:16]


def prompt_shape_hash(prompt: Any) -> str:
    """Hash where near-duplicates (differing only in numbers, ids, times) collide; '' if unavailable."""
    try:
        from tokenwatch.core.tokens import prompt_shape_hash as core_shape

        return core_shape(prompt)
    except Exception:
        return ""


def _chars_estimate(value: Any) -> int:
    return (len(_canonical(value)) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


_warming: set[str] = set()


def tokenizer_ready(model: str) -> bool:
    """True when counting for `model` costs no encoding load; else starts loading it in the
    background (a first load takes up to a second, which must not land on an agent's call)."""
    try:
        from tokenwatch.core import tokens

        if tokens.encoding_ready(model):
            return True
    except Exception:
        return True  # no tokenizer to wait for: the character estimate is all there is
    if model not in _warming:
        _warming.add(model)
        threading.Thread(
            target=_load_quietly, args=(model,), name="tokenwatch-tokenizer", daemon=True
        ).start()
    return False


def _load_quietly(model: str) -> None:
    try:
        from tokenwatch.core.tokens import count_text

        count_text("warm up", model)
    except Exception:
        pass  # counting falls back to the character estimate


def count_prompt(
    endpoint: str, params: dict[str, Any], model: str, *, wait_for_tokenizer: bool = True
) -> tuple[int, bool]:
    """(prompt tokens, estimated) for a request's parameters, counted locally: every part the
    provider bills as input (core.request_tokens), tool definitions and schemas included.

    With `wait_for_tokenizer` False, a tokenizer still loading gives a character estimate now.
    """
    try:
        from tokenwatch.core import request_tokens
    except Exception:  # core absent or broken: the whole request is the best guess left
        return _chars_estimate(params), True
    if not wait_for_tokenizer and not tokenizer_ready(model):
        return _chars_estimate(request_tokens.billed_parts(endpoint, params)), True
    try:
        count = request_tokens.count_request(endpoint, params, model)
        return count.tokens, count.estimated
    except Exception:  # counting is advisory: never let it break the call
        return _chars_estimate(request_tokens.billed_parts(endpoint, params)), True


def count_output(text: str, model: str) -> tuple[int, bool]:
    """(tokens, estimated) of generated text, counted locally."""
    try:
        from tokenwatch.core.tokens import count_text

        count = count_text(text, model)
        return count.tokens, count.estimated
    except Exception:
        return _chars_estimate(text), True

"""The SDK's side of conversation signals: which wire an endpoint speaks, and calls in flight."""

from __future__ import annotations

import threading

from tokenwatch.core import conversation

_WIRES = {
    "/v1/chat/completions": conversation.CHAT,
    "/v1/responses": conversation.RESPONSES,
    "/v1/messages": conversation.ANTHROPIC,
}


def wire_of(endpoint: str) -> str:
    """The conversation wire of an endpoint; '' for those without one (embeddings, legacy)."""
    return _WIRES.get(endpoint, "")


class InFlight:
    """Identical requests (by prompt hash) this process has in flight, across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flying: dict[str, int] = {}

    def take_off(self, prompt_hash: str) -> int:
        """Count one more; returns how many identical ones were already in flight."""
        with self._lock:
            before = self._flying.get(prompt_hash, 0)
            self._flying[prompt_hash] = before + 1
            return before

    def land(self, prompt_hash: str) -> None:
        with self._lock:
            left = self._flying.pop(prompt_hash, 1) - 1
            if left > 0:
                self._flying[prompt_hash] = left

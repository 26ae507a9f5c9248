"""The action vocabulary: what a budget or rule may do at its limit, and how each reads once done."""

from __future__ import annotations

from typing import Final

ACTIONS: Final = ("alert", "throttle", "pause", "kill", "deny")
"""What a budget or rule may do when it fires, mildest first."""
HARD_ACTIONS: Final = frozenset({"pause", "kill", "deny"})
"""The actions that stop an agent's spending (not just report or slow it)."""
_PAST: Final = {
    "pause": "paused",
    "resume": "resumed",
    "kill": "killed",
    "throttle": "throttled",
    "deny": "denied",
}


def past(kind: str) -> str:
    """How an action reads once done (`paused`, `killed`); an unknown kind reads as itself."""
    return _PAST.get(kind, kind)

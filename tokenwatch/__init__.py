"""tokenwatch: watch, price and control the token spending of LLM agents.

Agents use the client API from here: `tokenwatch.instrument()`, `tokenwatch.report(...)`,
`with tokenwatch.task("t-42"):`, `tokenwatch.usage()`, `tokenwatch.BudgetExceeded`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_CLIENT_NAMES = {"instrument", "report", "task", "usage", "BudgetExceeded", "uninstrument"}


def __getattr__(name: str) -> Any:
    # The client is loaded on first use so `tokenwatch` the CLI starts fast.
    if name in _CLIENT_NAMES:
        from tokenwatch import client

        return getattr(client, name)
    raise AttributeError(f"module 'tokenwatch' has no attribute {name!r}")

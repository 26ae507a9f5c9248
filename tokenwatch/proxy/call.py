"""One metered call on its way through the proxy: what is known so far and the event being filled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenwatch.core.models import UsageEvent
from tokenwatch.core.tokens import TokenCount
from tokenwatch.proxy.http import Headers
from tokenwatch.proxy.levers import Prepared
from tokenwatch.proxy.routes import AgentRoute, Target
from tokenwatch.proxy.usage import CallFacts, Reader


@dataclass(slots=True)
class Call:
    """One metered call on its way: what is known so far and the event being filled."""

    target: Target
    route: AgentRoute
    facts: CallFacts
    prompt: TokenCount
    event: UsageEvent
    reader: Reader
    strip_usage: bool = False
    doc: dict[str, Any] | None = None
    plan: Prepared | None = None
    """What the levers did to the request (None when none could)."""
    trimmed_tokens: int = 0
    capture: list[bytes] | None = None
    """The answer's bytes as the agent got them, kept for the response cache."""
    answer_headers: Headers | None = None
    started: float = 0.0
    first_byte: float | None = None
    gateway_cost: float | None = None
    """What an upstream gateway said the call cost, in a response header."""
    ended: float | None = None
    """Set when the exchange is over; the event is then finished in the settle task."""
    cut_body: bytes = b""
    """What arrived of a JSON body the upstream cut short (its text is counted as output)."""

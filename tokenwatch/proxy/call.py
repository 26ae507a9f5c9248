"""One metered call on its way through the proxy: what is known so far and the event being filled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenwatch.core.admission import CallRequest
from tokenwatch.core.models import Source, UsageEvent
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


def call_request(
    route: AgentRoute,
    target: Target,
    facts: CallFacts,
    tokens: tuple[int, int],
    prompt_hash: str = "",
) -> CallRequest:
    """What the gate is asked to admit for a call of `route`'s agent: `tokens` are its input
    and most output; `prompt_hash` lets the gate see copies in flight."""
    return CallRequest(
        agent=route.agent,
        provider=target.provider,
        model=facts.model,
        endpoint=target.endpoint,
        run_id=route.run_id,
        task=route.task,
        user=route.user,
        tags=dict(route.tags),
        input_tokens=tokens[0],
        max_output_tokens=tokens[1],
        prompt_hash=prompt_hash,
    )


def call_event(
    ts: float, route: AgentRoute, target: Target, facts: CallFacts, waited_ms: float, call_id: str
) -> UsageEvent:
    """The record of a call through the proxy, before its answer fills it in."""
    return UsageEvent(
        ts=ts,
        agent=route.agent,
        run_id=route.run_id,
        user=route.user,
        task=route.task,
        provider=target.provider,
        model=facts.model,
        endpoint=target.endpoint,
        wait_ms=waited_ms,
        source=Source.PROXY.value,
        call_id=call_id,
    )

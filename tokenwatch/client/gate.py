"""Asking the supervisor before a call: obey throttle waits, raise BudgetExceeded on a deny."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenwatch.client import session
from tokenwatch.client.reporter import LinkState, Reporter

log = logging.getLogger("tokenwatch")

ADMIT_TIMEOUT_S = 0.5
"""An admit not answered within this long lets the call go: tokenwatch never stalls the agent."""
QUIET_AFTER_TIMEOUT_S = 5.0
"""After an admit goes unanswered, calls skip admission this long: a hung supervisor costs one
timeout, not one per call."""
MAX_WAIT_S = 300.0
"""Cap on one throttle wait, so a confused supervisor cannot freeze the agent for ever."""


sleep: Callable[[float], None] = time.sleep
"""How a sync caller waits (replaced in tests to record waits instead of taking them)."""


async def sleep_async(seconds: float) -> None:
    """How an async caller waits: the running event loop's sleep (asyncio or trio)."""
    import anyio

    await anyio.sleep(seconds)


class BudgetExceeded(Exception):
    """A tokenwatch budget rule denied this call; `budget` names it, `message` says how to fix it."""

    def __init__(self, budget: str, message: str) -> None:
        super().__init__(message or f"tokenwatch budget {budget!r} exceeded")
        self.budget = budget
        self.message = message


@dataclass(slots=True)
class Ticket:
    """What admission decided for one call: how long it was held and its reservation."""

    reservation: str = ""
    wait_s: float = 0.0
    """Seconds the supervisor asked this call to wait (already obeyed when the ticket is returned)."""
    denied: BudgetExceeded | None = None


def admit_fields(
    model: str, provider: str, input_tokens: int, max_output_tokens: int, prompt_hash: str
) -> dict[str, Any]:
    return {
        "model": model,
        "provider": provider,
        "input_tokens": input_tokens,
        "max_output_tokens": max_output_tokens,
        "prompt_hash": prompt_hash,
    }


def _ticket(reply: dict[str, Any] | None) -> Ticket:
    if reply is None or not reply.get("ok"):
        return Ticket()
    data = reply.get("data")
    if not isinstance(data, dict):
        return Ticket()
    wait = data.get("wait") or 0.0
    wait_s = min(MAX_WAIT_S, float(wait)) if isinstance(wait, int | float) and wait > 0 else 0.0
    ticket = Ticket(reservation=str(data.get("reservation") or ""), wait_s=wait_s)
    if data.get("allowed") is False:
        budget = str(data.get("budget") or "")
        ticket.denied = BudgetExceeded(budget, str(data.get("message") or ""))
    return ticket


_skip_until = 0.0


def admission_wanted() -> bool:
    """False for a while after an admit went unanswered."""
    return time.monotonic() >= _skip_until


def _note_unanswered(reply: dict[str, Any] | None, rep: Reporter) -> None:
    """A connected supervisor that did not answer in time is hung or overloaded: leave it be."""
    global _skip_until
    if reply is None and rep.state is LinkState.CONNECTED:
        _skip_until = time.monotonic() + QUIET_AFTER_TIMEOUT_S


def _throttle_wait() -> float:
    rep = session.current_reporter()
    return min(MAX_WAIT_S, rep.throttle_wait()) if rep is not None else 0.0


def admit_sync(fields: dict[str, Any]) -> Ticket:
    """Sync admission: sleeps in the caller's thread as told; raises BudgetExceeded on deny."""
    pushed = _throttle_wait()
    if pushed:
        sleep(pushed)
    rep = session.reporter()
    reply = rep.request("admit", ADMIT_TIMEOUT_S, **fields)
    _note_unanswered(reply, rep)
    ticket = _ticket(reply)
    _raise_if_denied(ticket)
    if ticket.wait_s:
        sleep(ticket.wait_s)
    ticket.wait_s += pushed
    return ticket


async def admit_async(fields: dict[str, Any]) -> Ticket:
    """Async admission: waits with the running event loop's sleep; raises BudgetExceeded on deny."""
    import anyio

    pushed = _throttle_wait()
    if pushed:
        await sleep_async(pushed)
    rep = session.reporter()
    reply = None
    if rep.state is not LinkState.DOWN:
        # A worker thread waits, so neither the event loop nor the reporter thread ever blocks.
        ask = functools.partial(rep.request, "admit", ADMIT_TIMEOUT_S, **fields)
        reply = await anyio.to_thread.run_sync(ask)
        _note_unanswered(reply, rep)
    ticket = _ticket(reply)
    _raise_if_denied(ticket)
    if ticket.wait_s:
        await sleep_async(ticket.wait_s)
    ticket.wait_s += pushed
    return ticket


def _raise_if_denied(ticket: Ticket) -> None:
    if ticket.denied is not None:
        log.warning("tokenwatch: call denied by budget %s: %s", ticket.denied.budget, ticket.denied)
        raise ticket.denied

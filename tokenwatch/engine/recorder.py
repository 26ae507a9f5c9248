"""Recording usage: each call counted once (by call id), priced, counted into agents, figures,
budgets and rules, and stored; while the ledger refuses writes, kept in memory and retried."""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Final

import anyio

from tokenwatch.core.admission import Signal
from tokenwatch.core.models import Agent, UsageEvent
from tokenwatch.engine.agents import AgentRecord
from tokenwatch.engine.context import STORE_ERRORS, EngineContext

log = logging.getLogger("tokenwatch.engine")

RECENT_CALL_IDS: Final = 200_000
"""Call ids remembered to count a call reported twice (SDK and proxy, resend) only once."""
STORE_RETRY_MAX: Final = 5.0
UNNAMED: Final = "unnamed"
RESPONSE_KEY: Final = "\x00response:"
"""Prefix of a provider answer id among the remembered call ids (no call id starts with NUL)."""


class Recorder:
    """Counts and stores usage; `act` carries out what budgets and rules signal."""

    def __init__(self, ctx: EngineContext, act: Callable[[Signal], None]) -> None:
        self._ctx = ctx
        self._act = act
        # An OrderedDict, not a dict: dropping a dict's oldest key with next(iter(...)) walks
        # every key deleted before it, 16 us per call once full (200k ids).
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._pending: deque[UsageEvent] = deque()
        self._writing = 0
        """Events taken from `_pending` whose write is under way (still not stored)."""
        self._pending_wakeup = anyio.Event()
        self.events = 0
        self.duplicates = 0

    @property
    def pending(self) -> int:
        """Events counted but not yet stored (kept through a ledger outage)."""
        return len(self._pending) + self._writing

    async def ingest(self, events: Sequence[UsageEvent]) -> None:
        """Record usage reported without an admission (SDK, import); returns once stored."""
        ctx = self._ctx
        fresh: list[UsageEvent] = []
        for event in events:
            if not self.accept(event):
                continue
            ctx.prices.price(event)
            self.count(event, ctx.budgets.record(event))
            if ctx.shared is not None:
                ctx.shared.settle("", event)
            fresh.append(event)
        await self.persist(fresh, wait=True)

    def accept(self, event: UsageEvent) -> bool:
        """False for a call already counted (same call_id, or same provider answer: the proxy
        and a coding agent's session log both saw it)."""
        if not event.agent:
            event.agent = UNNAMED
        answer = RESPONSE_KEY + event.response_id if event.response_id else ""
        if (event.call_id and event.call_id in self._recent) or (answer and answer in self._recent):
            self.duplicates += 1
            return False
        if event.call_id:
            self._remember(event.call_id)
        else:
            event.call_id = uuid.uuid4().hex  # never reported twice: nothing to remember
        if answer:
            self._remember(answer)
        return True

    def _remember(self, key: str) -> None:
        recent = self._recent
        recent[key] = None
        if len(recent) > RECENT_CALL_IDS:
            recent.popitem(last=False)

    def count(self, event: UsageEvent, signals: list[Signal]) -> None:
        """Count a priced call into its agent, the live figures and the rules; act on signals."""
        ctx = self._ctx
        self.events += 1
        rec = ctx.roster.get(event.agent) or self._reporting_agent(event)
        rec.count(event.total_tokens, event.cost_usd, event.price_source)
        ctx.live.add(event)
        ctx.events.publish("usage", event)
        for signal in [*signals, *ctx.rules.observe(event)]:
            self._act(signal)

    def _reporting_agent(self, event: UsageEvent) -> AgentRecord:
        """An agent known only from its usage (no run, attach or hello)."""
        agent = Agent(name=event.agent, pid=event.pid, run_id=event.run_id, task=event.task)
        rec = self._ctx.roster.add(AgentRecord(agent))
        self._ctx.agent_changed(rec)
        return rec

    async def persist(self, events: list[UsageEvent], *, wait: bool) -> None:
        """Store events; while the store fails, keep them (never lost) and retry."""
        if not events:
            return
        delay = 0.05
        while True:
            try:
                await self._ctx.store.append_many(events)
            except ValueError as exc:
                # Rows the ledger refuses as they are (the rest were stored): retried, they would
                # be refused again. The capture paths refuse such usage before it gets here.
                log.error("the ledger refused usage: %s", exc)
                return
            except STORE_ERRORS as exc:
                self._ctx.store_failed(exc)
                if not wait:
                    self._pending.extend(events)
                    self._pending_wakeup.set()
                    return
                await anyio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX)
                continue
            self._ctx.store_error = ""
            return

    async def retry_pending(self) -> None:
        """Write back what an outage kept, whenever some is kept (runs until cancelled)."""
        while True:
            await self._pending_wakeup.wait()
            self._pending_wakeup = anyio.Event()
            await self.drain_pending()

    async def drain_pending(self) -> None:
        while self._pending:
            batch = list(self._pending)
            self._pending.clear()
            self._writing = len(batch)
            try:
                await self.persist(batch, wait=True)
            except BaseException:
                # stopped (shutdown) before the write was known to be stored: held again, for
                # `take_unstored` (stored twice is not possible: call_id)
                self._pending.extendleft(reversed(batch))
                raise
            finally:
                self._writing = 0

    def take_unstored(self) -> list[UsageEvent]:
        """The usage recorded but not known to be stored (the store was failing), handed over
        at shutdown to be kept elsewhere; the recorder lets go of it."""
        left = list(self._pending)
        self._pending.clear()
        return left

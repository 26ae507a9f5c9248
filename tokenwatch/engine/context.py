"""What the engine's parts share: the agents, the live figures, the policy in force, the ledger
port, the clock, the task group that owns their background work, and the listeners."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio.abc

from tokenwatch.config import SupervisorSettings
from tokenwatch.core.admission import RuleBook
from tokenwatch.core.errors import StoreUnavailable
from tokenwatch.core.models import Agent, AgentState
from tokenwatch.engine.agents import AgentRecord, Roster
from tokenwatch.engine.events import Publisher
from tokenwatch.engine.figures import LiveFigures
from tokenwatch.engine.ports import Budgeting, Ledger, Pricer, SharedBudgets

log = logging.getLogger("tokenwatch.engine")

STORE_ERRORS = (StoreUnavailable, OSError)
"""What a ledger write raises when the file cannot take it; the engine keeps going."""


class EngineContext:
    """The state every part of the engine reads; each part owns the rest of its own."""

    def __init__(
        self,
        store: Ledger,
        prices: Pricer,
        budgets: Budgeting,
        rules: RuleBook,
        *,
        settings: SupervisorSettings,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.prices = prices
        self.budgets = budgets
        self.rules = rules
        self.settings = settings
        self.clock = clock
        self.roster = Roster()
        self.live = LiveFigures(tz=settings.timezone, clock=clock)
        self.events = Publisher()
        self.store_error = ""
        """Why the ledger last refused a write; empty once a write has gone through."""
        self.tg: anyio.abc.TaskGroup | None = None
        self.shared: SharedBudgets | None = None
        """The team's shared budgets ([fleet]); None: this machine's budgets only."""

    def start_soon(self, fn: Callable[..., Any], *args: Any, name: str) -> None:
        """Run `fn(*args)` in the engine's task group (it must be running: `Engine.run`)."""
        if self.tg is None:
            raise RuntimeError("the engine is not running (start Engine.run first)")
        self.tg.start_soon(fn, *args, name=name)

    def store_failed(self, exc: Exception) -> None:
        if not self.store_error:
            log.error("the store cannot be written: %s (usage kept in memory, retrying)", exc)
        self.store_error = str(exc) or type(exc).__name__

    def set_state(self, rec: AgentRecord, state: AgentState) -> None:
        rec.agent.state = state.value
        self.agent_changed(rec)

    def agent_changed(self, rec: AgentRecord) -> None:
        self.events.publish("agent", rec.agent)
        if self.tg is not None:
            self.start_soon(self.save_agent, rec.agent, name=f"save agent {rec.name}")

    async def save_agent(self, agent: Agent) -> None:
        try:
            await self.store.save_agent(agent)
        except STORE_ERRORS as exc:
            self.store_failed(exc)

"""The engine: every call and usage event passes here (hold, throttle, budgets, price, store, rules,
actions, publish). A thin facade over parts that each own their state: the gate, the recorder,
control of agents and their lifecycle; it implements the Gate the proxy and the SDK call."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc

from tokenwatch.config import AgentSettings, BudgetSettings, RuleSettings, SupervisorSettings
from tokenwatch.core.admission import Admission, CallRequest, RuleBook, Signal
from tokenwatch.core.models import (
    Action,
    ActionKind,
    AgentState,
    AgentView,
    Alert,
    BudgetStatus,
    Severity,
    Snapshot,
    UsageEvent,
)
from tokenwatch.engine.agents import AgentRecord, Roster
from tokenwatch.engine.context import EngineContext
from tokenwatch.engine.control import Control
from tokenwatch.engine.events import Listener
from tokenwatch.engine.figures import LiveFigures
from tokenwatch.engine.gate import Gate
from tokenwatch.engine.lifecycle import Lifecycle
from tokenwatch.engine.ports import (
    Attacher,
    Budgeting,
    ChildEnv,
    Ledger,
    Pricer,
    Routes,
    SharedBudgets,
)
from tokenwatch.engine.recorder import Recorder
from tokenwatch.process.processes import NotPermitted, ProcessGone, ProcessHandle, Spawner

SHUTDOWN_DRAIN_TIMEOUT: Final = 10.0
"""Seconds `release_all` keeps trying to store held usage; what is left is `take_unstored`'s."""


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    agents: int
    live_agents: int
    events: int
    duplicates: int
    pending_store: int
    store_error: str
    reservations: int


def _same_env(env: Mapping[str, str]) -> Mapping[str, str]:
    return env


class Engine:
    """Composes the ledger port, prices, budgets, rules and process control; publishes what
    happens to its listeners."""

    def __init__(
        self,
        store: Ledger,
        prices: Pricer,
        budgets: Budgeting,
        rules: RuleBook,
        *,
        settings: SupervisorSettings | None = None,
        clock: Callable[[], float] = time.time,
        attach: Attacher = ProcessHandle.attach,
        spawner: Spawner | None = None,
        child_env: ChildEnv = _same_env,
        agents: dict[str, AgentSettings] | None = None,
        logs_dir: Path | None = None,
        socket_path: str = "",
    ) -> None:
        ctx = self._ctx = EngineContext(
            store, prices, budgets, rules, settings=settings or SupervisorSettings(), clock=clock
        )
        self._control = Control(ctx, on_exited=lambda rec, code: self._lifecycle.ended(rec, code))
        self._recorder = Recorder(ctx, act=self._control.act_nowait)
        self._gate = Gate(ctx, self._recorder, act=self._control.act_nowait)
        self._lifecycle = Lifecycle(ctx, self._control, attach=attach, spawner=spawner,
                                    child_env=child_env, agent_settings=agents or {},
                                    logs_dir=logs_dir, socket_path=socket_path)  # fmt: skip
        # The verbs the socket, the proxy and the CLI call, each the method of the part that
        # owns its state (bound here rather than wrapped: one call, the part's own docstring).
        gate, recorder, control, life = self._gate, self._recorder, self._control, self._lifecycle
        self.admit = gate.admit
        self.admit_nowait = gate.admit_nowait
        self.share = gate.share
        self.settle = gate.settle
        self.release = gate.release
        self.ingest = recorder.ingest
        self.pause = control.pause
        self.resume = control.resume
        self.kill = control.kill
        self.deny = control.deny
        self.throttle = control.throttle
        self.pause_all = control.pause_all
        self.resume_all = control.resume_all
        self.take_unstored = recorder.take_unstored
        self.register = life.register
        self.started = life.started
        self.exited = life.exited
        self.attach = life.attach
        self.hello = life.hello
        self.caller = life.caller
        self.task = life.task
        self.connection_lost = life.connection_lost
        self.launch = life.launch
        self.env_for = life.env_for
        self.adopt = life.adopt
        self.recover = life.recover
        self.restore_route = life.restore_route
        self.agent_changed = ctx.agent_changed

    # -- lifetime -----------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the engine's background work (actions, exit watch, store retries) until cancelled."""
        async with anyio.create_task_group() as tg:
            self._ctx.tg = tg
            tg.start_soon(self._lifecycle.watch_exits, name="engine: watch exits")
            tg.start_soon(self._recorder.retry_pending, name="engine: store retries")
            task_status.started()
            await anyio.sleep_forever()

    async def release_all(self) -> None:
        """On the way out: no agent stays stopped, held calls go, pending usage is stored."""
        for rec in self.roster:
            # a duty cycle, cancelled, continues its agent itself (unless its user stopped it)
            self._control.stop_duty(rec)
            rec.release()
            if rec.handle is not None and rec.agent.state == AgentState.PAUSED:
                try:
                    rec.handle.resume()
                except (ProcessGone, NotPermitted):
                    pass
            if rec.live:
                rec.agent.state = AgentState.DETACHED.value
                await self._ctx.save_agent(rec.agent)
        with anyio.move_on_after(SHUTDOWN_DRAIN_TIMEOUT):
            await self._recorder.drain_pending()

    # -- what the composition root sets -------------------------------------------------------

    def add_listener(self, fn: Listener) -> None:
        """Call `fn(kind, obj)` synchronously for every usage, alert, action and agent change."""
        self._ctx.events.add(fn)

    def use_routes(self, routes: Routes) -> None:
        self._lifecycle.routes = routes

    def use_shared_budgets(self, shared: SharedBudgets) -> None:
        """Hold calls in the team's shared budgets too ([fleet]), after the local ones."""
        self._ctx.shared = shared

    def use_prices(self, prices: Pricer) -> None:
        """Price calls recorded from now on with `prices` (an edited price table)."""
        self._ctx.prices = prices

    def use_budgets(self, settings: Sequence[BudgetSettings]) -> list[str]:
        """Enforce these budgets from now on (usage kept by name); the names that start empty."""
        fresh = self._ctx.budgets.replace(settings)
        if self._ctx.shared is not None:
            self._ctx.shared.replace(settings)
        return fresh

    def use_rules(self, settings: Sequence[RuleSettings]) -> None:
        replace: Callable[[Sequence[RuleSettings]], Any] = self._ctx.rules.replace
        replace(settings)

    def use_agent_settings(self, agents: Mapping[str, AgentSettings]) -> None:
        """The `[agents.NAME]` that `launch` starts from now on."""
        self._lifecycle.agent_settings = dict(agents)

    async def seed_budgets(self, store: object, only: Collection[str] | None = None) -> None:
        """Count what the ledger already holds for this period into the budgets (all, or `only`)."""
        seed = getattr(self._ctx.budgets, "seed", None)  # a stand-in book may have none
        if seed is not None:
            await seed(store, only=only)

    def seed_today(
        self,
        group: str,
        key: str,
        tokens: int,
        cost_usd: float,
        estimated_usd: float = 0.0,
        unpriced: int = 0,
    ) -> None:
        """Start today's live figures from what the ledger holds (at start-up); `estimated_usd`
        is the part of the cost priced at a fallback's rates, over `unpriced` calls."""
        self._ctx.live.today.seed(group, key, tokens, cost_usd, estimated_usd, unpriced)

    # -- what others read ---------------------------------------------------------------------

    @property
    def settings(self) -> SupervisorSettings:
        return self._ctx.settings

    @settings.setter
    def settings(self, settings: SupervisorSettings) -> None:
        self._ctx.settings = settings

    @property
    def roster(self) -> Roster:
        return self._ctx.roster

    @property
    def live(self) -> LiveFigures:
        return self._ctx.live

    @property
    def budgets(self) -> Budgeting:
        return self._ctx.budgets

    @property
    def rules(self) -> RuleBook:
        return self._ctx.rules

    @property
    def routes(self) -> Routes | None:
        return self._lifecycle.routes

    @property
    def socket_path(self) -> str:
        return self._lifecycle.socket_path

    def find(self, name: str) -> AgentRecord:
        """The agent named `name`; UnknownAgent when there is none."""
        return self._ctx.roster.find(name)

    def statistics(self) -> EngineStatistics:
        roster = self._ctx.roster
        return EngineStatistics(
            agents=len(roster),
            live_agents=sum(1 for r in roster if r.live),
            events=self._recorder.events,
            duplicates=self._recorder.duplicates,
            pending_store=self._recorder.pending,
            store_error=self._ctx.store_error,
            reservations=len(self._gate.reservations),
        )

    def views(self) -> list[AgentView]:
        return [AgentView(agent=rec.agent) for rec in self.roster]

    def snapshot(self) -> Snapshot:
        return self.live.snapshot(self.views(), self.budget_statuses(), supervisor=self.socket_path)

    def budget_statuses(self) -> list[BudgetStatus]:
        rows = self._ctx.budgets.statuses()
        shared = self._ctx.shared
        return rows if shared is None else shared.statuses(rows)

    async def alerts(self, since: float = 0, limit: int = 200) -> list[Alert]:
        return await self._ctx.store.list_alerts(since=since, limit=limit)

    async def ack_alerts(self, ids: Sequence[int] | None) -> int:
        return await self._ctx.store.ack_alerts(ids)

    # -- alerts not of an agent's doing ---------------------------------------------------------

    def alert_nowait(self, alert: Alert) -> None:
        """Tell about something that is not an agent's doing (stored, published, notified)."""
        self._control.act_nowait(
            Signal(alert=alert, action=ActionKind.ALERT.value, agent=alert.agent)
        )

    def raise_alert(self, agent: str, message: str, *, rule: str = "supervisor") -> Alert:
        alert = Alert(rule=rule, agent=agent, message=message, severity=Severity.WARNING.value,
                      ts=self._ctx.clock())  # fmt: skip
        self._control.act_nowait(Signal(alert=alert, action=ActionKind.ALERT.value, agent=agent))
        return alert


__all__ = ["Action", "Admission", "CallRequest", "Engine", "EngineStatistics", "UsageEvent"]

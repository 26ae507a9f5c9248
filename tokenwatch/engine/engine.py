"""The engine: every call and usage event passes here (hold, throttle, budgets, price, store, rules,
actions, publish); it implements the Gate that the proxy and the SDK call around each LLM call."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
import anyio.abc

from tokenwatch.config import AgentSettings, BudgetSettings, SupervisorSettings
from tokenwatch.core.admission import (
    Admission,
    BudgetBook,
    CallRequest,
    Refusal,
    Reservation,
    RuleBook,
    Signal,
)
from tokenwatch.core.budgets import run_budget_name
from tokenwatch.core.models import (
    Action,
    ActionKind,
    Agent,
    AgentState,
    AgentView,
    Alert,
    BudgetStatus,
    Severity,
    Snapshot,
    Status,
    UsageEvent,
)
from tokenwatch.core.output_estimate import OutputEstimate
from tokenwatch.core.protocol import ErrorCode, ProtocolError
from tokenwatch.core.quantities import QuantityError, RateKind, parse_rate
from tokenwatch.core.throttle import TokenBucket
from tokenwatch.engine.agents import AgentRecord, Roster, check_name
from tokenwatch.engine.figures import LiveFigures
from tokenwatch.ledger.store import StoreUnavailable
from tokenwatch.process.processes import NotPermitted, ProcessGone, ProcessHandle, Spawner

if TYPE_CHECKING:
    from tokenwatch.export.alerting import Notifier

log = logging.getLogger("tokenwatch.engine")


RECENT_CALL_IDS: Final = 200_000
"""Call ids remembered to count a call reported twice (SDK and proxy, resend) only once."""
EXIT_POLL_INTERVAL: Final = 0.5
STORE_RETRY_MAX: Final = 5.0
UNNAMED: Final = "unnamed"

Listener = Callable[[str, Any], None]
Attacher = Callable[..., ProcessHandle]


class Ledger(Protocol):
    """The part of tokenwatch.ledger.store.Store the engine uses."""

    async def append(self, event: UsageEvent) -> bool: ...

    async def append_many(self, events: Sequence[UsageEvent]) -> int: ...

    async def flush(self) -> None: ...

    async def save_agent(self, agent: Agent) -> None: ...

    async def load_agents(self) -> list[Agent]: ...

    async def forget_agent(self, name: str) -> None: ...

    async def add_alert(self, alert: Alert) -> int: ...

    async def list_alerts(self, since: float = 0, limit: int = 200) -> list[Alert]: ...

    async def ack_alerts(self, ids: Sequence[int] | None = None) -> int: ...

    async def add_action(self, action: Action) -> int: ...


class Pricer(Protocol):
    """The part of tokenwatch.core.pricing.PriceTable the engine uses."""

    def price(self, event: UsageEvent) -> UsageEvent: ...

    def worst_case(
        self, model: str, input_tokens: int, max_output_tokens: int, provider: str = ""
    ) -> float | None: ...

    def estimated_from(self, model: str, provider: str = "") -> str:
        """The fallback model that prices `model` when no table knows it, else ""."""
        ...


class Budgeting(BudgetBook, Protocol):
    """tokenwatch.core.budgets.Budgets: a BudgetBook that can be edited live."""

    def replace(self, settings: Sequence[BudgetSettings]) -> list[str]: ...

    async def seed(self, store: Any, only: Collection[str] | None = None) -> None: ...

    def add_ephemeral(self, settings: BudgetSettings, *, start: float) -> None: ...

    def remove_ephemeral(self, name: str) -> bool: ...

    def set_run_limit(self, name: str, limit: str) -> BudgetStatus: ...


class Routes(Protocol):
    """The proxy's route table and URLs, as far as the engine needs them."""

    def add_route(
        self, rec: Agent, openai_upstream: str, anthropic_upstream: str, token: str = ""
    ) -> str: ...

    def remove_route(self, token: str) -> None: ...

    def set_task(self, agent: str, task: str) -> None: ...

    def base_urls(self, token: str) -> dict[str, str]: ...

    @property
    def url(self) -> str: ...


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    agents: int
    live_agents: int
    events: int
    duplicates: int
    pending_store: int
    store_error: str
    reservations: int


class Engine:
    """Composes store, prices, budgets, rules and process control; publishes what happens."""

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
        notifier: Notifier | None = None,
        agents: dict[str, AgentSettings] | None = None,
        logs_dir: Path | None = None,
        socket_path: str = "",
    ) -> None:
        self._store = store
        self._prices = prices
        self.budgets = budgets
        self.rules = rules
        self.settings = settings or SupervisorSettings()
        self._clock = clock
        self._attach = attach
        self._spawner = spawner
        self._notifier = notifier
        self.agent_settings = dict(agents or {})
        self._logs_dir = logs_dir
        self.socket_path = socket_path
        self.roster = Roster()
        self.live = LiveFigures(tz=self.settings.timezone, clock=clock)
        self.routes: Routes | None = None
        self._listeners: list[Listener] = []
        # An OrderedDict, not a dict: dropping a dict's oldest key with next(iter(...)) walks
        # every key deleted before it, 16 us per call once full (200k ids).
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._reservations: dict[str, Reservation] = {}
        self.outputs = OutputEstimate()
        """What each agent's calls on each model produce: a call reserves its likely output."""
        self._pending: deque[UsageEvent] = deque()
        self._writing = 0
        """Events taken from `_pending` whose write is under way (still not stored)."""
        self._pending_wakeup = anyio.Event()
        self._store_error = ""
        self._events = 0
        self._duplicates = 0
        self._tg: anyio.abc.TaskGroup | None = None

    # -- lifetime -----------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the engine's background work (actions, exit watch, store retries) until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._watch_exits)
            tg.start_soon(self._retry_pending)
            task_status.started()
            await anyio.sleep_forever()

    def _start_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._tg is None:
            raise RuntimeError("the engine is not running (start Engine.run first)")
        self._tg.start_soon(fn, *args)

    async def release_all(self) -> None:
        """On the way out: no agent stays stopped, held calls go, pending usage is stored."""
        for rec in self.roster:
            # a duty cycle, cancelled, continues its agent itself (unless its user stopped it)
            self._stop_duty(rec)
            rec.release()
            if rec.handle is not None and rec.agent.state == AgentState.PAUSED:
                try:
                    rec.handle.resume()
                except (ProcessGone, NotPermitted):
                    pass
            if rec.live:
                rec.agent.state = AgentState.DETACHED.value
                await self._save_agent(rec.agent)
        with anyio.move_on_after(10):
            await self._drain_pending()

    @property
    def notifier(self) -> Notifier | None:
        return self._notifier

    def use_routes(self, routes: Routes) -> None:
        self.routes = routes

    def use_prices(self, prices: Pricer) -> None:
        """Price calls recorded from now on with `prices` (an edited price table)."""
        self._prices = prices

    def alert_nowait(self, alert: Alert) -> None:
        """Tell about something that is not an agent's doing (stored, published, notified)."""
        self._act_nowait(Signal(alert=alert, action=ActionKind.ALERT.value, agent=alert.agent))

    def restore_route(
        self, token: str, agent: str, run_id: str, openai_upstream: str, anthropic_upstream: str
    ) -> bool:
        """Give an agent that outlived its supervisor the proxy route it had (its base URL names
        the token); only the same run of a recovered agent, only once."""
        rec = self.roster.get(agent)
        if self.routes is None or rec is None or rec.route or rec.agent.run_id != run_id:
            return False
        if rec.agent.state != AgentState.DETACHED:
            return False
        rec.route = self.routes.add_route(rec.agent, openai_upstream, anthropic_upstream, token)
        return True

    def add_listener(self, fn: Listener) -> None:
        """Call `fn(kind, obj)` synchronously for every usage, alert, action and agent change."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        self._listeners.remove(fn)

    def _publish(self, kind: str, obj: Any) -> None:
        for fn in self._listeners:
            try:
                fn(kind, obj)
            except Exception:
                log.exception("listener %r failed on %s", fn, kind)

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(
            agents=len(self.roster),
            live_agents=sum(1 for r in self.roster if r.live),
            events=self._events,
            duplicates=self._duplicates,
            pending_store=len(self._pending) + self._writing,
            store_error=self._store_error,
            reservations=len(self._reservations),
        )

    # -- the gate -----------------------------------------------------------------------------

    async def admit(self, call: CallRequest) -> Admission:
        """Hold while the agent is paused or throttled, then reserve the worst case."""
        start = self._clock()
        rec = self.roster.get(call.agent)
        if rec is not None:
            refused = await self._hold(rec, call)
            if refused is not None:
                refused.waited_ms = (self._clock() - start) * 1000
                return refused
        return self._reserve(call, waited_ms=(self._clock() - start) * 1000)

    def admit_nowait(self, call: CallRequest) -> tuple[Admission, float]:
        """For SDK clients, which wait on their own: the admission and seconds to wait first."""
        rec = self.roster.get(call.agent)
        wait = 0.0
        if rec is not None:
            if rec.denied:
                return Admission(False, status=429, message=rec.denied), 0.0
            if rec.bucket is not None:
                amount = self._bucket_amount(rec, call)
                stats = rec.bucket.statistics()
                if stats.rate_per_s > 0:
                    wait = max(0.0, (amount - stats.available) / stats.rate_per_s)
                self._start_soon(rec.bucket.acquire, amount)
        return self._reserve(call, waited_ms=0.0), wait

    async def _hold(self, rec: AgentRecord, call: CallRequest) -> Admission | None:
        while not rec.denied and not rec.running.is_set():
            await rec.running.wait()
        if rec.denied:
            return Admission(False, status=429, message=rec.denied)
        bucket = rec.bucket
        if bucket is not None:
            await bucket.acquire(self._bucket_amount(rec, call))
            return await self._hold(rec, call) if not rec.running.is_set() else None
        return None

    def _bucket_amount(self, rec: AgentRecord, call: CallRequest) -> float:
        """What a call takes from a throttle before it goes: its prompt; the output is charged
        when it settles, so the rate holds without reserving every call's worst case."""
        if rec.bucket_usd:
            return self._prices.worst_case(call.model, call.input_tokens, 0) or 0.0
        return float(call.input_tokens)

    def _reserve(self, call: CallRequest, *, waited_ms: float) -> Admission:
        if self._store_error and not self.settings.fail_open:
            return Admission(
                False,
                status=503,
                message=(
                    f"tokenwatch cannot record usage right now ({self._store_error}); calls are "
                    "refused until it can (set [supervisor] fail_open = true to let them through)"
                ),
                waited_ms=waited_ms,
            )
        # The likely output, not max_tokens: coding agents ask 32k and write ~800 (the overshoot
        # this allows is bounded in docs/budgets.md).
        output = self.outputs.expected(call.agent, call.model, call.max_output_tokens)
        usd = self._prices.worst_case(call.model, call.input_tokens, output, call.provider)
        fallback = self._prices.estimated_from(call.model, call.provider)
        got = self.budgets.reserve(call, call.input_tokens + output, usd, fallback)
        if isinstance(got, Refusal):
            # A refusal can make a budget's action due (pause the agent it stopped) at once.
            for signal in self.budgets.signals_nowait():
                self._act_nowait(signal)
            return Admission(
                False,
                status=429,
                message=got.message,
                budget=got.budget,
                retry_after=got.retry_after,
                waited_ms=waited_ms,
            )
        if got.id:
            self._reservations[got.id] = got
        return Admission(True, reservation=got.id, waited_ms=waited_ms)

    async def settle(self, admission: Admission, event: UsageEvent) -> None:
        """Record a proxied (or SDK-admitted) call: count it, act on it, store it."""
        reservation = self._reservations.pop(admission.reservation, None)
        event.wait_ms = event.wait_ms or admission.waited_ms
        if not self._accept(event):
            if reservation is not None:
                self.budgets.release(reservation)
            return
        self._prices.price(event)
        if event.status == Status.OK.value and not event.estimated:
            self.outputs.observe(event.agent, event.model, event.output_tokens)
        self._count(event, self.budgets.settle(reservation, event))
        self._charge_output(event)
        await self._persist([event], wait=False)

    def release(self, admission: Admission) -> None:
        """Give back a reservation for a call that never went."""
        reservation = self._reservations.pop(admission.reservation, None)
        if reservation is not None:
            self.budgets.release(reservation)

    def _charge_output(self, event: UsageEvent) -> None:
        rec = self.roster.get(event.agent)
        if rec is None or rec.bucket is None:
            return
        if rec.bucket_usd:
            upfront = self._prices.worst_case(event.model, event.input_tokens, 0) or 0.0
            amount = max(0.0, (event.cost_usd or 0.0) - upfront)
        else:
            amount = float(event.output_tokens)
        if amount > 0:
            self._start_soon(rec.bucket.acquire, amount)

    # -- usage --------------------------------------------------------------------------------

    async def ingest(self, events: Sequence[UsageEvent]) -> None:
        """Record usage reported without an admission (SDK, import); returns once stored."""
        fresh: list[UsageEvent] = []
        for event in events:
            if not self._accept(event):
                continue
            self._prices.price(event)
            self._count(event, self.budgets.record(event))
            fresh.append(event)
        await self._persist(fresh, wait=True)

    def _accept(self, event: UsageEvent) -> bool:
        """False for a call already counted (same call_id)."""
        if not event.agent:
            event.agent = UNNAMED
        if not event.call_id:
            event.call_id = uuid.uuid4().hex
            return True
        if event.call_id in self._recent:
            self._duplicates += 1
            return False
        recent = self._recent
        recent[event.call_id] = None
        if len(recent) > RECENT_CALL_IDS:
            recent.popitem(last=False)
        return True

    def _count(self, event: UsageEvent, signals: list[Signal]) -> None:
        self._events += 1
        rec = self.roster.get(event.agent) or self._reporting_agent(event)
        rec.count(event.total_tokens, event.cost_usd, event.price_source)
        self.live.add(event)
        self._publish("usage", event)
        for signal in [*signals, *self.rules.observe(event)]:
            self._act_nowait(signal)

    def _reporting_agent(self, event: UsageEvent) -> AgentRecord:
        """An agent known only from its usage (no run, attach or hello)."""
        agent = Agent(name=event.agent, pid=event.pid, run_id=event.run_id, task=event.task)
        rec = self.roster.add(AgentRecord(agent))
        self._agent_changed(rec)
        return rec

    async def _persist(self, events: list[UsageEvent], *, wait: bool) -> None:
        """Store events; while the store fails, keep them (never lost) and retry."""
        if not events:
            return
        delay = 0.05
        while True:
            try:
                await self._store.append_many(events)
            except (StoreUnavailable, OSError) as exc:
                self._store_failed(exc)
                if not wait:
                    self._pending.extend(events)
                    self._pending_wakeup.set()
                    return
                await anyio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX)
                continue
            self._store_error = ""
            return

    def _store_failed(self, exc: Exception) -> None:
        if not self._store_error:
            log.error("the store cannot be written: %s (usage kept in memory, retrying)", exc)
        self._store_error = str(exc) or type(exc).__name__

    async def _retry_pending(self) -> None:
        while True:
            await self._pending_wakeup.wait()
            self._pending_wakeup = anyio.Event()
            await self._drain_pending()

    async def _drain_pending(self) -> None:
        while self._pending:
            batch = list(self._pending)
            self._pending.clear()
            self._writing = len(batch)
            try:
                await self._persist(batch, wait=True)
            finally:
                self._writing = 0

    # -- signals and actions --------------------------------------------------------------------

    def _act_nowait(self, signal: Signal) -> None:
        alert = signal.alert
        self.live.add_alert(alert)
        self._publish("alert", alert)
        if self._notifier is not None:
            self._notifier.notify_nowait(alert)
        self._start_soon(self._store_alert, alert)
        kind = signal.action
        rec = self.roster.get(signal.agent)
        if kind == ActionKind.ALERT or rec is None:
            return
        if rec.agent.critical and kind in (ActionKind.PAUSE, ActionKind.KILL):
            log.info("%s is critical: %s by %s downgraded to an alert", rec.name, kind, alert.rule)
            return
        who = alert.rule if alert.rule.startswith("budget:") else f"rule:{alert.rule}"
        self._start_soon(self._act, kind, rec.name, who, alert.message, signal.rate)

    async def _store_alert(self, alert: Alert) -> None:
        try:
            alert.id = await self._store.add_alert(alert)
        except (StoreUnavailable, OSError) as exc:
            self._store_failed(exc)

    async def _act(self, kind: str, name: str, who: str, why: str, rate: str) -> None:
        try:
            if kind == ActionKind.PAUSE:
                await self.pause(name, who=who, why=why)
            elif kind == ActionKind.KILL:
                await self.kill(name, who=who, why=why)
            elif kind == ActionKind.THROTTLE:
                await self.throttle(name, rate or "50%", who=who, why=why)
            elif kind == ActionKind.DENY:
                await self.deny(name, who=who, why=why)
        except ProtocolError as exc:
            log.warning("%s on %s by %s failed: %s", kind, name, who, exc.message)

    async def pause(self, name: str, *, who: str, why: str = "") -> Action:
        rec = self._acting_on(name, "pause")
        self._stop_duty(rec, continue_tree=False)
        rec.hold()
        ok, detail = self._signal_tree(rec, "pause")
        self._set_state(rec, AgentState.PAUSED)
        return await self._record(ActionKind.PAUSE, rec, who, why, detail, ok)

    async def resume(self, name: str, *, who: str, why: str = "") -> Action:
        rec = self._acting_on(name, "resume")
        rec.denied = ""
        ok, detail = self._signal_tree(rec, "resume")
        rec.release()
        throttled = bool(rec.agent.throttle)
        if throttled:
            self._start_duty(rec)
        self._set_state(rec, AgentState.THROTTLED if throttled else AgentState.RUNNING)
        return await self._record(ActionKind.RESUME, rec, who, why, detail, ok)

    def _acting_on(self, name: str, verb: str) -> AgentRecord:
        """The agent an action is for; one that has exited is an error, not a success."""
        rec = self.roster.find(name)
        if rec.agent.state == AgentState.EXITED:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"{name} has exited: there is nothing to {verb}"
            )
        return rec

    async def pause_all(self, *, who: str, why: str = "") -> list[Action]:
        """Pause every live agent that is not critical."""
        return [
            await self.pause(rec.name, who=who, why=why)
            for rec in self.roster
            if rec.live and not rec.agent.critical and rec.agent.state != AgentState.PAUSED
        ]

    async def kill(self, name: str, *, who: str, why: str = "") -> Action:
        rec = self._acting_on(name, "kill")
        rec.denied = f"{name} was killed by {who}"
        self._stop_duty(rec, continue_tree=False)
        rec.release()
        # Noted before the signals: `tokenwatch run` sees its agent die and asks for the
        # summary while this is still waiting out the grace period.
        note = f"killed by {who}"
        rec.done.append(note)
        ok, detail = True, "no process known: its calls are refused"
        if rec.handle is not None:
            try:
                report = await rec.handle.kill(self.settings.kill_grace)
                detail = f"{len(report.terminated)} ended on SIGTERM, {len(report.killed)} needed SIGKILL"
            except ProcessGone:
                detail = "it had already exited"
            except NotPermitted as exc:
                ok, detail = False, str(exc)
                rec.done.remove(note)
        if rec.handle is not None:
            self._exited(rec, rec.handle.wait_exit_nowait())
        else:
            self._set_state(rec, AgentState.EXITED)
        return await self._record(ActionKind.KILL, rec, who, why, detail, ok, noted=True)

    async def deny(self, name: str, *, who: str, why: str = "") -> Action:
        rec = self._acting_on(name, "deny")
        rec.denied = (
            f"{name}'s calls are refused by {who}: {why} (`tokenwatch resume {name}` lifts it)"
        )
        rec.release()
        return await self._record(ActionKind.DENY, rec, who, why, "further calls refused", True)

    async def throttle(self, name: str, rate_text: str, *, who: str, why: str = "") -> Action:
        rec = self._acting_on(name, "throttle")
        try:
            rate = parse_rate(rate_text)
        except QuantityError as exc:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, str(exc)) from None
        self._stop_duty(rec)
        rec.bucket = None
        detail = str(rate)
        if rate.kind is RateKind.OFF:
            rec.agent.throttle = ""
        elif rate.kind is RateKind.FRACTION:
            if rec.handle is None:
                raise ProtocolError(
                    ErrorCode.NOT_PERMITTED,
                    f"{name} has no process tokenwatch can duty-cycle; use a rate like 20k/min",
                )
            rec.agent.throttle = str(rate)
            detail = f"runs {rate} of the time (SIGSTOP/SIGCONT)"
        else:
            burst = max(rate.per_second * 60.0, 1e-9)
            rec.bucket = TokenBucket(rate.per_second, burst)
            rec.bucket_usd = rate.kind is RateKind.USD_PER_HOUR
            rec.agent.throttle = str(rate)
        if rec.agent.state != AgentState.PAUSED:
            if rec.agent.throttle:
                self._start_duty(rec)
            self._set_state(rec, AgentState.THROTTLED if rec.agent.throttle else AgentState.RUNNING)
        else:
            self._agent_changed(rec)
        return await self._record(ActionKind.THROTTLE, rec, who, why, detail, True)

    def _start_duty(self, rec: AgentRecord) -> None:
        self._stop_duty(rec)  # one cycle per agent, ever
        if rec.handle is None or not rec.agent.throttle.endswith("%"):
            return
        fraction = parse_rate(rec.agent.throttle).value
        # the scope exists from now: stopping the duty before its task has run stops it too
        rec.duty = anyio.CancelScope()
        self._start_soon(self._run_duty, rec, rec.duty, fraction)

    async def _run_duty(self, rec: AgentRecord, scope: anyio.CancelScope, fraction: float) -> None:
        from tokenwatch.process.processes import DutyCycle

        if rec.handle is None:
            return
        cycle = DutyCycle(rec.handle, fraction)
        with scope:
            if rec.duty is scope:
                rec.cycle = cycle
                await cycle.run()
        if rec.duty is scope:
            rec.duty = rec.cycle = None

    def _stop_duty(self, rec: AgentRecord, *, continue_tree: bool = True) -> None:
        """End the agent's duty cycle, continuing its tree now (not when the cancelled cycle
        next runs, which could come after a pause); `continue_tree=False` when the caller is
        about to stop or kill it."""
        cycle = rec.cycle
        if cycle is not None and continue_tree:
            cycle.continue_now()
        elif cycle is not None:
            cycle.continue_at_end = False
        if rec.duty is not None:
            rec.duty.cancel()
        rec.duty = rec.cycle = None

    def _signal_tree(self, rec: AgentRecord, how: str) -> tuple[bool, str]:
        if rec.handle is None:
            return True, "no process known: its proxied calls are held"
        try:
            pids = rec.handle.pause() if how == "pause" else rec.handle.resume()
        except ProcessGone:
            return False, "its process has exited"
        except NotPermitted as exc:
            return False, str(exc)
        return True, f"{len(pids)} process{'es' if len(pids) != 1 else ''}"

    async def _record(
        self,
        kind: ActionKind,
        rec: AgentRecord,
        who: str,
        why: str,
        detail: str,
        ok: bool,
        *,
        noted: bool = False,
    ) -> Action:
        action = Action(
            kind=kind.value,
            agent=rec.name,
            who=who,
            why=why,
            detail=detail,
            ok=ok,
            ts=self._clock(),
        )
        past = {"pause": "paused", "resume": "resumed", "kill": "killed", "throttle": "throttled",
                "deny": "denied"}.get(kind.value, kind.value)  # fmt: skip
        if not noted:
            rec.done.append(f"{past} by {who}")
        await self._save_agent(rec.agent)  # committed before the caller hears it is done
        try:
            action.id = await self._store.add_action(action)
        except (StoreUnavailable, OSError) as exc:
            self._store_failed(exc)
        self._publish("action", action)
        return action

    # -- agents -------------------------------------------------------------------------------

    def _set_state(self, rec: AgentRecord, state: AgentState) -> None:
        rec.agent.state = state.value
        self._agent_changed(rec)

    def _agent_changed(self, rec: AgentRecord) -> None:
        self._publish("agent", rec.agent)
        if self._tg is not None:
            self._start_soon(self._save_agent, rec.agent)

    async def _save_agent(self, agent: Agent) -> None:
        try:
            await self._store.save_agent(agent)
        except (StoreUnavailable, OSError) as exc:
            self._store_failed(exc)

    def register(
        self,
        name: str,
        *,
        pid: int | None = None,
        command: Sequence[str] = (),
        task: str = "",
        user: str = "",
        session: str = "",
        tags: dict[str, str] | None = None,
        budget: str = "",
        launched: bool = False,
        critical: bool = False,
        openai_upstream: str = "",
        anthropic_upstream: str = "",
    ) -> AgentRecord:
        """A new agent under a unique name, with a proxy route and (maybe) a budget of its own."""
        agent = Agent(
            name=self.roster.unique_name(name or "agent"),
            run_id=uuid.uuid4().hex[:12],
            command=list(command),
            task=task,
            user=user,
            session=session,
            tags=dict(tags or {}),
            critical=critical,
            launched=launched,
            started_at=self._clock(),
        )
        rec = AgentRecord(agent)
        if pid is not None:
            self._take_hold_of(rec, pid)
        if self.routes is not None:
            rec.route = self.routes.add_route(agent, openai_upstream, anthropic_upstream)
        if budget:
            self._add_run_budget(rec, budget)
        self.roster.add(rec)
        self._agent_changed(rec)
        return rec

    def _add_run_budget(self, rec: AgentRecord, budget: str) -> None:
        from tokenwatch.core.quantities import parse_amount

        try:
            parse_amount(budget)
        except QuantityError as exc:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, str(exc)) from None
        settings = BudgetSettings(
            name=run_budget_name(rec.name),
            scope="agent",
            target=rec.name,
            period="total",
            limit=budget,
            action="deny",
        )
        self.budgets.add_ephemeral(settings, start=rec.agent.started_at)

    def _take_hold_of(self, rec: AgentRecord, pid: int) -> None:
        try:
            handle = self._attach(pid)
        except ProcessGone:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"no process with pid {pid}") from None
        except NotPermitted as exc:
            raise ProtocolError(ErrorCode.NOT_PERMITTED, str(exc)) from None
        if rec.handle is not None:
            rec.handle.close()
        rec.handle = handle
        rec.agent.pid = pid
        rec.agent.start_time = handle.start_time

    def started(self, name: str, pid: int) -> AgentRecord:
        """`tokenwatch run` spawned the agent's process."""
        rec = self.roster.find(name)
        self._take_hold_of(rec, pid)
        self._agent_changed(rec)
        return rec

    def exited(self, name: str, code: int) -> dict[str, object]:
        """`tokenwatch run` saw its agent exit; the summary it prints."""
        rec = self.roster.find(name)
        self._exited(rec, code)
        return rec.summary()

    def _exited(self, rec: AgentRecord, code: int | None) -> None:
        if not rec.live and rec.agent.exit_code is not None:
            return
        self._stop_duty(rec)  # continues what is left of the tree while the handle is open
        rec.release()
        if code is not None:
            rec.agent.exit_code = code
        if rec.handle is not None:
            rec.handle.close()
            rec.handle = None
        if rec.route and self.routes is not None:
            self.routes.remove_route(rec.route)
            rec.route = ""
        self.budgets.remove_ephemeral(run_budget_name(rec.name))
        self._set_state(rec, AgentState.EXITED)

    def attach(self, pid: int, name: str = "") -> AgentRecord:
        """Put a process tokenwatch did not start under supervision."""
        existing = self.roster.by_pid(pid)
        if existing is not None:
            raise ProtocolError(
                ErrorCode.NAME_TAKEN, f"pid {pid} is already supervised as {existing.name!r}"
            )
        if not name:
            name = _process_name(pid)
        rec = self.register(name)
        try:
            self._take_hold_of(rec, pid)
        except ProtocolError:
            self._exited(rec, None)  # gives back its proxy route
            self.roster.remove(rec.name)
            raise
        self._agent_changed(rec)
        return rec

    def hello(
        self,
        name: str,
        *,
        pid: int | None = None,
        run_id: str = "",
        task: str = "",
        user: str = "",
        session: str = "",
        tags: dict[str, str] | None = None,
    ) -> AgentRecord:
        """An agent's SDK introduced itself: join its record, or start one."""
        check_name(name)
        rec = self.roster.get(name)
        if rec is None or not rec.live:
            agent = Agent(name=name, run_id=run_id, task=task, user=user, session=session,
                          tags=dict(tags or {}), started_at=self._clock())  # fmt: skip
            rec = self.roster.add(AgentRecord(agent))
        if pid is not None and rec.handle is None:
            try:
                self._take_hold_of(rec, pid)
            except ProtocolError:
                rec.agent.pid = pid  # not ours to signal: still show it
        if task:
            rec.agent.task = task
        self._agent_changed(rec)
        return rec

    def task(self, agent: str, name: str, state: str) -> None:
        rec = self.roster.get(agent)
        if state == "start":
            if rec is not None:
                rec.agent.task = name
            if self.routes is not None:
                self.routes.set_task(agent, name)
            return
        if rec is not None and rec.agent.task == name:
            rec.agent.task = ""
        for signal in self.rules.task_ended(agent, name):
            self._act_nowait(signal)

    def connection_lost(self, agent: str) -> None:
        """An agent's SDK connection closed: without a process to watch, it is gone."""
        rec = self.roster.get(agent)
        if rec is not None and rec.live and rec.handle is None and not rec.route:
            self._exited(rec, None)

    async def launch(self, name: str, *, env: dict[str, str] | None = None) -> AgentRecord:
        """Start an `[agents.NAME]` agent from the config, its output in the logs dir."""
        settings = self.agent_settings.get(name)
        if settings is None:
            known = ", ".join(sorted(self.agent_settings)) or "none configured"
            raise ProtocolError(
                ErrorCode.UNKNOWN_AGENT, f"no [agents.{name}] in the config (known: {known})"
            )
        if not settings.command:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"[agents.{name}] has no command")
        if self._spawner is None:
            raise ProtocolError(ErrorCode.NOT_PERMITTED, "this supervisor cannot launch agents")
        rec = self.register(
            name, command=settings.command, task=settings.task, tags=settings.tags,
            launched=True, critical=settings.critical,
            openai_upstream=settings.openai_upstream, anthropic_upstream=settings.anthropic_upstream,
        )  # fmt: skip
        child_env = {
            **(env if env is not None else os.environ),
            **settings.env,
            **self.env_for(rec),
        }
        child_env = _with_autoinstrument(child_env)
        log_path = self._logs_dir / f"{rec.name}.log" if self._logs_dir else None
        try:
            handle = self._spawner(list(settings.command), env=child_env, cwd=settings.cwd or None,
                                   log_path=log_path)  # fmt: skip
        except OSError as exc:
            self._exited(rec, None)
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"cannot launch {name}: {exc}") from None
        rec.handle = handle
        rec.agent.pid = handle.pid
        rec.agent.start_time = handle.start_time
        self._agent_changed(rec)
        return rec

    def env_for(self, rec: AgentRecord) -> dict[str, str]:
        """What a process needs to report as this agent and to call through the proxy."""
        env = {
            "TOKENWATCH_SOCKET": self.socket_path,
            "TOKENWATCH_AGENT": rec.name,
            "TOKENWATCH_RUN_ID": rec.agent.run_id,
            "TOKENWATCH_TASK": rec.agent.task,
        }
        if self.routes is not None:
            if not rec.route:
                rec.route = self.routes.add_route(rec.agent, "", "")
            env["TOKENWATCH_PROXY_URL"] = self.routes.url
            env.update(self.routes.base_urls(rec.route))
        return env

    async def adopt(self, name: str, decision: str, *, who: str) -> Action | None:
        """Decide about an agent a previous supervisor left: adopt it, kill it, or forget it."""
        rec = self.roster.find(name)
        if decision == "adopt":
            if rec.agent.state != AgentState.DETACHED:
                raise ProtocolError(
                    ErrorCode.BAD_MESSAGE, f"{name} is {rec.agent.state}, not detached"
                )
            self._set_state(rec, AgentState.RUNNING)
            return None
        if decision == "kill":
            return await self.kill(name, who=who, why="left by a previous supervisor")
        if decision == "forget":
            self._exited(rec, None)
            self.roster.remove(name)
            await self._store.forget_agent(name)
            return None
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "decision must be adopt, kill or forget")

    async def recover(self) -> list[AgentRecord]:
        """After a crash: continue any stopped agent a previous supervisor left, offer it back."""
        found: list[AgentRecord] = []
        for agent in await self._store.load_agents():
            if agent.state == AgentState.EXITED or agent.name in self.roster:
                continue
            handle = self._recover_handle(agent)
            if handle is None:
                agent.state = AgentState.EXITED.value
                await self._save_agent(agent)
                continue
            if any(p.state == "T" for p in handle.tree()):
                resumed = handle.resume()
                log.warning("%s was left stopped; continued %d processes", agent.name, len(resumed))
            agent.state = AgentState.DETACHED.value
            agent.throttle = ""
            rec = self.roster.add(AgentRecord(agent, handle=handle))
            self._agent_changed(rec)
            found.append(rec)
        return found

    def _recover_handle(self, agent: Agent) -> ProcessHandle | None:
        if agent.pid is None:
            return None
        try:
            return self._attach(agent.pid, start_time=agent.start_time or None)
        except (ProcessGone, NotPermitted):
            return None

    async def _watch_exits(self) -> None:
        while True:
            await anyio.sleep(EXIT_POLL_INTERVAL)
            for rec in self.roster:
                if rec.handle is not None and rec.live and not rec.handle.alive():
                    self._exited(rec, rec.handle.wait_exit_nowait())

    # -- views --------------------------------------------------------------------------------

    def views(self) -> list[AgentView]:
        return [AgentView(agent=rec.agent) for rec in self.roster]

    def snapshot(self) -> Snapshot:
        return self.live.snapshot(
            self.views(), self.budgets.statuses(), supervisor=self.socket_path
        )

    async def alerts(self, since: float = 0, limit: int = 200) -> list[Alert]:
        return await self._store.list_alerts(since=since, limit=limit)

    async def ack_alerts(self, ids: Sequence[int] | None) -> int:
        return await self._store.ack_alerts(ids)

    def raise_alert(self, agent: str, message: str, *, rule: str = "supervisor") -> Alert:
        alert = Alert(rule=rule, agent=agent, message=message, severity=Severity.WARNING.value,
                      ts=self._clock())  # fmt: skip
        self._act_nowait(Signal(alert=alert, action=ActionKind.ALERT.value, agent=agent))
        return alert


def _process_name(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"no process with pid {pid}") from None
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in raw)[:40]
    return cleaned or f"pid-{pid}"


def _with_autoinstrument(env: dict[str, str]) -> dict[str, str]:
    from tokenwatch.client.autoinstrument import child_env

    return dict(child_env(env))

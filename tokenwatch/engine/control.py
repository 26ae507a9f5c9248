"""Control of agents: what budgets and rules signal, and pause, resume, kill, deny and throttle
(token buckets for calls, duty cycles for processes), each recorded as an Action."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from tokenwatch.core.actions import past
from tokenwatch.core.admission import Signal
from tokenwatch.core.errors import EngineError, InvalidRequest, NotAllowed
from tokenwatch.core.models import Action, ActionKind, AgentState, Alert
from tokenwatch.core.quantities import QuantityError, RateKind, parse_rate
from tokenwatch.core.throttle import TokenBucket
from tokenwatch.engine.agents import AgentRecord
from tokenwatch.engine.context import STORE_ERRORS, EngineContext
from tokenwatch.process.processes import NotPermitted, ProcessGone

log = logging.getLogger("tokenwatch.engine")

Exited = Callable[[AgentRecord, "int | None"], None]


class Control:
    """Acts on agents; `on_exited` is told when a kill has ended an agent's process."""

    def __init__(self, ctx: EngineContext, on_exited: Exited) -> None:
        self._ctx = ctx
        self._on_exited = on_exited

    # -- signals ------------------------------------------------------------------------------

    def act_nowait(self, signal: Signal) -> None:
        """Raise a signal's alert (figures, listeners, ledger) and start its action."""
        ctx = self._ctx
        alert = signal.alert
        ctx.live.add_alert(alert)
        ctx.events.publish("alert", alert)
        ctx.start_soon(self._store_alert, alert, name="store alert")
        kind = signal.action
        rec = ctx.roster.get(signal.agent)
        if kind == ActionKind.ALERT or rec is None:
            return
        if rec.agent.critical and kind in (ActionKind.PAUSE, ActionKind.KILL):
            log.info("%s is critical: %s by %s downgraded to an alert", rec.name, kind, alert.rule)
            return
        who = alert.rule if alert.rule.startswith("budget:") else f"rule:{alert.rule}"
        ctx.start_soon(
            self._act, kind, rec.name, who, alert.message, signal.rate, name=f"{kind} {rec.name}"
        )

    async def _store_alert(self, alert: Alert) -> None:
        try:
            alert.id = await self._ctx.store.add_alert(alert)
        except STORE_ERRORS as exc:
            self._ctx.store_failed(exc)

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
        except EngineError as exc:
            log.warning("%s on %s by %s failed: %s", kind, name, who, exc.message)

    # -- actions ------------------------------------------------------------------------------

    async def pause(self, name: str, *, who: str, why: str = "") -> Action:
        rec = self._acting_on(name, "pause")
        self.stop_duty(rec, continue_tree=False)
        rec.hold()
        ok, detail = self._signal_tree(rec, "pause")
        self._ctx.set_state(rec, AgentState.PAUSED)
        return await self._record(ActionKind.PAUSE, rec, who, why, detail, ok)

    async def resume(self, name: str, *, who: str, why: str = "") -> Action:
        rec = self._acting_on(name, "resume")
        rec.denied = ""
        ok, detail = self._signal_tree(rec, "resume")
        rec.release()
        throttled = bool(rec.agent.throttle)
        if throttled:
            self.start_duty(rec)
        self._ctx.set_state(rec, AgentState.THROTTLED if throttled else AgentState.RUNNING)
        return await self._record(ActionKind.RESUME, rec, who, why, detail, ok)

    def _acting_on(self, name: str, verb: str) -> AgentRecord:
        """The agent an action is for; one that has exited is an error, not a success."""
        rec = self._ctx.roster.find(name)
        if rec.agent.state == AgentState.EXITED:
            raise InvalidRequest(f"{name} has exited: there is nothing to {verb}")
        return rec

    async def pause_all(self, *, who: str, why: str = "") -> list[Action]:
        """Pause every live agent that is not critical."""
        return [
            await self.pause(rec.name, who=who, why=why)
            for rec in self._ctx.roster
            if rec.live and not rec.agent.critical and rec.agent.state != AgentState.PAUSED
        ]

    async def resume_all(self, *, who: str, why: str = "") -> list[Action]:
        """Resume every live agent that is paused (critical ones too: someone paused them)."""
        return [
            await self.resume(rec.name, who=who, why=why)
            for rec in self._ctx.roster
            if rec.live and rec.agent.state == AgentState.PAUSED
        ]

    async def kill(self, name: str, *, who: str, why: str = "") -> Action:
        rec = self._acting_on(name, "kill")
        rec.denied = f"{name} was killed by {who}"
        self.stop_duty(rec, continue_tree=False)
        rec.release()
        # Noted before the signals: `tokenwatch run` sees its agent die and asks for the
        # summary while this is still waiting out the grace period.
        note = f"killed by {who}"
        rec.done.append(note)
        ok, detail = True, "no process known: its calls are refused"
        if rec.handle is not None:
            try:
                report = await rec.handle.kill(self._ctx.settings.kill_grace)
                detail = f"{len(report.terminated)} ended on SIGTERM, {len(report.killed)} needed SIGKILL"
            except ProcessGone:
                detail = "it had already exited"
            except NotPermitted as exc:
                ok, detail = False, str(exc)
                rec.done.remove(note)
        if rec.handle is not None:
            self._on_exited(rec, rec.handle.wait_exit_nowait())
        else:
            self._ctx.set_state(rec, AgentState.EXITED)
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
            raise InvalidRequest(str(exc)) from None
        self.stop_duty(rec)
        rec.bucket = None
        detail = str(rate)
        if rate.kind is RateKind.OFF:
            rec.agent.throttle = ""
        elif rate.kind is RateKind.FRACTION:
            if rec.handle is None:
                raise NotAllowed(
                    f"{name} has no process tokenwatch can duty-cycle; use a rate like 20k/min"
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
                self.start_duty(rec)
            state = AgentState.THROTTLED if rec.agent.throttle else AgentState.RUNNING
            self._ctx.set_state(rec, state)
        else:
            self._ctx.agent_changed(rec)
        return await self._record(ActionKind.THROTTLE, rec, who, why, detail, True)

    # -- duty cycles --------------------------------------------------------------------------

    def start_duty(self, rec: AgentRecord) -> None:
        self.stop_duty(rec)  # one cycle per agent, ever
        if rec.handle is None or not rec.agent.throttle.endswith("%"):
            return
        fraction = parse_rate(rec.agent.throttle).value
        # the scope exists from now: stopping the duty before its task has run stops it too
        rec.duty = anyio.CancelScope()
        self._ctx.start_soon(self._run_duty, rec, rec.duty, fraction, name=f"duty {rec.name}")

    async def _run_duty(self, rec: AgentRecord, scope: anyio.CancelScope, fraction: float) -> None:
        from tokenwatch.process.duty import DutyCycle

        if rec.handle is None:
            return
        cycle = DutyCycle(rec.handle, fraction)
        with scope:
            if rec.duty is scope:
                rec.cycle = cycle
                await cycle.run()
        if rec.duty is scope:
            rec.duty = rec.cycle = None

    def stop_duty(self, rec: AgentRecord, *, continue_tree: bool = True) -> None:
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

    # -- helpers ------------------------------------------------------------------------------

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
        ctx = self._ctx
        action = Action(kind=kind.value, agent=rec.name, who=who, why=why, detail=detail, ok=ok,
                        ts=ctx.clock())  # fmt: skip
        if not noted:
            rec.done.append(f"{past(kind.value)} by {who}")
        await ctx.save_agent(rec.agent)  # committed before the caller hears it is done
        try:
            action.id = await ctx.store.add_action(action)
        except STORE_ERRORS as exc:
            ctx.store_failed(exc)
        ctx.events.publish("action", action)
        return action

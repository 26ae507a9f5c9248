"""The gate around each call: hold while its agent is paused or throttled, reserve its worst case
against the budgets before it goes, settle what it really cost when it is done."""

from __future__ import annotations

from collections.abc import Callable

from tokenwatch.core.admission import Admission, CallRequest, Refusal, Reservation, Signal
from tokenwatch.core.models import Status, UsageEvent
from tokenwatch.core.output_estimate import OutputEstimate
from tokenwatch.engine.agents import AgentRecord
from tokenwatch.engine.context import EngineContext
from tokenwatch.engine.recorder import Recorder


class Gate:
    """The engine's `admission.Gate`; owns the reservations of calls in flight."""

    def __init__(
        self, ctx: EngineContext, recorder: Recorder, act: Callable[[Signal], None]
    ) -> None:
        self._ctx = ctx
        self._recorder = recorder
        self._act = act
        self.reservations: dict[str, Reservation] = {}
        self.outputs = OutputEstimate()
        """What each agent's calls on each model produce: a call reserves its likely output."""

    async def admit(self, call: CallRequest) -> Admission:
        """Hold while the agent is paused or throttled, then reserve the worst case."""
        clock = self._ctx.clock
        start = clock()
        rec = self._ctx.roster.get(call.agent)
        if rec is not None:
            refused = await self._hold(rec, call)
            if refused is not None:
                refused.waited_ms = (clock() - start) * 1000
                return refused
        return await self.share(call, self._reserve(call, waited_ms=(clock() - start) * 1000))

    async def share(self, call: CallRequest, admission: Admission) -> Admission:
        """After the local budgets admitted a call, hold it in the team's shared budgets too
        (docs/fleet.md); without a [fleet] it is the admission as it was."""
        shared = self._ctx.shared
        if shared is None or not admission.allowed:
            return admission
        held = self.reservations.get(admission.reservation)
        if held is None:
            return admission
        fallback = self._ctx.prices.estimated_from(call.model, call.provider)
        refusal = await shared.reserve(call, held.tokens, held.usd or None, fallback, held.id)
        if refusal is None:
            return admission
        self.reservations.pop(held.id, None)
        self._ctx.budgets.release(held)
        for signal in shared.signals_nowait():  # the team spent it: its action is due
            self._act(signal)
        return Admission(
            False,
            status=refusal.status,
            message=refusal.message,
            budget=refusal.budget,
            retry_after=refusal.retry_after,
            waited_ms=admission.waited_ms,
        )

    def admit_nowait(self, call: CallRequest) -> tuple[Admission, float]:
        """For SDK clients, which wait on their own: the admission and seconds to wait first."""
        rec = self._ctx.roster.get(call.agent)
        wait = 0.0
        if rec is not None:
            if rec.denied:
                return Admission(False, status=429, message=rec.denied), 0.0
            if rec.bucket is not None:
                amount = self._bucket_amount(rec, call)
                stats = rec.bucket.statistics()
                if stats.rate_per_s > 0:
                    wait = max(0.0, (amount - stats.available) / stats.rate_per_s)
                self._ctx.start_soon(rec.bucket.acquire, amount, name=f"throttle {rec.name}")
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
            return self._ctx.prices.worst_case(call.model, call.input_tokens, 0) or 0.0
        return float(call.input_tokens)

    def _reserve(self, call: CallRequest, *, waited_ms: float) -> Admission:
        ctx = self._ctx
        if ctx.store_error and not ctx.settings.fail_open:
            return Admission(
                False,
                status=503,
                message=(
                    f"tokenwatch cannot record usage right now ({ctx.store_error}); calls are "
                    "refused until it can (set [supervisor] fail_open = true to let them through)"
                ),
                waited_ms=waited_ms,
            )
        # The likely output, not max_tokens: coding agents ask 32k and write ~800 (the overshoot
        # this allows is bounded in docs/budgets.md).
        output = self.outputs.expected(call.agent, call.model, call.max_output_tokens)
        usd = ctx.prices.worst_case(call.model, call.input_tokens, output, call.provider)
        fallback = ctx.prices.estimated_from(call.model, call.provider)
        got = ctx.budgets.reserve(call, call.input_tokens + output, usd, fallback)
        if isinstance(got, Refusal):
            # A refusal can make a budget's action due (pause the agent it stopped) at once.
            for signal in ctx.budgets.signals_nowait():
                self._act(signal)
            return Admission(
                False,
                status=got.status,
                message=got.message,
                budget=got.budget,
                retry_after=got.retry_after,
                waited_ms=waited_ms,
            )
        if got.id:
            self.reservations[got.id] = got
        return Admission(True, reservation=got.id, waited_ms=waited_ms)

    async def settle(self, admission: Admission, event: UsageEvent) -> None:
        """Record a proxied (or SDK-admitted) call: count it, act on it, store it."""
        ctx = self._ctx
        reservation = self.reservations.pop(admission.reservation, None)
        event.wait_ms = event.wait_ms or admission.waited_ms
        if not self._recorder.accept(event):
            if reservation is not None:
                ctx.budgets.release(reservation)
                if ctx.shared is not None:
                    ctx.shared.release(reservation.id)
            return
        ctx.prices.price(event)
        if event.status == Status.OK.value and not event.estimated:
            self.outputs.observe(event.agent, event.model, event.output_tokens)
        self._recorder.count(event, ctx.budgets.settle(reservation, event))
        if ctx.shared is not None:
            ctx.shared.settle(reservation.id if reservation is not None else "", event)
        self._charge_output(event)
        await self._recorder.persist([event], wait=False)

    def release(self, admission: Admission) -> None:
        """Give back a reservation for a call that never went."""
        reservation = self.reservations.pop(admission.reservation, None)
        if reservation is not None:
            self._ctx.budgets.release(reservation)
            if self._ctx.shared is not None:
                self._ctx.shared.release(reservation.id)

    def _charge_output(self, event: UsageEvent) -> None:
        rec = self._ctx.roster.get(event.agent)
        if rec is None or rec.bucket is None:
            return
        if rec.bucket_usd:
            upfront = self._ctx.prices.worst_case(event.model, event.input_tokens, 0) or 0.0
            amount = max(0.0, (event.cost_usd or 0.0) - upfront)
        else:
            amount = float(event.output_tokens)
        if amount > 0:
            self._ctx.start_soon(rec.bucket.acquire, amount, name=f"throttle {rec.name}")

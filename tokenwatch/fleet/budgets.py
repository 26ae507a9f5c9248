"""Shared budgets: a call's likely use held in the team's database before it goes (after the
local budgets admitted it), its real use settled after, leases renewed while it runs; while the
database is unreachable each budget refuses its calls or spends from a local slice, as set."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc

from tokenwatch.config import BudgetSettings, FleetSettings
from tokenwatch.core.actions import HARD_ACTIONS
from tokenwatch.core.admission import CallRequest, Refusal, Signal
from tokenwatch.core.budget import DONE, Budget, budget_name
from tokenwatch.core.models import ActionKind, Alert, BudgetStatus, Severity, UsageEvent
from tokenwatch.core.periods import zone
from tokenwatch.core.pricing import is_estimated
from tokenwatch.core.quantities import parse_amount
from tokenwatch.fleet import statements as sql
from tokenwatch.fleet.connection import FleetUnreachable
from tokenwatch.fleet.link import Link, Row

log = logging.getLogger("tokenwatch.fleet")

SEND_ATTEMPTS: Final = 5
"""Tries of a settlement the server refuses (not an outage: those wait for it to return)."""
CLOSE_FLUSH: Final = 2.0
"""Seconds a stopping supervisor gives its queued settlements to reach the database."""


@dataclass(slots=True)
class _Hold:
    """What one call holds of one shared budget, and where: in the database, in the local
    slice, or nowhere (an alert budget, or nothing to hold: counted when it settles)."""

    budget: str
    key: str
    amount: float
    where: str = ""


@dataclass(slots=True)
class _Slice:
    """A local-slice budget's spending while the database was unreachable, not yet counted in."""

    limit: float
    reserved: float = 0.0
    spent: float = 0.0


@dataclass(frozen=True, slots=True)
class _Job:
    """A settlement or a release on its way to the database."""

    statement: str
    params: dict[str, Any]
    budget: str
    off_slice: float = 0.0
    """What it takes off the budget's local slice once the database has counted it."""


@dataclass(slots=True)
class _Seen:
    period: float
    spent: float
    reserved: float


class SharedBook:
    """The engine's `SharedBudgets` port, on the team's PostgreSQL (docs/fleet.md)."""

    def __init__(
        self,
        settings: FleetSettings,
        budgets: Sequence[BudgetSettings],
        *,
        tz: str = "local",
        clock: Callable[[], float] = time.time,
        keep: Path | None = None,
    ) -> None:
        self.settings = settings
        self._keep = keep
        """Where settlements unsent at exit wait for the next start (None: nowhere)."""
        self._tz = zone(tz)
        self._clock = clock
        self.link = Link(settings, on_up=self._wake)
        self._prefix = f"{settings.host}/{uuid.uuid4().hex[:12]}/"
        self._budgets: dict[str, Budget] = {}
        self._slices: dict[str, _Slice] = {}
        self._holds: dict[str, list[_Hold]] = {}
        self._jobs: deque[_Job] = deque()
        self._wakeup = anyio.Event()
        self._seen: dict[tuple[str, str], _Seen] = {}
        self._fired: set[tuple[str, str, float]] = set()
        """(budget, key, period) whose limit the team reached: its action is done."""
        self._pending: list[Signal] = []
        self.replace(budgets)

    def replace(self, settings: Sequence[BudgetSettings]) -> None:
        """The shared ones among `settings` from now on (a slice's spending is kept by name)."""
        budgets: dict[str, Budget] = {}
        slices: dict[str, _Slice] = {}
        for s in settings:
            if not s.shared:
                continue
            budget = budgets[budget_name(s)] = Budget(s, self._tz)
            if s.when_unreachable == "local-slice":
                limit = parse_amount(s.slice).value
                old = self._slices.get(budget.name)
                slices[budget.name] = (
                    _Slice(limit, old.reserved, old.spent) if old else _Slice(limit)
                )
        self._budgets, self._slices = budgets, slices

    @property
    def names(self) -> list[str]:
        return list(self._budgets)

    # -- lifetime -------------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect (the supervisor starts either way), then renew leases and send settlements
        until cancelled; on the way out, give queued settlements a moment to arrive."""
        self._restore_unsent()
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self.link.keep_connected, name="fleet: keep connected")
                tg.start_soon(self._send_jobs, name="fleet: send settlements")
                tg.start_soon(self._renew_leases, name="fleet: renew leases")
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self.link.closing = True
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(CLOSE_FLUSH):
                    if self._jobs and not self.link.up:
                        await self.link.open()
                    await self._send_queued()
                await self.link.aclose()
                self._keep_unsent()

    def _keep_unsent(self) -> None:
        """Settlements still queued, written for the next start (a restart during an outage
        would otherwise leave them out of the team's figures)."""
        settles = [job for job in self._jobs if job.statement is sql.SETTLE]
        if self._keep is None or not settles:
            return
        lines = "".join(
            json.dumps({"budget": j.budget, "params": j.params}) + "\n" for j in settles
        )
        try:
            part = self._keep.with_suffix(".part")
            part.write_text(lines)
            part.replace(self._keep)
        except OSError as exc:
            log.error("%d shared budget settlements are lost to the team's figures: %s",
                      len(settles), exc.strerror or exc)  # fmt: skip
            return
        log.warning("%d shared budget settlements kept in %s for the next start",
                    len(settles), self._keep)  # fmt: skip

    def _restore_unsent(self) -> None:
        """Queue what the last run kept (sent once the database answers; counted once by call
        id, should some of it have arrived after all)."""
        if self._keep is None or not self._keep.exists():
            return
        try:
            lines = self._keep.read_text().splitlines()
            self._keep.unlink()
        except OSError as exc:
            log.error("cannot read %s: %s", self._keep, exc.strerror or exc)
            return
        for line in lines:
            try:
                kept = json.loads(line)
                self._jobs.append(_Job(sql.SETTLE, dict(kept["params"]), str(kept["budget"])))
            except (ValueError, KeyError, TypeError):
                log.error("a kept settlement in %s cannot be read: %r", self._keep, line[:200])

    # -- admission ------------------------------------------------------------------------------

    async def reserve(
        self, call: CallRequest, tokens: int, usd: float | None, estimated_from: str, rid: str
    ) -> Refusal | None:
        """Hold the call's likely use in every shared budget covering it (see the port)."""
        holds = self._covering(call.agent, call.task, call.model, call.user, call.tags,
                               tokens, usd, bool(estimated_from))  # fmt: skip
        if not holds:
            return None
        done: list[_Hold] = []
        for hold in holds:
            budget = self._budgets[hold.budget]
            if hold.amount > 0 and budget.settings.action in HARD_ACTIONS:
                refusal = await self._hold(budget, hold, rid)
                if refusal is not None:
                    for held in done:
                        self._give_back(held, rid)
                    self._wake()
                    self._limit_reached(budget, hold, call.agent, refusal)
                    return refusal
            done.append(hold)
        self._holds[rid] = done
        return None

    def _covering(
        self,
        agent: str,
        task: str,
        model: str,
        user: str,
        tags: Mapping[str, str],
        tokens: float,
        usd: float | None,
        estimated: bool,
    ) -> list[_Hold]:
        holds = []
        for budget in self._budgets.values():
            key = budget.key_for(agent, task, model, user, tags)
            if key is not None:
                holds.append(_Hold(budget.name, key, budget.amount(tokens, usd, estimated)))
        return holds

    async def _hold(self, budget: Budget, hold: _Hold, rid: str) -> Refusal | None:
        if self.link.up:
            try:
                return await self._hold_in_db(budget, hold, rid)
            except FleetUnreachable:
                pass
        return self._hold_offline(budget, hold)

    async def _hold_in_db(self, budget: Budget, hold: _Hold, rid: str) -> Refusal | None:
        period = budget.period_start(self._clock())
        params = {
            "budget": budget.name, "key": hold.key, "period": period, "amount": hold.amount,
            "limit": budget.limit, "id": self._prefix + rid, "host": self.settings.host,
            "lease": self.settings.lease,
        }  # fmt: skip
        rows = await self.link.rows(sql.RESERVE, params)
        if not rows:
            # A dead supervisor's holds may be what fills it: drop expired ones, try once more.
            await self._sweep()
            rows = await self.link.rows(sql.RESERVE, params)
        if rows:
            hold.where = "db"
            self._see(budget.name, hold.key, period, rows[0])
            return None
        figures = await self.link.rows(sql.FIGURES, params)
        spent, reserved = (figures[0][0], figures[0][1]) if figures else (0.0, 0.0)
        self._see(budget.name, hold.key, period, (spent, reserved))
        return self._over(budget, hold, float(spent), float(reserved))

    def _limit_reached(self, budget: Budget, hold: _Hold, agent: str, refusal: Refusal) -> None:
        """When the team has spent the budget (the call would not fit with nothing in flight),
        its action is due once a period, as for a local budget; its alert is the refusal."""
        seen = self._seen.get((budget.name, hold.key))
        if refusal.status != 429 or seen is None or seen.spent + hold.amount <= budget.limit:
            return
        mark = (budget.name, hold.key, seen.period)
        if mark in self._fired:
            return
        self._fired.add(mark)
        action = budget.settings.action
        act = ActionKind.ALERT.value if action in ("alert", "deny") else action
        alert = Alert(f"budget:{budget.name}", agent, f"{agent}: {refusal.message}{DONE[action]}",
                      Severity.CRITICAL.value, action, self._clock())  # fmt: skip
        self._pending.append(Signal(alert=alert, action=act, agent=agent))

    def signals_nowait(self) -> list[Signal]:
        """Limit actions due from the team's spending since the last call."""
        pending, self._pending = self._pending, []
        return pending

    def _over(self, budget: Budget, hold: _Hold, spent: float, reserved: float) -> Refusal:
        whose = f" for {hold.key}" if hold.key else ""
        why = f"{budget.show(spent)} spent by the team"
        if reserved > 0:
            why += f", {budget.show(reserved)} in flight"
        message = (
            f"shared budget {budget.name} ({budget.show(budget.limit)} {budget.per()}{whose}, "
            f"across the fleet) would be exceeded: {why}, this call may use "
            f"{budget.show(hold.amount)}. Raise it on every supervisor of the team with "
            f"`{budget.raise_hint(hold.key, spent + reserved + hold.amount)}`"
        )
        now = self._clock()
        resets = budget.resets_at(now)
        return Refusal(budget.name, message, None if resets is None else max(0.0, resets - now))

    def _hold_offline(self, budget: Budget, hold: _Hold) -> Refusal | None:
        name, error = budget.name, self.link.error
        slc = self._slices.get(name)
        if slc is None:
            message = (
                f"shared budget {name} cannot be checked: the fleet database is unreachable "
                f"({error}); its calls are refused until it is back (when_unreachable = refuse)"
            )
            return Refusal(name, message, self.settings.retry_interval, status=503)
        if slc.spent + slc.reserved + hold.amount <= slc.limit:
            slc.reserved += hold.amount
            hold.where = "slice"
            return None
        message = (
            f"shared budget {name}: the fleet database is unreachable ({error}) and this "
            f"supervisor's local slice of it is spent ({budget.show(slc.spent)} of "
            f"{budget.show(slc.limit)} used, {budget.show(slc.reserved)} in flight, this call may "
            f"use {budget.show(hold.amount)}); calls are refused until the database is back"
        )
        return Refusal(name, message, self.settings.retry_interval, status=503)

    def _give_back(self, hold: _Hold, rid: str) -> None:
        if hold.where == "slice":
            slc = self._slices.get(hold.budget)
            if slc is not None:
                slc.reserved = max(0.0, slc.reserved - hold.amount)
        elif hold.where == "db":
            params = {"id": self._prefix + rid, "budget": hold.budget}
            self._jobs.append(_Job(sql.RELEASE, params, hold.budget))

    def release(self, rid: str) -> None:
        """Give back the holds of a call that never went."""
        for hold in self._holds.pop(rid, []):
            self._give_back(hold, rid)
        self._wake()

    # -- settlement -----------------------------------------------------------------------------

    def settle(self, rid: str, event: UsageEvent) -> None:
        """Queue the call's real use in place of its holds (usage reported without a call,
        `rid` empty, counts in every shared budget covering it, tags aside)."""
        holds = self._holds.pop(rid, None) if rid else None
        if holds is None:
            holds = self._covering(
                event.agent, event.task, event.model, event.user, {}, 0, 0, False
            )
        estimated = is_estimated(event.price_source)
        for hold in holds:
            budget = self._budgets.get(hold.budget)
            if budget is None:  # no longer shared (an edit): give its hold back
                self._give_back(hold, rid)
                continue
            amount = budget.amount(event.total_tokens, event.cost_usd, estimated)
            self._jobs.append(self._settlement(budget, hold, rid, event, amount))
        self._wake()

    def _settlement(
        self, budget: Budget, hold: _Hold, rid: str, event: UsageEvent, amount: float
    ) -> _Job:
        slc = self._slices.get(budget.name)
        off_slice = 0.0
        if slc is not None:
            if hold.where == "slice":
                slc.reserved = max(0.0, slc.reserved - hold.amount)
            if hold.where == "slice" or not self.link.up:
                slc.spent += amount  # spent here unseen by the team until the job arrives
                off_slice = amount
        params = {
            "id": self._prefix + rid if hold.where == "db" else "", "budget": budget.name,
            "key": hold.key, "period": budget.period_start(event.ts), "amount": amount,
            "call_id": event.call_id, "host": self.settings.host,
        }  # fmt: skip
        return _Job(sql.SETTLE, params, budget.name, off_slice)

    def _wake(self) -> None:
        self._wakeup.set()

    async def _send_jobs(self) -> None:
        while True:
            self._wakeup = anyio.Event()
            await self._send_queued()
            await self._wakeup.wait()

    async def _send_queued(self) -> None:
        """Send queued jobs in order until none is left or the database is unreachable."""
        failures = 0
        while self._jobs and self.link.up:
            job = self._jobs[0]
            try:
                rows = await self.link.rows(job.statement, job.params)
            except FleetUnreachable:
                return
            except Exception as exc:
                failures += 1
                if failures < SEND_ATTEMPTS:
                    await anyio.sleep(0.05 * failures)
                    continue
                log.error("a settlement of shared budget %s was refused: %s", job.budget, exc)
                rows = []
            failures = 0
            self._jobs.popleft()
            slc = self._slices.get(job.budget)
            if slc is not None and job.off_slice:
                slc.spent = max(0.0, slc.spent - job.off_slice)
            if rows and job.statement is sql.SETTLE:
                params = job.params
                self._see(job.budget, params["key"], params["period"], rows[0])

    @property
    def queued(self) -> int:
        """Settlements and releases not yet in the database (held through an outage)."""
        return len(self._jobs)

    # -- leases ---------------------------------------------------------------------------------

    async def _renew_leases(self) -> None:
        while True:
            await anyio.sleep(self.settings.lease / 3)
            if not self.link.up:
                continue
            try:
                await self._renew()
                await self._sweep()
                await self._refresh()
            except FleetUnreachable:
                continue

    async def _renew(self) -> None:
        ids = {self._prefix + rid for rid, holds in self._holds.items()
               if any(h.where == "db" for h in holds)}  # fmt: skip
        ids.update(job.params["id"] for job in self._jobs if job.params.get("id"))
        if ids:
            await self.link.rows(sql.RENEW, {"ids": sorted(ids), "lease": self.settings.lease})

    async def _sweep(self) -> None:
        try:
            await self.link.rows(sql.SWEEP, {})
        except FleetUnreachable:
            raise
        except Exception as exc:  # two sweepers deadlocked: the next sweep does it
            log.debug("sweep of expired holds skipped: %s", exc)

    async def _refresh(self) -> None:
        """What the team has spent of each shared budget (for status and the dashboard)."""
        now = self._clock()
        for budget in list(self._budgets.values()):
            period = budget.period_start(now)
            rows = await self.link.rows(
                "SELECT key, spent, reserved FROM shared_budgets "
                "WHERE budget = %(budget)s AND period_start = %(period)s",
                {"budget": budget.name, "period": period},
            )
            for key, spent, reserved in rows:
                self._see(budget.name, str(key), period, (spent, reserved))

    def _see(self, budget: str, key: str, period: float, row: Row) -> None:
        self._seen[(budget, key)] = _Seen(period, float(row[0]), float(row[1]))

    # -- status ---------------------------------------------------------------------------------

    def statuses(self, local: list[BudgetStatus]) -> list[BudgetStatus]:
        """Shared budgets' rows with the team's spending (as last seen) and the fleet's state."""
        now = self._clock()
        rows = []
        for row in local:
            budget = self._budgets.get(row.name)
            if budget is None:
                rows.append(row)
                continue
            key = "" if budget.scope in ("global", "tag") else row.target
            seen = self._seen.get((row.name, key))
            used = row.used
            if seen is not None and seen.period == budget.period_start(now):
                used = max(used, seen.spent)
            state, note = self.state(budget)
            rows.append(replace(row, used=used, fleet=state, fleet_note=note))
        return rows

    def state(self, budget: Budget) -> tuple[str, str]:
        """`shared`, `refusing` or `local-slice`, and the line status and the dashboard show."""
        if self.link.up:
            return "shared", ""
        slc = self._slices.get(budget.name)
        if slc is None:
            return "refusing", f"fleet unreachable: refusing {budget.name}"
        spent = budget.show(slc.spent + slc.reserved)
        return "local-slice", (
            f"fleet unreachable: spending from the local slice of {budget.name} "
            f"({spent} of {budget.show(slc.limit)})"
        )

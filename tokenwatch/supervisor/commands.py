"""What each protocol message does: the supervisor's request handlers, from wire fields to engine
calls and back to reply data (documented in docs/protocol.md)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from tokenwatch.config import Config, ConfigError, parse_config
from tokenwatch.core.admission import Admission, CallRequest
from tokenwatch.core.budgets import budget_name, is_run_budget
from tokenwatch.core.errors import (
    EngineError,
    InvalidRequest,
    NameTaken,
    NotAllowed,
    StoreUnavailable,
    UnknownAgent,
)
from tokenwatch.core.models import MAX_CALL_TOKENS, UsageEvent, over_call_limit
from tokenwatch.core.periods import MAX_TS
from tokenwatch.core.protocol import PUSH_KINDS, ErrorCode, ProtocolError
from tokenwatch.core.usage_wire import usage_from_wire
from tokenwatch.engine.agents import AgentRecord
from tokenwatch.engine.engine import Engine
from tokenwatch.ledger.store import MAX_ROWS
from tokenwatch.supervisor.overlay import overlay_file, remove_budget, set_budget
from tokenwatch.supervisor.reload import seed_quietly
from tokenwatch.supervisor.server import Session

MIN_SUBSCRIBE_INTERVAL = 0.1
MAX_HISTORY = 1000
LOG_TAIL_LINES = 200
LOG_TAIL_BYTES = 64 * 1024
TASK_STATES = frozenset({"start", "end"})


def _who(msg: dict[str, Any]) -> str:
    return str(msg.get("who") or "cli")


def _registered(engine: Engine, rec: AgentRecord) -> dict[str, Any]:
    return {"name": rec.name, "run_id": rec.agent.run_id, "env": engine.env_for(rec)}


_CODES: Final = {
    InvalidRequest: ErrorCode.BAD_MESSAGE,
    UnknownAgent: ErrorCode.UNKNOWN_AGENT,
    NameTaken: ErrorCode.NAME_TAKEN,
    NotAllowed: ErrorCode.NOT_PERMITTED,
}
"""The protocol's code for each refusal of the engine's (mapped here, once, at the socket)."""


class Commands:
    """Implements server.Handler on top of the engine (and the config for budget edits)."""

    def __init__(
        self,
        engine: Engine,
        config: Config,
        *,
        on_shutdown: Callable[[], None] = lambda: None,
        on_reload: Callable[[], Awaitable[str]] | None = None,
        info: Callable[[], dict[str, Any]] = dict,
        store: Any = None,
        logs_dir: Path | None = None,
        switch: Any = None,
    ) -> None:
        self.engine = engine
        self._switch = switch
        """The proxy's ModelSwitch (None without a proxy)."""
        self.config = config
        self._store = store
        self._logs_dir = logs_dir
        self._on_shutdown = on_shutdown
        self._on_reload = on_reload
        self._info = info
        self._handlers: dict[str, Callable[[Session, dict[str, Any]], Awaitable[Any]]] = {
            name.removeprefix("on_"): getattr(self, name)
            for name in dir(self)
            if name.startswith("on_")
        }

    # -- server.Handler -----------------------------------------------------------------------

    async def handle(self, session: Session, msg: dict[str, Any]) -> Any:
        handler = self._handlers.get(msg["type"])
        if handler is None:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{msg['type']!r} is not served here")
        try:
            return await handler(session, msg)
        except StoreUnavailable as exc:  # a damaged or unreadable ledger is not our bug
            raise ProtocolError(ErrorCode.STORE_UNAVAILABLE, str(exc)) from None
        except EngineError as exc:
            raise ProtocolError(_CODES.get(type(exc), ErrorCode.BAD_MESSAGE), exc.message) from None

    async def ingest(self, session: Session, events: list[UsageEvent]) -> None:
        for event in events:
            self._fill(session, event)
        await self.engine.ingest(events)

    def session_closed(self, session: Session) -> None:
        if session.agent:
            self.engine.connection_lost(session.agent)

    def snapshot(self) -> Any:
        return self.engine.snapshot().to_dict()

    def _fill(self, session: Session, event: UsageEvent) -> None:
        """Usage from a connection that said hello belongs to that agent unless it says otherwise."""
        if session.agent:
            event.agent = event.agent or session.agent
            if event.pid is None:
                event.pid = session.peer.pid

    # -- agents -------------------------------------------------------------------------------

    async def on_hello(self, session: Session, msg: dict[str, Any]) -> Any:
        rec = self.engine.hello(
            msg["name"],
            pid=msg.get("pid"),
            run_id=msg.get("run_id", ""),
            task=msg.get("task", ""),
            user=msg.get("user", ""),
            session=msg.get("session", ""),
            tags=_tags(msg),
        )
        session.agent = rec.name
        return {"name": rec.name, "throttle": rec.agent.throttle, "state": rec.agent.state}

    async def on_heartbeat(self, session: Session, msg: dict[str, Any]) -> Any:
        dropped = msg.get("dropped", 0)
        if dropped > 0:
            agent = session.agent or f"pid {session.peer.pid}"
            self.engine.raise_alert(
                agent,
                f"{agent} dropped {dropped} usage report{'s' if dropped != 1 else ''}: its buffer "
                "was full while the supervisor was slow or away; those calls are not in the ledger",
                rule="reports-dropped",
            )
        return {"ts": time.time()}

    async def on_task(self, session: Session, msg: dict[str, Any]) -> Any:
        if msg["state"] not in TASK_STATES:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "task: 'state' must be start or end")
        self.engine.task(_agent_of(session), msg["name"], msg["state"])
        return None

    async def on_admit(self, session: Session, msg: dict[str, Any]) -> Any:
        agent = _agent_of(session)
        rec = self.engine.roster.get(agent)
        call = CallRequest(
            agent=agent,
            provider=msg.get("provider", ""),
            model=msg.get("model", ""),
            run_id=rec.agent.run_id if rec else "",
            task=rec.agent.task if rec else "",
            tags=dict(rec.agent.tags) if rec else {},
            input_tokens=_call_tokens(msg, "input_tokens"),
            max_output_tokens=_call_tokens(msg, "max_output_tokens"),
            prompt_hash=msg.get("prompt_hash", ""),
        )
        admission, wait = self.engine.admit_nowait(call)
        admission = await self.engine.share(call, admission)
        return {
            "allowed": admission.allowed,
            "wait": wait,
            "message": admission.message,
            "budget": admission.budget,
            "reservation": admission.reservation,
            "status": admission.status,
            "retry_after": admission.retry_after,
        }

    async def on_settle(self, session: Session, msg: dict[str, Any]) -> Any:
        admission = Admission(True, reservation=msg["reservation"])
        if msg.get("event") is None:
            self.engine.release(admission)
            return None
        event = usage_from_wire(msg["event"])
        self._fill(session, event)
        await self.engine.settle(admission, event)
        return None

    async def on_register(self, session: Session, msg: dict[str, Any]) -> Any:
        command = [str(a) for a in msg.get("command", [])]
        rec = self.engine.register(
            msg.get("name") or _default_name(command),
            pid=msg.get("pid"),
            command=command,
            task=msg.get("task", ""),
            tags=_tags(msg),
            budget=msg.get("budget", ""),
            launched=msg.get("launched", False),
            critical=msg.get("critical", False),
            openai_upstream=msg.get("openai_upstream", ""),
            anthropic_upstream=msg.get("anthropic_upstream", ""),
            owner_pid=msg.get("owner_pid"),
        )
        return _registered(self.engine, rec)

    async def on_started(self, session: Session, msg: dict[str, Any]) -> Any:
        rec = self.engine.started(msg["name"], msg["pid"])
        return {"name": rec.name, "pid": rec.agent.pid}

    async def on_exited(self, session: Session, msg: dict[str, Any]) -> Any:
        return {"summary": self.engine.exited(msg["name"], msg["code"])}

    async def on_attach(self, session: Session, msg: dict[str, Any]) -> Any:
        return _registered(self.engine, self.engine.attach(msg["pid"], msg.get("name", "")))

    async def on_launch(self, session: Session, msg: dict[str, Any]) -> Any:
        rec = await self.engine.launch(msg["name"])
        return {"name": rec.name, "pid": rec.agent.pid, "run_id": rec.agent.run_id}

    async def on_env(self, session: Session, msg: dict[str, Any]) -> Any:
        rec = self.engine.roster.find(msg["agent"])
        if not rec.live:  # a route for it would bring back an agent that has ended
            raise ProtocolError(ErrorCode.UNKNOWN_AGENT, f"{rec.name} has exited")
        return self.engine.env_for(rec)

    async def on_adopt(self, session: Session, msg: dict[str, Any]) -> Any:
        action = await self.engine.adopt(msg["agent"], msg["decision"], who=_who(msg))
        return action.to_dict() if action else None

    # -- clients ------------------------------------------------------------------------------

    async def on_list(self, session: Session, msg: dict[str, Any]) -> Any:
        return [rec.agent.to_dict() for rec in self.engine.roster]

    async def on_status(self, session: Session, msg: dict[str, Any]) -> Any:
        snap = self.engine.snapshot()
        totals = {rec.name: rec for rec in self.engine.roster}
        agents = []
        for view in snap.agents:
            row = view.to_dict()
            rec = totals.get(view.agent.name)
            if rec is not None:
                row["summary"] = rec.summary()
            agents.append(row)
        return {
            "supervisor": self._info(),
            "engine": dataclasses.asdict(self.engine.statistics()),
            "tokens_per_min": snap.tokens_per_min,
            "usd_per_hour": snap.usd_per_hour,
            "spend_today_usd": snap.spend_today_usd,
            "unpriced_requests": snap.unpriced_today,
            "estimated_usd": snap.estimated_today_usd,
            "agents": agents,
            "fleet": [b.fleet_note for b in snap.budgets if b.fleet_note],
        }

    async def on_fleet_hosts(self, session: Session, msg: dict[str, Any]) -> Any:
        """The team's other hosts and their agents (fleet/roster.py); null without [fleet], and
        the reason, with no hosts, while the team's database cannot be read."""
        fleet = self.config.fleet
        if fleet is None:
            return None
        from tokenwatch.core.periods import zone
        from tokenwatch.fleet.connection import FleetUnreachable
        from tokenwatch.fleet.roster import read_roster

        tz = zone(self.config.supervisor.timezone)
        try:
            return (await read_roster(fleet, tz=tz, now=time.time())).to_dict()
        except FleetUnreachable as exc:
            return {"host": fleet.host, "error": str(exc), "hosts": []}

    async def on_subscribe(self, session: Session, msg: dict[str, Any]) -> Any:
        wanted = msg.get("interval") or self.engine.settings.snapshot_interval
        kinds = msg.get("kinds", PUSH_KINDS)
        unknown = [k for k in kinds if k not in PUSH_KINDS]
        if unknown:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"subscribe: unknown push kind {unknown[0]!r} (known: {', '.join(PUSH_KINDS)})",
            )
        session.snapshot_interval = max(MIN_SUBSCRIBE_INTERVAL, float(wanted))
        session.kinds = frozenset(kinds)
        session.subscribed = True
        return {"interval": session.snapshot_interval, "kinds": sorted(session.kinds)}

    async def on_pause(self, session: Session, msg: dict[str, Any]) -> Any:
        action = await self.engine.pause(msg["agent"], who=_who(msg), why=msg.get("why", ""))
        return action.to_dict()

    async def on_resume(self, session: Session, msg: dict[str, Any]) -> Any:
        action = await self.engine.resume(msg["agent"], who=_who(msg), why=msg.get("why", ""))
        return action.to_dict()

    async def on_kill(self, session: Session, msg: dict[str, Any]) -> Any:
        action = await self.engine.kill(msg["agent"], who=_who(msg), why=msg.get("why", ""))
        return action.to_dict()

    async def on_throttle(self, session: Session, msg: dict[str, Any]) -> Any:
        action = await self.engine.throttle(
            msg["agent"], msg["rate"], who=_who(msg), why=msg.get("why", "")
        )
        return action.to_dict()

    async def on_route(self, session: Session, msg: dict[str, Any]) -> Any:
        """Serve an agent's next calls with another model (`model`), or stop (`undo`); either
        way the switch in force after it (null for none)."""
        from tokenwatch.proxy.switch import LiveSwitch

        if self._switch is None:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "this supervisor runs no proxy")
        name, who = msg["agent"], _who(msg)
        rec = self.engine.roster.find(name)
        if msg.get("undo"):
            gone = self._switch.undo(rec.name)
            if gone is not None:
                self._told(
                    rec.name, f"{rec.name}'s calls go to the models it asks for again ({who})"
                )
        elif msg.get("model"):
            switch = LiveSwitch(rec.name, msg["model"], msg.get("only") or "*", who)
            self._switch.set(switch)
            asked = "" if switch.only == "*" else f" asked of {switch.only}"
            self._told(rec.name, f"{rec.name}'s calls{asked} now go to {switch.model} ({who})")
        self.engine.agent_changed(rec)  # its record shows (and keeps) the switch in force
        live = self._switch.live_of(rec.name)
        return None if live is None else dataclasses.asdict(live)

    def _told(self, agent: str, message: str) -> None:
        from tokenwatch.core.models import Alert, Severity

        alert = Alert(rule="route", agent=agent, message=message, severity=Severity.INFO.value)
        self.engine.alert_nowait(alert)

    async def on_pause_all(self, session: Session, msg: dict[str, Any]) -> Any:
        actions = await self.engine.pause_all(who=_who(msg), why=msg.get("why", ""))
        return [a.to_dict() for a in actions]

    async def on_resume_all(self, session: Session, msg: dict[str, Any]) -> Any:
        actions = await self.engine.resume_all(who=_who(msg), why=msg.get("why", ""))
        return [a.to_dict() for a in actions]

    async def on_budgets(self, session: Session, msg: dict[str, Any]) -> Any:
        return [s.to_dict() for s in self.engine.budget_statuses()]

    async def on_set_budget(self, session: Session, msg: dict[str, Any]) -> Any:
        try:
            budget = parse_config({"budget": [msg["budget"]]}, "set_budget").budget[0]
            name = budget_name(budget)
            if is_run_budget(name):  # lives and ends with its run: changed, never saved
                status = self.engine.budgets.set_run_limit(name, str(budget.limit))
                return {"name": name, "run": True, "status": status.to_dict()}
            await self._apply_budgets(_saved(set_budget, self.config, budget))
        except ConfigError as exc:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, str(exc)) from None
        return {"name": name, "saved_to": str(overlay_file(self.config))}

    async def on_remove_budget(self, session: Session, msg: dict[str, Any]) -> Any:
        name = msg["name"]
        if is_run_budget(name):
            if not self.engine.budgets.remove_ephemeral(name):
                raise ProtocolError(
                    ErrorCode.BAD_MESSAGE, f"no agent running now has a run budget named {name}"
                )
            return {"name": name, "run": True}
        try:
            await self._apply_budgets(_saved(remove_budget, self.config, name))
        except ConfigError as exc:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, str(exc)) from None
        return {"name": name, "saved_to": str(overlay_file(self.config))}

    async def _apply_budgets(self, config: Config) -> None:
        self.config = config
        fresh = self.engine.use_budgets(config.budget)
        if fresh and self._store is not None:
            # a budget added today counts today's usage so far, not from zero
            await seed_quietly(self.engine, self._store, fresh)

    async def on_alerts(self, session: Session, msg: dict[str, Any]) -> Any:
        since = _timestamp(msg, "since", 0.0)
        limit = _count(msg, "limit", 200, MAX_ROWS)
        alerts = await self.engine.alerts(since=since, limit=limit)
        return [a.to_dict() for a in alerts]

    async def on_ack_alerts(self, session: Session, msg: dict[str, Any]) -> Any:
        ids = msg.get("ids")
        if ids is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "ack_alerts: 'ids' must be integers")
        return {"acknowledged": await self.engine.ack_alerts(ids)}

    async def on_history(self, session: Session, msg: dict[str, Any]) -> Any:
        """An agent's recent calls (newest first), the actions taken on it and its log's tail."""
        name = msg["agent"]
        limit = _count(msg, "limit", 100, MAX_HISTORY)
        calls = await self._ledger().history(agent=name, limit=limit)
        actions = await self._ledger().list_actions(agent=name, limit=limit)
        return {
            "calls": [stored.event.to_dict() for stored in calls],
            "actions": [a.to_dict() for a in actions],
            "log": _log_tail(self._logs_dir, name),
        }

    async def on_report(self, session: Session, msg: dict[str, Any]) -> Any:
        """Totals grouped by agent, task, model, user, provider, day, week, month or session
        since `since` (default 24 h)."""
        from tokenwatch.ledger.report import build_report

        by = msg.get("by", "agent")
        since = _timestamp(msg, "since", time.time() - 86400)
        try:
            report = await build_report(self._ledger(), by=by, since=since)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, str(exc)) from None
        data = report.to_dict()
        data["rows"] = data.pop("groups")
        return data

    def _ledger(self) -> Any:
        if self._store is None:
            raise ProtocolError(ErrorCode.STORE_UNAVAILABLE, "this supervisor has no ledger")
        return self._store

    async def on_shutdown(self, session: Session, msg: dict[str, Any]) -> Any:
        self._on_shutdown()
        return {"pid": os.getpid()}

    async def on_reload(self, session: Session, msg: dict[str, Any]) -> Any:
        if self._on_reload is None:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "this supervisor cannot reload its config")
        try:
            return {"summary": await self._on_reload()}
        except ConfigError as exc:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{exc}; the settings in use stay") from None


def _timestamp(msg: dict[str, Any], field: str, default: float) -> float:
    """A Unix-seconds field, absent or null meaning `default`; refused out of the ledger's range
    (a huge one cannot be bound to SQLite, a negative one cannot be a date)."""
    value = msg.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_TS:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"{msg.get('type')}: {field!r} must be Unix seconds from 0 to {MAX_TS:.0f}",
        )
    return float(value)


def _count(msg: dict[str, Any], field: str, default: int, most: int) -> int:
    """A row-count field, absent or null meaning `default`; at least 1, at most `most`."""
    value = msg.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"{msg.get('type')}: {field!r} must be a whole number from 1"
        )
    return min(value, most)


def _call_tokens(msg: dict[str, Any], field: str) -> int:
    """A call's token figure (absent or negative: 0); more than one call can use is refused."""
    value: int = max(0, msg.get(field, 0))
    if value > MAX_CALL_TOKENS:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"admit: {over_call_limit(field, value)}")
    return value


def _log_tail(logs_dir: Path | None, name: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    if logs_dir is None or not check_name_safe(name):
        return []
    try:
        with (logs_dir / f"{name}.log").open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - LOG_TAIL_BYTES))
            tail = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    return tail[-lines:]


def check_name_safe(name: str) -> bool:
    """A name that cannot step outside the logs dir."""
    return "/" not in name and name not in ("", ".", "..")


def _agent_of(session: Session) -> str:
    if not session.agent:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "say hello first: this connection has no agent")
    return session.agent


def _tags(msg: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (msg.get("tags") or {}).items()}


def _default_name(command: list[str]) -> str:
    """Something recognisable from the command: the script for `python x.py`, else argv0."""
    words = [os.path.basename(a) for a in command if a and not a.startswith("-")]
    if not words:
        return "agent"
    if words[0].startswith("python") and len(words) > 1:
        return words[1].removesuffix(".py") or "agent"
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in words[0])
    return name[:40] or "agent"


def _saved(edit: Callable[[Config, Any], Config], config: Config, what: Any) -> Config:
    """Apply a budget edit to the overlay file; a file that cannot be written is a clear error."""
    try:
        return edit(config, what)
    except OSError as exc:
        raise ProtocolError(
            ErrorCode.INTERNAL, f"cannot save budgets to {overlay_file(config)}: {exc.strerror}"
        ) from None

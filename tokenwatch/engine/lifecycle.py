"""Agents' lives: registered (run, env, launch, attach, hello, or known from usage alone), given a
process handle and a proxy route, followed until they exit, and recovered after a crash."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import anyio

from tokenwatch import environ
from tokenwatch.config import AgentSettings, BudgetSettings
from tokenwatch.core import coding_agents
from tokenwatch.core.admission import Signal
from tokenwatch.core.budgets import run_budget_name
from tokenwatch.core.errors import EngineError, InvalidRequest, NameTaken, NotAllowed, UnknownAgent
from tokenwatch.core.models import Action, ActionKind, Agent, AgentState, Alert, Severity
from tokenwatch.core.quantities import QuantityError, parse_amount
from tokenwatch.core.redaction import redact_command
from tokenwatch.engine.agents import AgentRecord, check_name
from tokenwatch.engine.context import EngineContext
from tokenwatch.engine.control import Control
from tokenwatch.engine.ports import Attacher, ChildEnv, Routes
from tokenwatch.process.peers import Peer
from tokenwatch.process.processes import NotPermitted, ProcessGone, ProcessHandle, Spawner

log = logging.getLogger("tokenwatch.engine")

EXIT_POLL_INTERVAL: Final = 0.5
NEVER_RAN = frozenset({126, 127})
"""Exit codes that say the command could not be run at all (not executable, not found)."""


class Lifecycle:
    """Registers, starts, follows and ends agents; owns their process handles and routes."""

    def __init__(
        self,
        ctx: EngineContext,
        control: Control,
        *,
        attach: Attacher,
        spawner: Spawner | None,
        child_env: ChildEnv,
        agent_settings: Mapping[str, AgentSettings],
        logs_dir: Path | None,
        socket_path: str,
    ) -> None:
        self._ctx = ctx
        self._control = control
        self._attach = attach
        self._spawner = spawner
        self._child_env = child_env
        self.agent_settings = dict(agent_settings)
        self._logs_dir = logs_dir
        self.socket_path = socket_path
        self.routes: Routes | None = None

    # -- registration -------------------------------------------------------------------------

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
        owner_pid: int | None = None,
    ) -> AgentRecord:
        """A new agent under a unique name, with a proxy route and (maybe) a budget of its own;
        with `owner_pid`, it ends when that process does (which is never signalled)."""
        ctx = self._ctx
        agent = Agent(
            name=ctx.roster.unique_name(name or "agent"),
            run_id=uuid.uuid4().hex[:12],
            command=redact_command(command),  # keys given on a command line stay off disk
            task=task,
            user=user,
            session=session,
            tags=dict(tags or {}),
            critical=critical,
            launched=launched,
            started_at=ctx.clock(),
        )
        rec = AgentRecord(agent)
        if pid is not None:
            self._take_hold_of(rec, pid)
        if owner_pid is not None:
            rec.owner = self._handle_of(owner_pid, control=False)
        if self.routes is not None:
            rec.route = self.routes.add_route(agent, openai_upstream, anthropic_upstream)
        if budget:
            self._add_run_budget(rec, budget)
        ctx.roster.add(rec)
        ctx.agent_changed(rec)
        return rec

    def _add_run_budget(self, rec: AgentRecord, budget: str) -> None:
        try:
            parse_amount(budget)
        except QuantityError as exc:
            raise InvalidRequest(str(exc)) from None
        settings = BudgetSettings(
            name=run_budget_name(rec.name),
            scope="agent",
            target=rec.name,
            period="total",
            limit=budget,
            action="deny",
        )
        self._ctx.budgets.add_ephemeral(settings, start=rec.agent.started_at)

    def _handle_of(self, pid: int, *, control: bool = True) -> ProcessHandle:
        try:
            return self._attach(pid) if control else ProcessHandle.attach(pid, control=False)
        except ProcessGone:
            raise InvalidRequest(f"no process with pid {pid}") from None
        except NotPermitted as exc:
            raise NotAllowed(str(exc)) from None

    def _take_hold_of(self, rec: AgentRecord, pid: int) -> None:
        handle = self._handle_of(pid)
        if rec.handle is not None:
            rec.handle.close()
        rec.handle = handle
        rec.agent.pid = pid
        rec.agent.start_time = handle.start_time

    def started(self, name: str, pid: int) -> AgentRecord:
        """`tokenwatch run` spawned the agent's process."""
        rec = self._ctx.roster.find(name)
        self._take_hold_of(rec, pid)
        self._ctx.agent_changed(rec)
        return rec

    def exited(self, name: str, code: int) -> dict[str, object]:
        """`tokenwatch run` saw its agent exit; the summary it prints."""
        rec = self._ctx.roster.find(name)
        self.ended(rec, code)
        return rec.summary()

    def ended(self, rec: AgentRecord, code: int | None) -> None:
        """The agent's process is gone (or it is let go): release all it held."""
        if not rec.live and rec.agent.exit_code is not None:
            return
        self._control.stop_duty(rec)  # continues what is left of the tree while the handle is open
        rec.release()
        if code is not None:
            rec.agent.exit_code = code
        for handle in (rec.handle, rec.owner):
            if handle is not None:
                handle.close()
        rec.handle = rec.owner = None
        if rec.route and self.routes is not None:
            self.routes.remove_route(rec.route)
            rec.route = ""
        self._ctx.budgets.remove_ephemeral(run_budget_name(rec.name))
        self._ctx.set_state(rec, AgentState.EXITED)
        if rec.agent.launched and not rec.requests and code is not None and code not in NEVER_RAN:
            self._control.act_nowait(Signal(alert=_no_calls(rec.name, self._ctx.clock()),
                                            action=ActionKind.ALERT.value, agent=rec.name))  # fmt: skip

    def attach(self, pid: int, name: str = "") -> AgentRecord:
        """Put a process tokenwatch did not start under supervision."""
        existing = self._ctx.roster.by_pid(pid)
        if existing is not None:
            raise NameTaken(f"pid {pid} is already supervised as {existing.name!r}")
        if not name:
            name = _process_name(pid)
        rec = self.register(name)
        try:
            self._take_hold_of(rec, pid)
        except EngineError:
            self.ended(rec, None)  # gives back its proxy route
            self._ctx.roster.remove(rec.name)
            raise
        self._ctx.agent_changed(rec)
        return rec

    def caller(self, peer: Peer) -> str:
        """The route token for calls from `peer` on the stable endpoint: the live agent whose
        process is `peer` or one of its ancestors, else a new agent named after its program and
        holding its pid (so it can be paused and killed), else one that ends with it."""
        rec = self._supervising(peer)
        if rec is None:
            log.info("a call from pid %d (%s) on the stable endpoint", peer.pid, peer.name)
            try:
                rec = self.attach(peer.pid, peer.name)
            except EngineError:  # not ours to signal (tokenwatch's own group): show it still
                rec = self.register(peer.name, owner_pid=peer.pid)
                rec.agent.pid = peer.pid
        if not rec.route and self.routes is not None:
            rec.route = self.routes.add_route(rec.agent, "", "")
        return rec.route

    def _supervising(self, peer: Peer) -> AgentRecord | None:
        for pid, start_time in peer.lineage:
            rec = self._ctx.roster.by_pid(pid)
            if rec is not None and rec.live and rec.agent.start_time in (None, 0, start_time):
                return rec
        # one that left the tree (double fork to init) still has the run's variables
        agent, run_id = peer.run
        rec = self._ctx.roster.get(agent) if agent and run_id else None
        return rec if rec is not None and rec.live and rec.agent.run_id == run_id else None

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
        ctx = self._ctx
        check_name(name)
        rec = ctx.roster.get(name)
        if rec is None or not rec.live:
            agent = Agent(name=name, run_id=run_id, task=task, user=user, session=session,
                          tags=dict(tags or {}), started_at=ctx.clock())  # fmt: skip
            rec = ctx.roster.add(AgentRecord(agent))
        if pid is not None and rec.handle is None:
            try:
                self._take_hold_of(rec, pid)
            except EngineError:
                rec.agent.pid = pid  # not ours to signal: still show it
        if task:
            rec.agent.task = task
        ctx.agent_changed(rec)
        return rec

    def task(self, agent: str, name: str, state: str) -> None:
        rec = self._ctx.roster.get(agent)
        if state == "start":
            if rec is not None:
                rec.agent.task = name
            if self.routes is not None:
                self.routes.set_task(agent, name)
            return
        if rec is not None and rec.agent.task == name:
            rec.agent.task = ""
        for signal in self._ctx.rules.task_ended(agent, name):
            self._control.act_nowait(signal)

    def connection_lost(self, agent: str) -> None:
        """An agent's SDK connection closed: without a process to watch, it is gone."""
        rec = self._ctx.roster.get(agent)
        if rec is not None and rec.live and rec.handle is None and not rec.route:
            self.ended(rec, None)

    # -- launching ----------------------------------------------------------------------------

    async def launch(self, name: str, *, env: Mapping[str, str] | None = None) -> AgentRecord:
        """Start an `[agents.NAME]` agent from the config, its output in the logs dir."""
        settings = self.agent_settings.get(name)
        if settings is None:
            known = ", ".join(sorted(self.agent_settings)) or "none configured"
            raise UnknownAgent(f"no [agents.{name}] in the config (known: {known})")
        if not settings.command:
            raise InvalidRequest(f"[agents.{name}] has no command")
        if self._spawner is None:
            raise NotAllowed("this supervisor cannot launch agents")
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
        setup = coding_agents.plan(list(settings.command), child_env)  # what `run` adds too
        child_env.update(setup.env)
        log_path = self._logs_dir / f"{rec.name}.log" if self._logs_dir else None
        try:
            handle = self._spawner(setup.command, env=dict(self._child_env(child_env)),
                                   cwd=settings.cwd or None, log_path=log_path)  # fmt: skip
        except OSError as exc:
            self.ended(rec, None)
            raise InvalidRequest(f"cannot launch {name}: {exc}") from None
        rec.handle = handle
        rec.agent.pid = handle.pid
        rec.agent.start_time = handle.start_time
        self._ctx.agent_changed(rec)
        return rec

    def env_for(self, rec: AgentRecord) -> dict[str, str]:
        """What a process needs to report as this agent and to call through the proxy."""
        env = {
            environ.SOCKET: self.socket_path,
            environ.AGENT: rec.name,
            environ.RUN_ID: rec.agent.run_id,
            environ.TASK: rec.agent.task,
        }
        if self.routes is not None:
            if not rec.route:
                rec.route = self.routes.add_route(rec.agent, "", "")
            env[environ.PROXY_URL] = self.routes.url
            env.update(self.routes.base_urls(rec.route))
            if self.routes.endpoint:
                env[environ.ENDPOINT] = self.routes.endpoint
        return env

    def restore_route(
        self, token: str, agent: str, run_id: str, openai_upstream: str, anthropic_upstream: str
    ) -> bool:
        """Give an agent that outlived its supervisor the proxy route it had (its base URL names
        the token); only the same run of a recovered agent, only once."""
        rec = self._ctx.roster.get(agent)
        if self.routes is None or rec is None or rec.route or rec.agent.run_id != run_id:
            return False
        if rec.agent.state != AgentState.DETACHED:
            return False
        rec.route = self.routes.add_route(rec.agent, openai_upstream, anthropic_upstream, token)
        return True

    # -- after a crash ------------------------------------------------------------------------

    async def adopt(self, name: str, decision: str, *, who: str) -> Action | None:
        """Decide about an agent a previous supervisor left: adopt it, kill it, or forget it."""
        ctx = self._ctx
        rec = ctx.roster.find(name)
        if decision == "adopt":
            if rec.agent.state != AgentState.DETACHED:
                raise InvalidRequest(f"{name} is {rec.agent.state}, not detached")
            ctx.set_state(rec, AgentState.RUNNING)
            return None
        if decision == "kill":
            return await self._control.kill(name, who=who, why="left by a previous supervisor")
        if decision == "forget":
            self.ended(rec, None)
            ctx.roster.remove(name)
            await ctx.store.forget_agent(name)
            return None
        raise InvalidRequest("decision must be adopt, kill or forget")

    async def recover(self) -> list[AgentRecord]:
        """After a crash: continue any stopped agent a previous supervisor left, offer it back."""
        ctx = self._ctx
        found: list[AgentRecord] = []
        for agent in await ctx.store.load_agents():
            if agent.state == AgentState.EXITED or agent.name in ctx.roster:
                continue
            handle = self._recover_handle(agent)
            if handle is None:
                agent.state = AgentState.EXITED.value
                await ctx.save_agent(agent)
                continue
            if any(p.state == "T" for p in handle.tree()):
                resumed = handle.resume()
                log.warning("%s was left stopped; continued %d processes", agent.name, len(resumed))
            agent.state = AgentState.DETACHED.value
            agent.throttle = ""
            rec = ctx.roster.add(AgentRecord(agent, handle=handle))
            ctx.agent_changed(rec)
            found.append(rec)
        return found

    def _recover_handle(self, agent: Agent) -> ProcessHandle | None:
        if agent.pid is None:
            return None
        try:
            return self._attach(agent.pid, start_time=agent.start_time or None)
        except (ProcessGone, NotPermitted):
            return None

    async def watch_exits(self) -> None:
        """Notice agents whose process has ended (runs until cancelled)."""
        while True:
            await anyio.sleep(EXIT_POLL_INTERVAL)
            for rec in self._ctx.roster:
                if rec.handle is not None and rec.live and not rec.handle.alive():
                    self.ended(rec, rec.handle.wait_exit_nowait())
                elif rec.owner is not None and rec.live and not rec.owner.alive():
                    self.ended(rec, None)


def _no_calls(name: str, ts: float) -> Alert:
    message = (
        f"{name} ended without a single LLM call through tokenwatch: if it called a model, "
        "the calls went around the proxy (docs/agents.md says what each coding agent needs)"
    )
    return Alert(rule="no-calls", agent=name, message=message,
                 severity=Severity.WARNING.value, ts=ts)  # fmt: skip


def _process_name(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        raise InvalidRequest(f"no process with pid {pid}") from None
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in raw)[:40]
    return cleaned or f"pid-{pid}"

"""Where the dashboard's data comes from: the supervisor, or a scripted feed for tests and benchmarks."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from tokenwatch.client.control import SupervisorUnavailable
from tokenwatch.core.models import (
    Action,
    Agent,
    AgentState,
    AgentView,
    Alert,
    BudgetStatus,
    Snapshot,
)
from tokenwatch.core.quantities import parse_amount

Update = tuple[str, Any]
"""`("snapshot", Snapshot)`, `("alert", Alert)`, `("action", Action)`, `("agent", Agent)`, or
`("connection", status)`: the supervisor went away and is waited for (`status` says so), or is
back (empty)."""

RECONNECT_DELAYS: Final = (0.1, 0.2, 0.5, 1.0, 2.0)
"""Seconds between attempts to reach a supervisor again; the last repeats."""
WAITING: Final = "connection lost; waiting for a supervisor (start one: tokenwatch serve)"


class CommandError(Exception):
    """A command the supervisor refused or could not carry out; the message is shown as is."""


class DashboardSource(Protocol):
    """The dashboard's only window on the world: a stream of updates and a way to send commands."""

    def updates(self) -> AsyncIterator[Update]: ...

    async def command(self, kind: str, **fields: Any) -> Any:
        """Send one command and return the reply data; raises CommandError on refusal."""
        ...


class ControlClient(Protocol):
    """The part of `tokenwatch.client.control.SupervisorClient` the dashboard uses."""

    def subscribe(
        self, interval: float = ..., kinds: Sequence[str] | None = ...
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]: ...

    async def request(self, kind: str, **fields: Any) -> Any: ...

    async def aclose(self) -> None: ...


_DECODERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "snapshot": Snapshot.from_dict,
    "alert": Alert.from_dict,
    "action": Action.from_dict,
    "agent": Agent.from_dict,
}


DASHBOARD_KINDS: Final = tuple(_DECODERS)
"""The pushes the dashboard subscribes to: all but the per-call `usage`."""


def decode_update(kind: str, data: dict[str, Any]) -> Update | None:
    """A supervisor push as model objects; None for kinds the dashboard does not show (usage)."""
    decoder = _DECODERS.get(kind)
    if decoder is None:
        return None
    return kind, decoder(data)


class SupervisorSource:
    """Adapts a connected SupervisorClient: pushes become models, refusals become CommandError.

    With `reconnect` (opens a new client), a lost supervisor is waited for and the feed goes on
    with the next one; the clients it opened are closed by `aclose`.
    """

    def __init__(
        self,
        client: ControlClient,
        interval: float = 1.0,
        *,
        reconnect: Callable[[], Awaitable[ControlClient]] | None = None,
    ) -> None:
        self._client = client
        self._interval = interval
        self._reconnect = reconnect
        self._opened: list[ControlClient] = []

    async def updates(self) -> AsyncIterator[Update]:
        while True:
            try:
                async for update in self._feed():
                    yield update
            except (SupervisorUnavailable, OSError):
                pass  # the same as the feed ending: the supervisor is gone
            if self._reconnect is None:
                return
            yield "connection", WAITING
            self._client = await self._next_client(self._reconnect)
            yield "connection", ""

    async def _feed(self) -> AsyncIterator[Update]:
        # No per-call usage pushes: at thousands of calls/s they would cost the supervisor and
        # the dashboard more than everything else, and snapshots already aggregate them.
        async for kind, data in self._client.subscribe(self._interval, kinds=DASHBOARD_KINDS):
            update = decode_update(kind, data)
            if update is not None:
                yield update

    async def _next_client(self, connect: Callable[[], Awaitable[ControlClient]]) -> ControlClient:
        delays = itertools.chain(RECONNECT_DELAYS, itertools.repeat(RECONNECT_DELAYS[-1]))
        while True:
            try:
                client = await connect()
            except Exception:
                await anyio.sleep(next(delays))
                continue
            self._opened.append(client)
            return client

    async def aclose(self) -> None:
        """Close the clients this source opened (not the one it was given)."""
        for client in self._opened:
            with contextlib.suppress(Exception):
                await client.aclose()
        self._opened.clear()

    async def command(self, kind: str, **fields: Any) -> Any:
        try:
            return await self._client.request(kind, **fields)
        except OSError as exc:
            raise CommandError(f"supervisor unreachable: {exc.strerror or exc}") from exc
        except Exception as exc:
            message = getattr(exc, "message", None)
            if message is None:
                raise
            raise CommandError(str(message)) from exc


CommandEffect = Callable[[str, dict[str, Any]], Awaitable[Any]]
"""A test's hook run before ScriptedSource applies a command (e.g. signal a real process)."""


class ScriptedSource:
    """A stand-in engine: feeds snapshots you construct, records and applies the commands it gets.

    Commands change the current snapshot the way the supervisor would (pause sets the state,
    kill marks the agent exited...) and republish it, so the dashboard shows their effect.
    """

    def __init__(
        self,
        snapshot: Snapshot | None = None,
        *,
        effect: CommandEffect | None = None,
        replies: dict[str, Any] | None = None,
    ) -> None:
        self.snapshot = snapshot or Snapshot(ts=0.0)
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.replies: dict[str, Any] = dict(replies or {})
        """Reply data for commands with no built-in effect (`history`, `report`, ...)."""
        self._effect = effect
        send, receive = anyio.create_memory_object_stream[Update](max_buffer_size=math.inf)
        self._send: MemoryObjectSendStream[Update] = send
        self._receive: MemoryObjectReceiveStream[Update] = receive

    def push_nowait(self, kind: str, item: Any) -> None:
        """Queue one update for the dashboard; a snapshot also becomes the current state."""
        if kind == "snapshot":
            self.snapshot = item
        self._send.send_nowait((kind, item))

    def publish_nowait(self) -> None:
        self.push_nowait("snapshot", self.snapshot)

    async def updates(self) -> AsyncIterator[Update]:
        yield "snapshot", self.snapshot
        async for update in self._receive:
            yield update

    def close(self) -> None:
        """End the update stream, as a supervisor going away would."""
        self._send.close()

    def commands_of(self, kind: str) -> list[dict[str, Any]]:
        return [fields for k, fields in self.commands if k == kind]

    async def command(self, kind: str, **fields: Any) -> Any:
        self.commands.append((kind, fields))
        if "agent" in fields and kind != "history":
            self._view(fields["agent"])  # unknown agents are refused before any effect
        if self._effect is not None:
            await self._effect(kind, fields)
        apply = getattr(self, f"_apply_{kind}", None)
        if apply is None:
            if kind in self.replies:
                return self.replies[kind]
            raise CommandError(f"unknown command {kind!r}")
        result = apply(**fields)
        self.publish_nowait()
        return result

    def _view(self, name: str) -> AgentView:
        for view in self.snapshot.agents:
            if view.agent.name == name:
                return view
        raise CommandError(f"no agent named {name!r}")

    def _set_state(self, name: str, state: AgentState, **changes: Any) -> dict[str, Any]:
        agent = self._view(name).agent
        agent.state = state.value
        for key, value in changes.items():
            setattr(agent, key, value)
        self.push_nowait("agent", dataclasses.replace(agent))
        return {"agent": name, "state": agent.state}

    def _apply_pause(self, agent: str, **_: Any) -> dict[str, Any]:
        return self._set_state(agent, AgentState.PAUSED)

    def _apply_resume(self, agent: str, **_: Any) -> dict[str, Any]:
        return self._set_state(agent, AgentState.RUNNING)

    def _apply_kill(self, agent: str, **_: Any) -> dict[str, Any]:
        return self._set_state(agent, AgentState.EXITED, exit_code=-15)

    def _apply_throttle(self, agent: str, rate: str, **_: Any) -> dict[str, Any]:
        if rate == "off":
            return self._set_state(agent, AgentState.RUNNING, throttle="")
        return self._set_state(agent, AgentState.THROTTLED, throttle=rate)

    def _apply_route(
        self, agent: str, model: str = "", only: str = "*", undo: bool = False, **_: Any
    ) -> dict[str, Any] | None:
        """Like the supervisor: the record shows the switch; the reply is the switch in force."""
        record = self._view(agent).agent
        if undo:
            record.route_model = record.route_only = ""
        elif model:
            record.route_model, record.route_only = model, "" if only == "*" else only
        self.push_nowait("agent", dataclasses.replace(record))
        if not record.route_model:
            return None
        return {"agent": agent, "model": record.route_model, "only": record.route_only or "*"}

    def _apply_pause_all(self, **_: Any) -> dict[str, Any]:
        paused = [
            v.agent.name
            for v in self.snapshot.agents
            if not v.agent.critical and v.agent.state == AgentState.RUNNING
        ]
        for name in paused:
            self._set_state(name, AgentState.PAUSED)
        return {"paused": paused}

    def _apply_resume_all(self, **_: Any) -> dict[str, Any]:
        paused = [v.agent.name for v in self.snapshot.agents if v.agent.state == AgentState.PAUSED]
        for name in paused:
            self._set_state(name, AgentState.RUNNING)
        return {"resumed": paused}

    def _apply_ack_alerts(self, ids: list[int] | None = None, **_: Any) -> dict[str, Any]:
        count = 0
        for alert in self.snapshot.alerts:
            if not alert.acknowledged and (ids is None or alert.id in ids):
                alert.acknowledged = True
                count += 1
        return {"acknowledged": count}

    def _apply_set_budget(self, budget: dict[str, Any], **_: Any) -> dict[str, Any]:
        amount = parse_amount(budget["limit"])
        status = BudgetStatus(
            name=str(budget["name"]),
            scope=str(budget.get("scope", "global")),
            target=str(budget.get("target", "*")),
            period=str(budget.get("period", "day")),
            limit=amount.value,
            unit=amount.unit.value,
            used=0.0,
            action=str(budget.get("action", "alert")),
        )
        others = [b for b in self.snapshot.budgets if b.name != status.name]
        self.snapshot.budgets = [*others, status]
        return {"budget": status.name}

    def _apply_launch(self, name: str, **_: Any) -> dict[str, Any]:
        self.snapshot.agents.append(AgentView(agent=Agent(name=name, launched=True)))
        return {"name": name}

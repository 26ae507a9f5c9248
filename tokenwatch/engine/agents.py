"""The supervisor's roster of agents: each agent's record (process handle, hold, throttle, totals)
and unique naming among live agents."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import anyio

from tokenwatch.core.errors import InvalidRequest, UnknownAgent
from tokenwatch.core.models import Agent, AgentState
from tokenwatch.core.pricing import ESTIMATED, is_estimated

if TYPE_CHECKING:
    from tokenwatch.core.throttle import TokenBucket
    from tokenwatch.process.duty import DutyCycle
    from tokenwatch.process.processes import ProcessHandle

MAX_EXITED: Final = 200
"""Exited agents kept on the roster (newest), so status and the dashboard can show how they ended."""
LIVE_STATES: Final = frozenset(
    {AgentState.RUNNING, AgentState.PAUSED, AgentState.THROTTLED, AgentState.DETACHED}
)
_NAME_OK = re.compile(r"[A-Za-z0-9._@:+-]{1,64}")


@dataclass(eq=False)
class AgentRecord:
    """One agent as the engine holds it: the public Agent plus what it needs to control it."""

    agent: Agent
    handle: ProcessHandle | None = None
    owner: ProcessHandle | None = None
    """A process whose end ends the agent, never signalled (the shell that ran `tokenwatch env`)."""
    running: anyio.Event = field(default_factory=anyio.Event)
    """Set while calls may go; cleared while the agent is paused (held calls wait on it)."""
    bucket: TokenBucket | None = None
    bucket_usd: bool = False
    """True when the bucket counts dollars (`$1/h`), else tokens."""
    duty: anyio.CancelScope | None = None
    cycle: DutyCycle | None = None
    """The duty cycle `duty` runs, once it has started."""
    denied: str = ""
    """Why its calls are refused (a deny action); empty when they may go."""
    route: str = ""
    """Proxy route token, when it goes through the proxy."""
    requests: int = 0
    tokens: int = 0
    cost_usd: float | None = None
    unpriced_requests: int = 0
    """Calls to models no price table knows (priced by estimate, or not at all)."""
    estimated_usd: float = 0.0
    """The part of `cost_usd` that is such an estimate."""
    estimated_from: str = ""
    done: list[str] = field(default_factory=list)
    """What tokenwatch did to it (`paused by rule:runaway`), for the exit summary."""

    def __post_init__(self) -> None:
        self.running.set()

    @property
    def name(self) -> str:
        return self.agent.name

    @property
    def live(self) -> bool:
        return self.agent.state in LIVE_STATES

    def count(self, tokens: int, cost: float | None, price_source: str = "") -> None:
        self.requests += 1
        self.tokens += tokens
        if cost is not None:
            self.cost_usd = (self.cost_usd or 0.0) + cost
        if cost is None or is_estimated(price_source):
            self.unpriced_requests += 1
            self.estimated_usd += cost or 0.0
            self.estimated_from = price_source.removeprefix(ESTIMATED) or self.estimated_from

    def hold(self) -> None:
        if self.running.is_set():
            self.running = anyio.Event()

    def release(self) -> None:
        self.running.set()

    def summary(self) -> dict[str, object]:
        counts = Counter(self.done)
        return {
            "tokens": self.tokens,
            "cost_usd": self.cost_usd,
            "requests": self.requests,
            "unpriced_requests": self.unpriced_requests,
            "estimated_usd": self.estimated_usd,
            "estimated_from": self.estimated_from,
            "actions": [f"{what} {n}x" if n > 1 else what for what, n in counts.items()],
        }


def check_name(name: str) -> str:
    """An agent name fit for status tables, env vars and budgets."""
    if not _NAME_OK.fullmatch(name):
        raise InvalidRequest(
            f"agent name {name!r}: use 1-64 letters, digits and . _ @ : + -",
        )
    return name


class Roster:
    """Agents by name; names are unique among live agents (`coder`, `coder-2`, ...)."""

    def __init__(self) -> None:
        self._records: dict[str, AgentRecord] = {}

    def __iter__(self) -> Iterator[AgentRecord]:
        return iter(list(self._records.values()))

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def get(self, name: str) -> AgentRecord | None:
        return self._records.get(name)

    def find(self, name: str) -> AgentRecord:
        rec = self._records.get(name)
        if rec is None:
            known = ", ".join(sorted(r.name for r in self if r.live)) or "none running"
            raise UnknownAgent(f"no agent named {name!r} (known: {known})")
        return rec

    def unique_name(self, wanted: str) -> str:
        """`wanted`, or `wanted-2`, `wanted-3`... when a live agent has it."""
        base = check_name(wanted)
        name, n = base, 1
        while (rec := self._records.get(name)) is not None and rec.live:
            n += 1
            name = f"{base}-{n}"
        return name

    def add(self, record: AgentRecord) -> AgentRecord:
        self._records.pop(record.name, None)
        self._records[record.name] = record
        self._trim()
        return record

    def remove(self, name: str) -> None:
        self._records.pop(name, None)

    def by_pid(self, pid: int) -> AgentRecord | None:
        for rec in self._records.values():
            if rec.live and rec.agent.pid == pid:
                return rec
        return None

    def _trim(self) -> None:
        exited = [r for r in self._records.values() if not r.live]
        for rec in exited[: max(0, len(exited) - MAX_EXITED)]:
            del self._records[rec.name]

"""Plain data shared by every layer: the usage event, agents, budgets, alerts, actions, snapshots."""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field
from typing import Any, Final, Self

FIELD_ALIASES = {"ts": ("timestamp", "time")}


class Plain:
    """`to_dict` and a `from_dict` that ignores unknown keys, for the plain dataclasses below."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(**known_fields(cls, data))


def known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of `data` that are fields of the dataclass `cls` (derived keys dropped)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


class Status(enum.StrEnum):
    """How an LLM call ended."""

    OK = "ok"
    ERROR = "error"
    DENIED = "denied"
    CANCELLED = "cancelled"


class Source(enum.StrEnum):
    """Which capture path saw the call."""

    PROXY = "proxy"
    SDK = "sdk"
    LOG = "log"
    IMPORT = "import"


MAX_CLOCK_SKEW: Final = 86_400.0
"""Seconds a call's time may lie ahead of ours (clocks disagree); later than that, it cannot have
happened yet, and is refused rather than counted in a period that has not begun."""


MAX_CALL_TOKENS: Final = 100_000_000
"""The most tokens one call can count in any field: far beyond any model's context window and
output. A larger figure is a fault, refused where it comes in (socket, SDK, import; the proxy
estimates the call instead): a handful of them would overflow the ledger's 64-bit sums."""


def over_call_limit(name: str, count: int) -> str:
    """Why a token count is refused: more than one call can use."""
    return f"'{name}' is {count:,}, over {MAX_CALL_TOKENS:,} (the most one call can use)"


@dataclass(slots=True)
class UsageEvent(Plain):
    """One LLM call, normalised the OpenTelemetry way (see docs/architecture.md).

    `input_tokens` counts every prompt token, cache reads and writes included;
    `output_tokens` counts every generated token, reasoning included.
    """

    ts: float = field(default_factory=time.time)
    agent: str = ""
    run_id: str = ""
    pid: int | None = None
    session: str = ""
    user: str = ""
    task: str = ""
    step: str = ""
    tool: str = ""
    provider: str = ""
    model: str = ""
    endpoint: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float | None = None
    price_version: str = ""
    latency_ms: float | None = None
    ttft_ms: float | None = None
    wait_ms: float = 0.0
    status: str = Status.OK.value
    http_status: int | None = None
    prompt_hash: str = ""
    source: str = Source.SDK.value
    estimated: bool = False
    call_id: str = ""
    """Idempotency key: the same call reported twice (SDK and proxy, or a retry) is stored once."""
    prompt_shape: str = ""
    """Hash of the prompt with numbers, ids and times masked: near-duplicate prompts share it."""
    turn_hash: str = ""
    """Hash of the turns the call adds to its conversation (see core.conversation.Signals)."""
    turn_shape: str = ""
    tool_hash: str = ""
    """Hash of the tool calls in the conversation's tail with their results."""
    tool_call: str = ""
    """The tail's first tool call as `name(arg="value")`, cut short: what a loop alert names."""
    answer_hash: str = ""
    """Hash (by shape) of what the model answered: its text or tool calls."""
    overlap: int = 0
    """Identical requests of the agent already in flight when this one started (sampling, a
    parallel retry): such a call is a copy, not the next step of a sequence."""
    price_source: str = ""
    """Which table priced the call (`genai-prices`, `tokenwatch`, `tokenwatch.toml`), `provider`
    for a cost reported with the response, or `estimated:MODEL` for a model no table knows,
    priced at MODEL's rates; `price_version` is that table's version."""
    requested_model: str = ""
    """The model the agent asked for, when tokenwatch served another (`model`; a model switch)."""
    lever: str = ""
    """What tokenwatch did to spend less on this call: `cache`, `switch`, `trim` (joined by `+`)."""
    saved_tokens: int = 0
    """Tokens not billed thanks to the lever (a cache hit: the whole call; trimming: the cut)."""
    saved_usd: float | None = None
    """Dollars the lever saved, at the prices of the time; None when it saved nothing or unpriced."""
    response_id: str = ""
    """The provider's id of the answer (Anthropic's `msg_...`, OpenAI's `resp_...`/`chatcmpl-...`),
    as the proxy read it or an agent's session log names it: one answer is stored once, whichever
    path saw it first."""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def priced(self) -> bool:
        return self.cost_usd is not None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["total_tokens"] = self.total_tokens
        return d

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


class AgentState(enum.StrEnum):
    """What an agent is doing, as the supervisor sees it."""

    RUNNING = "running"
    PAUSED = "paused"
    THROTTLED = "throttled"
    STOPPED = "stopped"
    EXITED = "exited"
    DETACHED = "detached"
    """Known from a previous supervisor's records, not yet re-adopted."""


class ActionKind(enum.StrEnum):
    """What tokenwatch can do to an agent or a call."""

    ALERT = "alert"
    THROTTLE = "throttle"
    PAUSE = "pause"
    RESUME = "resume"
    KILL = "kill"
    DENY = "deny"


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(slots=True)
class Agent(Plain):
    """An agent under supervision (launched, attached, or only reporting)."""

    name: str
    pid: int | None = None
    state: str = AgentState.RUNNING.value
    run_id: str = ""
    command: list[str] = field(default_factory=list)
    task: str = ""
    user: str = ""
    session: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    critical: bool = False
    launched: bool = False
    """True when tokenwatch started the process (it then owns its logs and exit code)."""
    exit_code: int | None = None
    throttle: str = ""
    """Active throttle rate as the user wrote it (`20k/min`, `$1/h`, `50%`), empty when off."""
    route_model: str = ""
    """The model its proxied calls are served by instead (`tokenwatch route`), empty when off."""
    route_only: str = ""
    """Glob of the requested models that switch applies to; empty for every call."""
    started_at: float = field(default_factory=time.time)
    start_time: int = 0
    """The process's start time (clock ticks after boot): a restarted supervisor re-adopts the
    pid only if it still names that process, never one that reused the pid."""


@dataclass(slots=True)
class Alert(Plain):
    """Something a person should know, with what was done about it."""

    rule: str
    agent: str
    message: str
    severity: str = Severity.WARNING.value
    action: str = ActionKind.ALERT.value
    ts: float = field(default_factory=time.time)
    id: int | None = None
    acknowledged: bool = False


@dataclass(slots=True)
class Action(Plain):
    """An action taken on an agent: who (key, cli, rule:NAME), what, why."""

    kind: str
    agent: str
    who: str
    why: str = ""
    detail: str = ""
    ok: bool = True
    ts: float = field(default_factory=time.time)
    id: int | None = None


@dataclass(slots=True)
class BudgetStatus(Plain):
    """Where one budget stands in its current period."""

    name: str
    scope: str
    target: str
    period: str
    limit: float
    unit: str
    """`tokens` or `usd`."""
    used: float
    action: str
    resets_at: float | None = None
    forecast_exhausted_at: float | None = None
    estimated_usd: float = 0.0
    """The part of `used` priced at the fallback's rates (models no table knows): a partial
    total, marked wherever it is shown."""
    estimated_from: str = ""
    """The fallback model whose rates stood in for them."""
    fleet: str = ""
    """A shared budget's state: `shared`, or while the fleet database is unreachable
    `refusing` or `local-slice`; empty for a budget of this machine only."""
    fleet_note: str = ""
    """What status and the dashboard say of it while the fleet database is unreachable."""

    @property
    def remaining(self) -> float:
        return max(0.0, self.limit - self.used)

    @property
    def fraction(self) -> float:
        return self.used / self.limit if self.limit else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["remaining"] = self.remaining
        return d


@dataclass(slots=True)
class AgentView(Plain):
    """One agents-table row of a snapshot: an agent plus its live figures."""

    agent: Agent
    models: list[str] = field(default_factory=list)
    requests_per_min: float = 0.0
    tokens_per_min: float = 0.0
    usd_per_hour: float = 0.0
    period_tokens: int = 0
    period_cost_usd: float = 0.0
    period_estimated_usd: float = 0.0
    """The part of `period_cost_usd` priced by estimate (models no price table knows)."""
    unpriced_requests: int = 0
    """Today's calls to models no price table knows: `period_cost_usd` is partial when above 0."""
    budget_fraction: float | None = None
    burn: list[float] = field(default_factory=list)
    """Tokens per interval over the recent past, oldest first, for a sparkline."""
    last_alert: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(**known_fields(cls, {**data, "agent": Agent.from_dict(data["agent"])}))


@dataclass(slots=True)
class Snapshot(Plain):
    """Everything the dashboard shows, aggregated by the engine at a bounded rate."""

    ts: float
    tokens_per_min: float = 0.0
    usd_per_hour: float = 0.0
    spend_today_usd: float = 0.0
    estimated_today_usd: float = 0.0
    """The part of `spend_today_usd` priced by estimate (models no price table knows)."""
    unpriced_today: int = 0
    """Today's calls to such models: `spend_today_usd` is partial when above 0."""
    daily_budget_usd: float | None = None
    agents: list[AgentView] = field(default_factory=list)
    top: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    """Cost by group: `{"agent": [(name, usd), ...], "model": ..., ...}`, largest first."""
    top_partial: dict[str, list[str]] = field(default_factory=dict)
    """Per group, the names in `top` whose cost holds an estimate."""
    budgets: list[BudgetStatus] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    """Newest first, bounded."""
    burn: list[float] = field(default_factory=list)
    """Total tokens per interval, oldest first."""
    supervisor: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        d = dict(data)
        d["agents"] = [AgentView.from_dict(a) for a in d.get("agents", [])]
        d["budgets"] = [BudgetStatus.from_dict(b) for b in d.get("budgets", [])]
        d["alerts"] = [Alert.from_dict(a) for a in d.get("alerts", [])]
        d["top"] = {
            k: [(str(n), float(v)) for n, v in rows] for k, rows in d.get("top", {}).items()
        }
        return cls(**known_fields(cls, d))

"""tokenwatch's settings as frozen, typed dataclasses, and the checked conversion of a TOML table into them."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, TypeVar
from urllib.parse import parse_qs, urlsplit

T = TypeVar("T")
MAX_PORT = 65535
DAY = 86400.0
YEAR = 365 * DAY


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file, the key and the problem."""

    def in_file(self, source: str) -> ConfigError:
        """This error, its message led by the file it is about (once)."""
        text = str(self)
        if not source or text.startswith(f"{source}: "):
            return self
        return ConfigError(f"{source}: {text}")


@dataclass(frozen=True, slots=True)
class Range:
    """Bounds a number setting must keep; NaN and the infinities are always refused, since every
    number here ends up in a sleep, a socket or a sum that they would break far from the file."""

    low: float
    high: float = math.inf
    above: bool = False
    """`low` itself is refused (a timeout or interval of 0 would spin or fail at once)."""

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None
        if not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        too_low = value <= self.low if self.above else value < self.low
        if too_low or value > self.high:
            return f"must be {self._span()}, got {value!r}"
        return None

    def _span(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if math.isinf(self.high):
            return f"above {low}" if self.above else f"at least {low}"
        return f"above {low} and at most {high}" if self.above else f"from {low} to {high}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True, slots=True)
class Check:
    """A rule a setting must keep: `test` says what is wrong with a value, or None."""

    test: Callable[[Any], str | None]

    def problem(self, value: Any) -> str | None:
        return self.test(value)


def _http_url(value: str) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"expected an http:// or https:// URL, got {value!r}"
    return None


def _postgres_url(value: str) -> str | None:
    """A PostgreSQL URL without a password (the password's value is never echoed)."""
    if not value:
        return None
    parts = urlsplit(value)
    if parts.password is not None or "password" in parse_qs(parts.query, keep_blank_values=True):
        return (
            "holds a password; give it in PGPASSWORD or ~/.pgpass (or a PGSERVICE file), "
            "never in the config"
        )
    if parts.scheme not in ("postgresql", "postgres"):
        return "expected a postgresql:// URL (like postgresql://tokenwatch@db.example/team)"
    return None


def parse_listen(listen: str) -> tuple[str, int]:
    """`127.0.0.1:9464`, `:9464` or `[::1]:9464` -> (host, port); ValueError for anything else."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > MAX_PORT:
        raise ValueError(f"expected HOST:PORT (port 0 to {MAX_PORT}), got {listen!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def _listen(value: str) -> str | None:
    if not value:
        return None
    try:
        parse_listen(value)
    except ValueError as exc:
        return str(exc)
    return None


def _command(value: list[str]) -> str | None:
    if not value or not value[0]:
        return f'expected the program and its arguments, like ["python", "agent.py"], got {value!r}'
    return None


Port = Annotated[int, Range(0, MAX_PORT)]
Seconds = Annotated[float, Range(0, DAY, above=True)]
"""Seconds something may take: above 0 (0 would fail at once), at most a day."""
Span = Annotated[float, Range(0, YEAR)]
"""Seconds of history or quiet: 0 up to a year."""
UsdPerMillion = Annotated[float | None, Range(0)]
"""USD per 1M tokens."""
HttpUrl = Annotated[str, Check(_http_url)]
"""An http(s) URL, or empty for none."""
PostgresUrl = Annotated[str, Check(_postgres_url)]
"""A postgresql:// URL without a password, or empty for libpq's PG* variables."""


@dataclass(frozen=True, slots=True)
class SupervisorSettings:
    timezone: str = "local"
    """IANA zone that calendar periods (day, week, month) align to; `local` follows the machine."""
    snapshot_interval: Seconds = 1.0
    """Seconds between dashboard snapshots sent to subscribers (above 0, at most a day)."""
    kill_grace: Annotated[float, Range(0, 3600)] = 5.0
    """Seconds between SIGTERM and SIGKILL when an agent is killed (0 to 3600)."""
    fail_open: bool = False
    """Admit calls when the store cannot be written (default: refuse them with 503)."""


DEFAULT_ENDPOINT_PORT = 24680
"""Below Linux's ephemeral range (32768-60999, so no outgoing connection holds it), in no
/etc/services entry, and none of the ports local model servers and dev servers take."""


@dataclass(frozen=True, slots=True)
class ProxySettings:
    host: str = "127.0.0.1"
    """Loopback address the proxy binds to; anything else is refused."""
    port: Port = 0
    """TCP port (0 to 65535); 0 lets the supervisor choose a free one."""
    endpoint_port: Port = DEFAULT_ENDPOINT_PORT
    """The stable endpoint: a fixed port, on the same host, that needs no route token
    (`OPENAI_BASE_URL=http://127.0.0.1:PORT/v1` in a tool's own settings); calls are
    attributed to the calling process's agent. 0 turns it off (docs/proxy.md)."""
    openai_upstream: HttpUrl = ""
    """Where OpenAI-shaped calls go when the agent had no OPENAI_BASE_URL (default: api.openai.com)."""
    anthropic_upstream: HttpUrl = ""
    """Where Anthropic calls go when the agent had no ANTHROPIC_BASE_URL (default: api.anthropic.com)."""
    model_upstreams: dict[str, HttpUrl] = field(default_factory=dict)
    """Per-model upstream base URLs, e.g. `{"llama3" = "http://127.0.0.1:11434/v1"}`."""
    default_max_output_tokens: Annotated[int, Range(1, 10_000_000)] = 4096
    """Worst-case output reserved for a call that does not say its max tokens (1 to 10M)."""
    max_body_bytes: Annotated[int, Range(1024, 1 << 32)] = 32 * 1024 * 1024
    """Largest request body accepted (413 beyond); 1 KiB to 4 GiB."""
    request_timeout: Seconds = 30.0
    """Seconds a client has to send its whole request (slowloris guard; responses are not cut)."""
    connect_timeout: Seconds = 10.0
    """Seconds to connect to the upstream."""
    read_timeout: Seconds = 600.0
    """Seconds of upstream silence before the call fails."""


@dataclass(frozen=True, slots=True)
class BudgetSettings:
    name: str = ""
    """Unique name; defaults to `SCOPE:TARGET:PERIOD`."""
    scope: str = "global"
    """global, agent, task, model, user or tag."""
    target: str = "*"
    """Name or glob the scope matches (`researcher`, `gpt-4o*`); for tags `KEY=VALUE` or `KEY`."""
    period: str = "day"
    """request, task, hour, day, week, month or total."""
    limit: str | int | float = 0
    """Tokens (`200000`, `200k`, `1.5M`) or dollars (`"$2"`)."""
    action: str = "alert"
    """alert, throttle, pause, kill or deny at the limit."""
    warn: list[int] = field(default_factory=lambda: [50, 80, 100])
    """Percentages at which a warning fires, once per period."""
    rolling: bool = False
    """Measure the period as a rolling window instead of calendar-aligned."""
    rate: str = "50%"
    """Throttle rate applied when the action is throttle (`20k/min`, `$1/h`, `50%`)."""
    unpriced: str = "estimate"
    """A dollar budget counts calls to models no price table knows at the fallback's price
    (`estimate`), or as $0 (`free`, what tokenwatch did before it had a fallback)."""
    shared: bool = False
    """Counted and enforced across every supervisor of the team, in the [fleet] PostgreSQL
    database (docs/fleet.md); needs a [fleet] section."""
    when_unreachable: str = "refuse"
    """What a shared budget does while PostgreSQL cannot be reached: `refuse` its calls (fail
    closed), or `local-slice` (spend up to `slice` here, counted in when the server is back)."""
    slice: str | int | float = 0
    """With `local-slice`: what this supervisor may spend of a shared budget while PostgreSQL is
    unreachable (`"$1"`, `50k`), in the budget's unit."""


@dataclass(frozen=True, slots=True)
class RuleSettings:
    name: str = ""
    """Unique name, shown in alerts."""
    detector: str = ""
    """runaway, task_tokens, spike, huge_request, context_growth, drift or forecast."""
    threshold: Annotated[float, Range(0)] = 0.0
    """Detector-specific trigger level (repeats, multiple, tokens); 0 takes the detector's default."""
    window: Span = 0.0
    """Seconds of history the detector looks at; 0 takes its default."""
    action: str = "alert"
    """alert, throttle, pause, kill or deny when it fires."""
    escalate: list[str] = field(default_factory=list)
    """Actions to take if it keeps firing, in order (e.g. throttle, pause, kill)."""
    cooldown: Span = 60.0
    """Seconds before the same alert may repeat for the same agent."""
    enabled: bool = True
    """Switch a rule off without deleting it."""
    agents: str = "*"
    """Glob of agent names the rule watches."""
    rate: str = "50%"
    """Throttle rate applied when the action is throttle (`20k/min`, `$1/h`, `50%`)."""


@dataclass(frozen=True, slots=True)
class PriceSettings:
    input: UsdPerMillion = None
    """USD per 1M uncached input tokens."""
    output: UsdPerMillion = None
    """USD per 1M output tokens (reasoning included)."""
    cache_read: UsdPerMillion = None
    """USD per 1M cache-read input tokens."""
    cache_write: UsdPerMillion = None
    """USD per 1M cache-write input tokens."""
    reasoning: UsdPerMillion = None
    """USD per 1M reasoning tokens when billed apart from output."""
    free: bool = False
    """A local model: every rate is 0."""
    provider: str = ""
    """openai, anthropic, google, ... (for a model the bundled table does not know)."""


@dataclass(frozen=True, slots=True)
class AgentSettings:
    command: Annotated[list[str], Check(_command)] = field(default_factory=list)
    """Argument vector to launch, like a Procfile entry."""
    cwd: str = ""
    """Working directory; empty for the directory tokenwatch runs in."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the agent."""
    task: str = ""
    """Default task the agent's calls are attributed to."""
    tags: dict[str, str] = field(default_factory=dict)
    """Free-form labels (`team = "ml"`) budgets can scope to."""
    critical: bool = False
    """Never paused or killed by a rule, only alerted on."""
    openai_upstream: HttpUrl = ""
    """Upstream for this agent's OpenAI calls, overriding the proxy's."""
    anthropic_upstream: HttpUrl = ""
    """Upstream for this agent's Anthropic calls, overriding the proxy's."""


@dataclass(frozen=True, slots=True)
class AlertSettings:
    webhook: HttpUrl = ""
    """URL that receives each alert as Slack-compatible JSON; empty for none."""
    desktop: bool = False
    """Show a desktop notification (notify-send) per alert."""


@dataclass(frozen=True, slots=True)
class PrometheusSettings:
    listen: Annotated[str, Check(_listen)] = ""
    """`HOST:PORT` to serve /metrics on; empty keeps it off."""
    max_label_values: Annotated[int, Range(0, 100_000)] = 100
    """Distinct tasks/users kept as labels (0 to 100000); the rest fold into `other`."""


@dataclass(frozen=True, slots=True)
class OtlpSettings:
    endpoint: HttpUrl = ""
    """OTLP/HTTP collector URL; empty keeps it off."""
    spans: bool = False
    """Also send one span per LLM call."""
    interval: Seconds = 10.0
    """Seconds between metric exports."""
    queue_size: Annotated[int, Range(0, 1_000_000)] = 2048
    """Spans held while the collector is unreachable (0 to 1M); beyond, dropped and counted."""


@dataclass(frozen=True, slots=True)
class ExportSettings:
    prometheus: PrometheusSettings = field(default_factory=PrometheusSettings)
    otlp: OtlpSettings = field(default_factory=OtlpSettings)


@dataclass(frozen=True, slots=True)
class FleetSettings:
    url: PostgresUrl = ""
    """PostgreSQL the team's supervisors share (`postgresql://USER@HOST/DB`); never a password
    (PGPASSWORD, ~/.pgpass or PGSERVICE give it). Empty: libpq's PG* variables say where."""
    host: str = field(default_factory=lambda: os.uname().nodename)
    """This supervisor's name in the team's tables; default: the machine's host name."""
    lease: Annotated[float, Range(1, 3600)] = 30.0
    """Seconds a shared reservation holds unless renewed (1 to 3600): a supervisor that dies
    stops holding the team's budget after this long."""
    connect_timeout: Annotated[float, Range(0.5, 60)] = 3.0
    """Seconds to connect, and at most to wait on a statement, before the server counts as
    unreachable (0.5 to 60)."""
    retry_interval: Annotated[float, Range(0.1, 3600)] = 2.0
    """Seconds between attempts to reconnect while the server is unreachable."""
    ship_interval: Annotated[float, Range(0.05, 3600)] = 1.0
    """Seconds between sending this supervisor's new ledger events to the team's table
    (`tokenwatch report --fleet`); while the server is away they wait in the local ledger."""
    report_timeout: Annotated[float, Range(1, 3600)] = 120.0
    """Seconds `tokenwatch report --fleet` waits for the team's database to answer (a table
    locked by a migration, a stalled server) before saying so (1 to 3600)."""


@dataclass(frozen=True, slots=True)
class CacheSettings:
    enabled: bool = False
    """Answer an identical request from a local store instead of the upstream (docs/optimize.md)."""
    agents: str = "*"
    """Glob of agent names whose calls are cached."""
    shared: bool = False
    """Share entries between the user's agents (same key and upstream); default: each agent its own."""
    ttl: Annotated[float, Range(0, YEAR, above=True)] = 3600.0
    """Seconds an answer is served again after it was stored."""
    any_temperature: bool = False
    """Also cache sampled answers (temperature absent or above 0); default: only temperature 0."""
    max_bytes: Annotated[int, Range(1 << 20, 1 << 40)] = 64 << 20
    """Size bound of the store on disk (1 MiB to 1 TiB); the oldest entries go first beyond it."""
    max_entry_bytes: Annotated[int, Range(1024, 1 << 32)] = 4 << 20
    """Largest answer stored (1 KiB to 4 GiB); bigger ones are relayed but not kept."""


@dataclass(frozen=True, slots=True)
class SwitchSettings:
    budget: str = ""
    """Name of the budget whose use turns the switch on."""
    at: Annotated[float, Range(0, 1000, above=True)] = 80.0
    """Percent of that budget used from which calls are switched."""
    agents: str = "*"
    """Glob of agent names whose calls are switched."""
    model: str = "*"
    """Glob of the requested models that are switched (`gpt-4o`)."""
    to: str = ""
    """The model served instead (`gpt-4o-mini`): same provider and wire."""


@dataclass(frozen=True, slots=True)
class TrimSettings:
    enabled: bool = False
    """Drop a conversation's oldest turns once a budget is nearly used (docs/optimize.md)."""
    budget: str = ""
    """Name of the budget whose use turns trimming on; empty trims from the first call."""
    at: Annotated[float, Range(0, 1000)] = 80.0
    """Percent of that budget used from which prompts are trimmed."""
    agents: str = "*"
    """Glob of agent names whose prompts are trimmed."""
    keep_turns: Annotated[int, Range(1, 10_000)] = 6
    """Latest turns kept (1 to 10000); the system prompt is always kept."""
    summary_model: str = ""
    """A cheap model (same provider and wire) that summarises the dropped turns into one message
    in their place; empty drops them without a summary."""
    summary_timeout: Annotated[float, Range(0, 600, above=True)] = 30.0
    """Seconds a summary may take; past them the turns are dropped without one."""


@dataclass(frozen=True, slots=True)
class CacheHealthSettings:
    enabled: bool = True
    """Alert when calls re-send a long prompt prefix the provider did not serve from its cache."""
    min_prefix_tokens: Annotated[int, Range(1, 10_000_000)] = 4096
    """Shortest re-sent prefix (tokens) that counts."""
    repeats: Annotated[int, Range(1, 10_000)] = 3
    """Uncached re-sends within the window that raise the alert."""
    window: Annotated[float, Range(0, DAY, above=True)] = 600.0
    """Seconds a prefix is remembered and re-sends are counted over."""


@dataclass(frozen=True, slots=True)
class OptimizeSettings:
    cache: CacheSettings = field(default_factory=CacheSettings)
    switch: list[SwitchSettings] = field(default_factory=list)
    trim: TrimSettings = field(default_factory=TrimSettings)
    cache_health: CacheHealthSettings = field(default_factory=CacheHealthSettings)


SESSION_LOG_SOURCES: Final = ("claude-code", "codex", "gemini")
"""The coding agents whose own session logs tokenwatch can read (docs/agents.md)."""


def _log_sources(value: list[str]) -> str | None:
    unknown = [v for v in value if v not in SESSION_LOG_SOURCES]
    if unknown:
        return f"expected some of {', '.join(SESSION_LOG_SOURCES)}, got {unknown!r}"
    return None


@dataclass(frozen=True, slots=True)
class SessionLogSettings:
    follow: Annotated[list[str], Check(_log_sources)] = field(
        default_factory=lambda: list(SESSION_LOG_SOURCES)
    )
    """Coding agents whose session logs the supervisor follows live (`claude-code`, `codex`,
    `gemini`); `[]` follows none. A log directory not there yet is looked for at every poll."""
    poll_interval: Annotated[float, Range(0.05, 60)] = 0.5
    """Seconds between looks at the logs for new lines (0.05 to 60)."""
    claude_code: str = ""
    """Claude Code's projects dir; empty: $CLAUDE_CONFIG_DIR/projects, else ~/.claude/projects."""
    codex: str = ""
    """Codex's sessions dir; empty: $CODEX_HOME/sessions, else ~/.codex/sessions."""
    gemini: str = ""
    """Gemini CLI's project dirs (holding chats/); empty: ~/.gemini/tmp ($GEMINI_CLI_HOME for ~)."""

    def root(self, source: str) -> str:
        """The configured dir of `source`, or "" for where the agent keeps it by default."""
        return str(getattr(self, source.replace("-", "_")))


@dataclass(frozen=True, slots=True)
class Config:
    """The whole of tokenwatch.toml (plus tokenwatch's overlay), typed."""

    supervisor: SupervisorSettings = field(default_factory=SupervisorSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    budget: list[BudgetSettings] = field(default_factory=list)
    rule: list[RuleSettings] = field(default_factory=list)
    prices: dict[str, PriceSettings] = field(default_factory=dict)
    agents: dict[str, AgentSettings] = field(default_factory=dict)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    optimize: OptimizeSettings = field(default_factory=OptimizeSettings)
    fleet: FleetSettings | None = None
    """Shared budgets and the team ledger in PostgreSQL (docs/fleet.md); None: this machine only."""
    session_logs: SessionLogSettings = field(default_factory=SessionLogSettings)
    source: str = ""
    """The file this was read from (empty for built-in defaults)."""
    overlay: str = ""
    """The tokenwatch-owned file that tokenwatch's own edits go to."""


_INTERNAL = {"source", "overlay"}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if isinstance(tp, type):
        return {
            "str": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
        }.get(tp.__name__, f"a table ({tp.__name__})")
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a table"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return str(tp)


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _checked(value, tp, key, where)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(options) == 1:  # `X | None`: X's own error names the key inside a table
            return _convert(value, options[0], key, where)
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_convert(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a table, got {value!r}")
        _, inner = typing.get_args(tp)
        return {str(k): _convert(v, inner, f"{key}.{k}", where) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a table, got {value!r}")
        return _build(tp, value, key, where)  # type: ignore[arg-type]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: {key}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: {key}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _checked(value: Any, tp: Any, key: str, where: str) -> Any:
    """The value converted to the annotated type, then held to the bounds declared with it."""
    base, *rules = typing.get_args(tp)
    converted = _convert(value, base, key, where)
    for rule in rules:
        problem = rule.problem(converted)
        if problem:
            raise ConfigError(f"{where}: {key}: {problem}")
    return converted


def _build(cls: type[T], data: dict[str, Any], prefix: str, where: str) -> T:
    hints = typing.get_type_hints(cls, include_extras=True)
    known = {f.name for f in dataclasses.fields(cls)} - _INTERNAL  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in known:
            choices = ", ".join(sorted(known))
            raise ConfigError(f"{where}: unknown key '{dotted}' (expected one of: {choices})")
        kwargs[key] = _convert(value, hints[key], dotted, where)
    return cls(**kwargs)


def parse_config(data: dict[str, Any], where: str = "<config>") -> Config:
    """Typed settings from an already-parsed TOML document; raises ConfigError."""
    cfg = _build(Config, data, "", where)
    return dataclasses.replace(cfg, source=where)

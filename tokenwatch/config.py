"""tokenwatch.toml read into frozen, typed settings; tokenwatch's own edits go to an overlay file."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tokenwatch.paths import OVERLAY_NAME, Paths

T = TypeVar("T")


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file, the key and the problem."""

    def in_file(self, source: str) -> ConfigError:
        """This error, its message led by the file it is about (once)."""
        text = str(self)
        if not source or text.startswith(f"{source}: "):
            return self
        return ConfigError(f"{source}: {text}")


@dataclass(frozen=True, slots=True)
class SupervisorSettings:
    timezone: str = "local"
    """IANA zone that calendar periods (day, week, month) align to; `local` follows the machine."""
    snapshot_interval: float = 1.0
    """Seconds between dashboard snapshots sent to subscribers."""
    kill_grace: float = 5.0
    """Seconds between SIGTERM and SIGKILL when an agent is killed."""
    fail_open: bool = False
    """Admit calls when the store cannot be written (default: refuse them with 503)."""


@dataclass(frozen=True, slots=True)
class ProxySettings:
    host: str = "127.0.0.1"
    """Loopback address the proxy binds to; anything else is refused."""
    port: int = 0
    """TCP port; 0 lets the supervisor choose a free one."""
    openai_upstream: str = ""
    """Where OpenAI-shaped calls go when the agent had no OPENAI_BASE_URL (default: api.openai.com)."""
    anthropic_upstream: str = ""
    """Where Anthropic calls go when the agent had no ANTHROPIC_BASE_URL (default: api.anthropic.com)."""
    model_upstreams: dict[str, str] = field(default_factory=dict)
    """Per-model upstream base URLs, e.g. `{"llama3" = "http://127.0.0.1:11434/v1"}`."""
    default_max_output_tokens: int = 4096
    """Worst-case output reserved for a call that does not say its max tokens."""
    max_body_bytes: int = 32 * 1024 * 1024
    """Largest request body accepted (413 beyond)."""
    request_timeout: float = 30.0
    """Seconds a client has to send its whole request (slowloris guard; responses are not cut)."""
    connect_timeout: float = 10.0
    """Seconds to connect to the upstream."""
    read_timeout: float = 600.0
    """Seconds of upstream silence before the call fails."""


@dataclass(frozen=True, slots=True)
class BudgetSettings:
    name: str = ""
    """Unique name; defaults to `SCOPE:TARGET:PERIOD`."""
    scope: str = "global"
    """global, agent, task, model, user or tag."""
    target: str = "*"
    """Name or glob the scope matches (`researcher`, `gpt-4o*`, `team=ml` for tags)."""
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


@dataclass(frozen=True, slots=True)
class RuleSettings:
    name: str = ""
    """Unique name, shown in alerts."""
    detector: str = ""
    """runaway, task_tokens, spike, huge_request, context_growth, drift or forecast."""
    threshold: float = 0.0
    """Detector-specific trigger level (repeats, multiple, tokens); 0 takes the detector's default."""
    window: float = 0.0
    """Seconds of history the detector looks at; 0 takes its default."""
    action: str = "alert"
    """alert, throttle, pause, kill or deny when it fires."""
    escalate: list[str] = field(default_factory=list)
    """Actions to take if it keeps firing, in order (e.g. throttle, pause, kill)."""
    cooldown: float = 60.0
    """Seconds before the same alert may repeat for the same agent."""
    enabled: bool = True
    """Switch a rule off without deleting it."""
    agents: str = "*"
    """Glob of agent names the rule watches."""
    rate: str = "50%"
    """Throttle rate applied when the action is throttle (`20k/min`, `$1/h`, `50%`)."""


@dataclass(frozen=True, slots=True)
class PriceSettings:
    input: float | None = None
    """USD per 1M uncached input tokens."""
    output: float | None = None
    """USD per 1M output tokens (reasoning included)."""
    cache_read: float | None = None
    """USD per 1M cache-read input tokens."""
    cache_write: float | None = None
    """USD per 1M cache-write input tokens."""
    reasoning: float | None = None
    """USD per 1M reasoning tokens when billed apart from output."""
    free: bool = False
    """A local model: every rate is 0."""
    provider: str = ""
    """openai, anthropic, google, ... (for a model the bundled table does not know)."""


@dataclass(frozen=True, slots=True)
class AgentSettings:
    command: list[str] = field(default_factory=list)
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
    openai_upstream: str = ""
    """Upstream for this agent's OpenAI calls, overriding the proxy's."""
    anthropic_upstream: str = ""
    """Upstream for this agent's Anthropic calls, overriding the proxy's."""


@dataclass(frozen=True, slots=True)
class AlertSettings:
    webhook: str = ""
    """URL that receives each alert as Slack-compatible JSON; empty for none."""
    desktop: bool = False
    """Show a desktop notification (notify-send) per alert."""


@dataclass(frozen=True, slots=True)
class PrometheusSettings:
    listen: str = ""
    """`HOST:PORT` to serve /metrics on; empty keeps it off."""
    max_label_values: int = 100
    """Distinct tasks/users kept as labels; the rest fold into `other`."""


@dataclass(frozen=True, slots=True)
class OtlpSettings:
    endpoint: str = ""
    """OTLP/HTTP collector URL; empty keeps it off."""
    spans: bool = False
    """Also send one span per LLM call."""
    interval: float = 10.0
    """Seconds between metric exports."""
    queue_size: int = 2048
    """Spans held while the collector is unreachable; beyond, they are dropped and counted."""


@dataclass(frozen=True, slots=True)
class ExportSettings:
    prometheus: PrometheusSettings = field(default_factory=PrometheusSettings)
    otlp: OtlpSettings = field(default_factory=OtlpSettings)


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
    source: str = ""
    """The file this was read from (empty for built-in defaults)."""
    overlay: str = ""
    """The tokenwatch-owned file that tokenwatch's own edits go to."""


_INTERNAL = {"source", "overlay"}


def _type_name(tp: Any) -> str:
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
    if origin in (typing.Union, types.UnionType):
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


def _build(cls: type[T], data: dict[str, Any], prefix: str, where: str) -> T:
    hints = typing.get_type_hints(cls)
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


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def merge_overlay(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Apply tokenwatch's own edits: budgets by name (added, replaced, or removed)."""
    merged = dict(base)
    removed = set(overlay.get("removed_budgets", []))
    budgets = [b for b in base.get("budget", []) if _budget_name(b) not in removed]
    index = {_budget_name(b): i for i, b in enumerate(budgets)}
    for entry in overlay.get("budget", []):
        name = _budget_name(entry)
        if name in removed:
            continue
        if name in index:
            budgets[index[name]] = entry
        else:
            index[name] = len(budgets)
            budgets.append(entry)
    if budgets or "budget" in base:
        merged["budget"] = budgets
    return merged


def _budget_name(entry: dict[str, Any]) -> str:
    name = entry.get("name")
    if name:
        return str(name)
    return f"{entry.get('scope', 'global')}:{entry.get('target', '*')}:{entry.get('period', 'day')}"


def find_config(paths: Paths | None = None, cwd: Path | None = None) -> Path | None:
    paths = paths or Paths.discover()
    for candidate in paths.config_candidates(cwd):
        if candidate.is_file():
            return candidate
    return None


def overlay_path_for(config_file: Path | None, paths: Paths) -> Path:
    if config_file is None:
        return paths.overlay
    return config_file.with_name(OVERLAY_NAME)


def load_config(
    explicit: Path | None = None, paths: Paths | None = None, cwd: Path | None = None
) -> Config:
    """Read the project's (or user's, or an explicit) tokenwatch.toml plus its overlay."""
    paths = paths or Paths.discover()
    source = explicit if explicit is not None else find_config(paths, cwd)
    base: dict[str, Any] = {}
    if source is not None:
        base = read_toml(source)
    overlay_file = overlay_path_for(source, paths)
    data = base
    if overlay_file.is_file():
        overlay = read_toml(overlay_file)
        unknown = set(overlay) - {"budget", "removed_budgets"}
        if unknown:
            raise ConfigError(f"{overlay_file}: unknown key '{sorted(unknown)[0]}'")
        data = merge_overlay(base, overlay)
    cfg = parse_config(data, str(source) if source else "<defaults>")
    return dataclasses.replace(cfg, overlay=str(overlay_file))

"""Who is calling and where the call goes: per-agent route tokens, loopback Host check, upstreams."""

from __future__ import annotations

import dataclasses
import fnmatch
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from tokenwatch.config import ProxySettings

OPENAI = "openai"
ANTHROPIC = "anthropic"
OPENAI_PUBLIC = "https://api.openai.com/v1"
ANTHROPIC_PUBLIC = "https://api.anthropic.com"
PREFIX = "/a/"
"""Every agent's base URL starts `/a/TOKEN`; anything else is not an agent's call."""
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
LOOPBACK_BINDS = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True, slots=True)
class AgentRoute:
    """Who a route token stands for, and the upstreams that agent would have used on its own."""

    agent: str
    run_id: str = ""
    task: str = ""
    user: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    openai_upstream: str = ""
    """The agent's OPENAI_BASE_URL at launch (or its configured override); empty for the default."""
    anthropic_upstream: str = ""
    """The agent's ANTHROPIC_BASE_URL at launch (or its configured override)."""


class RouteTable:
    """Route tokens to agents. Tokens are random and unguessable: they are the agent's identity."""

    def __init__(self) -> None:
        self._routes: dict[str, AgentRoute] = {}

    def add(self, route: AgentRoute) -> str:
        """Register a route; returns its new token."""
        token = secrets.token_urlsafe(18)
        self._routes[token] = route
        return token

    def remove(self, token: str) -> None:
        self._routes.pop(token, None)

    def get(self, token: str) -> AgentRoute | None:
        return self._routes.get(token)

    def set_task(self, agent: str, task: str) -> None:
        """Attribute the agent's next calls (on every one of its routes) to `task`."""
        for token, route in self._routes.items():
            if route.agent == agent:
                self._routes[token] = dataclasses.replace(route, task=task)

    def __len__(self) -> int:
        return len(self._routes)


@dataclass(frozen=True, slots=True)
class Target:
    """A request path taken apart: the route token, the provider and the provider-relative path."""

    token: str
    provider: str
    path: str
    """The path after `/a/TOKEN` (e.g. `/v1/chat/completions`)."""
    endpoint: str
    """The API endpoint it names, as recorded (`/v1/chat/completions`, `/v1/messages`)."""


def split_path(path: str, headers: Mapping[str, str]) -> Target | None:
    """`/a/TOKEN/v1/...` taken apart; None when the path is not an agent's route."""
    if not path.startswith(PREFIX):
        return None
    token, slash, rest = path[len(PREFIX) :].partition("/")
    if not token:
        return None
    rest = slash + rest
    provider = ANTHROPIC if _is_anthropic(rest, headers) else OPENAI
    endpoint = rest if rest.startswith("/v1/") else "/v1" + rest
    return Target(token, provider, rest, endpoint.rstrip("/"))


def _is_anthropic(rest: str, headers: Mapping[str, str]) -> bool:
    # both SDKs may call /v1/models; only Anthropic's sends anthropic-version
    return rest.startswith("/v1/messages") or "anthropic-version" in headers


def provider_of(path: str, headers: Mapping[str, str]) -> str:
    """Which provider's error shape suits a request, even one that names no route."""
    target = split_path(path, headers)
    if target is not None:
        return target.provider
    return ANTHROPIC if _is_anthropic(path, headers) else OPENAI


def loopback_host(host: str | None, port: int) -> bool:
    """True when a Host header names this proxy by a loopback name (DNS-rebinding guard)."""
    if not host:
        return False
    name, port_text = _split_host(host.strip().lower())
    if name not in LOOPBACK_NAMES:
        return False
    return port_text is None or port_text == str(port)


def _split_host(host: str) -> tuple[str, str | None]:
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return host, None
        rest = host[end + 1 :]
        return host[: end + 1], rest[1:] if rest.startswith(":") else None
    name, colon, port = host.partition(":")
    return name, port if colon else None


def upstream_url(
    settings: ProxySettings, route: AgentRoute, target: Target, model: str, query: str
) -> str:
    """The URL a call goes to: per-model upstream, else the agent's, else the proxy's, else public.

    OpenAI-style bases end in `/v1` (the SDK's path is relative to it); Anthropic bases do not.
    """
    base = _model_upstream(settings.model_upstreams, model)
    if target.provider == ANTHROPIC:
        base = base or route.anthropic_upstream or settings.anthropic_upstream or ANTHROPIC_PUBLIC
        path = target.path
    else:
        base = base or route.openai_upstream or settings.openai_upstream or OPENAI_PUBLIC
        path = target.path[3:] if target.path.startswith("/v1/") else target.path
    url = base.rstrip("/") + path
    return f"{url}?{query}" if query else url


def _model_upstream(upstreams: Mapping[str, str], model: str) -> str:
    if not model or not upstreams:
        return ""
    if model in upstreams:
        return upstreams[model]
    for pattern, url in upstreams.items():
        if fnmatch.fnmatchcase(model, pattern):
            return url
    return ""


def check_bind(host: str) -> list[str]:
    """The loopback addresses to listen on for a configured host; ValueError for anything else."""
    if host not in LOOPBACK_BINDS:
        raise ValueError(
            f"the proxy only listens on loopback (127.0.0.1 or ::1), not {host!r}: "
            "agents on other machines must not spend through it"
        )
    return ["::1"] if host == "::1" else ["127.0.0.1", "::1"]

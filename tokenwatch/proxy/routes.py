"""Who is calling and where the call goes: per-agent route tokens, loopback Host check, upstreams."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tokenwatch.config import ProxySettings

OPENAI = "openai"
ANTHROPIC = "anthropic"
OPENAI_PUBLIC = "https://api.openai.com/v1"
ANTHROPIC_PUBLIC = "https://api.anthropic.com"
PREFIX = "/a/"
"""Every agent's base URL starts `/a/TOKEN`; anything else is not an agent's call."""
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
LOOPBACK_BINDS = frozenset({"127.0.0.1", "::1", "localhost"})
SAVED_FORMAT = 1
"""Version of the saved routes file (`save_routes`)."""

log = logging.getLogger("tokenwatch.proxy")


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

    def add(self, route: AgentRoute, token: str = "") -> str:
        """Register a route under a new token (or `token`, one a previous proxy gave out)."""
        token = token or secrets.token_urlsafe(18)
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

    def items(self) -> list[tuple[str, AgentRoute]]:
        return list(self._routes.items())


@dataclass(frozen=True, slots=True)
class SavedRoutes:
    """What a previous proxy left: its port and its routes, so agents that outlived it go on."""

    port: int = 0
    routes: dict[str, AgentRoute] = field(default_factory=dict)


def save_routes(path: Path, port: int, table: RouteTable) -> None:
    """Write the port and routes (0600, replaced atomically). A route whose upstream URL holds
    credentials is left out: nothing secret is written to disk."""
    routes = {token: dataclasses.asdict(r) for token, r in table.items() if _writable(r)}
    data = json.dumps({"format": SAVED_FORMAT, "port": port, "routes": routes}, sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(data)
    os.replace(tmp, path)


def load_routes(path: Path) -> SavedRoutes:
    """What `save_routes` wrote; nothing when there is no file or it cannot be read."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != SAVED_FORMAT:
            return SavedRoutes()
        routes = {str(t): AgentRoute(**r) for t, r in doc["routes"].items()}
        return SavedRoutes(int(doc["port"]), routes)
    except FileNotFoundError:
        return SavedRoutes()
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("ignoring the saved proxy routes in %s (%s)", path, type(exc).__name__)
        return SavedRoutes()


def _writable(route: AgentRoute) -> bool:
    """Without credentials in its upstream URLs: none in a login (`https://KEY@host`) or a query
    (`?key=...`), and none that cannot be told apart in a URL that does not parse."""
    for url in (route.openai_upstream, route.anthropic_upstream):
        try:
            parts = urlsplit(url)
        except ValueError:
            return False
        if parts.username is not None or parts.query:
            return False
    return True


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
    return token_target(token, slash + rest, headers)


def token_target(token: str, rest: str, headers: Mapping[str, str]) -> Target:
    """The Target of a provider-relative path (`/v1/messages`) for the route `token`."""
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
    base, _, fixed = base.partition("?")  # `https://host/v1?api-version=x`: the path goes first
    url = base.rstrip("/") + path
    query = "&".join(q for q in (fixed, query) if q)
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

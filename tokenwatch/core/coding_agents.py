"""What each known coding agent (Codex, Claude Code, Gemini CLI, opencode, aider, goose) needs to
send its calls through the tokenwatch proxy: environment, or config flags on its command line."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tokenwatch import environ

DOC = "docs/agents.md"
CODEX_PROVIDER = "tokenwatch"


@dataclass(frozen=True, slots=True)
class Plan:
    """How one run of an agent is set up: its command line, the variables added, what to know."""

    agent: str
    """The agent's title (`Codex CLI`), or empty when the program is not one tokenwatch knows."""
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


Setup = Callable[[list[str], int, Mapping[str, str]], Plan]
"""(command, index of the agent's program in it, environment with the proxy's base URLs)."""


def _codex(command: list[str], at: int, env: Mapping[str, str]) -> Plan:
    title = "Codex CLI"
    words = command[at + 1 :]
    if any("model_provider" in w for w in words) or "--oss" in words:
        note = "the command picks its own model provider: left as it is (not tracked)"
        return Plan(title, command, notes=[note])
    # Codex ignores OPENAI_BASE_URL; a provider of its own, on the Responses API over HTTP,
    # also keeps it from trying a WebSocket to the public API first
    key = (
        "CODEX_API_KEY"
        if env.get("CODEX_API_KEY") and not env.get("OPENAI_API_KEY")
        else ("OPENAI_API_KEY")
    )
    provider = f"model_providers.{CODEX_PROVIDER}"
    # the stable endpoint tells the run's calls by process: no route token where `ps` shows it
    endpoint = env.get(environ.ENDPOINT, "")
    base_url = endpoint + "/v1" if endpoint else env.get("OPENAI_BASE_URL", "")
    flags = [
        f"model_provider={json.dumps(CODEX_PROVIDER)}",
        f"{provider}.name={json.dumps(CODEX_PROVIDER)}",
        f"{provider}.base_url={json.dumps(base_url)}",
        f'{provider}.wire_api="responses"',
        f"{provider}.env_key={json.dumps(key)}",
    ]
    added = [word for flag in flags for word in ("-c", flag)]
    notes = [f"its API key is read from {key}"]
    if not endpoint:
        notes.append("no stable endpoint: the run's route token is on its command line")
    return Plan(title, [*command[: at + 1], *added, *words], notes=notes)


def _claude(command: list[str], at: int, env: Mapping[str, str]) -> Plan:
    return Plan("Claude Code", command, notes=["reads ANTHROPIC_BASE_URL"])


def _gemini(command: list[str], at: int, env: Mapping[str, str]) -> Plan:
    note = (
        "not tracked: it speaks Google's Gemini API, which the proxy does not read; it only "
        "gets the proxy's OpenAI and Anthropic base URLs, which it does not use"
    )
    return Plan("Gemini CLI", command, notes=[note])


def _opencode(command: list[str], at: int, env: Mapping[str, str]) -> Plan:
    return Plan("opencode", command, notes=["reads OPENAI_BASE_URL and ANTHROPIC_BASE_URL"])


def _aider(command: list[str], at: int, env: Mapping[str, str]) -> Plan:
    added = {"OPENAI_API_BASE": env.get("OPENAI_BASE_URL", "")}
    return Plan("aider", command, added, ["reads OPENAI_API_BASE and ANTHROPIC_BASE_URL"])


def _goose(command: list[str], at: int, env: Mapping[str, str]) -> Plan:
    openai = env.get("OPENAI_BASE_URL", "").removesuffix("/v1")
    added = {"OPENAI_HOST": openai, "ANTHROPIC_HOST": env.get("ANTHROPIC_BASE_URL", "")}
    return Plan("goose", command, added, ["reads OPENAI_HOST and ANTHROPIC_HOST"])


KNOWN: dict[str, Setup] = {
    "codex": _codex,
    "claude": _claude,
    "gemini": _gemini,
    "opencode": _opencode,
    "aider": _aider,
    "goose": _goose,
    "claude-code": _claude,
    "gemini-cli": _gemini,
    "opencode-ai": _opencode,
    "aider-chat": _aider,
}
"""Program name -> what it needs (docs/agents.md has the versions tried)."""
LAUNCHERS = frozenset({"npx", "pnpx", "bunx", "env", "nice", "nohup", "time", "exec", "node"})
"""Programs that run the agent: looked past (with their options) to find it."""


def find_agent(command: list[str]) -> int | None:
    """Where in `command` a known agent's program is (`npx codex`, `env X=1 claude`), or None."""
    for i, word in enumerate(command):
        name = os.path.basename(word).removesuffix(".js")
        if name in KNOWN:
            return i
        if name not in LAUNCHERS and not word.startswith("-") and "=" not in word:
            return None
    return None


def plan(command: list[str], env: Mapping[str, str]) -> Plan:
    """How `command` is run so that its calls go through the proxy whose base URLs are in `env`."""
    at = find_agent(command)
    if at is None:
        return Plan("", list(command))
    name = os.path.basename(command[at]).removesuffix(".js")
    return KNOWN[name](list(command), at, env)

"""Every path tokenwatch reads or writes: XDG dirs, or all under $TOKENWATCH_HOME."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "TOKENWATCH_HOME"
CONFIG_NAME = "tokenwatch.toml"
OVERLAY_NAME = "tokenwatch.local.toml"
DB_NAME = "usage.db"
SOCKET_NAME = "tokenwatch.sock"
MAX_SOCKET_PATH = 107
"""Bytes a Unix socket path may have on Linux (sun_path is 108, with its terminating NUL)."""


def socket_path_problem(path: Path) -> str | None:
    """Why `path` cannot be a Unix socket, or None when it can."""
    size = len(os.fsencode(path))
    if size <= MAX_SOCKET_PATH:
        return None
    return (
        f"the socket path {path} is too long for a Unix socket ({size} bytes, at most "
        f"{MAX_SOCKET_PATH}): use a shorter {HOME_ENV}, XDG_RUNTIME_DIR or TOKENWATCH_SOCKET"
    )


def agent_logs(source: str, env: dict[str, str] | None = None) -> Path:
    """Where a coding agent keeps its session logs: Claude Code's projects (under
    CLAUDE_CONFIG_DIR, else ~/.claude), Codex's sessions (under CODEX_HOME, else ~/.codex),
    Gemini CLI's project dirs with their chats (under GEMINI_CLI_HOME, else ~, in .gemini/tmp)."""
    env = dict(os.environ) if env is None else env
    home = Path(env.get("HOME") or Path.home())
    if source == "claude-code":
        return Path(env.get("CLAUDE_CONFIG_DIR") or home / ".claude") / "projects"
    if source == "gemini":
        return Path(env.get("GEMINI_CLI_HOME") or home) / ".gemini" / "tmp"
    return Path(env.get("CODEX_HOME") or home / ".codex") / "sessions"


@dataclass(frozen=True, slots=True)
class Paths:
    """Where tokenwatch keeps its files; build one with `Paths.discover()`."""

    config_dir: Path
    """User config dir: the fallback tokenwatch.toml and the tokenwatch-owned overlay."""
    state_dir: Path
    """Durable state: the SQLite ledger and agent logs."""
    runtime_dir: Path
    """Volatile, private (0700): the supervisor's socket and pid file."""
    cache_dir: Path
    """What can be made again: the tokenizer files converted from bundled vocabularies."""

    @classmethod
    def discover(cls, env: dict[str, str] | None = None) -> Paths:
        env = dict(os.environ) if env is None else env
        home = env.get(HOME_ENV)
        if home:
            root = Path(home).expanduser()
            return cls(root / "config", root / "state", root / "run", root / "cache")
        user_home = Path(env.get("HOME") or Path.home())
        config = Path(env.get("XDG_CONFIG_HOME") or user_home / ".config") / "tokenwatch"
        state = Path(env.get("XDG_STATE_HOME") or user_home / ".local" / "state") / "tokenwatch"
        cache = Path(env.get("XDG_CACHE_HOME") or user_home / ".cache") / "tokenwatch"
        runtime_base = env.get("XDG_RUNTIME_DIR")
        runtime = (
            Path(runtime_base) / "tokenwatch"
            if runtime_base
            else Path("/tmp") / f"tokenwatch-{os.getuid()}"
        )
        return cls(config, state, runtime, cache)

    @property
    def db(self) -> Path:
        return self.state_dir / DB_NAME

    @property
    def response_cache(self) -> Path:
        """The proxy's response cache (`[optimize.cache]`), beside the ledger: answers are
        private to this user, like the ledger (0600 in a 0700 directory)."""
        return self.state_dir / "response-cache.db"

    @property
    def unstored(self) -> Path:
        """Usage a stopping supervisor could not store (its ledger unwritable), beside the
        ledger; the next start stores it and removes the file."""
        return self.state_dir / "unstored-usage.jsonl"

    @property
    def fleet_unsent(self) -> Path:
        """Shared budgets' settlements a stopping supervisor could not send (the team's database
        unreachable); the next start sends them (each counted once) and removes the file."""
        return self.state_dir / "fleet-unsent.jsonl"

    @property
    def socket(self) -> Path:
        return self.runtime_dir / SOCKET_NAME

    @property
    def proxy_routes(self) -> Path:
        """The proxy's port and agent routes, for a restarted supervisor (gone with a reboot,
        like the agents they serve)."""
        return self.runtime_dir / "proxy-routes.json"

    @property
    def pidfile(self) -> Path:
        return self.runtime_dir / "supervisor.pid"

    @property
    def tokenizer_cache(self) -> Path:
        return self.cache_dir / "tiktoken"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def user_config(self) -> Path:
        return self.config_dir / CONFIG_NAME

    @property
    def overlay(self) -> Path:
        return self.config_dir / OVERLAY_NAME

    def config_candidates(self, cwd: Path | None = None) -> list[Path]:
        """The project's tokenwatch.toml first, then the user's."""
        here = (cwd or Path.cwd()) / CONFIG_NAME
        return [here, self.user_config]

    def ensure_private_runtime(self) -> Path:
        """Create the runtime dir as 0700 (never a looser window) and return it."""
        old = os.umask(0o077)
        try:
            self.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        finally:
            os.umask(old)
        st = self.runtime_dir.stat()
        if st.st_uid != os.getuid():
            raise PermissionError(f"{self.runtime_dir} is owned by uid {st.st_uid}, not you")
        if st.st_mode & 0o077:
            os.chmod(self.runtime_dir, 0o700)
        return self.runtime_dir

    def ensure_state(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.state_dir

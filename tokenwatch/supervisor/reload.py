"""An edited tokenwatch.toml applied to a running supervisor: what changes at once, what waits."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import anyio.abc

from tokenwatch.config import Config
from tokenwatch.core.models import Alert
from tokenwatch.core.rules import DEFAULT_RULES
from tokenwatch.engine.engine import Engine
from tokenwatch.supervisor.policy import build_policy, worded

log = logging.getLogger("tokenwatch.supervisor")

LIVE: Final = ("budget", "rule", "prices", "agents")
"""Sections a running supervisor applies at once (agents: for launches after the edit)."""
AT_RESTART: Final = ("supervisor", "proxy", "alerts", "export", "optimize", "fleet", "session_logs")
"""Sections that take effect when the supervisor is next started."""
POLL_INTERVAL: Final = 2.0
"""Seconds between looks at the config files for an edit."""
SETTLE: Final = 0.2
"""Seconds the files must stay unchanged before they are read (not half-written)."""


@dataclass(frozen=True, slots=True)
class Reloaded:
    """What a reload did."""

    source: str
    applied: list[str]
    """Sections that changed and now apply."""
    at_restart: list[str]
    """Sections that changed and apply when the supervisor is next started."""
    fresh_budgets: list[str]
    """Budgets that start empty: to be counted in from the ledger (`Budgets.seed`)."""

    def summary(self) -> str:
        if not self.applied and not self.at_restart:
            return f"{self.source}: no change"
        parts = []
        if self.applied:
            parts.append(f"applied {', '.join(self.applied)}")
        if self.at_restart:
            parts.append(f"{', '.join(self.at_restart)} at the next supervisor start")
        return f"{self.source}: {'; '.join(parts)}"


def apply(engine: Engine, old: Config, new: Config) -> Reloaded:
    """Put `new`'s live sections into effect, all or none (raises ConfigError, changing nothing,
    when one of them is refused)."""
    changed = [name for name in (*LIVE, *AT_RESTART) if getattr(old, name) != getattr(new, name)]
    rules = new.rule or DEFAULT_RULES
    policy = build_policy(new)  # refused here, before anything changes
    with worded(new):
        fresh = engine.use_budgets(new.budget)
    engine.use_rules(rules)
    engine.use_prices(policy.prices)
    engine.use_agent_settings(new.agents)
    return Reloaded(
        new.source,
        [name for name in changed if name in LIVE],
        [name for name in changed if name in AT_RESTART],
        fresh,
    )


async def seed_quietly(engine: Engine, store: object, fresh: Sequence[str]) -> None:
    """Count the ledger's usage into budgets an edit left empty; one that cannot be read leaves
    them counting from now (said in the log and an alert), and the edit stands."""
    try:
        await engine.seed_budgets(store, only=fresh)
    except Exception as exc:
        names = ", ".join(fresh)
        why = f"{type(exc).__name__}: {exc}"
        log.warning("budgets %s may show less than was spent: ledger unreadable (%s)", names, why)
        message = (
            f"budgets {names} may show less than was spent this period: the ledger could not be "
            f"read ({why}); they count every call from now on"
        )
        engine.alert_nowait(Alert(rule="config", agent="", message=message))


Stamp = tuple[tuple[int, int] | None, ...]


class ConfigWatch:
    """Calls `on_edit` when the config file or its overlay changes on disk (polled)."""

    def __init__(
        self, files: Callable[[], list[Path]], on_edit: Callable[[], Awaitable[None]]
    ) -> None:
        self._files = files
        self._on_edit = on_edit

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        seen = last = _stamp(self._files())
        task_status.started()
        while True:
            await anyio.sleep(POLL_INTERVAL)
            now = _stamp(self._files())
            while now != seen:  # read it once the editor has stopped writing
                seen = now
                await anyio.sleep(SETTLE)
                now = _stamp(self._files())
            if seen != last:
                last = seen
                await self._on_edit()


def _stamp(files: list[Path]) -> Stamp:
    """Modification time and size of each file (None when absent)."""
    stamps: list[tuple[int, int] | None] = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append(None)
            continue
        stamps.append((st.st_mtime_ns, st.st_size))
    return tuple(stamps)

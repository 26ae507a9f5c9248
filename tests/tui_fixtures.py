"""Dashboard test helpers: scripted snapshots, real sleeper agents, and waiting on the running app."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
from textual.geometry import Region
from textual.pilot import Pilot
from textual.widget import Widget

from tokenwatch.core.models import (
    Action,
    Agent,
    AgentView,
    Alert,
    BudgetStatus,
    Snapshot,
    UsageEvent,
)
from tokenwatch.process.processes import ProcessHandle, spawn
from tokenwatch.tui.app import TokenwatchApp, build_app
from tokenwatch.tui.source import ScriptedSource

NOW = 1_767_000_000.0
"""A fixed 'now' so ages and report windows are the same on every run."""


def view(name: str, i: int, *, pid: int | None = None, **agent: Any) -> AgentView:
    """An agent row whose figures grow with `i` (so sorting by cost puts larger i first)."""
    return AgentView(
        agent=Agent(name=name, pid=pid or 4000 + i, started_at=NOW - 600, **agent),
        models=["gpt-4o-mini"] if i % 2 else ["claude-3-5-haiku"],
        requests_per_min=3.0 * i,
        tokens_per_min=1500.0 * i,
        usd_per_hour=0.12 * i,
        period_tokens=40_000 * i,
        period_cost_usd=0.031 * i,
        budget_fraction=min(1.2, 0.15 * i) if i else None,
        burn=[float((i * k) % 7) for k in range(12)],
        last_alert="runaway" if name == "looper" else "",
    )


NAMES = ("researcher", "coder", "summariser", "claude-writer", "looper")


def sample_snapshot(names: tuple[str, ...] = NAMES, pids: dict[str, int] | None = None) -> Snapshot:
    pids = pids or {}
    views = [view(n, i + 1, pid=pids.get(n)) for i, n in enumerate(names)]
    total = sum(v.period_cost_usd for v in views)
    return Snapshot(
        ts=NOW,
        tokens_per_min=sum(v.tokens_per_min for v in views),
        usd_per_hour=sum(v.usd_per_hour for v in views),
        spend_today_usd=total,
        daily_budget_usd=1.0,
        agents=views,
        top={
            "agent": sorted(
                ((v.agent.name, v.period_cost_usd) for v in views), key=lambda r: -r[1]
            ),
            "model": [("gpt-4o-mini", total * 0.6), ("claude-3-5-haiku", total * 0.4)],
        },
        budgets=[
            BudgetStatus("global:*:day", "global", "*", "day", 1.0, "usd", total, "alert"),
            BudgetStatus(
                "agent:coder:day", "agent", "coder", "day", 200_000, "tokens", 80_000, "pause"
            ),
        ],
        alerts=[
            Alert(
                "runaway", "looper", "9 identical prompts in 20s", "critical", "pause", NOW - 12, 2
            ),
            Alert("budget", "coder", "80% of agent:coder:day", "warning", "alert", NOW - 95, 1),
        ],
        burn=[float(k * 37 % 23) for k in range(40)],
        supervisor="/run/user/1000/tokenwatch/tokenwatch.sock",
    )


def sample_history(agent: str, n: int = 6) -> dict[str, Any]:
    """A `history` reply as the supervisor sends it: calls newest first, actions, log tail."""
    calls = [
        UsageEvent(
            ts=NOW - 30 * k,
            agent=agent,
            model="gpt-4o-mini" if k % 3 else "gpt-4o",
            task=f"t-{k % 2}",
            input_tokens=1200 + 10 * k,
            output_tokens=300 + k,
            cache_read_tokens=512 if k % 2 else 0,
            cost_usd=0.0004 * (k + 1),
            latency_ms=800.0 + k,
            status="ok" if k != 2 else "error",
            estimated=k == 4,
        ).to_dict()
        for k in range(n)
    ]
    actions = [
        Action("pause", agent, "rule:runaway", why="same prompt 4 times", ts=NOW - 50).to_dict()
    ]
    return {"calls": calls, "actions": actions, "log": ["step 1 ok", "call failed: 429"]}


def sample_report() -> dict[str, Any]:
    """A `report` reply as the supervisor sends it (grouped by agent)."""
    rows = [
        {"agent": "looper", "requests": 400, "input_tokens": 900_000, "cache_read_tokens": 0,
         "output_tokens": 12_000, "reasoning_tokens": 0, "cost_usd": 0.55, "tasks": 1},
        {"agent": "researcher", "requests": 120, "input_tokens": 300_000,
         "cache_read_tokens": 20_000, "output_tokens": 40_000, "reasoning_tokens": 0,
         "cost_usd": 0.21, "tasks": 3},
    ]  # fmt: skip
    total = {k: sum(r[k] for r in rows) for k in rows[0] if k != "agent"}
    return {"by": "agent", "rows": rows, "total": total, "unpriced_models": []}


def scripted_app(source: ScriptedSource, **kwargs: Any) -> TokenwatchApp:
    """The dashboard exactly as the CLI builds it, over a scripted source and a fixed clock."""
    kwargs.setdefault("clock", lambda: NOW)
    kwargs.setdefault("min_refresh", 0.0)
    return build_app(source, address="test", **kwargs)


async def wait_for(pilot: Pilot[Any], check: Callable[[], bool], what: str) -> None:
    """Let the app run until `check` holds (generous timeout, no fixed sleeps)."""
    with anyio.fail_after(30):
        while not check():
            await pilot.pause(0.02)
    assert check(), what


def row_names(app: TokenwatchApp) -> list[str]:
    return app.main.table.agent_names()


def notifications(app: TokenwatchApp) -> list[str]:
    return [n.message for n in app._notifications]


@contextmanager
def sleeper_agents(count: int) -> Iterator[list[ProcessHandle]]:
    """Real agent processes (own sessions) that just wait; killed at the end whatever happens."""
    argv = [sys.executable, "-c", "import time\nwhile True: time.sleep(1)"]
    handles = [spawn(argv, env=dict(os.environ)) for _ in range(count)]
    try:
        yield handles
    finally:
        for handle in handles:
            if handle.alive():
                os.kill(handle.pid, signal.SIGCONT)
                os.kill(handle.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while handle.wait_exit_nowait() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            handle.close()


class ProcessEffect:
    """What a real engine would do to processes on pause/resume/kill, applied by ScriptedSource."""

    def __init__(self, handles: dict[str, ProcessHandle]) -> None:
        self.handles = handles

    async def __call__(self, kind: str, fields: dict[str, Any]) -> None:
        handle = self.handles.get(fields.get("agent", ""))
        if handle is None:
            return
        if kind == "pause":
            handle.pause()
        elif kind == "resume":
            handle.resume()
        elif kind == "kill":
            await handle.kill(grace=5.0)


def widget_text(widget: Widget) -> str:
    """What the widget shows on screen, as plain text lines."""
    size = widget.size
    return "\n".join(s.text for s in widget.render_lines(Region(0, 0, size.width, size.height)))

"""The stage `tokenwatch demo` sets: a fake LLM, a private supervisor with its proxy, the demo
agents launched through it, and the final state gathered for `--headless`."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final

import anyio
import tomli_w

from tokenwatch import environ
from tokenwatch.client.control import SupervisorClient, SupervisorError, SupervisorUnavailable
from tokenwatch.core.models import Snapshot
from tokenwatch.demo.agents import PARENT_ENV
from tokenwatch.paths import HOME_ENV, Paths

START_TIMEOUT: Final = 60.0
"""Seconds the supervisor gets to answer (imports and opening the ledger on a loaded machine)."""
_PR_SET_PDEATHSIG: Final = 1


class DemoError(Exception):
    """The demo could not be set up; the message says which part failed and where its log is."""


def demo_config(fake_llm_url: str, parent_pid: int) -> dict[str, Any]:
    """The bundled demo.toml with the fake LLM's address, this Python and our pid filled in."""
    raw = resources.files("tokenwatch.demo").joinpath("demo.toml").read_text()
    data = tomllib.loads(raw)
    data.setdefault("proxy", {})
    data["proxy"]["openai_upstream"] = f"{fake_llm_url}/v1"
    data["proxy"]["anthropic_upstream"] = fake_llm_url
    for agent in data.get("agents", {}).values():
        agent["command"] = [sys.executable, *agent["command"][1:]]
        # Direct URLs are the fallback; the supervisor replaces them with its proxy's routes.
        agent["env"] = {
            **agent.get("env", {}),
            PARENT_ENV: str(parent_pid),
            "OPENAI_BASE_URL": f"{fake_llm_url}/v1",
            "ANTHROPIC_BASE_URL": fake_llm_url,
        }
    return data


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends SIGTERM if the demo dies first."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def supervisor_process(home: Path, config_file: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`tokenwatch serve` with TOKENWATCH_HOME=home; stopped (SIGTERM, then SIGKILL) at the end."""
    paths = Paths.discover({HOME_ENV: str(home)})
    paths.ensure_state()
    log = (paths.state_dir / "demo-supervisor.log").open("ab")
    env = {**os.environ, HOME_ENV: str(home)}
    for var in ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", environ.SOCKET, environ.AGENT):
        env.pop(var, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenwatch", "serve", "--config", str(config_file)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        preexec_fn=_die_with_parent,
    )
    try:
        yield proc
    finally:
        log.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def connect_when_ready(home: Path, proc: subprocess.Popen[bytes]) -> SupervisorClient:
    """Wait until the demo's supervisor answers on its socket."""
    paths = Paths.discover({HOME_ENV: str(home)})
    with anyio.move_on_after(START_TIMEOUT):
        while proc.poll() is None:
            try:
                return await SupervisorClient.connect(paths, start=False)
            except SupervisorUnavailable:
                await anyio.sleep(0.1)
    log = paths.state_dir / "demo-supervisor.log"
    raise DemoError(f"the demo supervisor did not start (exit {proc.poll()}); see {log}")


async def launch_agents(client: SupervisorClient, names: list[str]) -> list[str]:
    """Launch every demo agent; returns the names the supervisor gave them."""
    launched = []
    for name in names:
        try:
            data = await client.request("launch", name=name)
        except SupervisorError as exc:
            raise DemoError(f"could not launch {name}: {exc.message}") from None
        launched.append(str((data or {}).get("name", name)))
    return launched


@dataclass
class DemoOutcome:
    """What the demo ended with: the last snapshot, every alert and action it saw."""

    duration: float
    snapshot: Snapshot | None = None
    alerts: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        snap = self.snapshot or Snapshot(ts=0.0)
        agents = [
            {
                "name": v.agent.name,
                "state": v.agent.state,
                "pid": v.agent.pid,
                "critical": v.agent.critical,
                "exit_code": v.agent.exit_code,
                "throttle": v.agent.throttle,
                "models": v.models,
                "requests_per_min": v.requests_per_min,
                "tokens_per_min": v.tokens_per_min,
                "tokens": v.period_tokens,
                "cost_usd": v.period_cost_usd,
            }
            for v in snap.agents
        ]
        return {
            "duration": self.duration,
            "agents": agents,
            "usage": {
                "tokens": sum(a["tokens"] for a in agents),
                "cost_usd": sum(a["cost_usd"] for a in agents),
                "tokens_per_min": snap.tokens_per_min,
                "usd_per_hour": snap.usd_per_hour,
                "spend_today_usd": snap.spend_today_usd,
            },
            "alerts": self.alerts,
            "actions": self.actions,
        }


async def watch(client: SupervisorClient, duration: float) -> DemoOutcome:
    """Follow the supervisor's pushes for `duration` seconds and keep what the summary needs."""
    outcome = DemoOutcome(duration=duration)
    with anyio.move_on_after(duration):
        async for kind, data in client.subscribe(1.0, kinds=("snapshot", "action", "alert")):
            if kind == "snapshot":
                outcome.snapshot = Snapshot.from_dict(data)
            elif kind == "action":
                outcome.actions.append(data)
            elif kind == "alert":
                outcome.alerts.append(data)
    stored = await client.request("alerts", limit=500)
    if isinstance(stored, list) and stored:
        outcome.alerts = stored  # the ledger's list has ids and acknowledgements
    return outcome


async def stop_agents(client: SupervisorClient, names: list[str]) -> None:
    """Kill the demo's agents (all at once); ones already gone are fine."""

    async def kill(name: str) -> None:
        with contextlib.suppress(SupervisorError):
            await client.request("kill", agent=name, who="demo", why="the demo ended")

    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(kill, name, name=f"demo.kill-{name}")


def write_config(home: Path, data: dict[str, Any]) -> Path:
    """The demo's tokenwatch.toml inside its home (the supervisor is pointed at it explicitly)."""
    config_dir = Paths.discover({HOME_ENV: str(home)}).config_dir
    config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = config_dir / "tokenwatch.toml"
    path.write_bytes(tomli_w.dumps(data).encode())
    return path

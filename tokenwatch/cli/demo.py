"""`tokenwatch demo`: the whole product offline, with a fake LLM and real agent processes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenwatch.cli.errors import CliError

MAX_DURATION = 86_400.0
"""Seconds: a demo longer than a day is a typo."""

if TYPE_CHECKING:
    from tokenwatch.demo.stage import DemoOutcome


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole thing offline: fake LLM, supervisor, five agents, dashboard",
        description=(
            "Start an offline fake LLM, a private supervisor with its proxy (in a temporary "
            "TOKENWATCH_HOME, so your own ledger is untouched) and five real agent processes using "
            "the official openai and anthropic SDKs: a steady researcher, a bursty coder, a cheap "
            "summariser, a Claude writer and a looper that gets stuck after a few calls and is "
            "paused by the runaway rule. Opens the dashboard; quitting stops everything the demo "
            "started. No network and no API key needed."
        ),
    )
    p.add_argument(
        "--headless",
        action="store_true",
        help="no dashboard: run for --duration seconds and print the final state",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to run (default: until you quit; 30 with --headless)",
    )
    p.add_argument("--json", action="store_true", help="with --headless: print the state as JSON")
    p.add_argument(
        "--home",
        metavar="DIR",
        help="keep the demo's ledger, logs and config in DIR (default: a temporary dir, removed)",
    )
    p.add_argument(
        "--screenshot",
        metavar="FILE.svg",
        help="run the dashboard off-screen for --duration seconds (default 20) and save it as SVG",
    )
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    import shutil

    import anyio

    from tokenwatch.demo.fake_llm import fake_llm_process
    from tokenwatch.demo.stage import DemoError, demo_config, supervisor_process, write_config

    duration = _duration(args)
    screenshot = _screenshot_file(args.screenshot)
    if screenshot is not None:
        duration = duration or 20.0
    elif not args.headless and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise CliError("the demo's dashboard needs a terminal; add --headless to run without it")
    home = _home(args.home)
    try:
        with fake_llm_process("--quiet", "--latency-ms", "120", "--chunk-ms", "4") as url:
            config_file = write_config(home, demo_config(url, os.getpid()))
            with supervisor_process(home, config_file) as proc:
                outcome = anyio.run(_staged, home, proc, args.headless, duration, screenshot)
    except DemoError as exc:
        raise CliError(str(exc)) from None
    except RuntimeError as exc:  # fake-llm did not start
        raise CliError(str(exc)) from None
    finally:
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    if screenshot is not None:
        print(f"tokenwatch demo: dashboard saved to {screenshot}")
    elif outcome is None:
        print("tokenwatch demo: stopped the demo agents, the supervisor and the fake LLM")
    elif args.json:
        print(json.dumps(outcome.to_dict(), indent=2))
    else:
        print(summary_text(outcome))
    return 0


def _duration(args: argparse.Namespace) -> float | None:
    if args.json and not args.headless:
        raise CliError("--json goes with --headless")
    duration = args.duration
    if duration is None:
        return 30.0 if args.headless else None
    if not 0 < duration < MAX_DURATION:  # NaN fails this too
        raise CliError(f"--duration must be above zero and under a day, not {duration:g}")
    return float(duration)


def _screenshot_file(text: str | None) -> Path | None:
    if text is None:
        return None
    path = Path(text).resolve()
    if path.is_dir():
        raise CliError(f"--screenshot {text}: a directory; give a file name like dashboard.svg")
    if not path.parent.is_dir():
        raise CliError(f"--screenshot {text}: no directory {path.parent}")
    return path


def _home(text: str | None) -> Path:
    import tempfile

    if text is None:
        return Path(tempfile.mkdtemp(prefix="twdemo-"))
    home = Path(text).expanduser()
    if home.exists() and not home.is_dir():
        raise CliError(f"--home {text}: not a directory")
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--home {text}: {exc.strerror or exc}") from None
    if not os.access(home, os.W_OK | os.X_OK):
        raise CliError(f"--home {text}: not writable")
    return home


async def _staged(
    home: Path, proc: Any, headless: bool, duration: float | None, screenshot: Path | None
) -> DemoOutcome | None:
    import anyio

    from tokenwatch.demo.stage import connect_when_ready, launch_agents, stop_agents, watch
    from tokenwatch.supervisor.policy import load_config

    client = await connect_when_ready(home, proc)
    async with client:
        config = load_config(Path(proc.args[-1]))
        names = await launch_agents(client, list(config.agents))
        try:
            if headless:
                assert duration is not None
                return await watch(client, duration)
            from tokenwatch.cli.dashboard import run_dashboard
            from tokenwatch.tui.source import SupervisorSource

            if screenshot is not None:
                assert duration is not None
                await _screenshot(SupervisorSource(client), screenshot, duration)
                return None

            with anyio.move_on_after(duration if duration is not None else float("inf")):
                await run_dashboard(
                    SupervisorSource(client),
                    address=str(client.socket_path),
                    launchable=sorted(config.agents),
                )
            return None
        finally:
            with anyio.CancelScope(shield=True):
                await stop_agents(client, names)


async def _screenshot(source: Any, path: Path, duration: float) -> None:
    """The dashboard as the demo shows it after `duration` seconds, exported by the app itself."""
    import anyio

    from tokenwatch.tui.app import build_app

    app = build_app(source, address="demo")

    async def shoot() -> None:
        await anyio.sleep(duration)
        app.save_screenshot(filename=path.name, path=str(path.parent))
        app.exit()

    async with anyio.create_task_group() as tg:
        tg.start_soon(shoot, name="demo.screenshot")
        await app.run_async(headless=True, size=(150, 40))


def summary_text(outcome: DemoOutcome) -> str:
    """The headless demo's final state as a few aligned lines."""
    from tokenwatch.core.quantities import format_tokens, format_usd

    data = outcome.to_dict()
    usage = data["usage"]
    lines = [
        f"tokenwatch demo: {outcome.duration:g} s, {len(data['agents'])} agents, "
        f"{format_tokens(usage['tokens'])} tokens, {format_usd(usage['cost_usd'])}",
        f"{'agent':<16}{'state':<12}{'tokens':>8}{'cost':>10}{'req/min':>9}",
    ]
    for a in data["agents"]:
        lines.append(
            f"{a['name']:<16}{a['state']:<12}{format_tokens(a['tokens']):>8}"
            f"{format_usd(a['cost_usd']):>10}{a['requests_per_min']:>9.0f}"
        )
    lines.append("alerts (newest first):" if data["alerts"] else "alerts: none")
    for alert in sorted(data["alerts"], key=lambda a: -float(a.get("ts", 0))):
        lines.append(
            f"  {alert.get('severity', ''):<9}{alert.get('rule', '')}: {alert.get('agent', '')}: "
            f"{alert.get('message', '')} -> {alert.get('action', '')}"
        )
    lines.append("actions:" if data["actions"] else "actions: none")
    for action in data["actions"]:
        lines.append(
            f"  {action.get('kind', '')} {action.get('agent', '')} by {action.get('who', '')}"
            f" ({action.get('why', '')})"
        )
    return "\n".join(lines)

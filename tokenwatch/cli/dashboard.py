"""`tokenwatch` / `tokenwatch dashboard`: the live dashboard, a client of the supervisor."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from tokenwatch.cli.errors import CliError

if TYPE_CHECKING:
    from tokenwatch.tui.source import DashboardSource


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dashboard",
        help="open the live dashboard (what `tokenwatch` alone does)",
        description=(
            "Open the live dashboard: burn rates, budgets, top spenders and alerts, with keys to "
            "pause (p), kill (k), throttle (t) and budget (b) the selected agent; ? lists them all. "
            "Starts the supervisor in the background when none runs. Quitting leaves the agents "
            "running under the supervisor."
        ),
    )
    add_dashboard_arguments(p)
    p.set_defaults(func=open_dashboard)


def add_dashboard_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between snapshots from the supervisor (default 1)",
    )
    p.add_argument(
        "--max-rows",
        type=int,
        default=100,
        metavar="N",
        help="agents shown in the table at most; filter with / to find the rest (default 100)",
    )


def open_dashboard(args: argparse.Namespace) -> int:
    """Connect to (or start) the supervisor, run the dashboard inside that connection, say goodbye."""
    import anyio

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise CliError(
            "the dashboard needs a terminal; `tokenwatch status` prints the same figures"
        )
    interval = float(getattr(args, "interval", 1.0))
    max_rows = int(getattr(args, "max_rows", 100))
    if interval <= 0 or max_rows <= 0:
        raise CliError("--interval and --max-rows must be above zero")
    code = anyio.run(_dashboard, interval, max_rows)
    from tokenwatch.tui.app import QUIT_NOTE

    print(QUIT_NOTE, file=sys.stderr)
    return code


async def _dashboard(interval: float, max_rows: int) -> int:
    from tokenwatch.client.control import SupervisorClient, SupervisorError
    from tokenwatch.paths import Paths
    from tokenwatch.supervisor.policy import load_config
    from tokenwatch.tui.source import SupervisorSource

    paths = Paths.discover()
    config = load_config(paths=paths)
    try:
        client = await SupervisorClient.connect(paths, start=True)
    except SupervisorError as exc:
        raise CliError(exc.message) from None
    async with client:
        source = SupervisorSource(
            client,
            interval=interval,
            reconnect=lambda: SupervisorClient.connect(paths, start=False),
        )
        try:
            return await run_dashboard(
                source,
                address=str(client.socket_path),
                launchable=sorted(config.agents),
                max_rows=max_rows,
            )
        finally:
            await source.aclose()


async def run_dashboard(
    source: DashboardSource,
    *,
    address: str,
    launchable: list[str],
    max_rows: int = 100,
) -> int:
    """Run the app until quit; SIGTERM and SIGHUP also end it cleanly, restoring the terminal."""
    import signal

    import anyio

    from tokenwatch.tui.app import build_app

    app = build_app(source, address=address, launchable=launchable, max_rows=max_rows)
    async with anyio.create_task_group() as tg:

        async def exit_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                async for _ in signals:
                    app.exit(return_code=0)
                    return

        tg.start_soon(exit_on_signal, name="dashboard.signals")
        await app.run_async()
        tg.cancel_scope.cancel()
    return app.return_code or 0

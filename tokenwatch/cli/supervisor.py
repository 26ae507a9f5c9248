"""Commands that run or talk to the supervisor: serve, stop, reload, status, pause, resume, kill,
throttle, env, launch, adopt."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from tokenwatch.cli.errors import CliError

if TYPE_CHECKING:
    from tokenwatch.client.control import SupervisorClient
    from tokenwatch.paths import Paths


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the supervisor in the foreground",
        description=(
            "Run the supervisor (socket server, proxy, ledger, budgets, rules) in the foreground "
            "until SIGTERM or Ctrl-C; it then resumes any agent it paused and flushes the ledger. "
            "The proxy also listens on a stable endpoint, http://127.0.0.1:24680 by default "
            "([proxy] endpoint_port; 0 turns it off): a base URL with no token, for a tool's own "
            "settings, whose calls count for the calling process's agent (docs/proxy.md). "
            "Clients start one in the background when none runs, so this is for systemd or a "
            "terminal of its own."
        ),
    )
    p.add_argument("--config", metavar="FILE", help="tokenwatch.toml to use (default: discovered)")
    p.add_argument("--detach", action="store_true", help="start in the background and return")
    p.add_argument("--background", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    p.set_defaults(func=run_serve)

    p = sub.add_parser("stop", help="stop the running supervisor (agents keep running)")
    p.set_defaults(func=run_stop)

    p = sub.add_parser(
        "reload",
        help="apply an edited tokenwatch.toml to the running supervisor",
        description=(
            "Read tokenwatch.toml (and tokenwatch.local.toml) again. Budgets, rules, prices and "
            "agent settings apply at once; [supervisor], [proxy], [alerts] and [export] at the "
            "next start. A broken file changes nothing and is named with the key at fault. The "
            "supervisor also notices an edit by itself within a few seconds."
        ),
    )
    p.set_defaults(func=run_reload)

    p = sub.add_parser(
        "status",
        help="agents with state, pid, tokens, cost and burn rate",
        description=(
            "Show the supervised agents and what each has used so far (the ledger's figures "
            f"for its run). Never starts a supervisor: with none running it says so and exits "
            f'{NOT_RUNNING} (`--json` prints {{"supervisor": null, "agents": []}}).'
        ),
    )
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument(
        "--fleet",
        action="store_true",
        help="the team's other hosts instead ([fleet]): their agents' spend and calls today, "
        "last call and last shipment, read from the team's database (no supervisor needed)",
    )
    p.set_defaults(func=run_status)

    for verb, text, every in (
        ("pause", "stop an agent's process tree (SIGSTOP) and hold its calls",
         "every agent not marked critical"),
        ("resume", "continue a paused agent (SIGCONT) and release its calls",
         "every paused agent (critical ones too)"),
    ):  # fmt: skip
        p = sub.add_parser(verb, help=text, description=text[0].upper() + text[1:] + ".")
        target = p.add_mutually_exclusive_group(required=True)
        target.add_argument("name", nargs="?", help="agent name (see `tokenwatch status`)")
        target.add_argument("--all", action="store_true", help=every)
        _why(p)
        p.set_defaults(func=run_control, verb=verb)

    text = "end an agent's process tree: SIGTERM, then SIGKILL after the grace period"
    p = sub.add_parser("kill", help=text, description=text[0].upper() + text[1:] + ".")
    p.add_argument("name", help="agent name (see `tokenwatch status`)")
    _why(p)
    p.set_defaults(func=run_control, verb="kill")

    p = sub.add_parser(
        "throttle",
        help="slow an agent down without failing it",
        description=(
            "Slow an agent: RATE is tokens per minute (20k/min), dollars per hour ($1/h), a share "
            "of the time it may run (50%, by SIGSTOP/SIGCONT duty cycle), or `off`."
        ),
    )
    p.add_argument("name", help="agent name")
    p.add_argument("rate", help="20k/min, $1/h, 50%% or off")
    _why(p)
    p.set_defaults(func=run_throttle)

    p = sub.add_parser(
        "env",
        help="shell lines that make a process report as an agent and use the proxy",
        description=(
            "Print `export` lines for a process started outside tokenwatch: it then reports as "
            'NAME (SDK) and calls through the proxy. Use: eval "$(tokenwatch env NAME)". A new '
            "NAME is registered with your OPENAI_BASE_URL and ANTHROPIC_BASE_URL as its "
            "upstreams (as `run` does), and ends when the shell that asked exits."
        ),
    )
    p.add_argument("name", help="agent name (an existing agent, or a new one to register)")
    p.add_argument(
        "--pid",
        type=int,
        help="a new agent ends when this process exits (default: the shell that runs this)",
    )
    p.set_defaults(func=run_env)

    p = sub.add_parser("launch", help="start an [agents.NAME] agent from the config")
    p.add_argument("name", help="the NAME of an [agents.NAME] table")
    p.set_defaults(func=run_launch)

    p = sub.add_parser(
        "adopt",
        help="decide about an agent a previous supervisor left behind",
        description="Agents found after a supervisor crash are DETACHED until adopted, killed or forgotten.",
    )
    p.add_argument("name", help="agent name")
    p.add_argument("decision", choices=("adopt", "kill", "forget"))
    p.set_defaults(func=run_adopt)


def _why(p: argparse.ArgumentParser) -> None:
    p.add_argument("--why", default="", help="reason recorded with the action")


# -- running the supervisor ----------------------------------------------------------------


def run_serve(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    import anyio

    from tokenwatch.instance import AlreadyRunning
    from tokenwatch.paths import Paths, socket_path_problem
    from tokenwatch.supervisor.policy import load_config
    from tokenwatch.supervisor.service import serve_until_signalled

    paths = Paths.discover()
    problem = socket_path_problem(paths.socket)
    if problem is not None:
        raise CliError(problem)
    if args.detach:
        return _detach(paths, args)
    config = load_config(Path(args.config) if args.config else None, paths)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        anyio.run(serve_until_signalled, paths, config)
    except AlreadyRunning as exc:
        if args.background:
            return 0  # another client's supervisor won the start race: that one serves
        raise CliError(str(exc)) from None
    return 0


def _detach(paths: Paths, args: argparse.Namespace) -> int:
    """`serve --detach`: a background `serve` with the same options (the config made absolute:
    the background one must find the same file)."""
    from pathlib import Path

    from tokenwatch.instance import StartFailed, ensure_running

    options = ["--config", str(Path(args.config).resolve())] if args.config else []
    options += ["--verbose"] if args.verbose else []
    try:
        started = ensure_running(paths, options=options)
    except StartFailed as exc:
        raise CliError(str(exc)) from None
    if started:
        print(f"supervisor started on {paths.socket}")
        return 0
    ignored = " and ".join(o for o in options if o.startswith("--"))
    if ignored:
        # the one running keeps its own options: the user must know theirs were not applied
        raise CliError(
            f"a supervisor is already running on {paths.socket}; {ignored} not applied "
            "(`tokenwatch stop` it first)"
        )
    print(f"supervisor already running on {paths.socket}")
    return 0


def run_stop(args: argparse.Namespace) -> int:
    data = _call(lambda c: c.request("shutdown"), start=False, none="nothing to stop")
    print(f"supervisor {data['pid']} is stopping")
    return 0


def run_reload(args: argparse.Namespace) -> int:
    data = _call(
        lambda c: c.request("reload"),
        start=False,
        none="the next one reads the config as it starts",
    )
    print(data["summary"])
    return 0


# -- talking to it ---------------------------------------------------------------------------


NO_AGENTS = "no agent is supervised (`tokenwatch run -- CMD` starts one and runs CMD under it)"
NOT_RUNNING = 3
"""`status`'s exit code when no supervisor runs (as an init script's status says "not running")."""


def _call(
    fn: Callable[[SupervisorClient], Awaitable[Any]], *, start: bool, none: str = NO_AGENTS
) -> Any:
    """Connect (starting a supervisor only if `start`), run `fn`, and turn every supervisor
    failure into one clear line; `none` says what it means that none runs."""
    from tokenwatch.client.control import SupervisorError, SupervisorUnavailable

    try:
        return _answer(fn, start=start)
    except SupervisorUnavailable as exc:
        raise CliError(exc.message if start else f"{exc.message}: {none}") from None
    except SupervisorError as exc:
        raise CliError(exc.message) from None


def _answer(fn: Callable[[SupervisorClient], Awaitable[Any]], *, start: bool) -> Any:
    import anyio

    from tokenwatch.client.control import SupervisorClient

    async def go() -> Any:
        async with await SupervisorClient.connect(start=start) as client:
            return await fn(client)

    return anyio.run(go)


def run_status(args: argparse.Namespace) -> int:
    from tokenwatch.client.control import SupervisorError, SupervisorUnavailable

    if args.fleet:
        from tokenwatch.cli.hosts import run_fleet_status

        return run_fleet_status(args)

    try:  # read-only: a status never starts a supervisor, it says there is none
        status = _answer(lambda c: c.request("status"), start=False)
    except SupervisorUnavailable as exc:
        if args.json:
            print(json.dumps({"supervisor": None, "agents": []}, indent=2))
        else:
            print(f"{exc.message}: {NO_AGENTS}")
        return NOT_RUNNING
    except SupervisorError as exc:
        raise CliError(exc.message) from None
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(render_status(status))
    return 0


def render_status(status: dict[str, Any]) -> str:
    from tokenwatch.core.quantities import format_tokens, format_usd

    sup = status["supervisor"]
    lines = [
        f"supervisor pid {sup['pid']} · socket {sup['socket']}"
        + (f" · proxy {sup['proxy_url']}" if sup.get("proxy_url") else "")
        + (f" · endpoint {sup['endpoint_url']}" if sup.get("endpoint_url") else "")
        + f" · {format_usd(status['spend_today_usd'], _partial(status))} today"
    ]
    lines += status.get("fleet", [])  # shared budgets while the team's database is unreachable
    rows = [("NAME", "STATE", "PID", "TOKENS", "COST", "TOK/MIN", "$/HOUR", "THROTTLE")]
    for view in status["agents"]:
        agent, summary = view["agent"], view.get("summary", {})
        rows.append(
            (
                agent["name"],
                agent["state"]
                + (f" ({agent['exit_code']})" if agent.get("exit_code") is not None else ""),
                str(agent["pid"] or "-"),
                format_tokens(summary.get("tokens", 0)),
                format_usd(summary.get("cost_usd"), _partial(summary))
                if summary.get("requests")
                else "-",
                format_tokens(view["tokens_per_min"]),
                format_usd(view["usd_per_hour"]) if view["usd_per_hour"] else "-",
                agent.get("throttle") or "-",
            )
        )
    if len(rows) == 1:
        lines.append("no agents yet: start one with `tokenwatch run -- CMD`")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    if _partial(status) or any(_partial(v.get("summary", {})) for v in status["agents"]):
        from tokenwatch.core.quantities import estimate_note

        sources = [v.get("summary", {}).get("estimated_from") for v in status["agents"]]
        lines.append(
            estimate_note(status.get("estimated_usd", 0.0), next((s for s in sources if s), ""))
        )
    return "\n".join(lines)


def _partial(figures: dict[str, Any]) -> bool:
    """True when a dollar figure holds calls to models no price table knows."""
    return int(figures.get("unpriced_requests") or 0) > 0


def _print_action(action: dict[str, Any]) -> None:
    detail = f" ({action['detail']})" if action.get("detail") else ""
    from tokenwatch.core.actions import past

    verb = past(action["kind"])
    if not action.get("ok", True):
        raise CliError(f"{action['agent']}: could not be {verb}{detail}")
    print(f"{action['agent']} {verb}{detail}")


_NONE_TO = {"pause": "no running agent to pause", "resume": "no paused agent to resume"}


def run_control(args: argparse.Namespace) -> int:
    if getattr(args, "all", False):  # pause --all, resume --all
        kind = f"{args.verb}_all"
        actions = _call(lambda c: c.request(kind, who="cli", why=args.why), start=False)
        for action in actions:
            _print_action(action)
        if not actions:
            print(_NONE_TO[args.verb])
        return 0
    action = _call(
        lambda c: c.request(args.verb, agent=args.name, who="cli", why=args.why), start=False
    )
    _print_action(action)
    return 0


def run_throttle(args: argparse.Namespace) -> int:
    from tokenwatch.core.quantities import QuantityError, parse_rate

    try:
        parse_rate(args.rate)
    except QuantityError as exc:
        raise CliError(str(exc), exit_code=2) from None
    action = _call(
        lambda c: c.request("throttle", agent=args.name, rate=args.rate, who="cli", why=args.why),
        start=False,
    )
    _print_action(action)
    return 0


def run_env(args: argparse.Namespace) -> int:
    import os

    from tokenwatch.cli.run import upstreams
    from tokenwatch.client.control import SupervisorError
    from tokenwatch.core.errors import InvalidRequest
    from tokenwatch.engine.agents import check_name

    try:
        check_name(args.name)  # an empty one would be registered under a name made up for it
    except InvalidRequest as exc:
        raise CliError(exc.message) from None

    async def env(client: SupervisorClient) -> Any:
        try:
            return await client.request("env", agent=args.name)
        except SupervisorError as exc:
            if exc.code != "unknown_agent":
                raise
        registered = await client.request(
            "register",
            name=args.name,
            owner_pid=args.pid or calling_shell(),
            **upstreams(dict(os.environ)),
        )
        return registered["env"]

    values = _call(env, start=True)
    for key in sorted(values):
        print(f"export {key}={shlex.quote(str(values[key]))}")
    return 0


def calling_shell() -> int:
    """The process that ran this one, past the subshell a `$(...)` may fork (a copy of the
    shell, with its command line), which exits as soon as we do."""
    import os

    from tokenwatch.process.processes import ProcessGone, process_info

    pid = os.getppid()
    try:
        while (me := process_info(pid)).ppid > 1 and process_info(me.ppid).argv == me.argv:
            pid = me.ppid
    except ProcessGone:
        pass
    return pid


def run_launch(args: argparse.Namespace) -> int:
    data = _call(lambda c: c.request("launch", name=args.name), start=True)
    print(f"launched {data['name']} (pid {data['pid']})")
    return 0


def run_adopt(args: argparse.Namespace) -> int:
    _call(
        lambda c: c.request("adopt", agent=args.name, decision=args.decision, who="cli"),
        start=False,
    )
    print(f"{args.name}: {args.decision}")
    return 0

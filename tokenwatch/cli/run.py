"""Commands `run` (launch an agent under supervision, in the foreground) and `attach` (adopt one)."""

from __future__ import annotations

import argparse
import os
import re
import time
from typing import TYPE_CHECKING, Any

from tokenwatch import environ
from tokenwatch.cli.errors import CliError
from tokenwatch.core.coding_agents import DOC, plan

if TYPE_CHECKING:
    from tokenwatch.cli.notices import ActionNotices
    from tokenwatch.client.control import SupervisorClient
    from tokenwatch.process.foreground import ForegroundChild

SUPERVISOR_FAILED = 125
"""Exit code when the supervisor cannot be reached or refuses the agent (nothing was run)."""
CANNOT_EXECUTE = 126
COMMAND_NOT_FOUND = 127
UPSTREAM_VARS = {"OPENAI_BASE_URL": "openai_upstream", "ANTHROPIC_BASE_URL": "anthropic_upstream"}
INTERPRETERS = re.compile(r"(python|pypy|node|deno|bun|ruby|perl|php|bash|sh|zsh|dash)[\d.]*")
"""Commands whose script, not themselves, names the agent."""
LAUNCHERS = frozenset({"uv", "uvx", "npx", "poetry", "pipenv", "env", "nice", "nohup", "time"})
"""Commands that run another one: skipped (with their words like `run`) when naming the agent."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run an agent under supervision (tokenwatch run -- CMD ...)",
        description=(
            "Run CMD in this terminal as if run directly (same stdin, stdout, stderr; Ctrl-C and "
            "Ctrl-Z reach it), registered with the supervisor (started in the background if "
            "none runs): its LLM calls go through the tokenwatch proxy (OPENAI_BASE_URL and "
            "ANTHROPIC_BASE_URL are set; yours become the upstreams), Python children report "
            "through the SDK, and it can be paused, throttled or killed. Exits with CMD's exit "
            "code (128+N if killed by signal N) and prints a one-line summary on stderr. "
            f"Exit {SUPERVISOR_FAILED}: no supervisor (see --unsupervised); "
            f"{COMMAND_NOT_FOUND}: CMD not found; {CANNOT_EXECUTE}: CMD not executable."
        ),
    )
    p.add_argument("--name", help="agent name (default: from CMD; made unique, e.g. coder-2)")
    p.add_argument("--task", default="", help="task its calls are attributed to")
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="label for budgets and reports (repeatable)",
    )
    p.add_argument(
        "--budget", help="limit for this run: tokens (200k) or dollars ($2), never a bare number"
    )
    p.add_argument(
        "--critical", action="store_true", help="rules only alert; never pause or kill it"
    )
    p.add_argument(
        "--unsupervised",
        action="store_true",
        help="if no supervisor can be reached, run CMD anyway (with a warning) instead of failing",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the command line and environment CMD would get (known coding agents get "
        "what they need to use the proxy: see docs/agents.md), and run nothing",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no notices when the agent is paused, throttled or killed, no summary line at exit",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the agent")
    p.set_defaults(func=run_run)

    p = sub.add_parser(
        "attach",
        help="put a running process under supervision (pause, throttle, kill)",
        description=(
            "Supervise a process tokenwatch did not start: it can then be paused, throttled "
            "(duty cycle) and killed like any agent. Its calls are only seen if it reports "
            "them: see `tokenwatch env NAME` for the variables to start it with next time."
        ),
    )
    p.add_argument("pid", type=int, help="process id (one of yours)")
    p.add_argument("--name", default="", help="agent name (default: from its command line)")
    p.set_defaults(func=run_attach)


def _tags(pairs: list[str]) -> dict[str, str]:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--tag {pair!r}: expected KEY=VALUE", exit_code=2)
        tags[key.strip()] = value.strip()
    return tags


def _check_budget(budget: str | None) -> None:
    if budget is None:
        return
    from tokenwatch.core.quantities import QuantityError, parse_typed_limit

    try:
        parse_typed_limit(budget)
    except QuantityError as exc:
        raise CliError(f"--budget: {exc}", exit_code=2) from None


def _command(args: argparse.Namespace) -> list[str]:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command or not command[0]:
        raise CliError("nothing to run: tokenwatch run [OPTIONS] -- CMD [ARGS...]", exit_code=2)
    return command


def default_name(command: list[str]) -> str:
    """Something recognisable from CMD: `python agents/coder.py` -> `coder`, `python -m pkg.bot`
    -> `pkg.bot`, `uv run x.py` -> `x`, else the program's name; fit for an agent name."""
    words = [os.path.basename(w) for w in command]
    while words and (words[0] in LAUNCHERS or words[0] in ("run", "exec") or "=" in words[0]):
        words.pop(0)
    name = words[0] if words else "agent"
    if INTERPRETERS.fullmatch(name):
        name = _script_of(command[len(command) - len(words) + 1 :]) or name
    name = re.sub(r"[^A-Za-z0-9._@:+-]+", "-", name.removesuffix(".py")).strip("-.")
    return name[:64] or "agent"


def _script_of(args: list[str]) -> str:
    for i, arg in enumerate(args):
        if arg == "-m" and i + 1 < len(args):
            return args[i + 1]
        if arg in ("-c", "-e", "--eval", "-"):
            return ""
        if not arg.startswith("-"):
            return os.path.splitext(os.path.basename(arg))[0]
    return ""


def upstreams(env: dict[str, str]) -> dict[str, str]:
    """The user's own base URLs become the proxy's upstreams (never the proxy itself)."""
    proxy = env.get(environ.PROXY_URL, "")
    return {
        field: env[var]
        for var, field in UPSTREAM_VARS.items()
        if env.get(var) and not (proxy and env[var].startswith(proxy))
    }


def run_run(args: argparse.Namespace) -> int:
    from tokenwatch.process.foreground import ForegroundChild, Interrupted

    command = _command(args)
    request: dict[str, Any] = {
        "name": args.name or default_name(command),
        "command": command,
        "task": args.task or None,
        "tags": _tags(args.tag) or None,
        "budget": args.budget,
        "launched": True,
        "critical": args.critical or None,
        **upstreams(dict(os.environ)),
    }
    _check_budget(args.budget)
    if args.dry_run:
        print(dry_run(command, str(request["name"])))
        return 0
    registered: list[str] = []
    with ForegroundChild() as child:
        try:
            return _run(child, command, request, registered, args)
        except Interrupted as exc:
            if registered and not child.started:
                _forget_nowait(registered[0], exc.code)
            return exc.code


def _forget_nowait(name: str, code: int) -> None:
    """Interrupted between registering and starting: say so, but never hang on it."""
    import anyio

    from tokenwatch.process.foreground import Interrupted

    async def report() -> None:
        with anyio.move_on_after(2):
            await _report_exit(name, code)

    try:
        anyio.run(report)
    except Interrupted:
        pass


def _run(
    child: ForegroundChild,
    command: list[str],
    request: dict[str, Any],
    registered: list[str],
    args: argparse.Namespace,
) -> int:
    import anyio

    from tokenwatch.client.control import SupervisorError, SupervisorUnavailable

    try:
        since = time.time()
        name, run_id, notices = anyio.run(
            _register_and_start, child, command, request, registered, not args.quiet
        )
    except SupervisorUnavailable as exc:
        if not args.unsupervised:
            raise CliError(
                f"{exc.message} (pass --unsupervised to run without tokenwatch)",
                exit_code=SUPERVISOR_FAILED,
            ) from None
        _warn(f"running unsupervised: {exc.message}")
        name, code, summary = str(request["name"]), _run_unsupervised(child, command), None
    except SupervisorError as exc:
        raise CliError(exc.message, exit_code=SUPERVISOR_FAILED) from None
    else:
        try:
            code = child.wait()
        finally:
            if notices is not None:
                notices.stop()
        summary = anyio.run(_report_exit, name, code, run_id, since)
    if not args.quiet:
        _warn(summary_line(name, code, summary))
    return code


async def _register_and_start(
    child: ForegroundChild,
    command: list[str],
    request: dict[str, Any],
    registered: list[str],
    notify: bool,
) -> tuple[str, str, ActionNotices | None]:
    """Register, spawn with the env the supervisor gave, tell it the pid; returns the name
    (also put in `registered` at once, for the clean-up after an interruption), the run id and, if
    `notify`, the watcher that tells the terminal of actions on the agent (started before the
    agent, so a pause at its first call is told)."""
    import contextlib

    import anyio.to_thread

    from tokenwatch.cli.notices import ActionNotices
    from tokenwatch.client.control import SupervisorClient, SupervisorError

    async with await SupervisorClient.connect() as client:
        reply = await client.request("register", **request)
        name = str(reply["name"])
        registered.append(name)
        env = _child_env(client, name, reply)
        setup = plan(command, env)
        env.update(setup.env)
        command = setup.command
        notices = ActionNotices(name) if notify else None
        if notices is not None:
            await anyio.to_thread.run_sync(notices.start)
        try:
            _start(child, command, env)
        except CliError as exc:
            if notices is not None:
                notices.stop()
            with contextlib.suppress(SupervisorError):
                await client.request("exited", name=name, code=exc.exit_code)
            raise
        await _started(client, child, name)
    return name, str(reply.get("run_id") or ""), notices


async def _started(client: SupervisorClient, child: ForegroundChild, name: str) -> None:
    from tokenwatch.client.control import SupervisorError

    assert child.pid is not None
    try:
        await client.request("started", name=name, pid=child.pid)
    except SupervisorError as exc:
        if child.exited_nowait():
            return  # it was over before the supervisor looked: nothing left to control
        # the agent runs already: carry on, but say it cannot be paused or killed
        _warn(f"{name} runs, but the supervisor did not take hold of it: {exc.message}")


def _child_env(client: SupervisorClient, name: str, reply: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (reply.get("env") or {}).items()})
    env.setdefault(environ.SOCKET, str(client.socket_path))
    env[environ.AGENT] = name
    env[environ.RUN_ID] = str(reply.get("run_id") or "")
    from tokenwatch.client.autoinstrument import child_env

    return child_env(env)


def _start(child: ForegroundChild, command: list[str], env: dict[str, str]) -> int:
    try:
        return child.start(command, env=env)
    except FileNotFoundError:
        raise CliError(f"{command[0]}: command not found", exit_code=COMMAND_NOT_FOUND) from None
    except PermissionError:
        raise CliError(f"{command[0]}: permission denied", exit_code=CANNOT_EXECUTE) from None
    except OSError as exc:
        raise CliError(f"{command[0]}: {exc.strerror}", exit_code=CANNOT_EXECUTE) from None


async def _report_exit(
    name: str, code: int, run_id: str = "", since: float = 0.0
) -> dict[str, Any] | None:
    """Tell the supervisor the agent ended; its summary, or, if the supervisor is gone, what
    the ledger holds for the run (None if nothing)."""
    from tokenwatch.client.control import SupervisorClient, SupervisorError

    try:
        async with await SupervisorClient.connect(start=False) as client:
            reply = await client.request("exited", name=name, code=code)
    except SupervisorError as exc:
        _warn(f"could not report the exit to the supervisor: {exc.message}")
        return await _summary_from_ledger(name, run_id, since)
    summary = (reply or {}).get("summary")
    return summary if isinstance(summary, dict) else None


async def _summary_from_ledger(name: str, run_id: str, since: float) -> dict[str, Any] | None:
    from tokenwatch.ledger.store import Store, StoreUnavailable
    from tokenwatch.paths import Paths

    db = Paths.discover().db
    if not run_id or not db.is_file():
        return None
    try:
        async with await Store.open_read_only(db) as store:
            runs = await store.sessions(since - 1.0, agent=name)
    except StoreUnavailable:
        return None
    for run in runs:
        if run.run_id == run_id:
            priced = run.requests > run.unpriced_requests
            cost = run.cost_usd if priced else None
            return {"tokens": run.total_tokens, "cost_usd": cost, "requests": run.requests}
    return None


def _run_unsupervised(child: ForegroundChild, command: list[str]) -> int:
    _start(child, command, dict(os.environ))
    return child.wait()


def summary_line(name: str, code: int, summary: dict[str, Any] | None) -> str:
    """`NAME exited 0 · 12,345 tokens · $0.0123 · 7 requests · paused by rule:runaway`, the
    cost marked `*` and explained when some calls were to models no price table knows."""
    from tokenwatch.core.quantities import format_usd

    parts = [f"{name} exited {code}{_signal_note(code)}"]
    if summary is not None:
        requests = int(summary.get("requests") or 0)
        unpriced = int(summary.get("unpriced_requests") or 0)
        cost = format_usd(summary.get("cost_usd"), unpriced > 0) if requests else "$0"
        if unpriced:
            source = summary.get("estimated_from")
            how = f"price: estimated from {source}" if source else "unpriced"
            cost += f" ({unpriced:,} call{'' if unpriced == 1 else 's'} {how})"
        parts += [
            f"{int(summary.get('tokens') or 0):,} tokens",
            cost,
            f"{requests:,} request{'' if requests == 1 else 's'}",
            *[str(action) for action in summary.get("actions") or []],
        ]
        if not requests:
            parts.append(f"no LLM call went through tokenwatch (if it made any: {DOC})")
    return " · ".join(parts)


def dry_run(command: list[str], name: str) -> str:
    """What `run` would start, with the proxy's URLs as placeholders (nothing is registered)."""
    import shlex

    env = {
        "OPENAI_BASE_URL": "http://127.0.0.1:PORT/a/TOKEN/v1",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:PORT/a/TOKEN",
        environ.AGENT: name,
        environ.ENDPOINT: "http://127.0.0.1:EPORT",
    }
    setup = plan(command, env)
    lines = [
        f"agent:   {name} ({setup.agent or 'not a coding agent tokenwatch knows'})",
        f"command: {shlex.join(setup.command)}",
        *[f"env:     {key}={value}" for key, value in sorted({**env, **setup.env}.items())],
        *[f"note:    {note}" for note in setup.notes],
        f"(PORT and TOKEN are given when it starts; EPORT is the stable endpoint's, "
        f"[proxy] endpoint_port, when it listens; see {DOC})",
    ]
    return "\n".join(lines)


def _signal_note(code: int) -> str:
    import signal

    if code <= 128:
        return ""
    try:
        return f" ({signal.Signals(code - 128).name})"
    except ValueError:
        return ""


def _warn(message: str) -> None:
    import sys

    print(f"tokenwatch: {message}", file=sys.stderr, flush=True)


def run_attach(args: argparse.Namespace) -> int:
    import anyio

    from tokenwatch.client.control import SupervisorError, SupervisorUnavailable

    _check_attachable(args.pid)

    async def attach() -> Any:
        from tokenwatch.client.control import SupervisorClient

        async with await SupervisorClient.connect() as client:
            return await client.request("attach", pid=args.pid, name=args.name or None)

    try:
        reply = anyio.run(attach)
    except SupervisorUnavailable as exc:
        raise CliError(exc.message, exit_code=SUPERVISOR_FAILED) from None
    except SupervisorError as exc:
        raise CliError(exc.message) from None
    name = reply["name"]
    print(f"attached pid {args.pid} as {name}: tokenwatch pause|throttle|kill {name}")
    return 0


def _check_attachable(pid: int) -> None:
    """One clear line for a pid that cannot be supervised, before bothering the supervisor."""
    from tokenwatch.process.processes import NotPermitted, ProcessGone, check_controllable

    try:
        check_controllable(pid)
    except ProcessGone:
        raise CliError(f"no process with pid {pid}") from None
    except NotPermitted as exc:
        raise CliError(str(exc)) from None

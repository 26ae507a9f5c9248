"""Commands `budget set|list|rm`, `alerts` and `rules test`: budgets, what fired, and rules tried on history."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenwatch.cli.errors import CliError
from tokenwatch.core.actions import ACTIONS

if TYPE_CHECKING:
    from tokenwatch.client.control import SupervisorClient
    from tokenwatch.config import BudgetSettings, Config
    from tokenwatch.core.models import Alert, BudgetStatus
    from tokenwatch.ledger.store import Store

SCOPES = ("global", "agent", "task", "model", "user", "tag")
PERIODS = ("request", "task", "hour", "day", "week", "month", "total")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "budget",
        help="set, list or remove budgets",
        description=(
            "Budgets cap tokens or dollars per scope (global, agent, task, model, user, tag) and "
            "period. Edits are saved to tokenwatch.local.toml beside the config in use (the "
            "running supervisor's; never to the file you wrote), the path is printed, and a "
            "running supervisor applies them at once."
        ),
    )
    actions = p.add_subparsers(dest="budget_command", metavar="ACTION", required=True)
    _add_set(actions)
    q = actions.add_parser("list", help="limit, used, remaining, reset time and forecast")
    q.add_argument("--json", action="store_true", help="print the statuses as JSON")
    _config_option(q, "tokenwatch.toml whose budgets to show when no supervisor runs")
    q.set_defaults(func=run_list)
    q = actions.add_parser("rm", help="remove a budget by name (see `budget list`)")
    q.add_argument("name", metavar="NAME", help="the budget's name, as `budget list` shows it")
    _config_option(q)
    q.set_defaults(func=run_rm)

    p = sub.add_parser(
        "alerts",
        help="what budgets and rules fired, and what was done",
        description="List alerts (newest last), from the supervisor or else from the ledger.",
    )
    p.add_argument(
        "--since", default="24h", help="how far back: 1h, 7d, today, 2026-11-01 (default 24h)"
    )
    p.add_argument(
        "--limit", type=_limit, default=200, metavar="N", help="at most this many (default 200)"
    )
    p.add_argument("--json", action="store_true", help="print the alerts as JSON")
    p.set_defaults(func=run_alerts)

    p = sub.add_parser("rules", help="try the budgets and rules on stored history")
    rules = p.add_subparsers(dest="rules_command", metavar="ACTION", required=True)
    q = rules.add_parser(
        "test",
        help="replay stored usage through the budgets and rules; changes nothing",
        description=(
            "Replay the ledger's events through the configured budgets and [[rule]]s (the "
            "defaults when there are none) on a replay clock, and print what would have fired "
            "and when. Nothing is paused, stored or sent: tune a rule before turning it on."
        ),
    )
    q.add_argument(
        "--since", default="7d", help="how far back: 1h, 7d, today, 2026-11-01 (default 7d)"
    )
    q.add_argument("--json", action="store_true", help="print what fired as JSON")
    _config_option(q, "tokenwatch.toml whose budgets and rules to try")
    q.set_defaults(func=run_rules_test)


def _add_set(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = actions.add_parser(
        "set",
        help="add a budget, or change one",
        description=(
            "Add a budget or change one (same name). Options not given keep the budget's "
            "current value. Examples: `budget set agent:researcher '$5' --action pause`, "
            "`budget set global 2M --period week`, `budget set tag:team=ml '$50' --period month`."
        ),
    )
    q.add_argument(
        "scope",
        metavar="SCOPE[:NAME]",
        help="global, or agent/task/model/user:NAME (a glob: each match gets its own limit), "
        "or tag:KEY=VALUE (a value glob works) or tag:KEY (any value)",
    )
    q.add_argument(
        "limit",
        metavar="LIMIT",
        help="tokens (200k, 1.5M) or dollars ('$5'); a bare number is refused (5k or $5?)",
    )
    q.add_argument("--period", choices=PERIODS, help="default: day")
    q.add_argument("--action", choices=ACTIONS, help="what happens at the limit (default: alert)")
    q.add_argument("--warn", metavar="PCTS", help="warning thresholds in %% (default: 50,80,100)")
    q.add_argument("--name", help="budget name (default: SCOPE:NAME:PERIOD)")
    q.add_argument("--rolling", action="store_true", help="a rolling window, not calendar-aligned")
    q.add_argument("--rate", help="throttle rate when the action is throttle (20k/min, 50%%)")
    _config_option(q)
    q.set_defaults(func=run_set)


def _config_option(p: argparse.ArgumentParser, text: str = "tokenwatch.toml to edit") -> None:
    p.add_argument("--config", metavar="FILE", help=f"{text} (default: discovered)")


# -- budget set / rm --------------------------------------------------------------------------


def run_set(args: argparse.Namespace) -> int:
    from tokenwatch.core.budgets import is_run_budget
    from tokenwatch.supervisor.overlay import budget_entry, set_budget

    config = _load(args.config)
    budget = _budget_from_args(args, config)
    entry = budget_entry(budget)
    if is_run_budget(entry["name"]):
        return _set_run_limit(args, entry)
    where = _edit(
        args.config,
        config,
        lambda: set_budget(config, budget),
        lambda c: c.request("set_budget", budget=entry),
    )
    period = "" if budget.period == "total" else f" per {budget.period}"
    print(
        f"budget {entry['name']}: {budget.limit}{period}, {budget.action} at the limit, "
        f"warnings at {', '.join(f'{w}%' for w in budget.warn) or 'none'} ({where})"
    )
    return 0


def _edit(
    explicit: str | None,
    config: Config,
    save: Callable[[], object],
    tell: Callable[[SupervisorClient], Awaitable[Any]],
) -> str:
    """Save a budget edit beside the config in use and apply it; says where it went. The config
    in use is the running supervisor's (it saves the edit itself), unless --config names one."""
    from tokenwatch.supervisor.overlay import overlay_file

    if explicit is None:
        answer = _from_supervisor(tell)
        if answer is not None:
            return f"saved to {answer['saved_to']} and applied"
    with _saving(config):
        save()
    saved = overlay_file(config)
    if explicit is None:
        return f"saved to {saved}; no supervisor is running, it applies when one starts"
    try:
        answer = _from_supervisor(tell)
    except CliError as exc:
        print(f"tokenwatch: the supervisor did not apply it: {exc}", file=sys.stderr)
        return f"saved to {saved}; applies when the supervisor restarts"
    if answer is None:
        return f"saved to {saved}; no supervisor is running, it applies when one starts"
    if Path(answer["saved_to"]) != saved:
        return f"saved to {saved}, and applied by the supervisor, which saved it to {answer['saved_to']}"
    return f"saved to {saved} and applied"


@contextlib.contextmanager
def _saving(config: Config) -> Iterator[None]:
    """An edit of the overlay file; a file that cannot be written is one clear line."""
    from tokenwatch.supervisor.overlay import overlay_file

    try:
        yield
    except OSError as exc:
        raise CliError(
            f"cannot save budgets to {overlay_file(config)}: {exc.strerror or exc}"
        ) from None


def _set_run_limit(args: argparse.Namespace, entry: dict[str, Any]) -> int:
    """A run's budget (`tokenwatch run --budget`) lives in the supervisor and ends with its run:
    only its limit changes, and nothing is saved."""
    kept = [f"--{o}" for o in ("action", "warn", "rolling", "rate") if getattr(args, o)]
    if kept:
        raise CliError(
            f"{entry['name']} is a run's budget: only its limit can change ({', '.join(kept)} "
            "stays as `tokenwatch run --budget` set it)"
        )
    answer = _from_supervisor(lambda c: c.request("set_budget", budget=entry))
    if answer is None:
        raise CliError(f"no supervisor is running, so no run has the budget {entry['name']}")
    status = answer["status"]
    print(
        f"budget {entry['name']}: {_amount(status['limit'], status['unit'])} for this run of "
        f"{status['target']}, {_amount(status['used'], status['unit'])} used so far "
        "(applied; not saved: it ends with the run)"
    )
    return 0


def run_rm(args: argparse.Namespace) -> int:
    from tokenwatch.core.budgets import is_run_budget
    from tokenwatch.supervisor.overlay import UnknownBudget, remove_budget

    if is_run_budget(args.name):
        if _from_supervisor(lambda c: c.request("remove_budget", name=args.name)) is None:
            raise CliError(f"no supervisor is running, so no run has the budget {args.name}")
        print(f"budget {args.name} removed for the rest of the run")
        return 0
    config = _load(args.config)
    name = _budget_named(args.name, config, in_supervisor=args.config is None)
    try:
        where = _edit(
            args.config,
            config,
            lambda: remove_budget(config, name),
            lambda c: c.request("remove_budget", name=name),
        )
    except UnknownBudget as exc:
        raise CliError(str(exc)) from None
    print(f"budget {name} removed ({where})")
    return 0


def _budget_named(name: str, config: Config, *, in_supervisor: bool) -> str:
    """The budget `name` means: its full name, or the one budget of SCOPE[:NAME] (`agent:x`
    for `agent:x:day`, as `budget set agent:x` names it)."""
    from tokenwatch.core.budgets import budget_name

    rows = _from_supervisor(lambda c: c.request("budgets")) if in_supervisor else None
    known = (
        [r["name"] for r in rows] if rows is not None else [budget_name(b) for b in config.budget]
    )
    if name in known:
        return name
    matches = [k for k in known if k.startswith(name.rstrip(":") + ":")]
    if len(matches) > 1:
        raise CliError(f"{name} has several budgets: {', '.join(sorted(matches))}; name one")
    return matches[0] if matches else name


def _budget_from_args(args: argparse.Namespace, config: Config) -> BudgetSettings:
    import dataclasses

    from tokenwatch.config import BudgetSettings
    from tokenwatch.core.budgets import BudgetError, budget_name, check_budget

    scope, target = _scope(args.scope)
    period = args.period or "day"
    name = args.name or f"{scope}:{target}:{period}"
    base = next((b for b in config.budget if budget_name(b) == name), None)
    if base is None:
        base = BudgetSettings(scope=scope, target=target, period=period)
    _typed_limit(args.limit)
    changes: dict[str, Any] = {"name": name, "scope": scope, "target": target, "limit": args.limit}
    if args.period:
        changes["period"] = args.period
    if args.action:
        changes["action"] = args.action
    if args.warn is not None:
        changes["warn"] = _warn(args.warn)
    if args.rolling:
        changes["rolling"] = True
    if args.rate:
        changes["rate"] = args.rate
    budget = dataclasses.replace(base, **changes)
    try:
        check_budget(budget)
    except BudgetError as exc:
        raise CliError(str(exc)) from None
    return budget


def _typed_limit(text: str) -> None:
    from tokenwatch.core.quantities import QuantityError, parse_typed_limit

    try:
        parse_typed_limit(text)
    except QuantityError as exc:
        raise CliError(f"LIMIT: {exc}", exit_code=2) from None


def _scope(text: str) -> tuple[str, str]:
    scope, colon, target = text.partition(":")
    if scope not in SCOPES:
        raise CliError(f"unknown scope {scope!r}: use global, or {'/'.join(SCOPES[1:])}:NAME")
    if scope == "global":
        if target:
            raise CliError("a global budget has no name after 'global'; use --name to name it")
        return scope, "*"
    if not colon or not target:
        raise CliError(f"say what the {scope} budget covers: {scope}:NAME (a glob like '*' works)")
    return scope, target


def _warn(text: str) -> list[int]:
    if text.strip() in ("", "none"):
        return []
    try:
        values = [int(part.strip().rstrip("%")) for part in text.split(",")]
    except ValueError:
        raise CliError(f"--warn takes percentages like 50,80,100, not {text!r}") from None
    return values


# -- budget list ------------------------------------------------------------------------------


def run_list(args: argparse.Namespace) -> int:
    from tokenwatch.core.models import BudgetStatus

    rows = _from_supervisor(lambda c: c.request("budgets"))
    if rows is not None:
        statuses = [BudgetStatus.from_dict(r) for r in rows]
    else:
        statuses = _run(_statuses_from_ledger(_load(args.config)))
    if args.json:
        print(json.dumps([s.to_dict() for s in statuses], indent=2))
        return 0
    if not statuses:
        print("no budgets (add one with `tokenwatch budget set global 1M`)")
        return 0
    print(render_statuses(statuses, now=time.time()))
    return 0


async def _statuses_from_ledger(config: Config) -> list[BudgetStatus]:
    budgets = _budgets(config)
    store = await _open_ledger()
    if store is not None:
        async with store:
            await budgets.seed(store)
    statuses: list[BudgetStatus] = budgets.statuses()
    return statuses


def _budgets(config: Config) -> Any:
    from tokenwatch.core.budgets import BudgetError, Budgets
    from tokenwatch.core.quantities import QuantityError

    try:
        return Budgets(config.budget, tz=config.supervisor.timezone)
    except (BudgetError, QuantityError) as exc:
        raise CliError(str(exc)) from None


def render_statuses(statuses: list[BudgetStatus], *, now: float) -> str:
    header = ("BUDGET", "TARGET", "PERIOD", "LIMIT", "USED", "LEFT", "RESETS", "RUNS OUT", "ACTION")
    rows = [header]
    for s in statuses:
        rows.append(
            (
                s.name,
                s.target,
                s.period,
                _amount(s.limit, s.unit),
                f"{_amount(s.used, s.unit, s.estimated_usd > 0)} ({s.fraction:.0%})",
                _amount(s.remaining, s.unit),
                _time(s.resets_at, now),
                _time(s.forecast_exhausted_at, now) if s.forecast_exhausted_at else "-",
                s.action,
            )
        )
    table = _table(rows)
    from tokenwatch.core.quantities import estimate_note

    notes = [
        estimate_note(s.estimated_usd, s.estimated_from, f"{s.name} ({s.target})")
        for s in statuses
        if s.estimated_usd > 0
    ]
    return "\n".join([table, *notes])


def _amount(value: float, unit: str, partial: bool = False) -> str:
    from tokenwatch.core.quantities import format_tokens, format_usd

    return format_usd(value, partial) if unit == "usd" else format_tokens(value)


def _time(ts: float | None, now: float) -> str:
    import datetime as dt

    if ts is None:
        return "-"
    moment = dt.datetime.fromtimestamp(ts).astimezone()
    today = dt.datetime.fromtimestamp(now).astimezone().date()
    return f"{moment:%H:%M}" if moment.date() == today else f"{moment:%Y-%m-%d %H:%M}"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return "\n".join(line.rstrip() for line in lines)


# -- alerts -----------------------------------------------------------------------------------


def run_alerts(args: argparse.Namespace) -> int:
    from tokenwatch.core.models import Alert

    since = _since(args.since)
    rows = _from_supervisor(lambda c: c.request("alerts", since=since, limit=args.limit))
    if rows is not None:
        alerts = [Alert.from_dict(r) for r in rows]
    else:
        alerts = _run(_alerts_from_ledger(since, args.limit))
    alerts.sort(key=lambda a: (a.ts, a.id or 0))
    if args.json:
        print(json.dumps([a.to_dict() for a in alerts], indent=2))
        return 0
    if not alerts:
        print(f"no alerts since {args.since}")
        return 0
    print(render_alerts(alerts))
    return 0


async def _alerts_from_ledger(since: float, limit: int) -> list[Alert]:
    store = await _open_ledger()
    if store is None:
        return []
    async with store:
        alerts: list[Alert] = await store.list_alerts(since=since, limit=limit)
        return alerts


def render_alerts(alerts: list[Alert]) -> str:
    import datetime as dt

    rows = [("TIME", "SEVERITY", "AGENT", "RULE", "ACTION", "MESSAGE")]
    for a in alerts:
        when = dt.datetime.fromtimestamp(a.ts).astimezone()
        rows.append((f"{when:%Y-%m-%d %H:%M:%S}", a.severity, a.agent, a.rule, a.action, a.message))
    return _table(rows)


# -- rules test -------------------------------------------------------------------------------


def run_rules_test(args: argparse.Namespace) -> int:
    from tokenwatch.core.replay import ReplayResult

    config = _load(args.config)
    since = _since(args.since)
    result: ReplayResult = _run(_replay(config, since))
    if args.json:
        print(json.dumps([f.to_dict() for f in result.fired], indent=2))
        return 0
    print(render_replay(result, args.since))
    return 0


async def _replay(config: Config, since: float) -> Any:
    from tokenwatch.core.replay import Replay
    from tokenwatch.core.rules import DEFAULT_RULES, RuleError

    _budgets(config)  # a clear error for a bad budget before reading anything
    critical = {name for name, agent in config.agents.items() if agent.critical}
    try:
        replay = Replay(
            config.budget,
            config.rule or DEFAULT_RULES,
            since=since,
            tz=config.supervisor.timezone,
            is_critical=critical.__contains__,
        )
    except RuleError as exc:
        raise CliError(str(exc)) from None
    store = await _open_ledger()
    if store is None:
        return replay.result
    async with store:
        return await replay.feed_store(store)


def render_replay(result: Any, since_text: str) -> str:
    from collections import Counter

    if result.events == 0:
        return f"no usage since {since_text}: nothing to replay"
    lines = [f"replayed {result.events} calls since {since_text}; nothing was changed"]
    if not result.fired:
        lines.append("nothing would have fired")
        return "\n".join(lines)
    alerts = [f.signal.alert for f in result.fired]
    lines.append(render_alerts(alerts))
    counts = Counter((a.rule, a.action) for a in alerts)
    summary = ", ".join(f"{rule} {action} x{n}" for (rule, action), n in counts.most_common())
    lines.append(f"would have fired {len(alerts)} times: {summary}")
    return "\n".join(lines)


# -- plumbing ---------------------------------------------------------------------------------


def _load(path: str | None) -> Config:
    from tokenwatch.supervisor.policy import load_config

    return load_config(Path(path) if path else None)


def _limit(text: str) -> int:
    from tokenwatch.cli.ledger import positive_int
    from tokenwatch.ledger.store import MAX_ROWS

    # Beyond what SQLite can bind, a bound is no bound: same answer as the largest one.
    return min(positive_int(text), MAX_ROWS)


def _since(text: str) -> float:
    from tokenwatch.cli.ledger import moment

    return moment("--since", text, start=True)


def _run(coro: Awaitable[Any]) -> Any:
    import anyio

    from tokenwatch.core.errors import StoreUnavailable

    async def go() -> Any:
        return await coro

    try:
        return anyio.run(go)
    except StoreUnavailable as exc:  # a damaged ledger can open and fail at the first read
        raise CliError(str(exc)) from None


async def _open_ledger() -> Store | None:
    """The ledger for reading, if anything was ever recorded (reading never creates one)."""
    from tokenwatch.core.errors import StoreUnavailable
    from tokenwatch.ledger.store import Store
    from tokenwatch.paths import Paths

    path = Paths.discover().db
    if not path.is_file():
        return None
    try:
        return await Store.open_read_only(path)
    except StoreUnavailable as exc:
        raise CliError(str(exc)) from None


def _from_supervisor(fn: Callable[[SupervisorClient], Awaitable[Any]]) -> Any:
    """The running supervisor's answer, or None when none runs."""
    from tokenwatch.client.control import SupervisorClient, SupervisorError, SupervisorUnavailable

    async def go() -> Any:
        async with await SupervisorClient.connect(start=False) as client:
            return await fn(client)

    try:
        return _run(go())
    except SupervisorUnavailable:
        return None
    except SupervisorError as exc:
        raise CliError(exc.message) from None

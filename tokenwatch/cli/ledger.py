"""`tokenwatch import` and `report`: the ledger from the shell."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tokenwatch.cli import settings
from tokenwatch.cli.errors import CliError

if TYPE_CHECKING:
    import datetime

    from tokenwatch.core.models import UsageEvent
    from tokenwatch.core.pricing import PriceTable
    from tokenwatch.ledger.importer import LineError
    from tokenwatch.ledger.report import Report
    from tokenwatch.ledger.store import Store

GROUPS = ("agent", "task", "model", "user", "provider", "day", "week", "month", "session")
FILTERS = ("agent", "task", "model", "user", "provider")
IMPORT_BATCH = 5000
MAX_ERRORS_SHOWN = 20


def register(subparsers: Any) -> None:
    _register_import(subparsers)
    _register_report(subparsers)


def _register_import(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "import",
        help="store usage events from a JSON-lines file (or stdin), or a coding agent's logs",
        description=(
            "Read usage events, one JSON object per line, in the shape `tokenwatch export` "
            "writes (field names of the usage event: ts, agent, model, input_tokens, "
            "output_tokens, cache_read_tokens, ... cost_usd). `ts` is Unix seconds or ISO 8601 "
            "(without an offset: the configured time zone). Missing fields take their defaults; "
            "events without cost_usd are priced with the current price table. Each bad line is "
            "reported with its number and skipped; the good ones are stored. A line already "
            "imported (same call_id, or same content) is stored once. Exit status: 0 when every "
            "line was good, 1 when some were skipped (the rest is stored), 2 for a bad config or a "
            "command-line mistake."
        ),
    )
    p.add_argument("file", metavar="FILE", nargs="?", help="JSON-lines file; '-' reads stdin")
    p.add_argument(
        "--from",
        dest="agent_logs",
        choices=("claude-code", "codex", "gemini"),
        help="instead of FILE: a coding agent's session logs (~/.claude/projects, "
        "~/.codex/sessions, ~/.gemini/tmp; see docs/agents.md), each call once however often "
        "it is logged (the supervisor follows them live: [session_logs])",
    )
    p.add_argument("--path", metavar="DIR", help="with --from: where its logs are")
    p.add_argument(
        "--since", help="with --from: calls from then on (1h, 7d, today, 2026-11-01; default all)"
    )
    p.add_argument(
        "--no-price",
        action="store_true",
        help="store events without cost_usd as unpriced instead of pricing them now",
    )
    p.set_defaults(func=run_import)


def _register_report(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report",
        help="tokens and cost per agent, task, model, user, provider, day, week, month or session",
        description=(
            "Summarise stored usage over a window: per group, requests, input/cached/output/"
            "reasoning tokens, cost, average tokens per call, output/input ratio, cost per "
            "task and errors, with a total row. Cost marked * leaves out calls to models "
            "the price table does not know. JSON and CSV use the usage event's field names "
            "(input_tokens, ..., cost_usd) plus total_tokens."
        ),
    )
    p.add_argument(
        "--since",
        default="24h",
        help="start: 1h, 24h, 7d (ago), today, or a date/time like 2026-11-01 (default 24h)",
    )
    p.add_argument("--until", default=None, help="end, same forms as --since (default: now)")
    p.add_argument(
        "--by",
        choices=GROUPS,
        default="agent",
        help="grouping (default agent); week starts on Monday; a session is one run of an agent "
        "(`tokenwatch run`), with when it started and last called",
    )
    p.add_argument(
        "--format",
        choices=("table", "json", "csv"),
        default="table",
        help="output format (default table)",
    )
    p.add_argument("--top", type=positive_int, default=None, metavar="N", help="largest N groups")
    p.add_argument(
        "--savings",
        action="store_true",
        help="what each lever (cache, switch, trim) saved per agent: calls, share, tokens, "
        "dollars (with --since, --until and --format table or json)",
    )
    for name in FILTERS:
        p.add_argument(
            f"--{name}", default=None, metavar="NAME", help=f"only this {name} (glob allowed)"
        )
    p.set_defaults(func=run_report)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def moment(option: str, text: str, tz: datetime.tzinfo | None = None, *, start: bool) -> float:
    """A --since (`start`: 7d is 7 days ago) or --until value; a bad one is the same one line
    and exit 2 (a command-line mistake) in every command."""
    from tokenwatch.core.periods import parse_since, parse_start
    from tokenwatch.core.quantities import QuantityError

    try:
        return parse_start(text, tz=tz) if start else parse_since(text, tz=tz)
    except QuantityError as exc:
        raise CliError(f"{option}: {exc}", 2) from None


# -- shared ----------------------------------------------------------------------------------


def _db_path() -> Path:
    from tokenwatch.paths import Paths

    return Paths.discover().db


async def _open_store(path: Path) -> Store:
    from tokenwatch.core.errors import StoreUnavailable
    from tokenwatch.ledger.store import Store

    try:
        return await Store.open(path)
    except StoreUnavailable as exc:
        raise CliError(str(exc)) from None


async def _open_for_reading(path: Path) -> Store:
    """The ledger read-only (a read-only file or directory will do); a missing one is created
    empty, as any command does."""
    import anyio

    from tokenwatch.core.errors import StoreUnavailable
    from tokenwatch.ledger.store import Store

    if not await anyio.Path(path).exists():
        return await _open_store(path)
    try:
        return await Store.open_read_only(path)
    except StoreUnavailable as exc:
        raise CliError(str(exc)) from None


# -- import ----------------------------------------------------------------------------------


def run_import(args: argparse.Namespace) -> int:
    import anyio

    cfg = settings.config()
    tz = settings.zone(cfg)
    table = None if args.no_price else settings.price_table(cfg)
    if (args.file is None) == (args.agent_logs is None):
        raise CliError("import: give FILE or --from AGENT (one of them)", 2)
    if args.agent_logs is not None:
        summary = anyio.run(_import_logs, args, tz, table, _db_path())
        print(summary.line(), file=sys.stderr)
        return 0
    source = _open_input(args.file)
    interrupt = Interrupt()
    previous = interrupt.install()
    try:
        summary = anyio.run(_import, source, tz, table, _db_path(), interrupt)
    finally:
        interrupt.uninstall(previous)
        if source is not sys.stdin:
            source.close()
    if not summary.good and summary.errors and not interrupt.hit:
        # Not one usage event: most likely not the file meant. One line, not one per line.
        name = "stdin" if args.file == "-" else args.file
        raise CliError(
            f"{name}: no usage events in it, nothing imported ({summary.errors[0]}; "
            f"{len(summary.errors):,} bad line{'s' if len(summary.errors) != 1 else ''})"
        )
    print(summary.line(), file=sys.stderr)
    if interrupt.hit:
        return 130
    return 1 if summary.errors else 0


class Interrupt:
    """Ctrl-C during an import: it stops the reading at once, but never cuts a write short (the
    import stops after it), so what was read is stored and the closing line can count it."""

    def __init__(self) -> None:
        self.reading = True
        self.hit = False

    def __call__(self, signum: int, frame: object) -> None:
        self.hit = True
        if self.reading:
            raise KeyboardInterrupt

    def install(self) -> Any:
        # Only the main thread may set handlers; elsewhere Ctrl-C is not ours to see anyway.
        if threading.current_thread() is not threading.main_thread():
            return None
        return signal.signal(signal.SIGINT, self)

    def uninstall(self, previous: Any) -> None:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


class ImportSummary:
    """What an import did, for the closing line."""

    def __init__(self) -> None:
        self.good = 0
        """Lines that were usage events."""
        self.read = 0
        self.stored = 0
        self.errors: list[LineError] = []
        self.unpriced: dict[str, int] = {}
        self.estimated_from: set[str] = set()
        """The fallback models whose rates priced the unpriced calls (empty: left with no cost)."""
        self.interrupted = False

    def line(self) -> str:
        parts = [f"imported {self.stored:,} events"]
        if self.interrupted:
            parts.insert(0, "interrupted")
        if self.read > self.stored:
            parts.append(f"{self.read - self.stored:,} already stored")
        if self.errors:
            plural = "s" if len(self.errors) != 1 else ""
            parts.append(f"skipped {len(self.errors):,} bad line{plural}")
        if self.unpriced:
            names = ", ".join(sorted(self.unpriced))
            how = "".join(f"; price: estimated from {m}" for m in sorted(self.estimated_from))
            parts.append(f"{sum(self.unpriced.values()):,} unpriced (model {names}{how})")
        return "tokenwatch: " + ", ".join(parts)


def _open_input(name: str) -> TextIO:
    if name == "-":
        return sys.stdin
    try:
        return open(name, encoding="utf-8", errors="strict")
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror}") from None


def _lines(source: TextIO, name: str) -> Iterator[str]:
    try:
        yield from source
    except UnicodeDecodeError as exc:
        raise CliError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


async def _import(
    source: TextIO,
    tz: datetime.tzinfo,
    table: PriceTable | None,
    db: Path,
    interrupt: Interrupt | None = None,
) -> ImportSummary:
    from tokenwatch.core.errors import StoreUnavailable
    from tokenwatch.ledger.importer import LineError, parse_lines

    interrupt = interrupt or Interrupt()
    summary = ImportSummary()
    batch: list[UsageEvent] = []
    store = await _open_store(db)
    try:
        try:
            try:
                for _, item in parse_lines(_lines(source, getattr(source, "name", "stdin")), tz):
                    if isinstance(item, LineError):
                        _report_bad_line(item, summary)
                        continue
                    _count_good(summary)
                    _price(item, table, summary)
                    batch.append(item)
                    if len(batch) >= IMPORT_BATCH:
                        await _store_batch(store, batch, summary, interrupt)
                    if interrupt.hit:
                        break
            except KeyboardInterrupt:
                pass  # the reading stops; what was read is still stored below
            interrupt.reading = False
            summary.interrupted = interrupt.hit
            await _store_batch(store, batch, summary, interrupt)
        finally:
            await store.aclose()
    except StoreUnavailable as exc:
        raise CliError(f"{exc}; stored {summary.stored} events before that") from None
    hidden = len(summary.errors) - MAX_ERRORS_SHOWN
    if hidden > 0 and summary.good:
        print(f"tokenwatch: ... and {hidden} more bad lines", file=sys.stderr)
    return summary


async def _import_logs(
    args: argparse.Namespace, tz: datetime.tzinfo, table: PriceTable | None, db: Path
) -> ImportSummary:
    from tokenwatch.core.periods import parse_start
    from tokenwatch.core.quantities import QuantityError
    from tokenwatch.ledger.session_logs import events
    from tokenwatch.ledger.store import StoreUnavailable
    from tokenwatch.paths import agent_logs

    try:
        since = parse_start(args.since, tz=tz) if args.since else 0.0
    except QuantityError as exc:
        raise CliError(f"--since: {exc}", 2) from None
    root = Path(args.path) if args.path else agent_logs(args.agent_logs)
    if not root.is_dir():
        raise CliError(f"no {args.agent_logs} logs in {root} (not a directory; see --path)")
    found = events(args.agent_logs, root, since)
    summary = ImportSummary()
    for event in found:
        _price(event, table, summary)
    store = await _open_store(db)
    try:
        await _store_batch(store, found, summary, Interrupt())
    except StoreUnavailable as exc:
        raise CliError(str(exc)) from None
    finally:
        await store.aclose()
    return summary


def _report_bad_line(error: LineError, summary: ImportSummary) -> None:
    """Name a bad line once a good one has shown this is a file of events at all: until then
    they are held, so a file with no event in it is one line, not one per line."""
    summary.errors.append(error)
    if summary.good and len(summary.errors) <= MAX_ERRORS_SHOWN:
        print(f"tokenwatch: {error}", file=sys.stderr)


def _count_good(summary: ImportSummary) -> None:
    summary.good += 1
    if summary.good == 1:
        for held in summary.errors[:MAX_ERRORS_SHOWN]:
            print(f"tokenwatch: {held}", file=sys.stderr)


def _price(event: UsageEvent, table: PriceTable | None, summary: ImportSummary) -> None:
    from tokenwatch.core.pricing import ESTIMATED, is_estimated

    if event.cost_usd is None and table is not None:
        table.price(event)
    if event.cost_usd is None or is_estimated(event.price_source):
        name = event.model or "(no model)"
        summary.unpriced[name] = summary.unpriced.get(name, 0) + 1
        if event.cost_usd is not None:
            summary.estimated_from.add(event.price_source.removeprefix(ESTIMATED))


async def _store_batch(
    store: Store, batch: list[UsageEvent], summary: ImportSummary, interrupt: Interrupt
) -> None:
    if not batch:
        return
    reading, interrupt.reading = interrupt.reading, False
    try:
        summary.read += len(batch)
        summary.stored += await store.append_many(batch)
        batch.clear()
    finally:
        interrupt.reading = reading


# -- report ----------------------------------------------------------------------------------


def run_report(args: argparse.Namespace) -> int:
    import anyio

    from tokenwatch.ledger.report import render

    cfg = settings.config()
    tz = settings.zone(cfg)
    since = moment("--since", args.since, tz, start=True)
    until = moment("--until", args.until, tz, start=False) if args.until else None
    if until is not None and until <= since:
        raise CliError("--until must be later than --since", 2)
    if args.savings:
        from tokenwatch.ledger.savings import render_savings

        if args.format == "csv":
            raise CliError("report --savings prints a table or JSON (--format table|json)", 2)
        sys.stdout.write(render_savings(anyio.run(_savings, since, until), args.format))
        return 0
    filters = {name: getattr(args, name) for name in FILTERS if getattr(args, name)}
    report = anyio.run(_report, args.by, since, until, args.top, tz, filters)
    sys.stdout.write(render(report, args.format))
    return 0


async def _report(
    by: str,
    since: float,
    until: float | None,
    top: int | None,
    tz: datetime.tzinfo,
    filters: dict[str, str],
) -> Report:
    from tokenwatch.core.errors import StoreUnavailable
    from tokenwatch.ledger.report import build_report

    store = await _open_for_reading(_db_path())
    try:
        return await build_report(store, by=by, since=since, until=until, top=top, tz=tz, **filters)
    except StoreUnavailable as exc:  # a damaged ledger can open and fail at the first read
        raise CliError(str(exc)) from None
    finally:
        await store.aclose()


async def _savings(since: float, until: float | None) -> list[Any]:
    from tokenwatch.ledger.savings import savings_rows
    from tokenwatch.ledger.store import StoreUnavailable

    store = await _open_for_reading(_db_path())
    try:
        return savings_rows(await store.savings(since, until))
    except StoreUnavailable as exc:
        raise CliError(str(exc)) from None
    finally:
        await store.aclose()

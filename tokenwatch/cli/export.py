"""`tokenwatch export`: stored usage events as JSON lines or CSV, the inverse of `tokenwatch import`."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from tokenwatch.cli.errors import CliError

FORMATS = ("jsonl", "csv")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "export",
        help="write stored usage events as JSON lines or CSV",
        description=(
            "Write stored usage events, oldest first, for spreadsheets and warehouses. "
            "JSON lines use the usage event's field names and read back with `tokenwatch import`."
        ),
    )
    p.add_argument(
        "--since", default="", help="start: 1h, 24h, 7d, today or a date (default: everything)"
    )
    p.add_argument("--until", default="", help="end: same forms as --since (default: now)")
    p.add_argument(
        "--format", choices=FORMATS, default="jsonl", help="output format (default: jsonl)"
    )
    p.add_argument("-o", "--output", default="-", help="file to write (default: standard output)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import anyio

    from tokenwatch.cli.ledger import moment

    since = moment("--since", args.since, start=True) if args.since else 0.0
    until = moment("--until", args.until, start=False) if args.until else None
    if args.output == "-":
        count = anyio.run(_export, since, until, args.format, sys.stdout)
    else:
        try:
            with open(args.output, "w", encoding="utf-8", newline="") as out:
                count = anyio.run(_export, since, until, args.format, out)
        except OSError as exc:
            raise CliError(f"cannot write {args.output}: {exc.strerror}") from None
    print(f"tokenwatch: exported {count} events", file=sys.stderr)
    return 0


async def _export(since: float, until: float | None, fmt: str, out: TextIO) -> int:
    import csv

    from tokenwatch.core.errors import StoreUnavailable
    from tokenwatch.core.models import UsageEvent
    from tokenwatch.core.protocol import dumps
    from tokenwatch.ledger.store import Store
    from tokenwatch.paths import Paths

    db = Paths.discover().db
    if not db.exists():
        raise CliError(f"no usage recorded yet ({db} does not exist)")
    columns = [*UsageEvent.field_names(), "total_tokens"]
    writer = (
        csv.DictWriter(out, fieldnames=columns, extrasaction="ignore") if fmt == "csv" else None
    )
    if writer is not None:
        writer.writeheader()
    try:
        store = await Store.open_read_only(db)
    except StoreUnavailable as exc:
        raise CliError(str(exc)) from None
    count = 0
    try:
        async with store:
            async for event in store.iter_events(since=since, until=until):
                row = event.to_dict()
                if writer is not None:
                    writer.writerow(row)
                else:
                    out.write(dumps(row).decode())
                count += 1
    except StoreUnavailable as exc:  # a damaged ledger can open and fail at any page
        raise CliError(f"{exc}; exported {count} events before that") from None
    out.flush()
    return count

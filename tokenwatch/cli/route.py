"""`tokenwatch route`: serve an agent's next calls with another model, until undone."""

from __future__ import annotations

import argparse
from typing import Any

from tokenwatch.cli.errors import CliError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    text = (
        "Send an agent's next calls to another model (same provider and wire) until undone: "
        "the proxy rewrites the request's model, the answer passes through, and the ledger "
        "records the model asked for and the one served. Without --model or --undo, shows the "
        "switch in force."
    )
    p = sub.add_parser("route", help="serve an agent's calls with another model", description=text)
    p.add_argument("name", metavar="AGENT")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", metavar="M", help="the model to serve instead (gpt-4o-mini)")
    what.add_argument("--undo", action="store_true", help="serve the models it asks for again")
    p.add_argument(
        "--only",
        metavar="GLOB",
        default="*",
        help="switch only calls asking for these models (gpt-4o; default: every call)",
    )
    p.set_defaults(func=run_route)


def run_route(args: argparse.Namespace) -> int:
    from tokenwatch.cli.supervisor import _call

    if args.model is not None and not args.model.strip():
        raise CliError("--model needs a model name", exit_code=2)
    fields: dict[str, Any] = {"agent": args.name, "who": "cli"}
    if args.undo:
        fields["undo"] = True
    elif args.model:
        fields.update(model=args.model.strip(), only=args.only)
    live = _call(lambda c: c.request("route", **fields), start=False)
    if live is None:
        print(f"{args.name}: calls go to the models it asks for")
    else:
        asked = "" if live["only"] == "*" else f" asking for {live['only']}"
        print(
            f"{args.name}: calls{asked} go to {live['model']} (tokenwatch route {args.name} --undo)"
        )
    return 0

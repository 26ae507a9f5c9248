"""The `tokenwatch` command line: a thin dispatcher; each command's module defers heavy imports."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from tokenwatch import environ
from tokenwatch.cli.errors import CliError

# command name -> module under tokenwatch.cli that defines register(subparsers)
COMMAND_MODULES: tuple[str, ...] = (
    "dashboard",
    "demo",
    "supervisor",
    "run",
    "budget",
    "route",
    "ledger",
    "prices",
    "count",
    "fakellm",
    "export",
)


class Parser(argparse.ArgumentParser):
    """argparse with the house's errors: one line on stderr (not usage and error), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"tokenwatch: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tokenwatch",
        description=(
            "Watch, price and control the token spending of LLM agents. "
            "With no command, opens the live dashboard."
        ),
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"tokenwatch.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"tokenwatch.cli.{name}":
                continue  # a command still being built is simply absent
            raise
        module.register(sub)
    _describe(parser)
    return parser


def _describe(parser: argparse.ArgumentParser) -> None:
    """A command's `--help` opens with its one-line summary when it has no longer description."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        summaries = {a.dest: a.help for a in action._choices_actions}
        for name, command in action.choices.items():
            summary = summaries.get(name)
            if command.description is None and summary:
                command.description = summary[0].upper() + summary[1:] + "."
            _describe(command)


def _version() -> str:
    from tokenwatch import __version__

    return f"tokenwatch {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        try:
            dashboard = importlib.import_module("tokenwatch.cli.dashboard")
        except ModuleNotFoundError:
            parser.print_help()
            return 0
        args.func = dashboard.open_dashboard
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"tokenwatch: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        if os.environ.get(environ.DEBUG):
            raise
        from tokenwatch.config import ConfigError

        if isinstance(exc, ConfigError):
            print(f"tokenwatch: {exc}", file=sys.stderr)
            return 2
        print(
            f"tokenwatch: internal error: {type(exc).__name__}: {exc} "
            "(set TOKENWATCH_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 1

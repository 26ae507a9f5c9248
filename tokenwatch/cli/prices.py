"""`tokenwatch prices`: the price table, or how one model is priced, from the shell."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from tokenwatch.cli import settings
from tokenwatch.cli.errors import CliError

if TYPE_CHECKING:
    from tokenwatch.core.pricing import PriceTable, Resolution


def register(subparsers: Any) -> None:
    _register_prices(subparsers)


def _register_prices(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "prices",
        help="show the price table, or how one model is priced",
        description=(
            "Show tokenwatch's bundled price table (USD per 1M tokens) with tokenwatch.toml's "
            '[prices."MODEL"] overrides applied (marked *), or, for one MODEL, the chain of '
            "tables (tokenwatch.toml, the bundled table, genai-prices, the fallback estimate), "
            "which one priced it, and the alias rules that got it there."
        ),
    )
    p.add_argument("model", nargs="?", default=None, metavar="MODEL", help="one model name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_prices)


def run_prices(args: argparse.Namespace) -> int:
    import json

    table = settings.price_table(settings.config())
    if args.model is None:
        rows = [{**p.to_dict(), "overridden": table.is_overridden(p.model)} for p in table.models()]
        if args.json:
            print(json.dumps({"version": table.version, "models": rows}, indent=2))
        else:
            sys.stdout.write(_price_lines(table))
        return 0
    resolved = table.estimate(args.model)
    if resolved is None:
        raise CliError(
            f"unknown model {args.model!r}, and the fallback model cannot be priced either "
            "(is genai-prices installed?)"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "version": table.version,
                    "model": args.model,
                    "resolved": resolved.price.model,
                    "source": resolved.source,
                    "source_version": resolved.version,
                    "estimated": resolved.estimated,
                    "chain": [{"table": t, "found": f} for t, f in _chain(table, resolved)],
                    "via": list(resolved.via),
                    "overridden": resolved.overridden,
                    "price": resolved.price.to_dict(),
                },
                indent=2,
            )
        )
        return 0
    sys.stdout.write(_one_price(table, resolved))
    return 0


def _chain(table: PriceTable, resolved: Resolution) -> list[tuple[str, str]]:
    """Each table in the order they are asked, with what it said about the model."""
    from tokenwatch.core.maintained_prices import SOURCE as MAINTAINED
    from tokenwatch.core.pricing import BUNDLED, CONFIG

    layers = [(CONFIG, CONFIG), (BUNDLED, f"{BUNDLED} {table.version}")]
    if table.maintained is not None:
        layers.append((MAINTAINED, f"{MAINTAINED} {table.maintained.version}".rstrip()))
    out: list[tuple[str, str]] = []
    said = "-"  # before the table that knows it: not there; after it: not asked
    for source, label in layers:
        if source == resolved.source and not resolved.estimated:
            out.append((label, f"{resolved.price.model} ({resolved.price.provider})"))
            said = "not asked"
        else:
            out.append((label, said))
    if resolved.estimated:
        out.append(("fallback", f"{resolved.estimated_from} (an estimate, marked as such)"))
    return out


_RATE_COLUMNS = ("input", "cache_read", "cache_write", "output", "reasoning")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}".rstrip("0").rstrip(".")


def _price_lines(table: PriceTable) -> str:
    header = ["MODEL", "PROVIDER", "INPUT", "CACHE READ", "CACHE WRITE", "OUTPUT", "REASONING"]
    rows = []
    for p in table.models():
        mark = "*" if table.is_overridden(p.model) else ""
        rows.append([p.model + mark, p.provider, *(_rate(getattr(p, c)) for c in _RATE_COLUMNS)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = [f"prices version {table.version} (USD per 1M tokens; * = set in tokenwatch.toml)"]
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:], strict=True)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out) + "\n"


def _one_price(table: PriceTable, resolved: Resolution) -> str:
    p = resolved.price
    if resolved.estimated:
        head = (
            f"{resolved.asked}: no price table knows it; price: estimated from "
            f'{resolved.estimated_from} (declare [prices."{resolved.asked}"] in tokenwatch.toml '
            "to price it exactly)"
        )
    else:
        label = f"{resolved.source} {resolved.version}".rstrip()
        head = f"{resolved.asked}: priced as {p.model} ({p.provider}) by {label}"
    lines = [head, "  chain (first that knows it wins):"]
    lines += [f"    {table_name:<22} {found}" for table_name, found in _chain(table, resolved)]
    lines += [f"  via {step}" for step in resolved.via]
    if resolved.overridden:
        lines.append("  rates set in tokenwatch.toml")
    lines += [
        f"  {name.replace('_', ' '):<12} {_rate(getattr(p, name))} USD per 1M tokens"
        for name in _RATE_COLUMNS
        if getattr(p, name) is not None
    ]
    if p.reasoning is None:
        lines.append("  reasoning tokens are billed as output")
    if resolved.found is not None:
        lines.append("  genai-prices rates follow the call's date and prompt size (tiers)")
    if p.note:
        lines.append(f"  note: {p.note}")
    if p.why:
        lines.append(f"  why tokenwatch prices it: {p.why}")
    return "\n".join(lines) + "\n"

"""The configuration a one-shot command reads (config file, time zone, price table), each
problem with it worded as the one-line error every command gives."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

from tokenwatch.cli.errors import CliError

if TYPE_CHECKING:
    from tokenwatch.config import Config
    from tokenwatch.core.pricing import PriceTable


def config() -> Config:
    """tokenwatch.toml as the supervisor would read it (same checks, same words)."""
    from tokenwatch.supervisor.policy import load_config

    return load_config()


def zone(cfg: Config) -> datetime.tzinfo:
    """The time zone periods and dates are read in."""
    from tokenwatch.core.periods import zone as find_zone
    from tokenwatch.core.quantities import QuantityError

    try:
        return find_zone(cfg.supervisor.timezone)
    except QuantityError as exc:
        raise CliError(f"{cfg.source}: supervisor.timezone: {exc}", 2) from None


def price_table(cfg: Config) -> PriceTable:
    """The prices the configuration names, on top of the shipped table."""
    from tokenwatch.core.pricing import PriceError, PriceTable

    try:
        return PriceTable.load(cfg.prices)
    except PriceError as exc:
        raise CliError(f"{cfg.source}: {exc}", 2) from None

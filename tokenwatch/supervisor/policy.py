"""The policy a config asks for: prices, budgets and rules, built (and their errors worded) here only."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenwatch.config import Config, ConfigError
from tokenwatch.config_file import read_config
from tokenwatch.core.budgets import Budgets, budget_name
from tokenwatch.core.pricing import PriceError, PriceTable
from tokenwatch.core.rules import DEFAULT_RULES, Rules
from tokenwatch.paths import Paths
from tokenwatch.proxy.routes import check_bind


@dataclass(frozen=True, slots=True)
class Policy:
    """What the engine enforces, as one config describes it."""

    prices: PriceTable
    budgets: Budgets
    rules: Rules


@contextlib.contextmanager
def worded(cfg: Config) -> Iterator[None]:
    """Every refusal of a price, budget or rule as one ConfigError led by the file it is in."""
    try:
        yield
    except PriceError as exc:
        raise ConfigError(f"{cfg.source}: {exc}") from None  # it names prices."MODEL"
    except ConfigError as exc:
        raise exc.in_file(cfg.source) from None


def build_policy(
    cfg: Config,
    *,
    clock: Callable[[], float] = time.time,
    is_critical: Callable[[str], bool] = lambda name: False,
) -> Policy:
    """Prices, budgets and rules from `cfg`; raises ConfigError naming the file and the key."""
    with worded(cfg):
        prices = PriceTable.load(cfg.prices)
        budgets = Budgets(cfg.budget, tz=cfg.supervisor.timezone, clock=clock)
        check_fleet(cfg)
        # forecast and spike rules read the budgets' status
        rules = Rules(
            cfg.rule or DEFAULT_RULES,
            clock=clock,
            is_critical=is_critical,
            budgets=budgets.statuses,
        )
    return Policy(prices, budgets, rules)


def check_fleet(cfg: Config) -> None:
    """A shared budget needs the [fleet] it is shared in, and [fleet] needs its driver."""
    if cfg.fleet is not None:
        if importlib.util.find_spec("psycopg") is None:
            raise ConfigError(
                "[fleet] needs PostgreSQL's driver: pip install 'tokenwatch[fleet]' (psycopg)"
            )
        return
    for settings in cfg.budget:
        if settings.shared:
            raise ConfigError(
                f"budget {budget_name(settings)} is shared, but there is no [fleet] section to "
                "share it in (docs/fleet.md)"
            )


def load_config(
    explicit: Path | None = None, paths: Paths | None = None, cwd: Path | None = None
) -> Config:
    """Read the config (`read_config`) and refuse, naming the file, what the supervisor would
    only refuse when it starts (or, for the proxy, at the next start after a reload)."""
    cfg = read_config(explicit, paths, cwd)
    try:
        check_bind(cfg.proxy.host)
    except ValueError as exc:
        raise ConfigError(f"{cfg.source}: proxy.host: {exc}") from None
    for i, switch in enumerate(cfg.optimize.switch):
        if not switch.budget or not switch.to:
            where = f"{cfg.source}: optimize.switch[{i}]"
            raise ConfigError(f"{where}: needs a budget and a model to switch to (`to`)")
    build_policy(cfg)
    return cfg

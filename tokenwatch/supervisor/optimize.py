"""The proxy's optimisation levers wired to the engine: prices for what they save, budget use for
when they act, alerts for what they notice."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tokenwatch.config import Config
from tokenwatch.core.models import Alert, Severity, UsageEvent
from tokenwatch.core.pricing import PriceTable
from tokenwatch.paths import Paths

if TYPE_CHECKING:
    from tokenwatch.engine.engine import Engine
    from tokenwatch.proxy.levers import Levers

CACHE_HEALTH_RULE = "prompt_cache"
"""The rule name prompt-cache health alerts carry."""


class ConfigPrices:
    """Prices of the config in use, built again only when the config changes (a reload)."""

    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config
        self._built_for: Config | None = None
        self._table = PriceTable.load({})

    def cost(self, event: UsageEvent) -> float | None:
        config = self._config()
        if config is not self._built_for:
            self._table, self._built_for = PriceTable.load(config.prices), config
        return self._table.cost(event)


def build_levers(
    paths: Paths, config: Callable[[], Config], engine: Engine, clock: Callable[[], float]
) -> Levers:
    from tokenwatch.proxy.levers import Levers

    def alert(agent: str, message: str) -> None:
        severity = Severity.INFO.value
        engine.alert_nowait(
            Alert(rule=CACHE_HEALTH_RULE, agent=agent, message=message, severity=severity)
        )

    return Levers(
        config().optimize,
        cache_path=paths.response_cache,
        price=ConfigPrices(config).cost,
        statuses=engine.budgets.statuses,
        alert=alert,
        clock=clock,
    )

"""The proxy's optimisation levers wired to the engine: prices for what they save, budget use for
when they act, alerts for what they notice."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from tokenwatch.config import Config
from tokenwatch.core.models import Agent, AgentState, Alert, Severity, UsageEvent
from tokenwatch.core.pricing import PriceTable
from tokenwatch.paths import Paths

if TYPE_CHECKING:
    from tokenwatch.engine.agents import AgentRecord
    from tokenwatch.engine.engine import Engine
    from tokenwatch.ledger.store import Store
    from tokenwatch.proxy.levers import Levers
    from tokenwatch.proxy.switch import ModelSwitch

log = logging.getLogger("tokenwatch.supervisor")
CACHE_HEALTH_RULE = "prompt_cache"
"""The rule name prompt-cache health alerts carry."""
TRIM_RULE = "trim"
"""The rule name of the alert that trimmed turns were dropped without their summary."""


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

    def trim_alert(agent: str, message: str) -> None:
        engine.alert_nowait(Alert(rule=TRIM_RULE, agent=agent, message=message))

    return Levers(
        config().optimize,
        cache_path=paths.response_cache,
        price=ConfigPrices(config).cost,
        statuses=engine.budgets.statuses,
        alert=alert,
        trim_alert=trim_alert,
        clock=clock,
    )


def shows_switch(switch: ModelSwitch) -> Callable[[str, object], None]:
    """An engine listener that writes the live model switch into each agent record it sees
    change, before the record is published and saved: the dashboard row shows it, and the
    ledger's agent record keeps it for the next supervisor (`recover_switched`)."""

    def stamp(kind: str, obj: object) -> None:
        if kind == "agent" and isinstance(obj, Agent):
            live = switch.live_of(obj.name)
            obj.route_model = live.model if live else ""
            obj.route_only = live.only if live and live.only != "*" else ""

    return stamp


async def recover_switched(
    engine: Engine, store: Store, switch: ModelSwitch | None
) -> list[AgentRecord]:
    """`engine.recover()`, the live model switches its agents' records keep put back first (the
    records it publishes are stamped with them, `shows_switch`); a switch of an agent that is not
    recovered is dropped."""
    if switch is None:
        return await engine.recover()
    from tokenwatch.proxy.switch import LiveSwitch

    switched = []
    for agent in await store.load_agents():
        if agent.route_model and agent.state != AgentState.EXITED:
            only = agent.route_only or "*"
            switch.set(LiveSwitch(agent.name, agent.route_model, only, "restored"))
            switched.append(agent.name)
    found = await engine.recover()
    recovered = {rec.name for rec in found}
    for name in switched:
        if name in recovered:
            log.info("%s's model switch restored", name)
        else:
            switch.undo(name)
    return found

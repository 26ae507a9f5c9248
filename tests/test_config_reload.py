"""An edited tokenwatch.toml reaches the running supervisor: on `reload`, or by itself."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from tests.supervisor_fixtures import running_supervisor
from tokenwatch.client.control import SupervisorClient, SupervisorError
from tokenwatch.config import BudgetSettings
from tokenwatch.core.budgets import Budgets
from tokenwatch.core.models import Alert, UsageEvent
from tokenwatch.paths import Paths
from tokenwatch.supervisor import reload as config_reload
from tokenwatch.supervisor.policy import load_config
from tokenwatch.supervisor.reload import seed_quietly
from tokenwatch.supervisor.service import Supervisor

FIRST = """
[[budget]]
name = "daily"
limit = "$5"

[[rule]]
name = "loops"
detector = "runaway"
threshold = 3
action = "pause"
"""


@asynccontextmanager
async def supervised(config_file: Path) -> AsyncIterator[tuple[Supervisor, SupervisorClient]]:
    paths = Paths.discover()
    config = load_config(config_file, paths)
    async with (
        running_supervisor(paths, config, proxy=False, exporters=False) as sup,
        await SupervisorClient.connect(socket_path=Path(sup.paths.socket), start=False) as client,
    ):
        yield sup, client


async def limits(client: SupervisorClient) -> dict[str, Any]:
    return {b["name"]: b["limit"] for b in await client.request("budgets")}


async def test_reload_applies_budgets_and_rules_and_says_what_waits(short_tmp: Path) -> None:
    config = short_tmp / "tokenwatch.toml"
    config.write_text(FIRST)
    async with supervised(config) as (sup, client):
        assert await limits(client) == {"daily": 5.0}
        config.write_text(
            FIRST.replace("$5", "$7").replace('"loops"', '"loops-4"').replace("= 3", "= 4")
            + '\n[proxy]\nhost = "::1"\n'
        )
        reply = await client.request("reload")
        assert await limits(client) == {"daily": 7.0}
        assert sup.engine is not None
        assert list(sup.engine.rules.names()) == ["loops-4"]
    assert reply["summary"] == f"{config}: applied budget, rule; proxy at the next supervisor start"


async def test_a_broken_edit_is_refused_whole_and_named(short_tmp: Path) -> None:
    config = short_tmp / "tokenwatch.toml"
    config.write_text(FIRST)
    async with supervised(config) as (_, client):
        config.write_text(FIRST.replace("$5", "$9").replace('"runaway"', '"psychic"'))
        with pytest.raises(SupervisorError) as caught:
            await client.request("reload")
        assert await limits(client) == {"daily": 5.0}, "nothing of a refused edit applies"
    assert str(caught.value.message).startswith(f"{config}: rule loops: ")
    assert caught.value.message.endswith("; the settings in use stay")


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        ("\n[proxy]\nport = 99999\n", "proxy.port: must be from 0 to 65535, got 99999"),
        ("\n[proxy]\nhost = '0.0.0.0'\n", "proxy.host: the proxy only listens on loopback"),
        ('\n[prices."local"]\ninput = -1\n', "prices.local.input: must be at least 0, got -1"),
    ],
)
async def test_an_edit_the_next_start_would_fail_on_is_refused_now(
    short_tmp: Path, edit: str, why: str
) -> None:
    config = short_tmp / "tokenwatch.toml"
    config.write_text(FIRST)
    async with supervised(config) as (sup, client):
        config.write_text(FIRST.replace("$5", "$9") + edit)
        with pytest.raises(SupervisorError) as caught:
            await client.request("reload")
        assert await limits(client) == {"daily": 5.0}, "nothing of a refused edit applies"
        assert sup.commands is not None
        assert sup.commands.config.proxy == sup.config.proxy
    assert caught.value.message.startswith(f"{config}: {why}")


async def test_an_edit_is_noticed_without_asking(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_reload, "POLL_INTERVAL", 0.05)
    config = short_tmp / "tokenwatch.toml"
    config.write_text(FIRST)
    async with supervised(config) as (_, client):
        config.write_text(FIRST.replace("$5", "$6"))
        with anyio.fail_after(10):
            while await limits(client) != {"daily": 6.0}:
                await anyio.sleep(0.05)
        config.write_text(FIRST.replace("$5", "lots"))
        with anyio.fail_after(10):
            while not (alerts := await client.request("alerts")):
                await anyio.sleep(0.05)
        assert await limits(client) == {"daily": 6.0}
    (alert,) = alerts
    assert alert["rule"] == "config"
    assert alert["message"] == (
        f"config not reloaded: {config}: budget daily: not a limit: 'lots' (tokens like 200k, "
        "or dollars like $2); the settings in use stay"
    )


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (FIRST.encode() + b'\n[prices."local"]\ninput = 1.0\n', 'prices."local": '),
        (FIRST.encode() + b"\n# caf\xe9\n", "not UTF-8 text"),
    ],
)
async def test_an_edit_that_fails_late_is_refused_and_the_supervisor_serves_on(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, edit: bytes, why: str
) -> None:
    monkeypatch.setattr(config_reload, "POLL_INTERVAL", 0.05)
    config = short_tmp / "tokenwatch.toml"
    config.write_text(FIRST)
    async with supervised(config) as (_, client):
        config.write_bytes(edit.replace(b"$5", b"$8"))
        with pytest.raises(SupervisorError) as caught:
            await client.request("reload")
        with anyio.fail_after(10):
            while not (alerts := await client.request("alerts")):
                await anyio.sleep(0.05)
        assert await limits(client) == {"daily": 5.0}
    assert why in caught.value.message
    assert why in alerts[0]["message"]


async def test_a_config_file_that_is_gone_keeps_the_settings_in_use(short_tmp: Path) -> None:
    config = short_tmp / "tokenwatch.toml"
    config.write_text(FIRST)
    async with supervised(config) as (_, client):
        config.unlink()
        with pytest.raises(SupervisorError) as caught:
            await client.request("reload")
        assert await limits(client) == {"daily": 5.0}
        config.write_text(FIRST.replace("$5", "$3"))  # put back: followed again
        await client.request("reload")
        assert await limits(client) == {"daily": 3.0}
    assert caught.value.message == (
        f"{config}: the file in use is gone; put it back to change settings; "
        "the settings in use stay"
    )


async def test_a_budget_added_while_running_counts_todays_usage_so_far(short_tmp: Path) -> None:
    config = short_tmp / "tokenwatch.toml"
    config.write_text(FIRST)
    async with supervised(config) as (sup, client):
        assert sup.store is not None
        await sup.store.append(UsageEvent(ts=time.time(), agent="a", model="m", input_tokens=700))
        await sup.store.flush()
        config.write_text(FIRST + '\n[[budget]]\nname = "tokens"\nlimit = "10k"\n')
        await client.request("reload")
        await client.request("set_budget", budget={"name": "cli", "limit": "20k"})
        used = {b["name"]: b["used"] for b in await client.request("budgets")}
    assert used == {"daily": 0.0, "tokens": 700, "cli": 700}


async def test_a_catch_up_that_cannot_read_the_ledger_keeps_the_edit_and_says_so() -> None:
    class Unreadable:
        async def flush(self) -> None:
            raise OSError(5, "Input/output error")

    budgets = Budgets([], tz="UTC")
    fresh = budgets.replace([BudgetSettings(name="g", limit="1k")])
    alerts: list[Alert] = []
    engine = SimpleNamespace(seed_budgets=budgets.seed, alert_nowait=alerts.append)
    await seed_quietly(engine, Unreadable(), fresh)  # type: ignore[arg-type]
    budgets.record(UsageEvent(ts=time.time(), agent="a", input_tokens=300, call_id="x"))
    assert {s.name: s.used for s in budgets.statuses()} == {"g": 300}
    (alert,) = alerts
    assert alert.message == (
        "budgets g may show less than was spent this period: the ledger could not be read "
        "(OSError: [Errno 5] Input/output error); they count every call from now on"
    )

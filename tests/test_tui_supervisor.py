"""The dashboard against a real supervisor (in-process) over its socket: launch, budget form
persisted to the overlay, pause and resume all on a real process, detail and report screens with real replies,
the model switch key changing the model fake-llm receives."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest
from textual.widgets import Input

from tests.process_fixtures import dead
from tests.process_fixtures import state as proc_state
from tests.proxy_fixtures import API_KEY
from tests.supervisor_fixtures import quiet_config, running_supervisor
from tests.tui_fixtures import notifications, row_names, wait_for
from tokenwatch.client.control import SupervisorClient
from tokenwatch.config import Config, ProxySettings
from tokenwatch.demo.fake_llm import running_fake_llm
from tokenwatch.paths import Paths
from tokenwatch.supervisor.policy import load_config
from tokenwatch.tui.app import build_app
from tokenwatch.tui.screens.detail import AgentDetailScreen
from tokenwatch.tui.screens.dialogs import BudgetScreen, ConfirmScreen, ModelScreen
from tokenwatch.tui.screens.report import ReportScreen
from tokenwatch.tui.source import SupervisorSource

AGENT = [sys.executable, "-c", "import time\nwhile True: time.sleep(0.5)"]


@pytest.mark.slow
async def test_dashboard_drives_a_real_supervisor(short_tmp: Path) -> None:
    config_file = short_tmp / "tokenwatch.toml"
    config_file.write_text(f"[agents.alpha]\ncommand = {json.dumps(AGENT)}\n")
    paths = Paths.discover()
    config = load_config(config_file, paths)
    async with (
        running_supervisor(paths, config, proxy=False, exporters=False),
        await SupervisorClient.connect(paths, start=False) as client,
    ):
        app = build_app(
            SupervisorSource(client, interval=0.2),
            address=str(client.socket_path),
            launchable=["alpha"],
            min_refresh=0.0,
        )
        async with app.run_test(size=(120, 36)) as pilot:
            await pilot.press("l", "enter")
            await wait_for(pilot, lambda: "alpha" in row_names(app), "launched agent shown")
            await wait_for(pilot, lambda: bool(app.view_of("alpha").agent.pid), "pid known")
            pid = app.view_of("alpha").agent.pid
            assert pid is not None

            await pilot.press("b")
            await wait_for(pilot, lambda: isinstance(app.screen, BudgetScreen), "form open")
            await pilot.press(*"$2", "enter")
            await wait_for(
                pilot, lambda: any(b.name == "agent:alpha:day" for b in app.budgets), "budget live"
            )
            saved = load_config(config_file, paths).budget
            assert [(b.name, b.limit, b.action) for b in saved] == [
                ("agent:alpha:day", "$2", "pause")
            ]
            mine = await anyio.Path(config_file).read_text()
            assert mine == f"[agents.alpha]\ncommand = {json.dumps(AGENT)}\n"  # never rewritten

            await pilot.press("t", *"50%", "enter")
            await wait_for(
                pilot, lambda: app.view_of("alpha").agent.state == "throttled", "throttled"
            )
            await pilot.press("t")  # again: off
            await wait_for(pilot, lambda: app.view_of("alpha").agent.state == "running", "off")

            await pilot.press("p")
            await wait_for(pilot, lambda: proc_state(pid) == "T", "process stopped")
            await wait_for(pilot, lambda: app.view_of("alpha").agent.state == "paused", "shown")

            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, AgentDetailScreen), "detail")
            screen = app.screen
            assert isinstance(screen, AgentDetailScreen)
            await wait_for(
                pilot, lambda: any(a.kind == "pause" for a in screen.actions), "actions loaded"
            )
            await pilot.press("escape", "r")
            await wait_for(pilot, lambda: isinstance(app.screen, ReportScreen), "report")
            await wait_for(
                pilot, lambda: "report failed" not in " ".join(notifications(app)), "no error"
            )
            await pilot.press("escape", "R")  # resume every paused agent
            await wait_for(pilot, lambda: proc_state(pid) in {"S", "R"}, "process resumed")
            await wait_for(pilot, lambda: app.view_of("alpha").agent.state == "running", "shown")
            await pilot.press("k")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "confirm")
            await pilot.press("y")
            await wait_for(pilot, lambda: dead(pid), "process gone")
            await wait_for(
                pilot, lambda: app.view_of("alpha").agent.state == "exited", "shown as exited"
            )


async def test_the_dashboard_waits_for_a_restarted_supervisor_and_goes_on() -> None:
    paths = Paths.discover()

    def connect() -> Any:
        return SupervisorClient.connect(paths, start=False)

    first = contextlib.AsyncExitStack()
    await first.enter_async_context(
        running_supervisor(paths, quiet_config(), proxy=False, exporters=False)
    )
    client = await connect()
    source = SupervisorSource(client, interval=0.2, reconnect=connect)
    try:
        app = build_app(source, address=str(client.socket_path), min_refresh=0.0)
        async with app.run_test(size=(120, 36)) as pilot:
            await wait_for(pilot, lambda: app.received > 0, "a first snapshot")
            await first.aclose()
            await wait_for(
                pilot, lambda: "waiting for a supervisor" in app.main.summary.connection, "lost"
            )
            async with (
                running_supervisor(paths, quiet_config(), proxy=False, exporters=False),
                await connect() as agent,
            ):
                await agent.request("hello", name="after-restart")
                await wait_for(pilot, lambda: "after-restart" in row_names(app), "feed goes on")
                await app.source.command("pause", agent="after-restart")
                await wait_for(
                    pilot,
                    lambda: app.view_of("after-restart").agent.state == "paused",
                    "commands reach the new supervisor",
                )
                assert app.main.summary.connection == ""
                assert "connected again" in notifications(app)
    finally:
        await source.aclose()
        await client.aclose()
        await first.aclose()


@pytest.mark.slow
async def test_the_model_key_switches_the_model_fake_llm_receives() -> None:
    async with running_fake_llm() as fake:
        config = Config(proxy=ProxySettings(openai_upstream=fake.url + "/v1"))
        paths = Paths.discover()
        async with (
            running_supervisor(paths, config, proxy=True, exporters=False),
            await SupervisorClient.connect(paths, start=False) as client,
        ):
            registered = await client.request("register", name="researcher")
            url = registered["env"]["OPENAI_BASE_URL"]
            app = build_app(
                SupervisorSource(client, interval=0.2),
                address=str(client.socket_path),
                min_refresh=0.0,
            )
            async with app.run_test(size=(120, 36)) as pilot:
                await wait_for(pilot, lambda: "researcher" in row_names(app), "agent shown")
                await pilot.press("m")
                await wait_for(pilot, lambda: isinstance(app.screen, ModelScreen), "prompt open")
                await pilot.press(*"gpt-4o-mini", "enter")
                await wait_for(pilot, lambda: "→gpt-4o-mini" in state_cell(app), "row shows it")
                assert "researcher: calls go to gpt-4o-mini" in notifications(app)
                await ask(url)

                await pilot.press("m")  # again: the prompt holds the model in force; emptied, undo
                await wait_for(pilot, lambda: isinstance(app.screen, ModelScreen), "prompt open")
                assert app.screen.query_one(Input).value == "gpt-4o-mini"
                await pilot.press("ctrl+u", "enter")
                await wait_for(pilot, lambda: "→" not in state_cell(app), "row shows it undone")
                await ask(url)
    assert [c.model for c in fake.calls] == ["gpt-4o-mini", "gpt-4o"]


def state_cell(app: Any) -> str:
    return str(app.main.table.get_cell("slot-0", "state"))


async def ask(url: str) -> None:
    messages = [{"role": "user", "content": "Which model answers?"}]
    async with openai.AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0) as oai:
        await oai.chat.completions.create(model="gpt-4o", messages=messages)  # type: ignore[arg-type]

"""The dashboard driven by its keys against a scripted engine; pause, resume and kill on real processes."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import pytest
from textual.widgets import Input, Label

from tests.process_fixtures import state as proc_state
from tests.tui_fixtures import (
    NAMES,
    NOW,
    ProcessEffect,
    notifications,
    row_names,
    sample_history,
    sample_report,
    sample_snapshot,
    scripted_app,
    sleeper_agents,
    wait_for,
    widget_text,
)
from tokenwatch.core.models import Action, Alert
from tokenwatch.process.processes import ProcessHandle
from tokenwatch.tui.screens.detail import AgentDetailScreen
from tokenwatch.tui.screens.dialogs import (
    BudgetScreen,
    ConfirmScreen,
    ModelScreen,
    ThrottleScreen,
)
from tokenwatch.tui.screens.report import ReportScreen
from tokenwatch.tui.source import CommandError, ScriptedSource
from tokenwatch.tui.widgets.spenders import TopSpenders


async def select(pilot: Any, name: str) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: name in row_names(app), f"{name} shown")
    app.main.table.move_cursor(row=row_names(app).index(name))
    await pilot.pause()
    assert app.main.table.selected_name == name


async def test_snapshot_fills_every_panel() -> None:
    source = ScriptedSource(sample_snapshot())
    app = scripted_app(source)
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == len(NAMES), "rows shown")
        # sorted by period cost, largest first: the last sample agent spends most
        assert row_names(app) == list(reversed(NAMES))
        summary = str(app.main.query_one("SummaryBar").render())
        assert "5 running" in summary
        assert "tok/min" in summary
        feed = str(app.main.feed.render())
        assert feed.index("runaway looper") < feed.index("budget coder")  # newest first
        assert "→ pause" in feed


async def test_totals_holding_estimated_prices_are_marked_everywhere() -> None:
    snap = sample_snapshot()
    looper = next(v for v in snap.agents if v.agent.name == "looper")
    looper.unpriced_requests = 2
    snap.unpriced_today = 2
    snap.estimated_today_usd = 0.1
    snap.top_partial = {"agent": ["looper"]}
    app = scripted_app(ScriptedSource(snap))
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == len(NAMES), "rows shown")
        table = widget_text(app.main.table)
        looper_row = next(line for line in table.splitlines() if "looper" in line)
        assert "$0.1550*" in looper_row  # its cost
        assert "░░* 75%" in looper_row  # and its budget gauge
        coder_row = next(line for line in table.splitlines() if "coder " in line)
        assert "*" not in coder_row
        summary = widget_text(app.main.query_one("SummaryBar"))
        assert "today $0.4650*" in summary
        spenders = widget_text(app.main.query_one(TopSpenders))
        assert "$0.1550*" in spenders
        assert spenders.count("*") == 1  # the others hold no estimate


@contextlib.contextmanager
def real_agent(name: str) -> Iterator[tuple[ProcessHandle, ScriptedSource]]:
    """The sample dashboard with `name` backed by a real process the commands act on."""
    with sleeper_agents(1) as (handle,):
        yield (
            handle,
            ScriptedSource(
                sample_snapshot(pids={name: handle.pid}), effect=ProcessEffect({name: handle})
            ),
        )


@pytest.mark.slow
async def test_p_pauses_and_resumes_a_real_process() -> None:
    with real_agent("coder") as (handle, source):
        app = scripted_app(source)
        async with app.run_test() as pilot:
            await select(pilot, "coder")
            await pilot.press("p")
            await wait_for(pilot, lambda: proc_state(handle.pid) == "T", "process stopped")
            await wait_for(pilot, lambda: "paused coder" in notifications(app), "result shown")
            await wait_for(
                pilot, lambda: app.view_of("coder").agent.state == "paused", "row shows paused"
            )
            await pilot.press("p")
            await wait_for(pilot, lambda: proc_state(handle.pid) in {"S", "R"}, "running again")
            sent = [(k, f) for k, f in source.commands if k != "fleet_hosts"]  # start-up question
            assert [k for k, _ in sent] == ["pause", "resume"]
            assert sent[0][1] == {"agent": "coder", "who": "key"}


@pytest.mark.slow
async def test_k_kills_only_after_confirmation() -> None:
    with real_agent("looper") as (handle, source):
        app = scripted_app(source)
        async with app.run_test() as pilot:
            await select(pilot, "looper")
            await pilot.press("k")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "confirm open")
            await pilot.press("n")
            await wait_for(pilot, lambda: "looper not killed" in notifications(app), "cancel said")
            await pilot.press("k")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "confirm open")
            await pilot.press("enter")  # the focused button is Cancel
            await pilot.pause()
            assert source.commands_of("kill") == []
            assert handle.alive()
            await pilot.press("k", "y")
            await wait_for(pilot, lambda: not handle.alive(), "process gone")
            await wait_for(pilot, lambda: "killed looper" in notifications(app), "result shown")
            assert len(source.commands_of("kill")) == 1


async def test_throttle_validates_the_rate_and_t_again_turns_it_off() -> None:
    source = ScriptedSource(sample_snapshot())
    app = scripted_app(source)
    async with app.run_test() as pilot:
        await select(pilot, "researcher")
        await pilot.press("t")
        await wait_for(pilot, lambda: isinstance(app.screen, ThrottleScreen), "dialog open")
        await pilot.press(*"fast", "enter")
        error = app.screen.query_one(".error", Label)
        assert error.display
        assert "not a rate" in str(error.render())
        assert source.commands_of("throttle") == []
        app.screen.query_one("#rate", Input).value = ""
        await pilot.press(*"20k/min", "enter")
        await wait_for(pilot, lambda: bool(source.commands_of("throttle")), "throttle sent")
        assert source.commands_of("throttle") == [
            {"agent": "researcher", "rate": "20k/min", "who": "key"}
        ]
        await wait_for(
            pilot, lambda: "throttled researcher to 20k/min" in notifications(app), "shown"
        )
        await wait_for(pilot, lambda: app.view_of("researcher").agent.throttle != "", "state")
        await pilot.press("t")
        await wait_for(pilot, lambda: len(source.commands_of("throttle")) == 2, "off sent")
        assert source.commands_of("throttle")[1]["rate"] == "off"


async def test_model_key_switches_esc_leaves_it_and_an_empty_prompt_undoes() -> None:
    source = ScriptedSource(sample_snapshot())
    app = scripted_app(source)
    async with app.run_test(size=(160, 48)) as pilot:
        await select(pilot, "coder")
        await pilot.press("m", *"gpt 4o", "enter")
        assert "no spaces" in str(app.screen.query_one(".error", Label).render())
        await pilot.press("escape")  # cancelled: nothing sent
        assert source.commands_of("route") == []
        await pilot.press("m", *"gpt-4o-mini", "enter")
        await wait_for(pilot, lambda: "coder: calls go to gpt-4o-mini" in notifications(app), "ok")
        assert app.view_of("coder").agent.route_model == "gpt-4o-mini"
        await pilot.press("enter")  # the agent screen says so too
        await wait_for(pilot, lambda: isinstance(app.screen, AgentDetailScreen), "detail")
        identity = app.screen.query_one("#identity")
        await wait_for(pilot, lambda: "served by gpt-4o-mini" in widget_text(identity), "shown")
        await pilot.press("escape", "m")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelScreen), "prompt open")
        await pilot.press("ctrl+u", "enter")
        await wait_for(pilot, lambda: not app.view_of("coder").agent.route_model, "undone")
    assert source.commands_of("route") == [
        {"agent": "coder", "model": "gpt-4o-mini", "who": "key"},
        {"agent": "coder", "undo": True, "who": "key"},
    ]


@pytest.mark.parametrize("bad", ["lots", "-5", "0", "$"])
async def test_budget_form_rejects_bad_limits(bad: str) -> None:
    source = ScriptedSource(sample_snapshot())
    app = scripted_app(source)
    async with app.run_test() as pilot:
        await select(pilot, "summariser")
        await pilot.press("b")
        await wait_for(pilot, lambda: isinstance(app.screen, BudgetScreen), "form open")
        await pilot.press(*bad, "enter")
        await pilot.pause()
        assert isinstance(app.screen, BudgetScreen), "the form stays open"
        assert str(app.screen.query_one(".error", Label).render()) != ""
        assert source.commands_of("set_budget") == []


async def test_budget_form_sends_good_input_and_prefills_the_current_budget() -> None:
    source = ScriptedSource(sample_snapshot())
    app = scripted_app(source)
    async with app.run_test() as pilot:
        await select(pilot, "coder")
        await pilot.press("b")
        await wait_for(pilot, lambda: isinstance(app.screen, BudgetScreen), "form open")
        limit = app.screen.query_one("#limit", Input)
        assert limit.value == "200k"  # the budget coder already has
        limit.value = ""
        await pilot.press(*"$2.50", "enter")
        await wait_for(pilot, lambda: bool(source.commands_of("set_budget")), "budget sent")
        budget = source.commands_of("set_budget")[0]["budget"]
        assert budget == {
            "name": "agent:coder:day",
            "scope": "agent",
            "target": "coder",
            "period": "day",
            "limit": "$2.5",
            "action": "pause",
        }
        await wait_for(
            pilot,
            lambda: any(b.name == "agent:coder:day" and b.unit == "usd" for b in app.budgets),
            "new budget shown",
        )


async def test_a_long_last_alert_reads_whole_on_a_wide_terminal() -> None:
    why = "looper repeated the same prompt 4 times in 1 s; paused"
    snap = sample_snapshot()
    snap.agents = [
        dataclasses.replace(v, last_alert=why) if v.agent.name == "looper" else v
        for v in snap.agents
    ]
    app = scripted_app(ScriptedSource(snap))
    async with app.run_test(size=(200, 40)) as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows")
        table = app.main.table
        await wait_for(pilot, lambda: why in widget_text(table), "the whole alert shown")
        await pilot.resize_terminal(160, 40)  # the column narrows with the screen
        await wait_for(  # (the old layout, clipped by the narrower screen, looks the same)
            pilot,
            lambda: table.size.width < 160 and table.virtual_size.width <= table.size.width,
            "resized and laid out again: no sideways scrolling",
        )
        assert why[:30] in widget_text(table)
        assert why not in widget_text(table)
        await pilot.resize_terminal(200, 40)
        await wait_for(pilot, lambda: why in widget_text(table), "whole again")


async def test_a_snapshot_that_arrives_as_the_dashboard_quits_is_ignored() -> None:
    from tokenwatch.tui.messages import SnapshotArrived

    app = scripted_app(ScriptedSource(sample_snapshot()))
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows")
    assert not app.screen_stack  # quit: every screen is gone
    with app._context():  # as Textual delivers the feed's last message, in the app's context
        app._snapshot(SnapshotArrived(sample_snapshot()))
    assert app.snapshot.agents, "taken in, and nothing raised"


async def test_filter_and_sort() -> None:
    source = ScriptedSource(sample_snapshot())
    app = scripted_app(source)
    async with app.run_test(size=(160, 40)) as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows")
        await pilot.press("slash", *"claude")  # by name or by model
        await wait_for(pilot, lambda: len(row_names(app)) == 2, "filtered")
        assert set(row_names(app)) == {"coder", "claude-writer"}
        await pilot.press("enter")  # keep the filter, back to the table
        await pilot.press("s")  # cost -> budget (next column shown)
        assert app.main.table.sort_key != "cost"
        app.main.table.sort_by("name")
        await pilot.pause()
        assert row_names(app) == sorted(row_names(app))
        app.main.table.sort_by("name")  # again: reversed
        await pilot.pause()
        assert row_names(app) == sorted(row_names(app), reverse=True)
        await pilot.press("slash", "escape")
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "filter cleared")


async def test_pause_all_ack_and_grouping() -> None:
    source = ScriptedSource(sample_snapshot())
    app = scripted_app(source)
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows")
        await pilot.press("P")
        await wait_for(
            pilot, lambda: all(v.agent.state == "paused" for v in app.snapshot.agents), "paused"
        )
        await pilot.press("a")
        await wait_for(pilot, lambda: bool(source.commands_of("ack_alerts")), "ack sent")
        assert sorted(source.commands_of("ack_alerts")[0]["ids"]) == [1, 2]
        await wait_for(pilot, lambda: not app.main.feed.unacknowledged, "feed acknowledged")
        spenders = app.main.query_one(TopSpenders)
        await pilot.press("g")
        assert spenders.grouping == "model"
        assert "gpt-4o-mini" in widget_text(spenders)


async def test_actions_and_alerts_pushed_between_snapshots_reach_the_feed() -> None:
    source = ScriptedSource(sample_snapshot())
    app = scripted_app(source)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows")
        source.push_nowait("alert", Alert("spike", "coder", "burn 6x baseline", "info", ts=NOW - 1))
        source.push_nowait(
            "action", Action("throttle", "coder", "rule:spike", why="burn 6x baseline", ts=NOW)
        )
        await wait_for(pilot, lambda: "rule:spike" in str(app.main.feed.render()), "action shown")
        assert "spike coder: burn 6x baseline" in str(app.main.feed.render())


async def test_refused_commands_show_the_supervisors_message() -> None:
    async def refuse(kind: str, fields: dict[str, Any]) -> None:
        raise CommandError("coder is not yours to pause")

    app = scripted_app(ScriptedSource(sample_snapshot(), effect=refuse))
    async with app.run_test() as pilot:
        await select(pilot, "coder")
        await pilot.press("p")
        await wait_for(
            pilot, lambda: "coder is not yours to pause" in notifications(app), "error shown"
        )
        assert app.view_of("coder").agent.state == "running"


async def test_enter_opens_agent_detail_with_its_calls() -> None:
    source = ScriptedSource(sample_snapshot(), replies={"history": sample_history("coder")})
    app = scripted_app(source)
    async with app.run_test(size=(120, 40)) as pilot:
        await select(pilot, "coder")
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, AgentDetailScreen), "detail open")
        screen = app.screen
        assert isinstance(screen, AgentDetailScreen)
        await wait_for(pilot, lambda: len(screen.events) == 6, "history shown")
        assert source.commands_of("history") == [{"agent": "coder", "limit": 200}]
        calls = screen.query_one("#calls")
        assert calls.row_count == 6  # type: ignore[attr-defined]
        await pilot.press("3")
        await pilot.pause()
        assert "agent:coder:day" in widget_text(screen.query_one("#budgets"))
        await pilot.press("4")
        await pilot.pause()
        assert "pause coder by rule:runaway" in widget_text(screen.query_one("#actions"))
        await pilot.press("5")
        await pilot.pause()
        assert "call failed: 429" in widget_text(screen.query_one("#log"))
        await pilot.press("2")
        await pilot.pause()
        assert "gpt-4o" in widget_text(screen.query_one("#by-model"))
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, AgentDetailScreen), "back")


async def test_report_screen_shows_rows_and_total_for_each_window() -> None:
    source = ScriptedSource(sample_snapshot(), replies={"report": sample_report()})
    app = scripted_app(source)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, ReportScreen), "report open")
        table = app.screen.query_one("#report")
        await wait_for(pilot, lambda: table.row_count == 3, "rows + total")  # type: ignore[attr-defined]
        assert source.commands_of("report")[0] == {"since": NOW - 86400, "by": "agent"}
        assert table.get_row("total")[-2] == "$0.7600"  # type: ignore[attr-defined]
        await pilot.press("1", "g")
        await wait_for(pilot, lambda: len(source.commands_of("report")) == 3, "re-requested")
        assert source.commands_of("report")[-1] == {"since": NOW - 3600, "by": "model"}


async def test_launch_lists_configured_agents() -> None:
    source = ScriptedSource(sample_snapshot())
    app = scripted_app(source, launchable=["indexer", "reviewer"])
    async with app.run_test() as pilot:
        await pilot.press("l", "down", "enter")
        await wait_for(pilot, lambda: bool(source.commands_of("launch")), "launch sent")
        assert source.commands_of("launch") == [{"name": "reviewer"}]
        await wait_for(pilot, lambda: "reviewer" in row_names(app), "new agent shown")


async def test_launch_without_configured_agents_says_how() -> None:
    app = scripted_app(ScriptedSource(sample_snapshot()))
    async with app.run_test() as pilot:
        await pilot.press("l")
        assert any("[agents.NAME]" in n for n in notifications(app))


async def test_help_and_command_palette_list_the_keys() -> None:
    app = scripted_app(ScriptedSource(sample_snapshot()))
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        text = " ".join(widget_text(w) for w in app.screen.query("Static"))
        for key, what in [
            ("p", "Pause/resume"),
            ("k", "Kill"),
            ("P", "Pause all"),
            ("/", "Filter"),
        ]:
            assert re.search(rf"(^|\s){re.escape(key)}\s+{what}", text), (key, what)
        await pilot.press("escape")
        titles = [c.title for c in app.get_system_commands(app.main)]
        assert {"Pause/resume", "Kill", "Throttle", "Budget", "Report"} <= set(titles)


async def test_a_flood_of_snapshots_coalesces_and_only_changed_cells_are_rewritten() -> None:
    source = ScriptedSource(sample_snapshot())
    app = scripted_app(source, min_refresh=0.2)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows")
        before = app.main.table.cell_updates
        for k in range(200):
            snap = sample_snapshot()
            snap.agents[0].requests_per_min = 1000.0 + k  # one figure changes
            source.push_nowait("snapshot", snap)
        await wait_for(
            pilot, lambda: app.view_of("researcher").requests_per_min == 1199.0, "last applied"
        )
        assert app.refreshes < 200  # coalesced: fewer repaints than snapshots pushed
        assert app.main.table.cell_updates - before <= app.refreshes


async def test_lost_supervisor_is_said_plainly() -> None:
    source = ScriptedSource(sample_snapshot())
    app = scripted_app(source)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows")
        source.close()
        await wait_for(
            pilot, lambda: any("closed the connection" in n for n in notifications(app)), "said"
        )


async def test_an_alert_pushed_and_then_in_a_snapshot_is_shown_once() -> None:
    source = ScriptedSource(sample_snapshot())
    app = scripted_app(source)
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows")
        alert = Alert("runaway", "coder", "same prompt 4 times", "critical", "pause", NOW - 1)
        source.push_nowait("alert", alert)  # as pushed: no id yet
        await wait_for(pilot, lambda: "same prompt 4" in widget_text(app.main.feed), "pushed")
        snap = sample_snapshot()
        snap.alerts.insert(0, Alert(**{**alert.to_dict(), "id": 9}))  # as stored
        source.push_nowait("snapshot", snap)
        await wait_for(
            pilot, lambda: any(e.alert_id == 9 for e in app.main.feed.unacknowledged), "id"
        )
        assert widget_text(app.main.feed).count("same prompt 4") == 1


async def test_no_color_renders_in_grey_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    app = scripted_app(ScriptedSource(sample_snapshot()))  # NO_COLOR is read when the app is built
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows")
        svg = app.export_screenshot()
    window_chrome = {"ff5f57", "febc2e", "28c840", "c5c8c6"}  # the SVG's frame, not the app
    colours = set(re.findall(r"#([0-9a-f]{6})\b", svg)) - window_chrome
    assert colours, "the screenshot has colours to check"
    assert {c for c in colours if not (c[0:2] == c[2:4] == c[4:6])} == set()


@pytest.mark.parametrize("keys", [(), ("slash", *"co")], ids=["table", "filter box"])
async def test_ctrl_c_quits(keys: tuple[str, ...]) -> None:
    app = scripted_app(ScriptedSource(sample_snapshot()))
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows")
        await pilot.press(*keys, "ctrl+c")
        await wait_for(pilot, lambda: app.return_code == 0, "the dashboard quit")
        assert not any("ctrl+q" in n for n in notifications(app))

"""The dashboard reads right at 80x24 and 160x48: nothing cut silently, the essential keys
always shown, rows that hold still under the cursor, figures that say what they measure."""

from __future__ import annotations

import dataclasses
import re
import time

import pytest
from textual.widgets import Footer, Input
from textual.widgets._footer import FooterKey

from tests.tui_fixtures import (
    NOW,
    notifications,
    row_names,
    sample_snapshot,
    scripted_app,
    view,
    wait_for,
    widget_text,
)
from tokenwatch.core.models import Snapshot
from tokenwatch.tui.screens.dialogs import ThrottleScreen
from tokenwatch.tui.source import ScriptedSource

SIZES = pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
ALERT = "looper repeated the same prompt 4 times in 1 s; paused"


def crowded_snapshot() -> Snapshot:
    """Two names that share a long prefix, a throttle rate, a long last alert, a tiny cost."""
    snap = sample_snapshot()
    snap.agents[0].agent.name = "literature-reviewer-alpha"
    snap.agents[1].agent.name = "literature-reviewer-beta"
    snap.agents[2].agent.state = "throttled"
    snap.agents[2].agent.throttle = "20k/min"
    snap.agents[4].last_alert = ALERT
    snap.agents[3].period_cost_usd = 0.000098  # a figure grows its column, never cut
    return snap


def line_with(text: str, needle: str) -> str:
    return next(line for line in text.splitlines() if needle in line)


@SIZES
async def test_names_and_states_stay_apart_and_nothing_is_cut_silently(
    size: tuple[int, int],
) -> None:
    app = scripted_app(ScriptedSource(crowded_snapshot()))
    async with app.run_test(size=size) as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows")
        table = app.main.table
        await wait_for(pilot, lambda: "alpha" in widget_text(table), "laid out for the size")
        text = widget_text(table)
        alpha, beta = line_with(text, "alpha"), line_with(text, "beta")
        assert "throttled 20k/min" in text
        assert "$0.000098" in text
        for row in (alpha, beta):
            assert re.search(r"\d+%", row), "the budget column is still on screen"
        if size[0] >= 160:
            assert "literature-reviewer-alpha" in alpha
            assert "literature-reviewer-beta" in beta
            looper = line_with(text, "looper")
            assert ALERT in looper or "…" in looper
        else:
            assert "…" in alpha, "cut in the middle, and said so"
            assert "…" in beta
            assert alpha.split()[1] != beta.split()[1]


@SIZES
async def test_help_and_quit_are_always_in_the_footer_and_no_key_is_cut(
    size: tuple[int, int],
) -> None:
    app = scripted_app(ScriptedSource(sample_snapshot()))
    async with app.run_test(size=size) as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows")
        footer = app.main.query_one(Footer)

        def shown() -> str:
            return "  ".join(str(k.render()).strip() for k in footer.query(FooterKey))

        await wait_for(pilot, lambda: "q Quit" in shown(), "footer drawn")
        text = shown()
        assert "? Help" in text
        assert "p Pause/resume" in text
        keys = list(footer.query(FooterKey))
        palette = next(k for k in keys if k.has_class("-command-palette"))
        for key in keys:
            if key is not palette:
                assert key.region.right <= palette.region.x, f"{key.key} runs under the palette"
        if size[0] >= 160:
            assert all(k in text for k in ("/ Filter", "r Report", "R Resume all"))


async def test_a_long_error_in_a_dialog_wraps_whole() -> None:
    app = scripted_app(ScriptedSource(sample_snapshot()))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows")
        await pilot.press("t")
        await wait_for(pilot, lambda: isinstance(app.screen, ThrottleScreen), "dialog open")
        app.screen.query_one("#rate", Input).value = "fast" * 6
        await pilot.press("enter")
        await pilot.pause()
        error = app.screen.query_one(".error")
        dialog = app.screen.query_one(".dialog")
        assert dialog.content_region.contains_region(error.region), "not clipped by the dialog"
        shown = " ".join(widget_text(error).split())
        assert f"not a rate: '{'fast' * 6}' (try 20k/min, $1/h, 50% or off)" in shown


def reversed_costs() -> Snapshot:
    """The sample agents with their figures reversed: the cheapest becomes the dearest."""
    snap = sample_snapshot()
    names = [v.agent.name for v in snap.agents]
    snap.agents = [view(n, len(names) - i) for i, n in enumerate(names)]
    return snap


async def test_rows_hold_still_while_the_user_moves_and_keys_act_on_what_was_shown() -> None:
    source = ScriptedSource(sample_snapshot())
    app = scripted_app(source)
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows")
        shown = row_names(app)  # by cost: looper, claude-writer, summariser, coder, researcher
        await pilot.press("down")  # onto claude-writer
        refreshes = app.refreshes
        source.push_nowait("snapshot", reversed_costs())
        await wait_for(pilot, lambda: app.refreshes > refreshes, "new figures applied")
        assert row_names(app) == shown, "the rows did not move under the cursor"
        assert "order held" in str(app.main.table.border_title)
        await pilot.press("down", "p")  # the row below claude-writer, as shown: summariser
        await wait_for(pilot, lambda: bool(source.commands_of("pause")), "pause sent")
        assert source.commands_of("pause")[0]["agent"] == shown[2] == "summariser"


async def test_the_order_follows_the_sort_again_once_the_user_stops() -> None:
    source = ScriptedSource(sample_snapshot())
    app = scripted_app(source)
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows")
        await pilot.press("down")
        table = app.main.table
        table.clock = lambda: time.monotonic() + 3600  # the hold has long passed
        source.push_nowait("snapshot", reversed_costs())
        await wait_for(pilot, lambda: row_names(app)[0] == "researcher", "re-sorted")
        assert table.selected_name == "claude-writer", "the cursor stays on its agent"
        assert "order held" not in str(table.border_title)


async def test_big_r_resumes_every_paused_agent() -> None:
    source = ScriptedSource(sample_snapshot())
    app = scripted_app(source)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows")
        await pilot.press("P")
        await wait_for(
            pilot, lambda: all(v.agent.state == "paused" for v in app.snapshot.agents), "paused"
        )
        await pilot.press("R")
        await wait_for(
            pilot, lambda: all(v.agent.state == "running" for v in app.snapshot.agents), "resumed"
        )
        assert source.commands_of("resume_all") == [
            {"who": "key", "why": "R pressed on the dashboard"}
        ]
        assert "resumed all paused agents" in notifications(app)


@SIZES
async def test_figures_say_their_window_and_when_the_budget_runs_out(
    size: tuple[int, int],
) -> None:
    snap = sample_snapshot()
    snap.budgets[0] = dataclasses.replace(snap.budgets[0], forecast_exhausted_at=NOW + 5400)
    app = scripted_app(ScriptedSource(snap))
    async with app.run_test(size=size) as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows")
        summary = widget_text(app.main.summary)
        assert "tok/min (1m)" in summary
        assert "/h (10m)" in summary
        when = time.strftime("%H:%M", time.localtime(NOW + 5400))
        assert f"runs out {when}" in summary
        legend = str(app.main.table.border_subtitle)
        assert "tok/m: last 1 min" in legend
        assert "$/h: last 10 min" in legend

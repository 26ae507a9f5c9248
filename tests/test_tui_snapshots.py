"""What each dashboard screen looks like at 80x24 and at a large size (pytest-textual-snapshot).

The app is built by the same factory the CLI uses; update the pictures with `--snapshot-update`
after checking the change is intended.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Input

from tests.tui_fixtures import (
    row_names,
    sample_history,
    sample_report,
    sample_snapshot,
    scripted_app,
    wait_for,
)
from tokenwatch.tui.app import TokenwatchApp
from tokenwatch.tui.screens.detail import AgentDetailScreen
from tokenwatch.tui.screens.dialogs import BudgetScreen, ConfirmScreen, HelpScreen
from tokenwatch.tui.screens.report import ReportScreen
from tokenwatch.tui.source import ScriptedSource

SMALL = (80, 24)
LARGE = (160, 48)


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Call times are shown in local time: pin the zone so the pictures match anywhere."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def dashboard() -> TokenwatchApp:
    source = ScriptedSource(
        sample_snapshot(),
        replies={"history": sample_history("coder", 12), "report": sample_report()},
    )
    return scripted_app(source)


def ready(
    *keys: str, until: Callable[[TokenwatchApp], bool]
) -> Callable[[Pilot[Any]], Awaitable[None]]:
    """Wait for the table, select the coder, press `keys`, wait until the screen is complete."""

    async def run_before(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, TokenwatchApp)
        await wait_for(pilot, lambda: len(row_names(app)) == 5, "rows shown")
        app.main.table.move_cursor(row=row_names(app).index("coder"))
        await pilot.press(*keys)
        await wait_for(pilot, lambda: until(app), "screen complete")
        for box in app.screen.query(Input):
            box.cursor_blink = False  # a blinking cursor would make the picture depend on timing
        await pilot.pause()

    return run_before


def _detail_loaded(app: TokenwatchApp) -> bool:
    return isinstance(app.screen, AgentDetailScreen) and len(app.screen.events) == 12


def _report_loaded(app: TokenwatchApp) -> bool:
    return isinstance(app.screen, ReportScreen) and app.screen.query_one("#report").row_count == 3  # type: ignore[attr-defined]


SCREENS: dict[str, tuple[tuple[str, ...], Callable[[TokenwatchApp], bool]]] = {
    "main": ((), lambda app: True),
    "detail": (("enter",), _detail_loaded),
    "report": (("r",), _report_loaded),
    "help": (("question_mark",), lambda app: isinstance(app.screen, HelpScreen)),
    "kill": (("k",), lambda app: isinstance(app.screen, ConfirmScreen)),
    "budget": (("b",), lambda app: isinstance(app.screen, BudgetScreen)),
}


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["80x24", "160x48"])
@pytest.mark.parametrize("screen", ["main", "detail", "report"])
def test_screen_pictures(snap_compare: Any, screen: str, size: tuple[int, int]) -> None:
    keys, until = SCREENS[screen]
    assert snap_compare(dashboard(), terminal_size=size, run_before=ready(*keys, until=until))


@pytest.mark.parametrize("screen", ["help", "kill", "budget"])
def test_dialog_pictures_at_80x24(snap_compare: Any, screen: str) -> None:
    keys, until = SCREENS[screen]
    assert snap_compare(dashboard(), terminal_size=SMALL, run_before=ready(*keys, until=until))

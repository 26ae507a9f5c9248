"""The dashboard says when a shared budget cannot be checked, and what it does meanwhile."""

from __future__ import annotations

from tests.tui_fixtures import (
    NAMES,
    row_names,
    sample_snapshot,
    scripted_app,
    wait_for,
    widget_text,
)
from tokenwatch.core.models import BudgetStatus
from tokenwatch.tui.source import ScriptedSource


async def test_the_summary_bar_names_each_shared_budget_in_trouble() -> None:
    snap = sample_snapshot()
    snap.budgets = [
        BudgetStatus(name="strict", scope="global", target="*", period="day", limit=5.0,
                     unit="usd", used=1.0, action="deny", fleet="refusing",
                     fleet_note="fleet unreachable: refusing strict"),
        BudgetStatus(name="sliced", scope="global", target="*", period="day", limit=5.0,
                     unit="usd", used=1.0, action="deny", fleet="local-slice",
                     fleet_note="fleet unreachable: spending from the local slice of sliced "
                     "($0.40 of $2.00)"),
        BudgetStatus(name="fine", scope="global", target="*", period="day", limit=5.0,
                     unit="usd", used=1.0, action="deny", fleet="shared"),
    ]  # fmt: skip
    app = scripted_app(ScriptedSource(snap))
    async with app.run_test(size=(200, 48)) as pilot:
        await wait_for(pilot, lambda: len(row_names(app)) == len(NAMES), "rows shown")
        summary = widget_text(app.main.query_one("SummaryBar"))
        assert "fleet unreachable: refusing strict" in summary
        assert "fleet unreachable: spending from the local slice of sliced ($0.40 of" in summary
        assert "fine" not in summary

"""Live figures and `tokenwatch status` mark a dollar total that holds estimated prices."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from tokenwatch.cli.supervisor import render_status
from tokenwatch.core.models import Agent, AgentView, UsageEvent
from tokenwatch.engine.agents import AgentRecord
from tokenwatch.engine.figures import LiveFigures

NOW = dt.datetime(2026, 12, 5, 10, 0, tzinfo=dt.UTC).timestamp()


def calls() -> list[UsageEvent]:
    guessed = UsageEvent(ts=NOW - 5, agent="claude3", model="acme-coder-7", cost_usd=0.06)
    guessed.price_source = "estimated:claude-opus-4-5"
    known = UsageEvent(ts=NOW - 4, agent="claude3", model="claude-opus-4-5", cost_usd=0.04)
    known.price_source = "genai-prices"
    other = UsageEvent(ts=NOW - 3, agent="coder", model="gpt-4o", cost_usd=0.01)
    return [guessed, known, other]


def test_live_figures_count_the_estimated_part_per_agent_and_group() -> None:
    live = LiveFigures(tz="UTC", clock=lambda: NOW)
    for event in calls():
        live.add(event)
    views = [AgentView(agent=Agent(name)) for name in ("claude3", "coder")]
    snap = live.snapshot(views, [])
    assert snap.spend_today_usd == pytest.approx(0.11)
    assert (snap.unpriced_today, snap.estimated_today_usd) == (1, pytest.approx(0.06))
    claude3, coder = snap.agents
    assert (claude3.period_cost_usd, claude3.period_estimated_usd) == (pytest.approx(0.1), 0.06)
    assert (claude3.unpriced_requests, coder.unpriced_requests) == (1, 0)
    assert snap.top_partial["agent"] == ["claude3"]
    assert snap.top_partial["model"] == ["acme-coder-7"]


def status_of(records: list[AgentRecord], live: LiveFigures) -> dict[str, Any]:
    """`status --json` as the supervisor builds it (commands.on_status)."""
    snap = live.snapshot([AgentView(agent=r.agent) for r in records], [])
    return {
        "supervisor": {"pid": 1, "socket": "/tmp/s"},
        "usd_per_hour": snap.usd_per_hour,
        "spend_today_usd": snap.spend_today_usd,
        "unpriced_requests": snap.unpriced_today,
        "estimated_usd": snap.estimated_today_usd,
        "agents": [
            {**v.to_dict(), "summary": r.summary()}
            for v, r in zip(snap.agents, records, strict=True)
        ],
    }


def test_status_table_and_json_mark_the_partial_total() -> None:
    live = LiveFigures(tz="UTC", clock=lambda: NOW)
    records = {name: AgentRecord(Agent(name, pid=7)) for name in ("claude3", "coder")}
    for event in calls():
        live.add(event)
        records[event.agent].count(event.total_tokens, event.cost_usd, event.price_source)
    status = status_of(list(records.values()), live)
    claude3 = status["agents"][0]["summary"]
    assert (claude3["unpriced_requests"], claude3["estimated_usd"]) == (1, 0.06)
    assert claude3["estimated_from"] == "claude-opus-4-5"
    assert status["unpriced_requests"] == 1
    lines = render_status(status).splitlines()
    assert lines[0].endswith("$0.1100* today")
    assert next(line for line in lines if line.startswith("claude3")).split()[4] == "$0.1000*"
    assert next(line for line in lines if line.startswith("coder")).split()[4] == "$0.0100"
    assert lines[-1].startswith(
        "* includes $0.0600 for models no price table knows, at an estimated price "
        "(price: estimated from claude-opus-4-5)"
    )

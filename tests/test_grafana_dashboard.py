"""The Grafana dashboard in the repo is valid JSON and queries only metrics tokenwatch exports."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tokenwatch.config import PrometheusSettings
from tokenwatch.core.models import (
    Action,
    Agent,
    AgentView,
    Alert,
    BudgetStatus,
    Snapshot,
    UsageEvent,
)
from tokenwatch.export.prometheus import PrometheusExporter


def exported_names() -> set[str]:
    snap = Snapshot(
        ts=time.time(),
        agents=[AgentView(agent=Agent(name="a"))],
        budgets=[BudgetStatus("b", "global", "*", "day", 1.0, "usd", 0.5, "alert")],
    )
    exporter = PrometheusExporter(PrometheusSettings(), lambda: snap)
    exporter.observe("usage", UsageEvent(agent="a", model="m", input_tokens=1, cost_usd=0.1))
    exporter.observe("alert", Alert(rule="r", agent="a", message="m"))
    exporter.observe("action", Action(kind="pause", agent="a", who="key"))
    text = exporter.render().decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_every_panel_queries_exported_metrics(repo_root: Path) -> None:
    dashboard = json.loads((repo_root / "deploy/grafana/tokenwatch.json").read_text())
    names = exported_names()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    used = {m for e in exprs for m in re.findall(r"\btokenwatch_[a-z_]+", e)}
    assert used, "the dashboard queries no tokenwatch metric"
    assert used <= names, f"unknown metrics: {sorted(used - names)}"

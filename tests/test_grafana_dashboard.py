"""The Grafana dashboard in the repo is valid JSON and queries only metrics (and labels) tokenwatch exports."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

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


def exported_labels() -> dict[str, set[str]]:
    """Sample name -> the label names tokenwatch's /metrics gives it."""
    snap = Snapshot(
        ts=time.time(),
        agents=[AgentView(agent=Agent(name="a"))],
        budgets=[BudgetStatus("b", "global", "*", "day", 1.0, "usd", 0.5, "alert")],
    )
    exporter = PrometheusExporter(PrometheusSettings(), lambda: snap)
    exporter.observe("usage", UsageEvent(agent="a", model="m", input_tokens=1, cost_usd=0.1))
    exporter.observe("alert", Alert(rule="r", agent="a", message="m"))
    exporter.observe("action", Action(kind="pause", agent="a", who="key"))
    exporter.observe("usage", UsageEvent(agent="a", model="m", lever="cache", saved_usd=0.1))
    text = exporter.render().decode()
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


SCRAPE_LABELS = {"instance", "job"}
"""Labels Prometheus adds to every series it scrapes."""


def queries(dashboard: dict[str, Any]) -> list[str]:
    panels = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    variables = [
        text
        for v in dashboard["templating"]["list"]
        if "definition" in v
        for text in (v["definition"], v["query"]["query"])
    ]
    return panels + variables


def test_every_panel_queries_exported_metrics(repo_root: Path) -> None:
    dashboard = json.loads((repo_root / "deploy/grafana/tokenwatch.json").read_text())
    names = set(exported_labels())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    used = {m for e in exprs for m in re.findall(r"\btokenwatch_[a-z_]+", e)}
    assert used, "the dashboard queries no tokenwatch metric"
    assert used <= names, f"unknown metrics: {sorted(used - names)}"


def test_every_label_a_query_uses_is_exported(repo_root: Path) -> None:
    dashboard = json.loads((repo_root / "deploy/grafana/tokenwatch.json").read_text())
    labels = exported_labels()
    for expr in queries(dashboard):
        for metric, matchers in re.findall(r"\b(tokenwatch_[a-z_]+)(?:\{([^}]*)\})?", expr):
            used = set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", matchers))
            known = labels[metric] | SCRAPE_LABELS
            assert used <= known, f"{expr}: {sorted(used - known)}"
        grouped = {g.strip() for by in re.findall(r"by \(([^)]*)\)", expr) for g in by.split(",")}
        metrics = re.findall(r"\btokenwatch_[a-z_]+", expr)
        in_expr = SCRAPE_LABELS.union(*(labels[m] for m in metrics))
        assert grouped <= in_expr, f"{expr}: {sorted(grouped - in_expr)}"


def test_the_board_splits_by_the_host_label(repo_root: Path) -> None:
    dashboard = json.loads((repo_root / "deploy/grafana/tokenwatch.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "host" in variables
    assert "host=~" in "".join(queries(dashboard))

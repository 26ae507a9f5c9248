"""OTLP export under today's OpenTelemetry GenAI names, the old ones under the opt-in, `host` everywhere.

Read back through the OpenTelemetry SDK's own InMemoryMetricReader, and from Prometheus' parser."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import (
    Histogram,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
    Sum,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from tests.test_export_metrics import EVENTS, snapshot
from tokenwatch.config import OtlpSettings, PrometheusSettings
from tokenwatch.core.models import Action, Alert, UsageEvent
from tokenwatch.export.otlp import OtlpExporter
from tokenwatch.export.prometheus import PrometheusExporter
from tokenwatch.export.semconv import OPT_IN_VARIABLE, emit_old_names

CURRENT_COUNTERS = {
    "gen_ai.client.inference.usage.input_tokens": "input_tokens",
    "gen_ai.client.inference.usage.output_tokens": "output_tokens",
    "gen_ai.client.inference.usage.cache_read.input_tokens": "cache_read_tokens",
    "gen_ai.client.inference.usage.cache_write.input_tokens": "cache_write_tokens",
    "gen_ai.client.inference.usage.reasoning.output_tokens": "reasoning_tokens",
}
CURRENT_HISTOGRAMS = {
    "gen_ai.client.inference.operation.input_tokens",
    "gen_ai.client.inference.operation.output_tokens",
    "gen_ai.client.inference.duration",
}
OLD_NAMES = {
    "gen_ai.client.token.usage",
    "gen_ai.client.operation.duration",
    "tokenwatch.tokens.cache_read",
    "tokenwatch.tokens.reasoning",
}
REASONING = UsageEvent(
    agent="coder",
    model="o3-mini",
    provider="openai",
    input_tokens=500,
    output_tokens=900,
    reasoning_tokens=700,
    cost_usd=0.004,
    latency_ms=2000.0,
)


def read_back(opt_in: str | None, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> dict[str, Metric]:
    """Record EVENTS (plus an action, an alert, a budget) and return what the SDK reader collects."""
    if opt_in is None:
        monkeypatch.delenv(OPT_IN_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(OPT_IN_VARIABLE, opt_in)
    reader = InMemoryMetricReader()
    exporter = OtlpExporter(OtlpSettings(interval=3600), snapshot, metric_reader=reader, **kw)
    for event in [*EVENTS, REASONING]:
        exporter.observe("usage", event)
    exporter.observe("action", Action(kind="pause", agent="coder", who="rule:runaway"))
    exporter.observe("alert", Alert(rule="runaway", agent="coder", message="looping"))
    data = reader.get_metrics_data()
    exporter.shutdown()
    assert data is not None
    return {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }


def by_model(metric: Metric) -> dict[str, float]:
    out: dict[str, float] = {}
    for point in metric.data.data_points:
        model = str(point.attributes["gen_ai.request.model"])
        value = point.value if isinstance(point, NumberDataPoint) else point.sum
        out[model] = out.get(model, 0) + value
    return out


def expected(field: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for event in [*EVENTS, REASONING]:
        out[event.model] = out.get(event.model, 0) + getattr(event, field)
    return out


def test_current_names_by_default_and_no_old_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = read_back(None, monkeypatch)
    assert not OLD_NAMES & metrics.keys()
    for name, field in CURRENT_COUNTERS.items():
        metric = metrics[name]
        assert isinstance(metric.data, Sum), name
        assert metric.data.is_monotonic, name
        assert metric.unit == "{token}"
        assert by_model(metric) == expected(field), name
        for point in metric.data.data_points:
            attrs = point.attributes
            assert attrs["gen_ai.token.modality"] == "unknown"
            assert {"gen_ai.operation.name", "gen_ai.provider.name"} <= attrs.keys()
            assert "gen_ai.token.type" not in attrs
            assert "gen_ai.system" not in attrs
    for name in CURRENT_HISTOGRAMS:
        assert isinstance(metrics[name].data, Histogram), name
    per_call = metrics["gen_ai.client.inference.operation.input_tokens"]
    assert by_model(per_call) == expected("input_tokens")
    assert list(per_call.data.data_points[0].explicit_bounds[:3]) == [1, 4, 16]
    assert "gen_ai.token.modality" not in per_call.data.data_points[0].attributes
    failed = [p for p in per_call.data.data_points if "error.type" in p.attributes]
    assert [p.attributes["error.type"] for p in failed] == ["500"]
    assert metrics["gen_ai.client.inference.duration"].unit == "s"
    priced = [e for e in [*EVENTS, REASONING] if e.cost_usd is not None]
    assert sum(by_model(metrics["tokenwatch.cost"]).values()) == pytest.approx(
        sum(e.cost_usd or 0 for e in priced)
    )


def test_latest_experimental_is_the_default_set(monkeypatch: pytest.MonkeyPatch) -> None:
    latest = read_back("gen_ai_latest_experimental", monkeypatch)
    assert latest.keys() == read_back(None, monkeypatch).keys()


@pytest.mark.parametrize("opt_in", ["gen_ai_latest_experimental/dup", "http, gen_ai/dup"])
def test_old_names_join_the_current_ones_under_the_opt_in(
    opt_in: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = read_back(opt_in, monkeypatch)
    assert OLD_NAMES | CURRENT_COUNTERS.keys() | CURRENT_HISTOGRAMS <= metrics.keys()
    usage = metrics["gen_ai.client.token.usage"]
    assert isinstance(usage.data, Histogram)
    sums: dict[tuple[str, str], float] = {}
    for point in usage.data.data_points:
        key = (
            str(point.attributes["gen_ai.request.model"]),
            str(point.attributes["gen_ai.token.type"]),
        )
        sums[key] = point.sum
        assert point.attributes["gen_ai.system"] == point.attributes["gen_ai.provider.name"]
    assert sums[("gpt-4o", "input")] == 2000
    assert sums[("gpt-4o", "output")] == 400
    assert sums[("o3-mini", "output")] == 900
    assert by_model(metrics["tokenwatch.tokens.reasoning"]) == {"o3-mini": 700}
    assert by_model(metrics["gen_ai.client.operation.duration"]) == by_model(
        metrics["gen_ai.client.inference.duration"]
    )


@pytest.mark.parametrize("opt_in", [None, "gen_ai/dup"])
def test_spans_carry_the_current_usage_attributes(
    opt_in: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if opt_in is None:
        monkeypatch.delenv(OPT_IN_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(OPT_IN_VARIABLE, opt_in)
    spans = InMemorySpanExporter()
    exporter = OtlpExporter(
        OtlpSettings(spans=True, interval=3600),
        snapshot,
        metric_reader=InMemoryMetricReader(),
        span_exporter=spans,
    )
    for event in [*EVENTS, REASONING]:
        exporter.observe("usage", event)
    exporter.shutdown()
    by_name = {s.name: dict(s.attributes or {}) for s in spans.get_finished_spans()}
    claude, o3 = by_name["chat claude-sonnet-4-5"], by_name["chat o3-mini"]
    assert claude["gen_ai.usage.cache_write.input_tokens"] == 4000
    assert o3["gen_ai.usage.reasoning.output_tokens"] == 700
    assert by_name["chat my-local-llm"]["error.type"] == "500"
    old = {"gen_ai.usage.cache_creation.input_tokens", "gen_ai.system"}
    assert (old <= claude.keys()) is (opt_in is not None)
    assert old.isdisjoint(claude) is (opt_in is None)


def test_host_is_on_every_otlp_series(monkeypatch: pytest.MonkeyPatch) -> None:
    for kw, host in [({}, socket.gethostname()), ({"host": "ci-runner-7"}, "ci-runner-7")]:
        metrics = read_back("gen_ai/dup", monkeypatch, **kw)
        assert {"tokenwatch.actions", "tokenwatch.alerts", "tokenwatch.budget.used"} <= (
            metrics.keys()
        )
        for name, metric in metrics.items():
            for point in metric.data.data_points:
                assert point.attributes["host.name"] == host, name


def test_host_is_on_every_prometheus_series() -> None:
    exporter = PrometheusExporter(PrometheusSettings(), snapshot, host="build-box")
    for event in [*EVENTS, REASONING]:
        exporter.observe("usage", event)
    exporter.observe("usage", UsageEvent(agent="a", model="m", lever="cache", saved_usd=0.1))
    exporter.observe("action", Action(kind="pause", agent="coder", who="key"))
    exporter.observe("alert", Alert(rule="runaway", agent="coder", message="looping"))
    families = list(text_string_to_metric_families(exporter.render().decode()))
    ours = [s for f in families if f.name.startswith("tokenwatch_") for s in f.samples]
    assert len({s.name for s in ours}) >= 15
    assert {s.name: s.labels.get("host") for s in ours} == {s.name: "build-box" for s in ours}


@pytest.mark.parametrize(
    ("value", "old"),
    [
        (None, False),
        ("", False),
        ("gen_ai_latest_experimental", False),
        ("http/dup,database", False),
        ("gen_ai_latest_experimental/dup", True),
        (" http , gen_ai/dup ", True),
    ],
)
def test_which_opt_in_values_bring_back_the_old_names(value: str | None, old: bool) -> None:
    environ = {} if value is None else {OPT_IN_VARIABLE: value}
    assert emit_old_names(environ) is old

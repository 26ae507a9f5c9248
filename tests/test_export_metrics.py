"""Prometheus /metrics and OTLP export carry exactly the recorded usage, under the GenAI names."""

from __future__ import annotations

import time

import aiohttp
import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.otlp_fixtures import Collector, counter_sums, histogram_sums, points_without
from tokenwatch.config import OtlpSettings, PrometheusSettings, parse_listen
from tokenwatch.core.models import (
    Action,
    Agent,
    AgentView,
    Alert,
    BudgetStatus,
    Snapshot,
    UsageEvent,
)
from tokenwatch.export.labels import OTHER, LabelFolder
from tokenwatch.export.otlp import OtlpExporter
from tokenwatch.export.prometheus import PrometheusExporter
from tokenwatch.export.semconv import OPT_IN_VARIABLE

EVENTS = [
    UsageEvent(
        agent="researcher",
        model="gpt-4o",
        provider="openai",
        task="t1",
        endpoint="/v1/chat/completions",
        input_tokens=1200,
        cache_read_tokens=1024,
        output_tokens=300,
        reasoning_tokens=0,
        cost_usd=0.0061,
        latency_ms=850.0,
    ),
    UsageEvent(
        agent="researcher",
        model="gpt-4o",
        provider="openai",
        task="t2",
        endpoint="/v1/chat/completions",
        input_tokens=800,
        output_tokens=100,
        cost_usd=0.003,
        latency_ms=400.0,
    ),
    UsageEvent(
        agent="coder",
        model="claude-sonnet-4-5",
        provider="anthropic",
        task="t1",
        endpoint="/v1/messages",
        input_tokens=5000,
        cache_write_tokens=4000,
        output_tokens=700,
        cost_usd=0.0285,
        latency_ms=1200.0,
    ),
    UsageEvent(
        agent="coder",
        model="my-local-llm",
        provider="openai",
        task="t3",
        endpoint="/v1/chat/completions",
        input_tokens=50,
        output_tokens=5,
        cost_usd=None,
        status="error",
        http_status=500,
    ),
]


def snapshot() -> Snapshot:
    return Snapshot(
        ts=time.time(),
        tokens_per_min=1234.0,
        usd_per_hour=0.5,
        agents=[
            AgentView(
                agent=Agent(name="researcher", state="running"),
                tokens_per_min=1000.0,
                usd_per_hour=0.4,
            ),
            AgentView(
                agent=Agent(name="coder", state="paused"), tokens_per_min=234.0, usd_per_hour=0.1
            ),
        ],
        budgets=[
            BudgetStatus(
                name="daily",
                scope="global",
                target="*",
                period="day",
                limit=5.0,
                unit="usd",
                used=1.25,
                action="pause",
            )
        ],
    )


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in found.items() if n == name and want <= lab)


async def test_metrics_scraped_over_http_equal_the_recorded_usage() -> None:
    exporter = PrometheusExporter(PrometheusSettings(listen="127.0.0.1:0"), snapshot)
    for event in EVENTS:
        exporter.observe("usage", event)
    exporter.observe(
        "alert", Alert(rule="runaway", agent="coder", message="looping", severity="critical")
    )
    exporter.observe("action", Action(kind="pause", agent="coder", who="rule:runaway"))
    async with anyio.create_task_group() as tg:
        port = await tg.start(exporter.serve)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            assert resp.status == 200
            text = await resp.text()
        tg.cancel_scope.cancel()
    found = samples(text)
    for token_type, attr in [
        ("input", "input_tokens"),
        ("output", "output_tokens"),
        ("cache_read", "cache_read_tokens"),
        ("cache_write", "cache_write_tokens"),
    ]:
        expected = sum(getattr(e, attr) for e in EVENTS)
        assert total(found, "tokenwatch_tokens_total", type=token_type) == expected, token_type
    assert total(found, "tokenwatch_tokens_total", agent="coder", type="output") == 705
    assert total(found, "tokenwatch_cost_usd_total") == pytest.approx(
        sum(e.cost_usd or 0 for e in EVENTS)
    )
    assert total(found, "tokenwatch_requests_total") == len(EVENTS)
    assert total(found, "tokenwatch_requests_total", status="error") == 1
    assert total(found, "tokenwatch_unpriced_requests_total", model="my-local-llm") == 1
    assert total(found, "tokenwatch_alerts_total", rule="runaway") == 1
    assert total(found, "tokenwatch_actions_total", kind="pause") == 1
    assert total(found, "tokenwatch_agent_state", agent="coder", state="paused") == 1
    assert total(found, "tokenwatch_agent_state", agent="coder", state="running") == 0
    assert total(found, "tokenwatch_budget_remaining", budget="daily") == pytest.approx(3.75)
    assert total(found, "tokenwatch_tokens_per_minute") == 1234.0


def test_an_estimated_cost_is_counted_and_marked_apart() -> None:
    exporter = PrometheusExporter(PrometheusSettings(listen="127.0.0.1:0"), snapshot)
    guessed = UsageEvent(agent="coder", model="acme-coder-7", cost_usd=0.03)
    guessed.price_source = "estimated:claude-opus-4-5"
    exporter.observe("usage", guessed)
    exporter.observe("usage", UsageEvent(agent="coder", model="gpt-4o", cost_usd=0.01))
    found = samples(exporter.render().decode())
    assert total(found, "tokenwatch_cost_usd_total") == pytest.approx(0.04)
    assert total(
        found, "tokenwatch_estimated_cost_usd_total", estimated_from="claude-opus-4-5"
    ) == pytest.approx(0.03)
    assert total(found, "tokenwatch_unpriced_requests_total", model="acme-coder-7") == 1
    assert total(found, "tokenwatch_unpriced_requests_total", model="gpt-4o") == 0


def test_task_and_user_labels_stay_bounded() -> None:
    exporter = PrometheusExporter(PrometheusSettings(max_label_values=3), snapshot)
    for i in range(50):
        exporter.observe(
            "usage", UsageEvent(agent="a", model="m", task=f"task-{i}", input_tokens=10)
        )
    found = samples(exporter.render().decode())
    tasks = {dict(lab)["task"] for (n, lab) in found if n == "tokenwatch_requests_total"}
    assert tasks == {"task-0", "task-1", "task-2", OTHER}
    assert total(found, "tokenwatch_requests_total") == 50
    assert total(found, "tokenwatch_tokens_total", task=OTHER) == 470


def test_savings_are_counted_per_agent_and_lever() -> None:
    exporter = PrometheusExporter(PrometheusSettings(), snapshot)
    hit = UsageEvent(agent="coder", model="gpt-4o", lever="cache", saved_tokens=900, saved_usd=0.25)
    for event in (hit, hit, UsageEvent(agent="coder", model="gpt-4o", input_tokens=900)):
        exporter.observe("usage", event)
    found = samples(exporter.render().decode())
    assert total(found, "tokenwatch_saved_usd_total", agent="coder", lever="cache") == 0.5
    assert total(found, "tokenwatch_lever_requests_total", lever="cache") == 2
    assert total(found, "tokenwatch_requests_total") == 3


def test_label_folder_keeps_first_values() -> None:
    fold = LabelFolder(2)
    assert [fold(v) for v in ["a", "b", "c", "a", "d"]] == ["a", "b", OTHER, "a", OTHER]
    assert fold.folded == 2


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (":9464", ("127.0.0.1", 9464)),
        ("[::1]:9000", ("::1", 9000)),
    ],
)
def test_listen_addresses(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["localhost", "garbage", "127.0.0.1:99999", ":-1"])
def test_bad_listen_address_is_refused(listen: str) -> None:
    with pytest.raises(ValueError, match=r"expected HOST:PORT \(port 0 to 65535\)"):
        parse_listen(listen)


async def test_otlp_collector_receives_genai_metrics_and_spans(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(OPT_IN_VARIABLE, raising=False)
    exporter = OtlpExporter(
        OtlpSettings(endpoint=collector.url, spans=True, interval=3600), snapshot, host="agents-1"
    )
    for event in EVENTS:
        exporter.observe("usage", event)
    assert await anyio.to_thread.run_sync(exporter.force_flush)
    await anyio.to_thread.run_sync(exporter.shutdown)

    inputs = counter_sums(collector.metrics, "gen_ai.client.inference.usage.input_tokens")
    assert inputs["gpt-4o"] == 2000
    assert inputs["claude-sonnet-4-5"] == 5000
    outputs = counter_sums(collector.metrics, "gen_ai.client.inference.usage.output_tokens")
    assert outputs["gpt-4o"] == 400
    cache_write = "gen_ai.client.inference.usage.cache_write.input_tokens"
    assert counter_sums(collector.metrics, cache_write)["claude-sonnet-4-5"] == 4000
    assert not histogram_sums(collector.metrics, "gen_ai.client.token.usage")
    assert points_without(collector.metrics, "host.name", "agents-1") == []
    names = {
        m.name
        for r in collector.metrics
        for rm in r.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert {
        "gen_ai.client.inference.duration",
        "gen_ai.client.inference.operation.input_tokens",
        "tokenwatch.cost",
        "tokenwatch.budget.used",
    } <= names

    spans = [
        s
        for r in collector.traces
        for rs in r.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    ]
    assert len(spans) == len(EVENTS)
    by_name = {s.name: s for s in spans}
    claude = by_name["chat claude-sonnet-4-5"]
    attrs = {a.key: a.value for a in claude.attributes}
    assert attrs["gen_ai.usage.input_tokens"].int_value == 5000
    assert attrs["gen_ai.usage.output_tokens"].int_value == 700
    assert attrs["gen_ai.provider.name"].string_value == "anthropic"
    assert attrs["gen_ai.usage.cache_write.input_tokens"].int_value == 4000
    assert "gen_ai.usage.cache_creation.input_tokens" not in attrs
    assert "gen_ai.system" not in attrs
    assert attrs["tokenwatch.cost_usd"].double_value == pytest.approx(0.0285)
    assert claude.end_time_unix_nano - claude.start_time_unix_nano == 1_200_000_000


@pytest.mark.slow
async def test_unreachable_collector_drops_and_counts_instead_of_blocking() -> None:
    # A port nobody listens on: connections are refused at once.
    exporter = OtlpExporter(
        OtlpSettings(endpoint="http://127.0.0.1:9", spans=True, queue_size=4, interval=3600),
        snapshot,
    )
    for _ in range(40):
        exporter.observe("usage", EVENTS[0])
    stats = exporter.statistics()
    assert stats.spans_queued <= 4
    assert stats.spans_dropped == 40 - stats.spans_queued
    await anyio.to_thread.run_sync(exporter.force_flush, 1.0)
    await anyio.to_thread.run_sync(exporter.shutdown)
    after = exporter.statistics()
    assert after.metric_exports_failed >= 1
    assert after.spans_exported == 0

"""A running supervisor exports what its ledger holds: /metrics (Prometheus' own parser) and OTLP."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.otlp_fixtures import Collector, counter_sums, points_without
from tests.supervisor_fixtures import quiet_config, raw_client, running_supervisor, usage_event
from tokenwatch.config import ExportSettings, OtlpSettings, PrometheusSettings
from tokenwatch.export.semconv import OPT_IN_VARIABLE
from tokenwatch.ledger.store import Store
from tokenwatch.paths import Paths

CALLS = [
    (
        "researcher",
        "gpt-4o",
        {"input_tokens": 1200, "cache_read_tokens": 1024, "output_tokens": 300},
    ),
    ("researcher", "gpt-4o-mini", {"input_tokens": 400, "output_tokens": 90}),
    (
        "coder",
        "claude-sonnet-4-5",
        {
            "provider": "anthropic",
            "input_tokens": 6000,
            "cache_write_tokens": 5000,
            "output_tokens": 800,
        },
    ),
    ("coder", "unheard-of-model", {"input_tokens": 10, "output_tokens": 2}),
    ("coder", "o3-mini", {"input_tokens": 500, "output_tokens": 900, "reasoning_tokens": 700}),
]


def metric_sum(text: str, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and want <= set(s.labels.items())
    )


async def test_scraped_metrics_equal_the_ledger() -> None:
    paths = Paths.discover()
    config = quiet_config(
        export=ExportSettings(prometheus=PrometheusSettings(listen="127.0.0.1:0"))
    )
    async with running_supervisor(paths, config, proxy=False) as sup:
        async with raw_client(paths.socket) as client:
            for agent in ("researcher", "coder"):
                await client.call("hello", name=agent, pid=0)
            for i, (agent, model, fields) in enumerate(CALLS):
                reply = await client.call(
                    "usage", event=usage_event(agent, f"c{i}", model=model, **fields)
                )
                assert reply["ok"], reply
        assert sup.metrics_url
        async with aiohttp.ClientSession() as http, http.get(sup.metrics_url) as resp:
            text = await resp.text()

    async with await Store.open(paths.db) as store:
        totals = await store.totals(0)
        by_agent = {row.key: row for row in await store.aggregate("agent", 0)}

    assert metric_sum(text, "tokenwatch_requests_total") == totals.requests == len(CALLS)
    assert metric_sum(text, "tokenwatch_requests_total", host=socket.gethostname()) == len(CALLS)
    for token_type, field in [
        ("input", "input_tokens"),
        ("output", "output_tokens"),
        ("cache_read", "cache_read_tokens"),
        ("cache_write", "cache_write_tokens"),
        ("reasoning", "reasoning_tokens"),
    ]:
        assert metric_sum(text, "tokenwatch_tokens_total", type=token_type) == getattr(
            totals, field
        )
    assert metric_sum(text, "tokenwatch_cost_usd_total") == pytest.approx(totals.cost_usd)
    for agent, row in by_agent.items():
        assert metric_sum(text, "tokenwatch_cost_usd_total", agent=agent) == pytest.approx(
            row.cost_usd
        )
    assert metric_sum(text, "tokenwatch_unpriced_requests_total", model="unheard-of-model") == 1
    assert totals.unpriced_requests == 1


async def test_supervisor_ships_spans_and_metrics_to_an_otlp_collector(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(OPT_IN_VARIABLE, raising=False)
    paths = Paths.discover()
    otlp = OtlpSettings(endpoint=collector.url, spans=True, interval=3600)
    config = quiet_config(export=ExportSettings(otlp=otlp))
    async with running_supervisor(paths, config, proxy=False), raw_client(paths.socket) as client:
        await client.call("hello", name="researcher", pid=0)
        for i, (_, model, fields) in enumerate(CALLS):
            assert (
                await client.call(
                    "usage", event=usage_event("researcher", f"o{i}", model=model, **fields)
                )
            )["ok"]
    # Stopping the supervisor flushes the exporter: everything recorded has reached the collector.
    spans = [
        s
        for r in collector.traces
        for rs in r.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    ]
    assert sorted(s.name for s in spans) == sorted(f"chat {model}" for _, model, _ in CALLS)
    inputs = counter_sums(collector.metrics, "gen_ai.client.inference.usage.input_tokens")
    assert inputs["gpt-4o"] == 1200
    outputs = counter_sums(collector.metrics, "gen_ai.client.inference.usage.output_tokens")
    assert outputs["o3-mini"] == 900
    reasoning = "gen_ai.client.inference.usage.reasoning.output_tokens"
    assert counter_sums(collector.metrics, reasoning)["o3-mini"] == 700
    # One board over several supervisors splits by machine: every series names this one.
    assert points_without(collector.metrics, "host.name", socket.gethostname()) == []

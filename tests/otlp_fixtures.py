"""An in-process OTLP/HTTP collector for export tests: it decodes the protobuf it receives."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric


@dataclass
class Collector:
    """An in-process OTLP/HTTP collector that decodes what it receives."""

    metrics: list[ExportMetricsServiceRequest] = field(default_factory=list)
    traces: list[ExportTraceServiceRequest] = field(default_factory=list)
    url: str = ""


async def _body(request: web.Request) -> bytes:
    raw = await request.read()
    return gzip.decompress(raw) if request.headers.get("Content-Encoding") == "gzip" else raw


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    col = Collector()

    async def metrics(request: web.Request) -> web.Response:
        col.metrics.append(ExportMetricsServiceRequest.FromString(await _body(request)))
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def traces(request: web.Request) -> web.Response:
        col.traces.append(ExportTraceServiceRequest.FromString(await _body(request)))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/metrics", metrics)
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    col.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield col
    await runner.cleanup()


def histogram_sums(
    requests: list[ExportMetricsServiceRequest], name: str
) -> dict[tuple[str, str], float]:
    """(model, token type) -> sum of the histogram's recorded values, last export wins."""
    out: dict[tuple[str, str], float] = {}
    for req in requests:
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.histogram.data_points:
                        attrs = {a.key: a.value.string_value for a in point.attributes}
                        out[(attrs["gen_ai.request.model"], attrs.get("gen_ai.token.type", ""))] = (
                            point.sum
                        )
    return out


def _metrics(requests: list[ExportMetricsServiceRequest]) -> Iterator[Metric]:
    for req in requests:
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                yield from sm.metrics


def counter_sums(requests: list[ExportMetricsServiceRequest], name: str) -> dict[str, float]:
    """model -> the counter's value (summed over its other attributes), last export wins."""
    last: dict[tuple[tuple[str, str], ...], float] = {}
    for metric in _metrics(requests):
        if metric.name != name:
            continue
        assert metric.sum.is_monotonic, name
        for point in metric.sum.data_points:
            key = tuple(sorted((a.key, a.value.string_value) for a in point.attributes))
            last[key] = point.as_int or point.as_double
    out: dict[str, float] = {}
    for key, value in last.items():
        model = dict(key)["gen_ai.request.model"]
        out[model] = out.get(model, 0) + value
    return out


def points_without(requests: list[ExportMetricsServiceRequest], key: str, value: str) -> list[str]:
    """Names of the metrics with a data point whose attribute `key` is not `value`."""
    missing = []
    for metric in _metrics(requests):
        data = metric.WhichOneof("data")
        for point in getattr(metric, data).data_points:
            attrs = {a.key: a.value.string_value for a in point.attributes}
            if attrs.get(key) != value:
                missing.append(metric.name)
    return missing

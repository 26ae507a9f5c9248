"""An in-process OTLP/HTTP collector for export tests: it decodes the protobuf it receives."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


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

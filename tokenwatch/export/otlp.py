"""OpenTelemetry export over OTLP/HTTP: GenAI-convention metrics and, optionally, one span per call."""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode

from tokenwatch.config import OtlpSettings
from tokenwatch.core.models import Action, Alert, Snapshot, UsageEvent
from tokenwatch.core.pricing import is_estimated

EXPORT_TIMEOUT_S = 5.0
"""An unreachable collector costs the export thread at most this long per attempt, never the loop."""

OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/responses": "chat",
    "/v1/messages": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
}


def operation_name(endpoint: str) -> str:
    for suffix, name in OPERATIONS.items():
        if endpoint.endswith(suffix):
            return name
    return "chat"


def genai_attributes(event: UsageEvent) -> dict[str, str]:
    """The GenAI semantic-convention attributes that identify a call's kind, provider and model."""
    return {
        "gen_ai.operation.name": operation_name(event.endpoint),
        "gen_ai.provider.name": event.provider,
        "gen_ai.system": event.provider,
        "gen_ai.request.model": event.model,
        "tokenwatch.agent": event.agent,
    }


def span_attributes(event: UsageEvent) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        **genai_attributes(event),
        "gen_ai.usage.input_tokens": event.input_tokens,
        "gen_ai.usage.output_tokens": event.output_tokens,
        "gen_ai.usage.cache_read.input_tokens": event.cache_read_tokens,
        "gen_ai.usage.cache_creation.input_tokens": event.cache_write_tokens,
        "tokenwatch.usage.reasoning_tokens": event.reasoning_tokens,
        "tokenwatch.task": event.task,
        "tokenwatch.user": event.user,
        "tokenwatch.run_id": event.run_id,
        "tokenwatch.estimated": event.estimated,
        "tokenwatch.source": event.source,
        "tokenwatch.status": event.status,
    }
    if event.cost_usd is not None:
        attrs["tokenwatch.cost_usd"] = event.cost_usd
        # which table priced it; `estimated:MODEL` when no table knew the model
        attrs["tokenwatch.price_source"] = event.price_source
    if event.http_status is not None:
        attrs["http.response.status_code"] = event.http_status
    if event.ttft_ms is not None:
        attrs["tokenwatch.ttft_ms"] = event.ttft_ms
    return attrs


@dataclass(slots=True)
class OtlpStatistics:
    metric_exports_failed: int = 0
    spans_queued: int = 0
    spans_exported: int = 0
    spans_failed: int = 0
    spans_dropped: int = 0
    """Spans not queued because the collector was not keeping up (bounded queue)."""


class _CountingMetricExporter(MetricExporter):
    def __init__(self, inner: MetricExporter, stats: OtlpStatistics) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self._inner = inner
        self._stats = stats

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        result = self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        if result is not MetricExportResult.SUCCESS:
            self._stats.metric_exports_failed += 1
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class _CountingSpanExporter(SpanExporter):
    def __init__(self, inner: SpanExporter, stats: OtlpStatistics, lock: threading.Lock) -> None:
        self._inner = inner
        self._stats = stats
        self._lock = lock

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self._inner.export(spans)
        with self._lock:
            if result is SpanExportResult.SUCCESS:
                self._stats.spans_exported += len(spans)
            else:
                self._stats.spans_failed += len(spans)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _BoundedSpanProcessor(SpanProcessor):
    """Forwards to a batch processor while fewer than `capacity` spans wait; counts the rest as dropped."""

    def __init__(
        self, inner: SpanProcessor, capacity: int, stats: OtlpStatistics, lock: threading.Lock
    ) -> None:
        self._inner = inner
        self._capacity = capacity
        self._stats = stats
        self._lock = lock

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            s = self._stats
            waiting = s.spans_queued - s.spans_exported - s.spans_failed
            if waiting >= self._capacity:
                s.spans_dropped += 1
                return
            s.spans_queued += 1
        self._inner.on_end(span)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)


class OtlpExporter:
    """Engine listener that records GenAI metrics (and spans) and ships them from SDK threads."""

    def __init__(
        self,
        settings: OtlpSettings,
        snapshot: Callable[[], Snapshot],
        *,
        metric_exporter: MetricExporter | None = None,
        span_exporter: SpanExporter | None = None,
    ) -> None:
        self.settings = settings
        self.stats = OtlpStatistics()
        self._lock = threading.Lock()
        self._snapshot = snapshot
        resource = Resource.create(
            {"service.name": "tokenwatch", "host.name": socket.gethostname()}
        )
        metric_exporter = metric_exporter or self._otlp_metric_exporter()
        reader = PeriodicExportingMetricReader(
            _CountingMetricExporter(metric_exporter, self.stats),
            export_interval_millis=settings.interval * 1000,
            export_timeout_millis=EXPORT_TIMEOUT_S * 1000,
        )
        self.meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        self._instruments()
        self.tracer_provider: TracerProvider | None = None
        if settings.spans:
            span_exporter = span_exporter or self._otlp_span_exporter()
            counting = _CountingSpanExporter(span_exporter, self.stats, self._lock)
            batch = BatchSpanProcessor(
                counting,
                max_queue_size=max(settings.queue_size, 1),
                max_export_batch_size=min(512, max(settings.queue_size, 1)),
                export_timeout_millis=EXPORT_TIMEOUT_S * 1000,
            )
            self.tracer_provider = TracerProvider(resource=resource)
            self.tracer_provider.add_span_processor(
                _BoundedSpanProcessor(batch, settings.queue_size, self.stats, self._lock)
            )

    def _otlp_metric_exporter(self) -> MetricExporter:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(endpoint=self._url("metrics"), timeout=EXPORT_TIMEOUT_S)

    def _otlp_span_exporter(self) -> SpanExporter:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=self._url("traces"), timeout=EXPORT_TIMEOUT_S)

    def _url(self, signal: str) -> str:
        base = self.settings.endpoint.rstrip("/")
        return base if base.endswith(f"/v1/{signal}") else f"{base}/v1/{signal}"

    def _instruments(self) -> None:
        meter = self.meter_provider.get_meter("tokenwatch")
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Input and output tokens used per LLM call",
        )
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="LLM call duration"
        )
        self.cost = meter.create_counter(
            "tokenwatch.cost", unit="USD", description="Spend on LLM calls"
        )
        self.requests = meter.create_counter("tokenwatch.requests", unit="{request}")
        self.cached = meter.create_counter("tokenwatch.tokens.cache_read", unit="{token}")
        self.reasoning = meter.create_counter("tokenwatch.tokens.reasoning", unit="{token}")
        self.actions = meter.create_counter("tokenwatch.actions", unit="{action}")
        self.alerts = meter.create_counter("tokenwatch.alerts", unit="{alert}")
        meter.create_observable_gauge(
            "tokenwatch.budget.used",
            callbacks=[self._budget_used],
            description="Budget used this period",
        )
        meter.create_observable_gauge(
            "tokenwatch.budget.remaining",
            callbacks=[self._budget_remaining],
            description="Budget left this period",
        )

    def _budget_observations(self, attr: str) -> Iterable[Observation]:
        for b in self._snapshot().budgets:
            value = b.used if attr == "used" else b.remaining
            yield Observation(
                value, {"tokenwatch.budget": b.name, "tokenwatch.budget.unit": b.unit}
            )

    def _budget_used(self, _: CallbackOptions) -> Iterable[Observation]:
        return list(self._budget_observations("used"))

    def _budget_remaining(self, _: CallbackOptions) -> Iterable[Observation]:
        return list(self._budget_observations("remaining"))

    def observe(self, kind: str, obj: Any) -> None:
        if kind == "usage" and isinstance(obj, UsageEvent):
            self._usage(obj)
        elif kind == "action" and isinstance(obj, Action):
            self.actions.add(1, {"tokenwatch.action": obj.kind, "tokenwatch.agent": obj.agent})
        elif kind == "alert" and isinstance(obj, Alert):
            self.alerts.add(1, {"tokenwatch.rule": obj.rule, "tokenwatch.severity": obj.severity})

    def _usage(self, event: UsageEvent) -> None:
        attrs = genai_attributes(event)
        self.token_usage.record(event.input_tokens, {**attrs, "gen_ai.token.type": "input"})
        self.token_usage.record(event.output_tokens, {**attrs, "gen_ai.token.type": "output"})
        if event.latency_ms is not None:
            timing = dict(attrs)
            if event.status != "ok":
                timing["error.type"] = str(event.http_status or event.status)
            self.duration.record(event.latency_ms / 1000.0, timing)
        self.requests.add(1, {**attrs, "tokenwatch.status": event.status})
        if event.cost_usd is not None:  # an estimated price is told apart: a partial total
            estimated = is_estimated(event.price_source)
            self.cost.add(event.cost_usd, {**attrs, "tokenwatch.price_estimated": estimated})
        if event.cache_read_tokens:
            self.cached.add(event.cache_read_tokens, attrs)
        if event.reasoning_tokens:
            self.reasoning.add(event.reasoning_tokens, attrs)
        if self.tracer_provider is not None:
            self._span(event)

    def _span(self, event: UsageEvent) -> None:
        assert self.tracer_provider is not None
        tracer = self.tracer_provider.get_tracer("tokenwatch")
        end_ns = int(event.ts * 1e9)
        start_ns = end_ns - int((event.latency_ms or 0.0) * 1e6)
        name = f"{operation_name(event.endpoint)} {event.model}".strip()
        span = tracer.start_span(
            name, kind=SpanKind.CLIENT, start_time=start_ns, attributes=span_attributes(event)
        )
        if event.status != "ok":
            span.set_status(Status(StatusCode.ERROR, event.status))
        span.end(end_time=end_ns)

    def force_flush(self, timeout_s: float = EXPORT_TIMEOUT_S) -> bool:
        """Blocking: call from a worker thread (anyio.to_thread) in async code."""
        ok = self.meter_provider.force_flush(int(timeout_s * 1000))
        if self.tracer_provider is not None:
            ok = self.tracer_provider.force_flush(int(timeout_s * 1000)) and ok
        return ok

    def shutdown(self) -> None:
        """Blocking: flushes what it can within the export timeout, then stops the SDK threads."""
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        self.meter_provider.shutdown(timeout_millis=EXPORT_TIMEOUT_S * 1000)

    def statistics(self) -> OtlpStatistics:
        with self._lock:
            return dataclasses.replace(self.stats)

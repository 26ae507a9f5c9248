"""OpenTelemetry export over OTLP/HTTP: GenAI-convention metrics and, optionally, one span per call."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricReader,
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
from tokenwatch.export.host import host_name
from tokenwatch.export.semconv import (
    DURATION,
    OLD_DURATION,
    OLD_TOKEN_USAGE,
    OPERATION_HISTOGRAMS,
    TOKEN_BUCKETS,
    TOKEN_MODALITY_UNKNOWN,
    USAGE_COUNTERS,
    emit_old_names,
)

HOST = "host.name"
"""The machine on every series: OpenTelemetry's name for it (a bare `host` would clash with the
`host.*` namespace); a Prometheus-bound collector turns it into a `host_name` label."""

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


def genai_attributes(event: UsageEvent, *, old: bool = False) -> dict[str, str]:
    """The GenAI semantic-convention attributes that identify a call's kind, provider and model."""
    attrs = {
        "gen_ai.operation.name": operation_name(event.endpoint),
        "gen_ai.provider.name": event.provider,
        "gen_ai.request.model": event.model,
        "tokenwatch.agent": event.agent,
    }
    if old:  # `gen_ai.system` gave way to `gen_ai.provider.name` in v1.37
        attrs["gen_ai.system"] = event.provider
    return attrs


def error_type(event: UsageEvent) -> str | None:
    """`error.type` for a failed call (its HTTP status, else tokenwatch's status); None when it went well."""
    return None if event.status == "ok" else str(event.http_status or event.status)


def span_attributes(event: UsageEvent, *, old: bool = False) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        **genai_attributes(event, old=old),
        "gen_ai.usage.input_tokens": event.input_tokens,
        "gen_ai.usage.output_tokens": event.output_tokens,
        "gen_ai.usage.cache_read.input_tokens": event.cache_read_tokens,
        "gen_ai.usage.cache_write.input_tokens": event.cache_write_tokens,
        "gen_ai.usage.reasoning.output_tokens": event.reasoning_tokens,
        "tokenwatch.task": event.task,
        "tokenwatch.user": event.user,
        "tokenwatch.run_id": event.run_id,
        "tokenwatch.estimated": event.estimated,
        "tokenwatch.source": event.source,
        "tokenwatch.status": event.status,
    }
    if old:  # the names these had before the GenAI conventions renamed or adopted them
        attrs["gen_ai.usage.cache_creation.input_tokens"] = event.cache_write_tokens
        attrs["tokenwatch.usage.reasoning_tokens"] = event.reasoning_tokens
    if event.cost_usd is not None:
        attrs["tokenwatch.cost_usd"] = event.cost_usd
        # which table priced it; `estimated:MODEL` when no table knew the model
        attrs["tokenwatch.price_source"] = event.price_source
    if (error := error_type(event)) is not None:
        attrs["error.type"] = error
    if event.http_status is not None:
        attrs["http.response.status_code"] = event.http_status
    if event.ttft_ms is not None:
        attrs["gen_ai.response.time_to_first_chunk"] = event.ttft_ms / 1000.0
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
        metric_reader: MetricReader | None = None,
        span_exporter: SpanExporter | None = None,
        host: str | None = None,
        old_names: bool | None = None,
    ) -> None:
        self.settings = settings
        self.host = host or host_name()
        """`host.name` on every series (and the resource), so a team's board can split by machine."""
        self.old_names = emit_old_names() if old_names is None else old_names
        """Also emit the GenAI names of before the 2026 move (OTEL_SEMCONV_STABILITY_OPT_IN)."""
        self.stats = OtlpStatistics()
        self._lock = threading.Lock()
        self._snapshot = snapshot
        resource = Resource.create({"service.name": "tokenwatch", HOST: self.host})
        reader = metric_reader or PeriodicExportingMetricReader(
            _CountingMetricExporter(metric_exporter or self._otlp_metric_exporter(), self.stats),
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
        self.usage = [
            (meter.create_counter(name, unit="{token}", description=text), field)
            for name, field, text in USAGE_COUNTERS
        ]
        self.per_call = [
            (
                meter.create_histogram(
                    name,
                    unit="{token}",
                    description=text,
                    explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
                ),
                field,
            )
            for name, field, text in OPERATION_HISTOGRAMS
        ]
        self.duration = meter.create_histogram(DURATION, unit="s", description="LLM call duration")
        self.cost = meter.create_counter(
            "tokenwatch.cost", unit="USD", description="Spend on LLM calls"
        )
        self.requests = meter.create_counter("tokenwatch.requests", unit="{request}")
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
        if self.old_names:
            self._old_instruments(meter)

    def _old_instruments(self, meter: Meter) -> None:
        """The names tokenwatch emitted before the GenAI conventions split token usage into counters."""
        self.token_usage = meter.create_histogram(
            OLD_TOKEN_USAGE,
            unit="{token}",
            description="Input and output tokens used per LLM call",
        )
        self.old_duration = meter.create_histogram(
            OLD_DURATION, unit="s", description="LLM call duration"
        )
        self.cached = meter.create_counter("tokenwatch.tokens.cache_read", unit="{token}")
        self.reasoning = meter.create_counter("tokenwatch.tokens.reasoning", unit="{token}")

    def _budget_observations(self, attr: str) -> Iterable[Observation]:
        for b in self._snapshot().budgets:
            value = b.used if attr == "used" else b.remaining
            yield Observation(
                value,
                {"tokenwatch.budget": b.name, "tokenwatch.budget.unit": b.unit, HOST: self.host},
            )

    def _budget_used(self, _: CallbackOptions) -> Iterable[Observation]:
        return list(self._budget_observations("used"))

    def _budget_remaining(self, _: CallbackOptions) -> Iterable[Observation]:
        return list(self._budget_observations("remaining"))

    def observe(self, kind: str, obj: Any) -> None:
        if kind == "usage" and isinstance(obj, UsageEvent):
            self._usage(obj)
        elif kind == "action" and isinstance(obj, Action):
            attrs = {"tokenwatch.action": obj.kind, "tokenwatch.agent": obj.agent, HOST: self.host}
            self.actions.add(1, attrs)
        elif kind == "alert" and isinstance(obj, Alert):
            rule = {"tokenwatch.rule": obj.rule, "tokenwatch.severity": obj.severity}
            self.alerts.add(1, {**rule, HOST: self.host})

    def _usage(self, event: UsageEvent) -> None:
        attrs: dict[str, Any] = {**genai_attributes(event, old=self.old_names), HOST: self.host}
        per_call = dict(attrs)
        if (error := error_type(event)) is not None:
            per_call["error.type"] = error
        # Every call counts, a failed one too (0 tokens then), as the conventions ask.
        counted = {**attrs, "gen_ai.token.modality": TOKEN_MODALITY_UNKNOWN}
        for counter, field in self.usage:
            counter.add(getattr(event, field), counted)
        for histogram, field in self.per_call:
            histogram.record(getattr(event, field), per_call)
        if event.latency_ms is not None:
            self.duration.record(event.latency_ms / 1000.0, per_call)
        self.requests.add(1, {**attrs, "tokenwatch.status": event.status})
        if event.cost_usd is not None:  # an estimated price is told apart: a partial total
            estimated = is_estimated(event.price_source)
            self.cost.add(event.cost_usd, {**attrs, "tokenwatch.price_estimated": estimated})
        if self.old_names:
            self._old_usage(event, attrs, per_call)
        if self.tracer_provider is not None:
            self._span(event)

    def _old_usage(
        self, event: UsageEvent, attrs: dict[str, Any], per_call: dict[str, Any]
    ) -> None:
        self.token_usage.record(event.input_tokens, {**attrs, "gen_ai.token.type": "input"})
        self.token_usage.record(event.output_tokens, {**attrs, "gen_ai.token.type": "output"})
        if event.latency_ms is not None:
            self.old_duration.record(event.latency_ms / 1000.0, per_call)
        if event.cache_read_tokens:
            self.cached.add(event.cache_read_tokens, attrs)
        if event.reasoning_tokens:
            self.reasoning.add(event.reasoning_tokens, attrs)

    def _span(self, event: UsageEvent) -> None:
        assert self.tracer_provider is not None
        tracer = self.tracer_provider.get_tracer("tokenwatch")
        end_ns = int(event.ts * 1e9)
        start_ns = end_ns - int((event.latency_ms or 0.0) * 1e6)
        name = f"{operation_name(event.endpoint)} {event.model}".strip()
        span = tracer.start_span(
            name,
            kind=SpanKind.CLIENT,
            start_time=start_ns,
            attributes=span_attributes(event, old=self.old_names),
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

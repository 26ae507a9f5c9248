"""Exporters for fleets: Prometheus /metrics and OpenTelemetry OTLP."""

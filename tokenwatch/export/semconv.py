"""The OpenTelemetry GenAI names tokenwatch emits, and whether OTEL_SEMCONV_STABILITY_OPT_IN adds the old ones."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

# Read as of 2026-12-05 from open-telemetry/semantic-conventions-genai (docs/gen-ai/
# gen-ai-token-metrics.md, client-inference.md, non-normative/migration.md); docs/export.md lists
# every name, type, unit and attribute, and the commits read.

OPT_IN_VARIABLE: Final = "OTEL_SEMCONV_STABILITY_OPT_IN"
"""OpenTelemetry's own variable, read directly: tokenwatch/environ.py holds TOKENWATCH_* names only."""
LATEST: Final = "gen_ai_latest_experimental"
"""The one GenAI value the conventions define: the latest names only (tokenwatch's default anyway)."""
DUP_VALUES: Final = frozenset({f"{LATEST}/dup", "gen_ai/dup"})
"""Today's names and the old ones side by side. The GenAI conventions define no `/dup` value; these
follow the `http/dup`, `database/dup`, ... form the other domains document for a phased move."""

TOKEN_MODALITY_UNKNOWN: Final = "unknown"
"""Providers report no split by modality, and the spec asks for `unknown` when it cannot be told."""

TOKEN_BUCKETS: Final = tuple(float(4**i) for i in range(14))
"""1, 4, 16, ... 67108864: the bucket boundaries the spec gives for per-operation token histograms."""

USAGE_COUNTERS: Final = (
    ("gen_ai.client.inference.usage.input_tokens", "input_tokens", "Input tokens, cached included"),
    (
        "gen_ai.client.inference.usage.output_tokens",
        "output_tokens",
        "Output tokens, reasoning included",
    ),
    (
        "gen_ai.client.inference.usage.cache_read.input_tokens",
        "cache_read_tokens",
        "Input tokens served from the provider's cache",
    ),
    (
        "gen_ai.client.inference.usage.cache_write.input_tokens",
        "cache_write_tokens",
        "Input tokens written to the provider's cache",
    ),
    (
        "gen_ai.client.inference.usage.reasoning.output_tokens",
        "reasoning_tokens",
        "Output tokens spent on reasoning",
    ),
)
"""(counter name, UsageEvent field, description): one monotonic counter per token category."""

OPERATION_HISTOGRAMS: Final = (
    ("gen_ai.client.inference.operation.input_tokens", "input_tokens", "Input tokens per call"),
    ("gen_ai.client.inference.operation.output_tokens", "output_tokens", "Output tokens per call"),
)
"""(histogram name, UsageEvent field, description): the per-call distributions, for percentiles."""

DURATION: Final = "gen_ai.client.inference.duration"
OLD_DURATION: Final = "gen_ai.client.operation.duration"
OLD_TOKEN_USAGE: Final = "gen_ai.client.token.usage"


def emit_old_names(environ: Mapping[str, str] | None = None) -> bool:
    """True when OTEL_SEMCONV_STABILITY_OPT_IN asks for the old GenAI names next to today's."""
    raw = (os.environ if environ is None else environ).get(OPT_IN_VARIABLE, "")
    values = {value.strip() for value in raw.split(",")}
    return bool(values & DUP_VALUES)

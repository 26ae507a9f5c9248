"""Error responses in each provider's own shape, so SDKs raise their usual exception types."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from tokenwatch.core.admission import Admission
from tokenwatch.proxy.routes import ANTHROPIC, OPENAI

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    431: "invalid_request_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    431: "invalid_request_error",
    503: "overloaded_error",
}
JSON = "application/json"


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A whole error response: status, headers and body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def error_body(provider: str, status: int, message: str, code: str = "") -> bytes:
    """`{"error": {...}}` for OpenAI, `{"type": "error", "error": {...}}` for Anthropic."""
    if provider == ANTHROPIC:
        kind = _ANTHROPIC_TYPES.get(status, "api_error")
        doc: dict[str, object] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        kind = _OPENAI_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        doc = {"error": {"message": message, "type": kind, "param": None, "code": code or kind}}
    return json.dumps(doc).encode()


def error_reply(
    provider: str,
    status: int,
    message: str,
    *,
    code: str = "",
    retry_after: float | None = None,
    retry: bool | None = None,
) -> ErrorReply:
    """An error response; `retry_after` adds retry-after headers, `retry` tells SDKs (not) to retry."""
    headers = [("Content-Type", JSON), ("x-tokenwatch-error", code or str(status))]
    if retry_after is not None:
        seconds = max(0.0, retry_after)
        headers.append(("retry-after", str(max(1, math.ceil(seconds)))))
        headers.append(("retry-after-ms", str(int(seconds * 1000))))
    if retry is not None:
        # both official SDKs obey this before their own status-based retry rules
        headers.append(("x-should-retry", "true" if retry else "false"))
    return ErrorReply(status, headers, error_body(provider, status, message, code))


def refusal(provider: str, admission: Admission) -> ErrorReply:
    """The reply to an agent whose call tokenwatch refused (budget, pause, store down)."""
    status = admission.status if admission.status >= 400 else 429
    message = admission.message or "refused by tokenwatch"
    code = "budget_exceeded" if admission.budget else "tokenwatch_refused"
    # without a retry-after, waiting will not help: tell the SDK not to retry on its own
    retry = None if admission.retry_after is not None else False
    return error_reply(
        provider, status, message, code=code, retry_after=admission.retry_after, retry=retry
    )


def protocol_error_page(status: int, message: str) -> tuple[bytes, str]:
    """The page for a request too broken to route: in the OpenAI shape most clients read."""
    return error_body(OPENAI, status, message), JSON

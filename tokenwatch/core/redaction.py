"""Secrets kept off disk and screens: what in a command line looks like a key, and its redaction."""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[redacted]"

_SECRET_NAME = re.compile(
    r"^-{0,2}(?:[A-Za-z0-9_.-]*[-_.])?(?:api[-_]?key|apikey|key|token|secret|password|passwd"
    r"|pwd|pass|auth|credentials?|bearer)$",
    re.IGNORECASE,
)
"""A flag or variable whose value is a secret: `--api-key`, `OPENAI_API_KEY`, `GITHUB_TOKEN`."""

_KEY_LIKE = re.compile(
    "|".join(
        (
            r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}",  # OpenAI, Anthropic (sk-ant-...), Stripe-style
            r"\b(?:gsk|hf|ghp|gho|ghu|ghs|ghr|glpat|xai|r8)[-_][A-Za-z0-9_-]{16,}",
            r"\bgithub_pat_[A-Za-z0-9_]{20,}",
            r"\bAIza[0-9A-Za-z_-]{30,}",  # Google
            r"\bAKIA[0-9A-Z]{16}\b",  # AWS access key id
            r"\bxox[abprs]-[A-Za-z0-9-]{10,}",  # Slack
            r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # a JWT
            # any other run of 32 letters and digits, both (a key or a hash: better hidden)
            r"(?<![A-Za-z0-9_])(?=[A-Za-z0-9_]*[0-9])(?=[A-Za-z0-9_]*[A-Za-z])"
            r"[A-Za-z0-9_]{32,}(?![A-Za-z0-9_])",
        )
    )
)
_URL_LOGIN = re.compile(r"(?<=://)[^/@\s]+@")
"""`https://user:password@host`: the login part."""


def redact_text(text: str) -> str:
    """`text` with every key-looking value and URL login replaced by [redacted]."""
    return _URL_LOGIN.sub(REDACTED + "@", _KEY_LIKE.sub(REDACTED, text))


def redact_command(argv: Iterable[str]) -> list[str]:
    """A command line fit to record and show: the value of a secret-named flag or variable
    (`--api-key V`, `--token=V`, `OPENAI_API_KEY=V`) and anything that looks like a key are
    replaced by [redacted]; the rest is kept as given."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        name, eq, _ = arg.partition("=")
        if hide_next:
            out.append(REDACTED)
        elif eq and _SECRET_NAME.match(name):
            out.append(f"{name}={REDACTED}")
        else:
            out.append(redact_text(arg))
        hide_next = not eq and arg.startswith("-") and bool(_SECRET_NAME.match(arg))
    return out

"""The generated text in a JSON response cut short, for estimating what the upstream billed."""

from __future__ import annotations

import json
import re
from typing import Final

# A text-bearing key (chat and responses `content`/`text`, tool-call `arguments`, `refusal`,
# reasoning and Anthropic's `thinking`) and its string value, up to its closing quote or the cut.
# Keys inside an escaped string are escaped too, so they are never taken for keys.
_TEXT_VALUE: Final = re.compile(
    rb'"(?:content|text|arguments|refusal|reasoning_content|thinking)"\s*:\s*"((?:[^"\\]|\\.)*)',
    re.DOTALL,
)


def cut_text(body: bytes) -> str:
    """Every generated text value that arrived in `body`, the last one as far as it got."""
    return "".join(_unescaped(m.group(1)) for m in _TEXT_VALUE.finditer(body))


def _unescaped(raw: bytes) -> str:
    try:
        value = json.loads(b'"' + raw + b'"')
    except ValueError:
        # cut inside an escape or a UTF-8 sequence: near enough for counting tokens
        return raw.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""

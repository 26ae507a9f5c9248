"""How deeply a JSON document nests, read from its bytes before any decoder recurses into it."""

from __future__ import annotations

import re
from array import array
from itertools import accumulate
from typing import Final

MAX_NESTING: Final = 128
"""Deepest nesting of arrays and objects taken, on the socket (`bad_message`) and by the proxy
(400). Nothing legitimate comes close, and every JSON decoder and encoder tokenwatch uses
recurses once a level: msgspec and the standard library fail near 1,000, orjson's encoder at 255."""

_ESCAPE: Final = re.compile(rb"\\.", re.DOTALL)
_STRUCTURE: Final = bytes(sorted(set(range(256)) - set(b'[]{}"')))
"""Every byte but brackets and quotes (deleted before the quotes are paired)."""
_STEPS: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def nested_deeper_than(data: bytes | str, limit: int = MAX_NESTING) -> bool:
    """Whether `data`'s arrays and objects nest more than `limit` levels (brackets inside
    strings do not count). Scans in C but for the sum over the brackets."""
    raw = data.encode() if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # the common case, cheaply: too few brackets to nest that deep
    if b"\\" in raw:
        raw = _ESCAPE.sub(b"", raw)  # an escaped quote does not end a string
    # Brackets and quotes only; every other piece between quotes was inside a string.
    outside = b"".join(raw.translate(None, _STRUCTURE).split(b'"')[::2])
    # +1 per opening and -1 (0xff as a signed byte) per closing bracket.
    steps = array("b", outside.translate(_STEPS))
    return max(accumulate(steps), default=0) > limit

"""Server-sent events split out of a byte stream that arrives in arbitrary chunks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

_SEPARATORS = (b"\r\n\r\n", b"\n\n", b"\r\r")


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One event: its exact bytes (separator included), its `event:` name and joined `data:`."""

    raw: bytes
    name: str
    data: bytes


class SseSplitter:
    """Feed chunks, get whole events; a partial event waits for the next chunk."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[SseEvent]:
        buffer = self._pending + chunk if self._pending else chunk
        if b"\r" not in buffer:
            # the usual case (LF only): one C-level split instead of a scan per separator kind
            parts = buffer.split(b"\n\n")
            self._pending = parts.pop()
            return [parse_event(part + b"\n\n") for part in parts]
        events: list[SseEvent] = []
        start = 0
        while True:
            end, sep = _next_boundary(buffer, start)
            if end < 0:
                break
            events.append(parse_event(buffer[start : end + sep]))
            start = end + sep
        self._pending = buffer[start:]
        return events

    def rest(self) -> bytes:
        """Bytes of an event that never ended (a cut stream), exactly as received."""
        pending, self._pending = self._pending, b""
        return pending


def _next_boundary(buffer: bytes, start: int) -> tuple[int, int]:
    best, size = -1, 0
    for sep in _SEPARATORS:
        at = buffer.find(sep, start)
        if at >= 0 and (best < 0 or at < best):
            best, size = at, len(sep)
    return best, size


def parse_event(raw: bytes) -> SseEvent:
    if raw.startswith(b"data: ") and raw.count(b"\n") == 2:
        return SseEvent(raw, "", raw[6:-2])  # one data line: most events of most streams
    name = ""
    data: list[bytes] = []
    for line in raw.splitlines():
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    return SseEvent(raw, name, b"\n".join(data))


def without_null_usage(events: bytes) -> bytes:
    """Chunks as the client would have had them without the usage we asked for: OpenAI adds
    `"usage":null` to every chunk once asked (inside a JSON string the quotes would be escaped,
    so this never touches content)."""
    return events.replace(b',"usage":null', b"").replace(b', "usage": null', b"")


def is_sse(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether an answer's headers say it is a server-sent event stream."""
    for name, value in headers:
        if name.lower() == "content-type":
            return value.lower().startswith("text/event-stream")
    return False

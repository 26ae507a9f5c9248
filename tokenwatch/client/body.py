"""Usage from a response body the agent reads itself (`with_streaming_response`), as it is read."""

from __future__ import annotations

import json
from typing import Any

MAX_JSON_BYTES = 16 * 1024 * 1024
"""A JSON body is kept for reading its usage up to this size; a bigger one is estimated."""


class SseEvents:
    """Server-sent events split out of arbitrary chunks: each event's data, decoded as JSON."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[Any]:
        """The JSON documents of the events that `chunk` completed (`[DONE]` and non-JSON left out)."""
        self._buffer += chunk
        docs: list[Any] = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) >= 0:
            line = bytes(self._buffer[start:end]).rstrip(b"\r")
            start = end + 1
            if not line:
                docs.extend(self._dispatch())
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        del self._buffer[:start]
        return docs

    def _dispatch(self) -> list[Any]:
        data, self._data = b"\n".join(self._data), []
        if not data or data == b"[DONE]":
            return []
        try:
            return [json.loads(data)]
        except ValueError:
            return []


class JsonBody:
    """A JSON body gathered as it is read, up to MAX_JSON_BYTES, and decoded at its end."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= MAX_JSON_BYTES:
            self._parts.append(chunk)

    def document(self) -> Any:
        """The decoded document; None when it was too big or is not JSON."""
        if self._size > MAX_JSON_BYTES:
            return None
        try:
            return json.loads(b"".join(self._parts))
        except ValueError:
            return None

"""One request to the fake LLM: its fault plan, SSE writing, the counted call it leaves behind."""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import anyio
from aiohttp import web

from tokenwatch.demo.fake_reply import PromptCache

FAULT_HEADER = "x-fake-llm-fault"
DEFAULT_SLOW_MS = 10_000.0


@dataclass(slots=True)
class CountedCall:
    """What the fake server billed for one call, normalised the OpenTelemetry way.

    `input_tokens` includes cache reads and writes; `output_tokens` includes reasoning.
    """

    endpoint: str
    model: str
    stream: bool
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    status: int
    request_id: str
    complete: bool = True
    """False when the stream was cut on purpose before its end."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Normalised token figures of one reply (see CountedCall)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Fault:
    """What to do wrong with one request."""

    status: int = 0
    """Answer with this HTTP error (429, 500...) instead of a reply; 0 for none."""
    cut_after: int | None = None
    """Close the connection after this many stream chunks (or body bytes), without the end."""
    delay_ms: float = 0.0
    """Extra wait before answering."""


def parse_fault(value: str) -> Fault:
    """Parse `429`, `500`, `cut`, `cut:N`, `slow` or `slow:MS` (comma-separated to combine)."""
    status, cut, delay = 0, None, 0.0
    for raw in value.split(","):
        word, _, arg = raw.strip().partition(":")
        try:
            if word.isdigit() and not arg:
                status = int(word)
                if not 400 <= status <= 599:
                    raise ValueError
            elif word == "cut":
                cut = int(arg) if arg else 1
                if cut < 0:
                    raise ValueError
            elif word == "slow":
                delay = float(arg) if arg else DEFAULT_SLOW_MS
                if not 0 <= delay < math.inf:
                    raise ValueError
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"bad {FAULT_HEADER} {raw.strip()!r}: use 429, 500, cut[:N] or slow[:MS]"
            ) from None
    return Fault(status, cut, delay)


@dataclass(frozen=True, slots=True)
class Settings:
    """Server-wide behaviour of the fake LLM."""

    latency_ms: float = 0.0
    chunk_ms: float = 0.0
    fail_every: int = 0
    fail_status: int = 500
    cut_every: int = 0
    cut_after: int = 2
    retry_after_s: float = 1.0
    reply_to_last: bool = False
    """Replies chosen by the last message only, not the whole conversation: a model in a rut
    answers the same question alike however long its history (for loop demos and benches)."""


def reply_seed(settings: Settings, items: Any) -> str:
    """What a reply is chosen by: the conversation, or only its last message."""
    if settings.reply_to_last and isinstance(items, list) and items:
        return repr(items[-1])
    return repr(items)


class BadRequest(Exception):
    """The request is refused: answered with `status` (400 unless said) in the provider's shape."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class StreamCut(Exception):
    """The connection was closed on purpose mid-response."""


class ClientGone(StreamCut):
    """The client hung up before the response was complete."""


ErrorBody = Callable[[int, str, str], dict[str, Any]]


def new_id(prefix: str, n_chars: int = 24) -> str:
    return prefix + secrets.token_hex(n_chars // 2 + 1)[:n_chars]


class Exchange:
    """A request in flight: parsed body, fault plan, and the writers that honour them."""

    def __init__(
        self, request: web.Request, settings: Settings, cache: PromptCache, request_id: str
    ) -> None:
        self.request = request
        self.settings = settings
        self.cache = cache
        self.request_id = request_id
        self.body: dict[str, Any] = {}
        self.fault = Fault()
        self.usage = Usage()
        self.model = ""
        self.stream = False
        self.created = int(time.time())
        self._chunks = 0
        self._response: web.StreamResponse | None = None

    def take(self, body: dict[str, Any], fault: Fault) -> None:
        """Adopt the parsed request body and the fault planned for it."""
        if body.get("tools") is not None and not isinstance(body["tools"], list):
            raise BadRequest("'tools' must be a list of tools")
        self.body = body
        self.fault = fault
        self.model = str(body.get("model", ""))
        self.stream = bool(body.get("stream", False))

    def require(self, key: str, kind: type | tuple[type, ...]) -> Any:
        """The body field `key`, which must be present and of `kind`, else a 400."""
        value = self.body.get(key)
        if not isinstance(value, kind):
            raise BadRequest(f"'{key}' is a required property of the right type")
        return value

    def limit(self, *keys: str) -> int | None:
        for key in keys:
            value = self.body.get(key)
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise BadRequest(f"'{key}' must be a positive integer")
                return value
        return None

    async def json(self, payload: dict[str, Any], headers: dict[str, str]) -> web.StreamResponse:
        """The JSON reply; with a `cut` fault, only its first bytes before hanging up."""
        if self.fault.cut_after is None:
            return web.json_response(payload, headers=headers, dumps=_dumps)
        body = _dumps(payload).encode()
        resp = web.StreamResponse(headers={**headers, "Content-Type": "application/json"})
        resp.content_length = len(body)
        await self._write(resp, body[: min(self.fault.cut_after, len(body) - 1)])
        self._hang_up()

    async def open_stream(self, headers: dict[str, str]) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                **headers,
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        self._response = resp
        await self._write(resp, None)
        return resp

    async def send(self, data: dict[str, Any] | str, event: str | None = None) -> None:
        """Write one SSE event, pausing `chunk_ms` first, and cutting the stream if planned."""
        assert self._response is not None, "open_stream first"
        if self._chunks and self.settings.chunk_ms:
            await anyio.sleep(self.settings.chunk_ms / 1000)
        if self.fault.cut_after is not None and self._chunks >= self.fault.cut_after:
            self._hang_up()
        text = data if isinstance(data, str) else _dumps(data)
        frame = (f"event: {event}\n" if event else "") + f"data: {text}\n\n"
        await self._write(self._response, frame.encode())
        self._chunks += 1

    async def close_stream(self) -> web.StreamResponse:
        assert self._response is not None
        try:
            await self._response.write_eof()
        except ConnectionResetError:
            raise ClientGone from None
        return self._response

    async def _write(self, resp: web.StreamResponse, data: bytes | None) -> None:
        """Send headers if not yet sent, then `data`; a client that hung up ends the exchange."""
        try:
            if not resp.prepared:
                await resp.prepare(self.request)
            if data:
                await resp.write(data)
        except ConnectionResetError:
            raise ClientGone from None

    def _hang_up(self) -> NoReturn:
        transport = self.request.transport
        if transport is not None:
            transport.abort()
        raise StreamCut

    def counted(self, endpoint: str, status: int) -> CountedCall:
        u = self.usage
        return CountedCall(
            endpoint=endpoint,
            model=self.model,
            stream=self.stream,
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            cache_read_tokens=u.cache_read_tokens,
            cache_write_tokens=u.cache_write_tokens,
            reasoning_tokens=u.reasoning_tokens,
            status=status,
            request_id=self.request_id,
        )


def retry_after_headers(seconds: float) -> dict[str, str]:
    return {
        "retry-after": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(int(seconds * 1000)),
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

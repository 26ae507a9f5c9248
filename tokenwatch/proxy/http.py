"""The proxy's HTTP server: the one module that knows the library (aiohttp)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
from aiohttp import ClientError, web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("tokenwatch.proxy")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
"""Headers that describe one connection, not the message: never relayed as they are."""


class BodyTooLarge(Exception):
    """The request body is over the limit (answered with 413)."""


class RequestTooSlow(Exception):
    """The client did not send its whole request before the deadline (answered with 408)."""


class ClientGone(Exception):
    """The client hung up while the response was being written."""


SHUTDOWN_GRACE = 5.0
"""Seconds calls in flight may take to finish when the proxy stops."""

Headers = list[tuple[str, str]]
ErrorPage = Callable[[int, str], tuple[bytes, str]]
"""Status and message to (body, content type): how the server words its own protocol errors."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What a client may send, and how long it has."""

    max_body_bytes: int
    max_header_bytes: int
    request_timeout: float


class Incoming:
    """One received request: its head at once, its body on demand, and the way to answer it."""

    __slots__ = ("_request", "_response", "started")

    def __init__(self, request: web.BaseRequest, started: float) -> None:
        self._request = request
        self._response: web.StreamResponse | None = None
        self.started = started
        """Loop clock (seconds) when the request head had arrived."""

    @property
    def method(self) -> str:
        return self._request.method

    @property
    def path(self) -> str:
        return self._request.raw_path.partition("?")[0]

    @property
    def query(self) -> str:
        return self._request.raw_path.partition("?")[2]

    @property
    def headers(self) -> Mapping[str, str]:
        return self._request.headers

    def header_items(self) -> Headers:
        return list(self._request.headers.items())

    async def read_body(self, limits: Limits) -> bytes:
        """The whole body, within the size limit and what is left of the request deadline."""
        declared = self._request.content_length
        if declared is not None and declared > limits.max_body_bytes:
            raise BodyTooLarge
        content = self._request.content
        if declared is not None and content.is_eof():
            return await content.read()  # all here already: no deadline to watch
        left = limits.request_timeout - (asyncio.get_running_loop().time() - self.started)
        parts: list[bytes] = []
        size = 0
        with anyio.move_on_after(max(0.0, left)) as scope:
            async for chunk in content.iter_any():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise BodyTooLarge
                parts.append(chunk)
        if scope.cancelled_caught:
            raise RequestTooSlow
        return b"".join(parts)

    @property
    def ends(self) -> tuple[tuple[str, int], tuple[str, int]] | None:
        """(the server's, the client's) address of the request's connection; None once closed."""
        transport = self._request.transport
        if transport is None:
            return None
        here, there = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
        if not here or not there:
            return None
        return (str(here[0]), int(here[1])), (str(there[0]), int(there[1]))

    @property
    def note(self) -> Any:
        """What the handler noted about the request's connection (there for its next requests)."""
        return getattr(self._request.protocol, "note", None)

    @note.setter
    def note(self, value: Any) -> None:
        protocol = self._request.protocol
        if isinstance(protocol, _Protocol):
            protocol.note = value

    @property
    def client_gone(self) -> bool:
        """True when the client has hung up (e.g. while its call was held)."""
        transport = self._request.transport
        return transport is None or transport.is_closing()

    @property
    def started_response(self) -> bool:
        return self._response is not None

    async def respond(
        self, status: int, headers: Headers, body: bytes, *, close: bool = False
    ) -> None:
        """A whole response at once; `close` drops the connection after it (body left unread)."""
        response = web.Response(status=status, body=body)
        _set_headers(response, headers)
        if close:
            response.force_close()
        self._response = response
        await self._guard(response.prepare(self._request))
        await self._guard(response.write_eof())
        if close:
            # not aiohttp's lingering read of the rest of a body we refused
            self._request.protocol.force_close()

    async def start(self, status: int, headers: Headers, content_length: int | None) -> None:
        """Send the head of a response whose body follows in `write` calls."""
        response = web.StreamResponse(status=status)
        _set_headers(response, headers)
        if content_length is not None:
            response.content_length = content_length
        self._response = response
        await self._guard(response.prepare(self._request))

    async def write(self, chunk: bytes) -> None:
        assert self._response is not None
        await self._guard(self._response.write(chunk))

    async def finish(self) -> None:
        assert self._response is not None
        await self._guard(self._response.write_eof())

    def abort(self) -> None:
        """Drop the connection so the client sees a cut response, not a clean end."""
        transport = self._request.transport
        if transport is not None:
            transport.abort()

    def response(self) -> web.StreamResponse:
        if self._response is None:
            self._response = web.Response(status=500)
        return self._response

    @staticmethod
    async def _guard(step: Awaitable[Any]) -> None:
        try:
            await step
        except (ConnectionError, ClientError) as exc:
            raise ClientGone(type(exc).__name__) from None


def _set_headers(response: web.StreamResponse, headers: Headers) -> None:
    for name, value in headers:
        response.headers.add(name, value)


def relayable(headers: Iterable[tuple[str, str]], drop: frozenset[str] = frozenset()) -> Headers:
    """The end-to-end headers of a message, without the connection ones and `drop` (lower case)."""
    return [(k, v) for k, v in headers if (low := k.lower()) not in HOP_BY_HOP and low not in drop]


Handler = Callable[[Incoming], Awaitable[None]]


class _Protocol(RequestHandler):
    """aiohttp's connection handler, answering malformed requests in our own words, unlogged.

    aiohttp's default logs the offending line, which can hold an API key.
    """

    error_page: ErrorPage
    note: Any = None
    """Kept with the connection for the handler (`Incoming.note`)."""

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, LineTooLong):
            status, text = 431, "request header fields too large"
        elif status == 500:
            text = "internal error in tokenwatch's proxy"
        else:
            text = "malformed HTTP request"
        if status == 500:
            # A bug: logged where it happened, never with the exception's text (it may quote
            # the request, and requests carry keys).
            log.error("%s: %s at %s", text, type(exc).__name__, _where(exc))
        else:
            log.debug("refused a request: %s (%s)", text, type(exc).__name__)
        body, ctype = self.error_page(status, text)
        response = web.Response(status=status, body=body, content_type=None)
        response.headers["Content-Type"] = ctype
        response.force_close()
        return response


def _where(exc: BaseException | None) -> str:
    """file:line of the innermost frame `exc` was raised in."""
    tb = exc.__traceback__ if exc is not None else None
    if tb is None:
        return "an unknown place"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"


class _Server(web.Server):
    def __init__(self, handler: Any, error_page: ErrorPage, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._error_page = error_page

    def __call__(self) -> RequestHandler:
        protocol = _Protocol(self, loop=self._loop, **self._kwargs)
        protocol.error_page = self._error_page
        return protocol


class HttpServer:
    """Serves `handler` on loopback addresses; one port for all of them."""

    def __init__(self, handler: Handler, limits: Limits, error_page: ErrorPage) -> None:
        self._handler = handler
        self._limits = limits
        self._error_page = error_page

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        incoming = Incoming(request, asyncio.get_running_loop().time())
        await self._handler(incoming)
        return incoming.response()

    async def serve(
        self,
        hosts: list[str],
        port: int,
        *,
        task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `hosts[0]` (required) and the others (best effort) until cancelled."""
        server = _Server(
            self._handle,
            self._error_page,
            # an idle or half-sent head is dropped after the deadline; a running response is not
            keepalive_timeout=self._limits.request_timeout,
            max_line_size=self._limits.max_header_bytes,
            max_field_size=self._limits.max_header_bytes,
            auto_decompress=False,
            access_log=None,
        )
        # at shutdown, calls in flight get a moment to finish; a long stream is then cut
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE)
        await runner.setup()
        try:
            first = web.TCPSite(runner, hosts[0], port, reuse_address=True)
            await first.start()
            bound = int(runner.addresses[0][1])
            for host in hosts[1:]:
                await _start_optional(web.TCPSite(runner, host, bound, reuse_address=True))
            task_status.started(bound)
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()


async def _start_optional(site: web.TCPSite) -> None:
    try:
        await site.start()
    except OSError as exc:
        # e.g. no IPv6 loopback on this machine: the first address still serves
        log.debug("not listening on %s: %s", site.name, exc.strerror)

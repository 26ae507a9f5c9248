"""The proxy's upstream client: HTTP/1.1 over pooled asyncio connections, parsed by httptools."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import NamedTuple
from urllib.parse import urlsplit

import httptools

from tokenwatch.proxy.egress import Egress, ProxyRefused, Via, open_tunnel

Headers = list[tuple[str, str]]

KEEPALIVE_IDLE = 30.0
"""Seconds an idle upstream connection is kept for reuse."""
STALE_WINDOW = 0.5
"""Seconds after sending within which an unanswered close means the idle connection was stale."""
MAX_IDLE_PER_ORIGIN = 64
"""Idle connections kept per upstream origin; more are closed as they come back."""
HAPPY_EYEBALLS_DELAY = 0.25
"""Seconds before a connection attempt to the next address starts alongside (RFC 8305)."""
MAX_RESPONSE_HEAD_BYTES = 65_536
"""Largest response head accepted from an upstream (a bigger one is a malformed answer)."""
_HIGH_WATER = 256 * 1024
"""Body bytes buffered before reading from the upstream pauses (the agent reads slower)."""
_NO_BODY = frozenset({"HEAD"})
# connection-specific or recomputed here: never copied from the agent's request
_REQUEST_DROP = frozenset(
    {"expect", "host", "content-length", "transfer-encoding", "connection", "proxy-authorization"}
)


class UpstreamUnreachable(Exception):
    """The upstream refused or failed the connection, or did not answer (answered with 502)."""


class UpstreamTimeout(Exception):
    """The upstream did not connect or answer in time (answered with 504)."""

    received: bytes = b""
    """What `UpstreamResponse.read` had of the body by then."""


class UpstreamCut(Exception):
    """The upstream closed the connection before the end of its response."""

    received: bytes = b""
    """What `UpstreamResponse.read` had of the body by then."""


class _Origin(NamedTuple):
    """Where a URL's request goes, and how it is addressed there."""

    scheme: str
    host: str
    port: int
    host_header: str
    target: str


@lru_cache(maxsize=1024)
def _origin(url: str) -> _Origin:
    try:
        parts = urlsplit(url)
    except ValueError:
        raise UpstreamUnreachable("not a valid upstream URL") from None
    where = parts.netloc.rpartition("@")[2]  # never a password written into the URL
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamUnreachable(f"not an http(s) upstream URL: {parts.scheme}://{where}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UpstreamUnreachable(f"not a valid port in the upstream URL {where}") from None
    target = parts.path or "/"
    if parts.query:
        target = f"{target}?{parts.query}"
    return _Origin(parts.scheme, parts.hostname, port, where, target)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an upstream; a single exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self._loop = loop
        self._read_timeout = read_timeout
        self.sent_at = self.lost_at = -1.0
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._paused = False
        self._reset(head_only=False)

    def _reset(self, *, head_only: bool) -> None:
        if self._paused and self.transport is not None:
            self.transport.resume_reading()
        self.status = 0
        self.headers: Headers = []
        self.content_length: int | None = None
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.received = 0
        self._head_size = 0
        self.error: Exception | None = None
        self._head_only = head_only
        self._interim = False
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._until_close = True
        self._waiter: asyncio.Future[None] | None = None

    # -- the exchange ------------------------------------------------------------------------

    def send(self, data: bytes, *, head_only: bool) -> None:
        assert self.transport is not None
        self._reset(head_only=head_only)
        self.sent_at = self._loop.time()
        self.transport.write(data)

    @property
    def found_stale(self) -> bool:
        """Closed unanswered right after the request went out: the upstream had closed this idle
        connection as it was reused, so the request was never read (and may go again)."""
        lost = self.lost_at - self.sent_at
        return self.received == 0 and self.transport is None and 0 <= lost < STALE_WINDOW

    async def wait_head(self) -> None:
        while not self.head_done:
            await self._wait("the upstream did not answer in time")

    async def next_chunk(self) -> bytes:
        """Body bytes received so far and not yet taken, waiting for some; b"" at the end."""
        while not self._body:
            if self.complete:
                return b""
            await self._wait("the upstream went silent mid-response")
        chunk = b"".join(self._body) if len(self._body) > 1 else self._body[0]
        self._body.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    @property
    def reusable(self) -> bool:
        transport = self.transport
        return (
            self.complete
            and self.keep_alive
            and not self._head_only
            and not self._body  # every byte taken: nothing of this answer can leak into the next
            and not self._paused
            and transport is not None
            and not transport.is_closing()
        )

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def _wait(self, silent: str) -> None:
        if self.error is not None:
            raise self.error
        waiter = self._loop.create_future()
        self._waiter = waiter
        timer = self._loop.call_later(self._read_timeout, _time_out, waiter, silent)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(self.error)

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.complete:
            return self.close()  # nothing is owed once the answer is complete
        self.received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if not self.complete:
                gone = UpstreamCut if self.head_done else UpstreamUnreachable
                self._fail(gone("the upstream sent a malformed HTTP response"))
            return self.close()
        if not self.head_done and self.received > MAX_RESPONSE_HEAD_BYTES:
            self._fail(UpstreamUnreachable("the upstream's response head is too large"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.lost_at = self._loop.time()
        ended = exc is None and self.error is None
        if self.head_done and not self.complete and self._until_close and ended:
            self.complete = True  # a body delimited by the end of the connection
            return self._wake()
        if not self.head_done:
            self._fail(UpstreamUnreachable("the upstream closed the connection without answering"))
        elif not self.complete:
            self._fail(UpstreamCut("the upstream closed the connection mid-response"))

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise UpstreamCut("a second response to one request")  # ends feed_data
        self._head_size = 0
        self.headers = []
        self.content_length = None
        self._until_close = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        if self._head_size > MAX_RESPONSE_HEAD_BYTES:
            self._fail(UpstreamUnreachable("the upstream's response head is too large"))
            raise OverflowError  # ends feed_data
        low = name.lower()
        if low == b"content-length":
            self._until_close = False
            self.content_length = int(value) if value.strip().isdigit() else None
        elif low == b"transfer-encoding":
            self._until_close = False
        self.headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True  # e.g. 100 Continue: the real answer follows
            return
        self.status = status
        self.keep_alive = self._parser.should_keep_alive()
        if status in (204, 304):
            self._until_close = False
        self.head_done = True
        if self._head_only:
            self.complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True  # the agent reads slower than the upstream sends
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        self._wake()


def _time_out(waiter: asyncio.Future[None], message: str) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(message))


class UpstreamResponse:
    """An upstream's answer: status and headers now, the body chunk by chunk as it arrives."""

    __slots__ = ("_conn",)

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    @property
    def status(self) -> int:
        return self._conn.status

    @property
    def headers(self) -> Headers:
        return self._conn.headers

    @property
    def content_length(self) -> int | None:
        return self._conn.content_length

    async def chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self._conn.next_chunk():
            yield chunk

    async def read(self, first_byte: Callable[[], None]) -> bytes:
        """The whole body (for one of known, bounded size); `first_byte` is called as it starts.
        A body that stops short raises with what did arrive as the exception's `received`."""
        parts: list[bytes] = []
        try:
            while chunk := await self._conn.next_chunk():
                if not parts:
                    first_byte()
                parts.append(chunk)
        except (UpstreamCut, UpstreamTimeout) as exc:
            exc.received = b"".join(parts)
            raise
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Stop reading and drop the upstream connection (an abandoned stream stops costing)."""
        self._conn.close()


class UpstreamClient:
    """A pooled HTTP/1.1 client for upstream calls; create and close it on the serving loop."""

    def __init__(
        self,
        connect_timeout: float,
        read_timeout: float,
        *,
        tls: ssl.SSLContext | None = None,
        idle_timeout: float = KEEPALIVE_IDLE,
        egress: Egress | None = None,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._tls = tls
        self._idle_timeout = idle_timeout
        self._egress = egress if egress is not None else Egress.from_environment()
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open = False

    async def __aenter__(self) -> UpstreamClient:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        self._open = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._open = False
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    def idle_connections(self) -> int:
        """Connections waiting in the pool for their next exchange."""
        return sum(len(idle) for idle in self._idle.values())

    @asynccontextmanager
    async def open(
        self, method: str, url: str, headers: Headers, body: bytes
    ) -> AsyncIterator[UpstreamResponse]:
        """Send a request; yields once the response head is in, closes it on exit."""
        assert self._open, "use the client inside `async with`"
        origin = _origin(url)
        forward = self._via(origin) if origin.scheme == "http" else None
        request = _request_bytes(method, origin, headers, body, forward)
        conn = await self._exchange(origin, request, head_only=method in _NO_BODY)
        try:
            yield UpstreamResponse(conn)
        finally:
            self._release(origin, conn)

    async def _exchange(self, origin: _Origin, request: bytes, *, head_only: bool) -> _Connection:
        conn = self._checkout(origin)
        if conn is not None:
            try:
                return await _send(conn, request, head_only=head_only)
            except UpstreamUnreachable:
                if not conn.found_stale:
                    raise  # it may have been read: sending it again could run it twice
                # an idle connection the upstream closed as it was reused: once more, anew
        conn = await self._connect(origin)
        return await _send(conn, request, head_only=head_only)

    def _checkout(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get((origin.scheme, origin.host, origin.port))
        oldest = asyncio.get_running_loop().time() - self._idle_timeout
        while idle and idle[0].idle_since < oldest:
            idle.pop(0).close()  # the longest idle, unused since: not kept open any longer
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if transport is not None and not transport.is_closing() and conn.idle_since >= oldest:
                return conn
            conn.close()
        return None

    def _release(self, origin: _Origin, conn: _Connection) -> None:
        if not (self._open and conn.reusable):
            return conn.close()
        idle = self._idle.setdefault((origin.scheme, origin.host, origin.port), [])
        if len(idle) >= MAX_IDLE_PER_ORIGIN:
            return conn.close()
        conn.idle_since = asyncio.get_running_loop().time()
        idle.append(conn)

    def _via(self, origin: _Origin) -> Via | None:
        try:
            return self._egress.via(origin.scheme, origin.host)
        except ProxyRefused as exc:
            raise UpstreamUnreachable(str(exc)) from None

    async def _connect(self, origin: _Origin) -> _Connection:
        conn = _Connection(asyncio.get_running_loop(), self._read_timeout)
        where = f"{origin.host}:{origin.port}"
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._open_transport(conn, origin)
        except TimeoutError:
            conn.close()
            raise UpstreamTimeout(f"could not connect to {where} in time") from None
        except ssl.SSLError as exc:
            conn.close()
            raise UpstreamUnreachable(f"cannot connect to {where} (TLS: {exc.reason})") from None
        except ProxyRefused as exc:
            raise UpstreamUnreachable(str(exc)) from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise UpstreamUnreachable(f"cannot connect to {where} ({reason})") from None
        return conn

    async def _open_transport(self, conn: _Connection, origin: _Origin) -> None:
        """Connect `conn`: straight to the origin, to a forward proxy (http), or through its
        CONNECT tunnel (https, TLS end to end with the origin)."""
        loop = asyncio.get_running_loop()
        tls = self._tls if origin.scheme == "https" else None
        via = self._via(origin)
        host, port = (origin.host, origin.port) if via is None else (via.host, via.port)
        if via is None or tls is None:
            await loop.create_connection(
                lambda: conn,
                host,
                port,
                ssl=tls,
                server_hostname=origin.host if tls is not None else None,
                # an address family that is routed nowhere must not eat the connect timeout
                happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
            )
            return
        tunnel = await open_tunnel(via, origin.host, origin.port)
        try:
            await loop.create_connection(
                lambda: conn, sock=tunnel, ssl=tls, server_hostname=origin.host
            )
        except BaseException:
            tunnel.close()
            raise


async def _send(conn: _Connection, request: bytes, *, head_only: bool) -> _Connection:
    conn.send(request, head_only=head_only)
    try:
        await conn.wait_head()
    except BaseException:
        conn.close()
        raise
    return conn


def _request_bytes(
    method: str, origin: _Origin, headers: Headers, body: bytes, forward: Via | None = None
) -> bytes:
    target = origin.target
    if forward is not None:  # to a forward proxy: the whole URL, and our login to the proxy
        target = f"http://{origin.host_header}{origin.target}"
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
    if forward is not None and forward.authorization:
        lines.append(f"Proxy-Authorization: {forward.authorization}\r\n")
    for name, value in headers:
        if name.lower() in _REQUEST_DROP:
            continue
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise UpstreamUnreachable(f"refused to send a malformed header field ({name!r})")
        lines.append(f"{name}: {value}\r\n")
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    head = "".join(lines).encode("utf-8", "surrogateescape")
    return head + body if body else head

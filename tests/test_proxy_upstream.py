"""The proxy's upstream client against raw sockets: framing, keep-alive, failures, TLS."""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenwatch.proxy.upstream import (
    STALE_WINDOW,
    UpstreamClient,
    UpstreamCut,
    UpstreamTimeout,
    UpstreamUnreachable,
    _Connection,
)

Reply = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]
"""Answers one request (its head and body as received); returns False to close the connection."""


@dataclass
class Upstream:
    """A raw TCP server answering with whatever bytes a test scripts."""

    reply: Reply
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = _content_length(head)
                request = head + (await reader.readexactly(length) if length else b"")
                self.requests.append(request)
                if not await self.reply(request, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            return int(value)
    return 0


@asynccontextmanager
async def upstream(reply: Reply, tls: ssl.SSLContext | None = None) -> AsyncIterator[Upstream]:
    up = Upstream(reply)
    server = await asyncio.start_server(up._serve, "127.0.0.1", 0, ssl=tls)
    up.port = server.sockets[0].getsockname()[1]
    async with server:
        yield up


def sends(wire: bytes, *, keep: bool = True, hold: float = 0.0) -> Reply:
    """Answers every request with `wire`, then keeps the connection (or holds it `hold`
    seconds and closes it)."""

    async def reply(_: bytes, __: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(wire)
        await writer.drain()
        await asyncio.sleep(hold)
        return keep

    return reply


def answer(body: bytes, *, extra: bytes = b"") -> Reply:
    return sends(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body))


def client(read_timeout: float = 5.0, **kwargs: object) -> UpstreamClient:
    return UpstreamClient(2.0, read_timeout, **kwargs)  # type: ignore[arg-type]


async def fetch(c: UpstreamClient, url: str, body: bytes = b"{}") -> tuple[int, bytes]:
    async with c.open("POST", url, [("Authorization", "Bearer sk-x")], body) as response:
        return response.status, await response.read(lambda: None)


async def test_request_goes_out_as_given_with_only_host_and_length_added() -> None:
    async with upstream(answer(b"ok")) as up, client() as c:
        headers = [("Authorization", "Bearer sk-x"), ("X-Custom", "1"), ("Expect", "100-continue")]
        async with c.open("POST", up.url + "/v1/chat/completions?a=1", headers, b"{}") as r:
            assert await r.read(lambda: None) == b"ok"
    (request,) = up.requests
    assert request == (
        b"POST /v1/chat/completions?a=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Authorization: Bearer sk-x\r\nX-Custom: 1\r\nContent-Length: 2\r\n\r\n{}" % up.port
    )


async def test_sequential_calls_share_one_kept_alive_connection() -> None:
    async with upstream(answer(b'{"n": 1}')) as up, client() as c:
        for _ in range(5):
            assert await fetch(c, up.url + "/v1/x") == (200, b'{"n": 1}')
        assert c.idle_connections() == 1
    assert (up.connections, len(up.requests)) == (1, 5)


async def test_chunked_body_arrives_piece_by_piece_before_its_end() -> None:
    release = asyncio.Event()

    async def reply(_: bytes, __: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        return True

    async with upstream(reply) as up, client() as c, c.open("GET", up.url, [], b"") as r:
        pieces = r.chunks()
        assert await anext(pieces) == b"first"  # relayed while the upstream still holds the rest
        release.set()
        assert [p async for p in pieces] == [b"second"]
        assert r.content_length is None


async def test_body_ended_by_closing_the_connection_is_whole_and_not_reused() -> None:
    reply = sends(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", keep=False)

    async with upstream(reply) as up, client() as c:
        assert await fetch(c, up.url) == (200, b"until the end")
        assert await fetch(c, up.url) == (200, b"until the end")
        assert c.idle_connections() == 0
    assert up.connections == 2


async def test_idle_connection_closed_by_the_upstream_is_replaced_once() -> None:
    # closes after answering, though the answer says keep-alive
    reply = sends(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", keep=False)

    async with upstream(reply) as up, client() as c:
        assert await fetch(c, up.url) == (200, b"ok")
        await asyncio.sleep(0.05)  # the close reaches the pooled connection
        assert await fetch(c, up.url) == (200, b"ok")
    assert (up.connections, len(up.requests)) == (2, 2)


async def test_bytes_beyond_the_answer_retire_the_connection() -> None:
    reply = sends(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n")

    async with upstream(reply) as up, client() as c:
        assert await fetch(c, up.url) == (200, b"ok")
        assert await fetch(c, up.url) == (200, b"ok")  # not the stray second answer
    assert up.connections == 2


async def test_interim_100_continue_is_skipped() -> None:
    reply = sends(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx"
    )

    async with upstream(reply) as up, client() as c:
        assert await fetch(c, up.url) == (201, b"x")


async def test_head_request_ends_at_the_head() -> None:
    reply = sends(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")

    async with upstream(reply) as up, client() as c, c.open("HEAD", up.url, [], b"") as r:
        assert (r.status, r.content_length) == (200, 1234)
        assert await asyncio.wait_for(r.read(lambda: None), 2) == b""


async def test_cut_mid_body_is_upstream_cut() -> None:
    reply = sends(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part", keep=False)

    async with upstream(reply) as up, client() as c:
        with pytest.raises(UpstreamCut, match="mid-response"):
            await fetch(c, up.url)
        assert c.idle_connections() == 0


async def test_silence_before_the_head_and_mid_body_time_out() -> None:
    async def never(_: bytes, reader: asyncio.StreamReader, __: asyncio.StreamWriter) -> bool:
        await reader.read()
        return False

    async def stalls(_: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await reader.read()
        return False

    async with upstream(never) as up, client(read_timeout=0.2) as c:
        with pytest.raises(UpstreamTimeout, match="did not answer in time"):
            await fetch(c, up.url)
        up.reply = stalls
        with pytest.raises(UpstreamTimeout, match="silent mid-response"):
            await fetch(c, up.url)


async def test_refused_connection_names_host_and_port_only() -> None:
    async with upstream(answer(b"")) as up:
        url = up.url
    async with client() as c:
        with pytest.raises(UpstreamUnreachable) as caught:
            await fetch(c, url + "/v1/secret-path?key=sk-x")
    assert str(caught.value).startswith(f"cannot connect to 127.0.0.1:{up.port} (")
    assert "secret" not in str(caught.value)
    assert "sk-x" not in str(caught.value)


async def test_a_url_that_is_not_http_is_refused_without_its_password() -> None:
    async with client() as c:
        with pytest.raises(UpstreamUnreachable) as caught:
            await fetch(c, "ftp://user:sk-secret@example.com/v1")
    assert str(caught.value) == "not an http(s) upstream URL: ftp://example.com"


@pytest.mark.parametrize(
    "wire",
    [b"HTTP/1.1 2x0 OK\r\n\r\n", b"SMTP ready\r\n\r\n", b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n"],
)
async def test_malformed_answer_is_unreachable(wire: bytes) -> None:
    async with upstream(sends(wire, keep=False, hold=1)) as up, client() as c:
        with pytest.raises(UpstreamUnreachable, match="malformed"):
            await fetch(c, up.url)


async def test_oversized_response_head_is_refused() -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 70_000 + b"\r\n\r\n"
    async with upstream(sends(head, keep=False, hold=1)) as up, client() as c:
        with pytest.raises(UpstreamUnreachable, match="too large"):
            await fetch(c, up.url)


async def test_header_that_would_split_the_request_is_not_sent() -> None:
    async with upstream(answer(b"")) as up, client() as c:
        with pytest.raises(UpstreamUnreachable, match="malformed header"):
            async with c.open("GET", up.url, [("X-A", "1\r\nX-Injected: yes")], b""):
                pass
    assert up.requests == []


async def test_tls_upstream_is_verified() -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_tls)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async with upstream(answer(b"secure"), tls=server_tls) as up:
        url = f"https://localhost:{up.port}/v1/x"
        async with client(tls=trusting) as c:
            assert await fetch(c, url) == (200, b"secure")
        async with client() as c:  # the system's trust store does not know this CA
            with pytest.raises(UpstreamUnreachable, match="TLS"):
                await fetch(c, url)


async def test_large_body_is_read_whole_while_reading_is_paused_and_resumed() -> None:
    big = bytes(range(256)) * 8192  # 2 MiB, over the client's buffer high-water mark
    async with upstream(answer(big)) as up, client() as c:
        async with c.open("GET", up.url, [], b"") as r:
            pieces = r.chunks()
            await asyncio.sleep(0.2)  # let the upstream fill the buffer before reading
            got = b"".join([p async for p in pieces])
        assert got == big
        assert await fetch(c, up.url) == (200, big)  # and the connection is reusable
    assert up.connections == 1


# -- framing, property-based: any body, any chunking, any split of the wire bytes ----------


def _chunked(body: bytes, sizes: list[int]) -> bytes:
    out, rest = [], body
    for size in sizes:
        if not rest:
            break
        piece, rest = rest[: size or 1], rest[size or 1 :]
        out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
    if rest:
        out.append(b"%x\r\n%s\r\n" % (len(rest), rest))
    return b"".join(out) + b"0\r\n\r\n"


def _splits(wire: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    return [wire[a:b] for a, b in itertools.pairwise(points) if b > a]


@settings(max_examples=150)
@given(
    body=st.binary(max_size=3000),
    sizes=st.lists(st.integers(0, 700), max_size=12),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    chunked=st.booleans(),
)
def test_any_framing_split_anywhere_reads_the_same_body(
    body: bytes, sizes: list[int], cuts: list[int], chunked: bool
) -> None:
    if chunked:
        wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(body, sizes)
    else:
        wire = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    async def read_back() -> tuple[bytes, bool]:
        conn = _Connection(asyncio.get_running_loop(), 1.0)
        for piece in _splits(wire, cuts):
            conn.data_received(piece)
        got = []
        while chunk := await conn.next_chunk():
            got.append(chunk)
        return b"".join(got), conn.keep_alive

    got, keep_alive = asyncio.run(read_back())
    assert got == body
    assert keep_alive


async def test_an_answer_left_unread_is_never_pooled() -> None:
    big = b"x" * 300_000  # all of it in before anyone reads: buffered past the high-water mark
    async with upstream(answer(big)) as up, client(read_timeout=2) as c:
        async with c.open("GET", up.url, [], b"") as r:
            await asyncio.sleep(0.2)  # the agent hung up without reading
            assert r.status == 200
        assert c.idle_connections() == 0
        assert await fetch(c, up.url) == (200, big)
    assert up.connections == 2


async def test_a_reset_in_a_body_ended_by_close_is_a_cut_not_an_end() -> None:
    async def reply(_: bytes, __: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"partial": ')
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN
        return False

    async with upstream(reply) as up, client() as c:
        with pytest.raises(UpstreamCut):
            await fetch(c, up.url)


async def test_a_request_the_upstream_held_then_dropped_is_not_sent_again() -> None:
    async def first_fine_then_slow_drop(
        request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if len(up.requests) == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            return True
        await asyncio.sleep(STALE_WINDOW + 0.2)  # read it, worked on it, then went away
        return False

    async with upstream(first_fine_then_slow_drop) as up, client() as c:
        assert await fetch(c, up.url) == (200, b"ok")
        with pytest.raises(UpstreamUnreachable, match="without answering"):
            await fetch(c, up.url)
    assert len(up.requests) == 2, "the dropped request was not sent a second time"


async def test_a_bad_port_in_the_upstream_url_is_an_upstream_error() -> None:
    async with client() as c:
        with pytest.raises(UpstreamUnreachable, match="not a valid port"):
            await fetch(c, "http://127.0.0.1:99999/v1")


async def test_a_request_on_a_connection_closed_as_it_was_reused_goes_again_once() -> None:
    async def closes_on_reuse(
        request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if up.connections == 1 and len(up.requests) == 2:
            return False  # closed at once, unanswered: as if its idle timer had just fired
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return True

    async with upstream(closes_on_reuse) as up, client() as c:
        assert await fetch(c, up.url) == (200, b"ok")
        assert await fetch(c, up.url) == (200, b"ok")  # sent again, on a new connection
    assert (up.connections, len(up.requests)) == (2, 3)

"""Upstream calls through the user's forward proxy (HTTPS_PROXY, HTTP_PROXY, NO_PROXY)."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import pytest
import trustme

from tokenwatch.proxy.egress import Egress, Via, bypassed
from tokenwatch.proxy.upstream import UpstreamClient, UpstreamUnreachable

ORIGIN = "upstream.test"
"""Not a name that resolves: only the forward proxy knows where it is."""


@dataclass
class ForwardProxy:
    """A forward proxy: CONNECT tunnels to `tunnel_to`, plain requests answered itself."""

    tunnel_to: int = 0
    refuse: bytes = b""
    established: bytes = b"HTTP/1.1 200 Connection established\r\n\r\n"
    port: int = 0
    heads: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        if head.startswith(b"CONNECT "):
            return await self._tunnel(reader, writer)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nforwarded")
        await writer.drain()
        writer.close()

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.write(self.refuse)
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.tunnel_to)
        writer.write(self.established)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@asynccontextmanager
async def serving(proxy: ForwardProxy) -> AsyncIterator[ForwardProxy]:
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    async with server:
        yield proxy


@asynccontextmanager
async def tls_origin(ca: trustme.CA) -> AsyncIterator[int]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:  # keep-alive: one answer per request
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(2)  # the body, `{}`
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure")
                await writer.drain()

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(ORIGIN).configure_cert(context)
    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def fetch(client: UpstreamClient, url: str) -> tuple[int, bytes]:
    async with client.open("POST", url, [("Authorization", "Bearer sk-x")], b"{}") as r:
        return r.status, await r.read(lambda: None)


async def test_https_goes_through_the_proxys_tunnel_with_tls_to_the_origin() -> None:
    ca = trustme.CA()
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async with tls_origin(ca) as port, serving(ForwardProxy(tunnel_to=port)) as proxy:
        egress = Egress({"https": f"http://u%40corp:p%3Ass@127.0.0.1:{proxy.port}"})
        async with UpstreamClient(2, 5, tls=trusting, egress=egress) as client:
            got = await fetch(client, f"https://{ORIGIN}:{port}/v1/chat/completions")
            again = await fetch(client, f"https://{ORIGIN}:{port}/v1/chat/completions")
    assert got == again == (200, b"secure")
    (head,) = proxy.heads  # one tunnel, kept alive for the second call
    login = base64.b64encode(b"u@corp:p:ss").decode()
    assert (
        head
        == (
            f"CONNECT {ORIGIN}:{port} HTTP/1.1\r\nHost: {ORIGIN}:{port}\r\n"
            f"Proxy-Authorization: Basic {login}\r\n\r\n"
        ).encode()
    )


async def test_plain_http_is_sent_to_the_proxy_whole_url_and_all() -> None:
    async with serving(ForwardProxy()) as proxy:
        egress = Egress({"http": f"http://127.0.0.1:{proxy.port}"})
        async with UpstreamClient(2, 5, egress=egress) as client:
            got = await fetch(client, f"http://{ORIGIN}/v1/embeddings?x=1")
    assert got == (200, b"forwarded")
    assert proxy.heads[0].startswith(
        f"POST http://{ORIGIN}/v1/embeddings?x=1 HTTP/1.1\r\nHost: {ORIGIN}\r\n".encode()
    )
    assert b"Proxy-Authorization" not in proxy.heads[0]


async def test_a_refused_tunnel_is_a_clear_upstream_error() -> None:
    refusal = b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
    async with serving(ForwardProxy(refuse=refusal)) as proxy:
        egress = Egress({"https": f"http://127.0.0.1:{proxy.port}"})
        async with UpstreamClient(2, 5, egress=egress) as client:
            with pytest.raises(UpstreamUnreachable) as caught:
                await fetch(client, f"https://{ORIGIN}/v1/messages")
    assert str(caught.value) == (
        f"the proxy 127.0.0.1:{proxy.port} refused a tunnel to {ORIGIN}:443 (407)"
    )


async def test_an_unsupported_proxy_is_named_without_its_password() -> None:
    egress = Egress({"https": "socks5://me:secret@proxy.corp:1080"})
    async with UpstreamClient(2, 5, egress=egress) as client:
        with pytest.raises(UpstreamUnreachable) as caught:
            await fetch(client, "https://api.openai.com/v1/chat/completions")
    message = str(caught.value)
    assert message == "unsupported forward proxy socks5://proxy.corp (an http:// proxy is needed)"


def test_which_hosts_go_through_the_proxy() -> None:
    egress = Egress(
        {"https": "http://proxy.corp:3128", "no": ".internal.corp, 10.0.0.0/8, api.local:8080"}
    )
    assert egress.via("https", "api.openai.com") == Via("proxy.corp", 3128)
    assert egress.via("http", "api.openai.com") is None  # no http_proxy set
    for host in ("gw.internal.corp", "internal.corp", "10.1.2.3", "api.local", "127.0.0.1",
                 "localhost", "::1"):  # fmt: skip
        assert egress.via("https", host) is None, host
    assert bypassed("anything.example", "*")
    assert not bypassed("notinternal.corp", ".internal.corp")
    assert bypassed("2001:db8::5", "[2001:db8::]/32")  # curl's way of writing an IPv6 network
    fallback = Egress({"all": "http://gw.corp:8080", "https": "http://tls.corp:3128"})
    assert fallback.via("http", "example.com") == Via("gw.corp", 8080)
    assert fallback.via("https", "example.com") == Via("tls.corp", 3128)


async def test_any_2xx_opens_the_tunnel_and_a_bad_proxy_port_is_named() -> None:
    ca = trustme.CA()
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async with tls_origin(ca) as port, serving(ForwardProxy(tunnel_to=port)) as proxy:
        proxy.established = b"HTTP/1.0 204 Tunnel open\r\n\r\n"
        egress = Egress({"https": f"http://127.0.0.1:{proxy.port}"})
        async with UpstreamClient(2, 5, tls=trusting, egress=egress) as client:
            assert await fetch(client, f"https://{ORIGIN}:{port}/v1/x") == (200, b"secure")
    egress = Egress({"https": "http://me:secret@proxy.corp:31x8"})
    async with UpstreamClient(2, 5, egress=egress) as client:
        with pytest.raises(UpstreamUnreachable) as caught:
            await fetch(client, "https://api.openai.com/v1/x")
    assert "secret" not in str(caught.value)
    assert "not valid" in str(caught.value)

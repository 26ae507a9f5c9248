"""How upstream calls leave the machine: directly, or through the user's HTTP(S)_PROXY."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

MAX_TUNNEL_REPLY_BYTES = 65_536
"""Largest answer a forward proxy may give to CONNECT."""
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


class ProxyRefused(Exception):
    """The forward proxy could not be reached or would not open a tunnel (answered with 502)."""


@dataclass(frozen=True, slots=True)
class Via:
    """A forward proxy (HTTP, as HTTP_PROXY and HTTPS_PROXY name them) and how to log in to it."""

    host: str
    port: int
    authorization: str = ""
    """The Proxy-Authorization value (Basic) from credentials in the proxy's URL; empty without."""

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


class Egress:
    """Which forward proxy, if any, a call to a host goes through (`http_proxy`, `https_proxy`,
    else `all_proxy`, and `no_proxy`, as curl and the SDKs read them; a loopback host never goes
    through one)."""

    def __init__(self, proxies: Mapping[str, str]) -> None:
        self._proxies = dict(proxies)
        self._cache: dict[tuple[str, str], Via | None] = {}

    @classmethod
    def from_environment(cls) -> Egress:
        return cls(urllib.request.getproxies_environment())

    def via(self, scheme: str, host: str) -> Via | None:
        key = (scheme, host)
        if key not in self._cache:
            self._cache[key] = self._choose(scheme, host)
        return self._cache[key]

    def _choose(self, scheme: str, host: str) -> Via | None:
        url = self._proxies.get(scheme) or self._proxies.get("all")
        if not url or _loopback(host) or bypassed(host, self._proxies.get("no", "")):
            return None
        return parse_proxy(url)


def bypassed(host: str, no_proxy: str) -> bool:
    """Whether `no_proxy` (`*`, or names, `.suffixes`, addresses and networks, comma separated)
    exempts `host`."""
    host = host.lower().strip("[]")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name = entry.lstrip(".")
        if name.count(":") == 1:
            name = name.split(":", 1)[0]  # `host:port`: the port is not told apart
        if host == name or host.endswith("." + name) or _in_network(host, name):
            return True
    return False


def _in_network(host: str, entry: str) -> bool:
    network = entry.replace("[", "").replace("]", "")  # `[2001:db8::]/32` as curl writes it
    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network(network, strict=False)
    except ValueError:
        return False


def parse_proxy(url: str) -> Via:
    """`http://user:password@proxy:3128` (a bare `proxy:3128` too) as a Via."""
    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        port = parts.port or 80
    except ValueError:
        raise ProxyRefused("the forward proxy's URL is not valid (its port?)") from None
    if parts.scheme != "http" or not parts.hostname:
        shown = f"{parts.scheme}://{parts.hostname or ''}"
        raise ProxyRefused(f"unsupported forward proxy {shown} (an http:// proxy is needed)")
    authorization = ""
    if parts.username is not None:
        login = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(login).decode()
    return Via(parts.hostname, port, authorization)


def _loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def open_tunnel(via: Via, host: str, port: int) -> socket.socket:
    """A socket connected to `host:port` through the proxy's CONNECT, for TLS on top. (A socket,
    not a transport: `loop.start_tls` on Python 3.11 returns no transport when upgrading one.)"""
    loop = asyncio.get_running_loop()
    sock = await _connect_to(via)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if via.authorization:
        head += f"Proxy-Authorization: {via.authorization}\r\n"
    try:
        await loop.sock_sendall(sock, f"{head}\r\n".encode())
        reply = await _reply_head(loop, sock)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or type(exc).__name__
        raise ProxyRefused(
            f"the proxy {via.where} dropped the tunnel to {target} ({reason})"
        ) from None
    except BaseException:
        sock.close()
        raise
    words = reply.split(b"\r\n", 1)[0].split(b" ", 2)
    status = words[1] if len(words) > 1 else b"?"
    if not (len(status) == 3 and status.startswith(b"2") and status.isdigit()):
        sock.close()
        code = status.decode("ascii", "replace")
        raise ProxyRefused(f"the proxy {via.where} refused a tunnel to {target} ({code})")
    return sock


async def _connect_to(via: Via) -> socket.socket:
    loop = asyncio.get_running_loop()
    failure: OSError | None = None
    try:
        addresses = await loop.getaddrinfo(via.host, via.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        addresses, failure = [], exc
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    reason = (failure.strerror or type(failure).__name__) if failure else "no address"
    raise ProxyRefused(f"cannot connect to the proxy {via.where} ({reason})")


async def _reply_head(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The proxy's answer up to its blank line (a 200 to CONNECT has no body)."""
    reply = b""
    while b"\r\n\r\n" not in reply:
        if len(reply) > MAX_TUNNEL_REPLY_BYTES:
            raise ProxyRefused("the proxy's answer to CONNECT is too large")
        data = await loop.sock_recv(sock, 4096)
        if not data:
            raise ProxyRefused("the proxy closed the connection instead of opening a tunnel")
        reply += data
    return reply

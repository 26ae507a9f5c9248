"""The stable endpoint: the proxy on a fixed port with no route token in its URLs; each connection's
calls are attributed to the process that opened it, looked up once and kept with the connection."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

from tokenwatch.core.errors import EngineError
from tokenwatch.process.peers import Peer, find_peer
from tokenwatch.proxy.errors import protocol_error_page
from tokenwatch.proxy.http import HttpServer, Incoming, Limits
from tokenwatch.proxy.routes import (
    AgentRoute,
    RouteTable,
    Target,
    loopback_host,
    split_path,
    token_target,
)

log = logging.getLogger("tokenwatch.proxy")

Callers = Callable[[Peer], str]
"""The route token for calls from a process (the engine's `caller`); EngineError if none."""
Serve = Callable[[Incoming, "Target | None", "AgentRoute | None", int], Awaitable[None]]
"""The proxy's request flow from its guards on, for a request whose route is known (or not)."""


class StableEndpoint:
    """Listens on `port` beside the routed proxy; `port` stays 0 when it could not bind."""

    def __init__(
        self, serve: Serve, routes: RouteTable, callers: Callers, limits: Limits, port: int
    ) -> None:
        self._serve = serve
        self._routes = routes
        self._callers = callers
        self._http = HttpServer(self.handle, limits, protocol_error_page)
        self._wanted = port
        self.port = 0
        self.error = ""
        """Why it is not listening (the port is taken...), or ""."""

    async def serve(
        self,
        hosts: list[str],
        *,
        task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen until cancelled; a port that cannot be bound is logged and reported as 0."""
        try:
            await self._http.serve(hosts, self._wanted, task_status=_Ported(self, task_status))
        except OSError as exc:  # raised by the bind, before anything was reported
            self.error = (
                f"the stable endpoint could not listen on port {self._wanted}: {exc.strerror}"
            )
            log.warning("%s ([proxy] endpoint_port; 0 turns it off)", self.error)
            task_status.started(0)

    async def handle(self, req: Incoming) -> None:
        target = split_path(req.path, req.headers)
        if target is not None:  # a route token's URL works here too
            return await self._serve(req, target, self._routes.get(target.token), self.port)
        if not loopback_host(req.headers.get("Host"), self.port):
            return await self._serve(req, None, None, self.port)  # refused before any lookup
        token = req.note
        route = self._routes.get(token) if token else None
        if route is None:  # the connection's first call (or its agent has ended since)
            token = req.note = await self._attribute(req)
            route = self._routes.get(token) if token else None
        await self._serve(req, token_target(token or "", req.path, req.headers), route, self.port)

    async def _attribute(self, req: Incoming) -> str:
        """The calling process's agent's route token; "" when it cannot be told (not ours)."""
        ends = req.ends
        if ends is None:
            return ""
        peer = await anyio.to_thread.run_sync(find_peer, *ends)
        if peer is None:
            log.info("a call on the stable endpoint from a process that is not yours: refused")
            return ""
        try:
            return self._callers(peer)
        except EngineError as exc:
            log.info("a call from pid %d not attributed: %s", peer.pid, exc)
            return ""


class _Ported:
    """The task status `serve` passes on, noting the port it reports."""

    def __init__(self, endpoint: StableEndpoint, status: anyio.abc.TaskStatus[int]) -> None:
        self._endpoint = endpoint
        self._status = status

    def started(self, value: int | None = None) -> None:
        self._endpoint.port = int(value or 0)
        self._status.started(self._endpoint.port)

"""Fixtures for proxy tests: a recording Gate, the proxy on fake-llm, and SDK clients through it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from tokenwatch.config import ProxySettings
from tokenwatch.core.admission import Admission, CallRequest
from tokenwatch.core.models import UsageEvent
from tokenwatch.demo.fake_llm import FakeLLM, running_fake_llm
from tokenwatch.proxy.levers import Levers
from tokenwatch.proxy.server import AgentRoute, ProxyServer, RouteTable

API_KEY = "sk-canary-7f3a9c1e5b2d4086-never-store"
"""A key whose every appearance outside the upstream request is a leak."""


class RecordingGate:
    """A Gate that admits calls while a token budget lasts and keeps every settled event.

    `budget` None admits everything; otherwise each call reserves its worst case under a lock,
    as the real engine does, and is refused with 429 once the budget cannot cover it.
    """

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget
        self.reserved = 0
        self.peak_reserved = 0
        self.requests: list[CallRequest] = []
        self.settled: list[tuple[Admission, UsageEvent]] = []
        self.settle_gate: anyio.Event | None = None
        """When set to an unset Event, settle waits for it (a slow store)."""
        self.settle_error: Exception | None = None
        self._lock = asyncio.Lock()
        self._next = 0
        self._costs: dict[str, int] = {}
        self.settled_event = anyio.Event()

    async def admit(self, call: CallRequest) -> Admission:
        self.requests.append(call)
        worst = call.input_tokens + call.max_output_tokens
        async with self._lock:
            if self.budget is not None and self.reserved + worst > self.budget:
                return Admission(
                    False,
                    status=429,
                    message=f"budget 'test' of {self.budget} tokens would be exceeded; "
                    "raise it with `tokenwatch budget set test`",
                    budget="test",
                )
            self._next += 1
            rid = f"r{self._next}"
            self.reserved += worst
            self.peak_reserved = max(self.peak_reserved, self.reserved)
            self._costs[rid] = worst
            return Admission(True, reservation=rid)

    async def settle(self, admission: Admission, event: UsageEvent) -> None:
        if self.settle_gate is not None:
            await self.settle_gate.wait()
        if self.settle_error is not None:
            raise self.settle_error
        self.settled.append((admission, dataclasses.replace(event)))
        self.settled_event.set()

    @property
    def events(self) -> list[UsageEvent]:
        return [event for _, event in self.settled]

    async def wait_settled(self, count: int) -> list[UsageEvent]:
        with anyio.fail_after(30):
            while len(self.settled) < count:
                self.settled_event = anyio.Event()
                await self.settled_event.wait()
        return self.events


@dataclass
class ProxyRig:
    """A running proxy in front of a running fake-llm, with one registered agent."""

    proxy: ProxyServer
    routes: RouteTable
    gate: RecordingGate
    fake: FakeLLM
    token: str
    urls: dict[str, str] = field(default_factory=dict)

    @property
    def openai_url(self) -> str:
        return self.urls["OPENAI_BASE_URL"]

    @property
    def anthropic_url(self) -> str:
        return self.urls["ANTHROPIC_BASE_URL"]


@asynccontextmanager
async def running_proxy(
    gate: RecordingGate | None = None,
    *,
    route: AgentRoute | None = None,
    fake_kwargs: dict[str, object] | None = None,
    levers: Levers | None = None,
    **settings: object,
) -> AsyncIterator[ProxyRig]:
    """fake-llm plus the proxy whose default upstreams are the fake; one agent `coder` routed."""
    gate = gate or RecordingGate()
    async with running_fake_llm(**(fake_kwargs or {})) as fake:
        defaults: dict[str, object] = {
            "openai_upstream": fake.url + "/v1",
            "anthropic_upstream": fake.url,
        }
        config = ProxySettings(**{**defaults, **settings})  # type: ignore[arg-type]
        routes = RouteTable()
        proxy = ProxyServer(gate, routes, config, levers=levers)
        async with anyio.create_task_group() as tg:
            await tg.start(proxy.serve)
            token = routes.add(route or AgentRoute(agent="coder", run_id="run-1", task="t1"))
            try:
                yield ProxyRig(proxy, routes, gate, fake, token, proxy.base_urls(token))
            finally:
                tg.cancel_scope.cancel()

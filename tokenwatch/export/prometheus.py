"""Prometheus `/metrics` for the supervisor: counters from every recorded call, gauges at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenwatch.config import PrometheusSettings, parse_listen
from tokenwatch.core.models import Action, AgentState, Alert, Snapshot, UsageEvent
from tokenwatch.core.pricing import ESTIMATED, is_estimated
from tokenwatch.export.host import host_name
from tokenwatch.export.labels import LabelFolder

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CALL_LABELS = ("host", "agent", "model", "provider", "task", "user", "status")
"""`host` first, on every series: the machine, so one board over many supervisors can split by it."""
TOKEN_TYPES = ("input", "output", "cache_read", "cache_write", "reasoning")


class SnapshotCollector(Collector):
    """Gauges read from the engine's latest snapshot when Prometheus scrapes."""

    def __init__(self, snapshot: Callable[[], Snapshot], host: str) -> None:
        self._snapshot = snapshot
        self._host = host

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from self._rates(snap, self._host)
        yield from self._agents(snap, self._host)
        yield from self._budgets(snap, self._host)

    def describe(self) -> Iterable[Metric]:
        return []

    @staticmethod
    def _rates(snap: Snapshot, host: str) -> Iterator[Metric]:
        tpm = GaugeMetricFamily(
            "tokenwatch_tokens_per_minute", "Tokens per minute, all agents, now", labels=["host"]
        )
        tpm.add_metric([host], snap.tokens_per_min)
        uph = GaugeMetricFamily(
            "tokenwatch_usd_per_hour",
            "Spend rate in USD per hour, all agents, now",
            labels=["host"],
        )
        uph.add_metric([host], snap.usd_per_hour)
        yield tpm
        yield uph

    @staticmethod
    def _agents(snap: Snapshot, host: str) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "tokenwatch_agent_state",
            "1 for the state each agent is in",
            labels=["host", "agent", "state"],
        )
        tpm = GaugeMetricFamily(
            "tokenwatch_agent_tokens_per_minute",
            "Tokens per minute by agent",
            labels=["host", "agent"],
        )
        uph = GaugeMetricFamily(
            "tokenwatch_agent_usd_per_hour",
            "Spend rate in USD per hour by agent",
            labels=["host", "agent"],
        )
        for view in snap.agents:
            name = view.agent.name
            for candidate in AgentState:
                state.add_metric(
                    [host, name, candidate.value], float(view.agent.state == candidate.value)
                )
            tpm.add_metric([host, name], view.tokens_per_min)
            uph.add_metric([host, name], view.usd_per_hour)
        yield state
        yield tpm
        yield uph

    @staticmethod
    def _budgets(snap: Snapshot, host: str) -> Iterator[Metric]:
        labels = ["host", "budget", "scope", "target", "period", "unit"]
        used = GaugeMetricFamily("tokenwatch_budget_used", "Budget used this period", labels=labels)
        remaining = GaugeMetricFamily(
            "tokenwatch_budget_remaining", "Budget left this period", labels=labels
        )
        limit = GaugeMetricFamily("tokenwatch_budget_limit", "Budget limit", labels=labels)
        for b in snap.budgets:
            values = [host, b.name, b.scope, b.target, b.period, b.unit]
            used.add_metric(values, b.used)
            remaining.add_metric(values, b.remaining)
            limit.add_metric(values, b.limit)
        yield used
        yield remaining
        yield limit


class PrometheusExporter:
    """Turns engine events into Prometheus series; `observe` is an engine listener."""

    def __init__(
        self,
        settings: PrometheusSettings,
        snapshot: Callable[[], Snapshot],
        *,
        host: str | None = None,
    ) -> None:
        self.settings = settings
        self.host = host or host_name()
        """The `host` label on every series (this machine's name unless told otherwise)."""
        self.registry = CollectorRegistry()
        self._task = LabelFolder(settings.max_label_values)
        self._user = LabelFolder(settings.max_label_values)
        reg = self.registry
        self.tokens = Counter(
            "tokenwatch_tokens",
            "Tokens by type (input counts cache reads and writes; output counts reasoning)",
            [*CALL_LABELS, "type"],
            registry=reg,
        )
        self.cost = Counter(
            "tokenwatch_cost_usd",
            "Spend in USD, estimates for unknown models included (see tokenwatch_estimated_cost_usd)",
            CALL_LABELS,
            registry=reg,
        )
        self.estimated = Counter(
            "tokenwatch_estimated_cost_usd",
            "The part of tokenwatch_cost_usd priced by estimate (models no price table knows)",
            [*CALL_LABELS, "estimated_from"],
            registry=reg,
        )
        self.requests = Counter(
            "tokenwatch_requests", "LLM calls recorded", CALL_LABELS, registry=reg
        )
        self.unpriced = Counter(
            "tokenwatch_unpriced_requests",
            "Calls to models no price table knows (priced by estimate, or not at all)",
            ["host", "model"],
            registry=reg,
        )
        self.actions = Counter(
            "tokenwatch_actions", "Actions taken on agents", ["host", "kind", "agent"], registry=reg
        )
        self.alerts = Counter(
            "tokenwatch_alerts", "Alerts raised", ["host", "rule", "severity"], registry=reg
        )
        self.saved_usd = Counter(
            "tokenwatch_saved_usd",
            "USD the optimisation levers saved (cache, switch, trim)",
            ["host", "agent", "lever"],
            registry=reg,
        )
        self.saved_calls = Counter(
            "tokenwatch_lever_requests",
            "Calls a lever touched (cache: answered from the cache)",
            ["host", "agent", "lever"],
            registry=reg,
        )
        reg.register(SnapshotCollector(snapshot, self.host))
        self._port = 0

    def observe(self, kind: str, obj: Any) -> None:
        if kind == "usage" and isinstance(obj, UsageEvent):
            self._usage(obj)
        elif kind == "action" and isinstance(obj, Action):
            self.actions.labels(self.host, obj.kind, obj.agent).inc()
        elif kind == "alert" and isinstance(obj, Alert):
            self.alerts.labels(self.host, obj.rule, obj.severity).inc()

    def _usage(self, event: UsageEvent) -> None:
        labels = (
            self.host,
            event.agent,
            event.model,
            event.provider,
            self._task(event.task),
            self._user(event.user),
            event.status,
        )
        counts = (
            event.input_tokens,
            event.output_tokens,
            event.cache_read_tokens,
            event.cache_write_tokens,
            event.reasoning_tokens,
        )
        for token_type, count in zip(TOKEN_TYPES, counts, strict=True):
            if count:
                self.tokens.labels(*labels, token_type).inc(count)
        self.requests.labels(*labels).inc()
        estimated = is_estimated(event.price_source)
        if event.cost_usd is None or estimated:
            self.unpriced.labels(self.host, event.model).inc()
        if event.cost_usd is not None:
            self.cost.labels(*labels).inc(event.cost_usd)
        if estimated and event.cost_usd is not None:
            source = event.price_source.removeprefix(ESTIMATED)
            self.estimated.labels(*labels, source).inc(event.cost_usd)
        if event.lever:
            self.saved_calls.labels(self.host, event.agent, event.lever).inc()
            if event.saved_usd:
                saved = max(0.0, event.saved_usd)
                self.saved_usd.labels(self.host, event.agent, event.lever).inc(saved)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    @property
    def port(self) -> int:
        return self._port

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve GET /metrics on `settings.listen` until cancelled; reports the bound port."""
        from aiohttp import web

        host, port = parse_listen(self.settings.listen)

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
            self._port = int(runner.addresses[0][1])
            task_status.started(self._port)
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()

"""The supervisor service: opens the ledger, wires prices, budgets, rules, the engine, the proxy,
exporters and the socket server, and owns their lifetime (signals, clean exit, crash recovery)."""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
import anyio.to_thread

from tokenwatch.config import Config, ConfigError, ProxySettings
from tokenwatch.core.maintained_prices import INSTALLED
from tokenwatch.core.models import Agent, Alert, UsageEvent
from tokenwatch.engine.engine import Engine
from tokenwatch.engine.figures import GROUPS
from tokenwatch.export.alerting import Notifier
from tokenwatch.instance import instance_lock, remove_pid, write_pid
from tokenwatch.paths import Paths
from tokenwatch.process.processes import Spawner, spawn
from tokenwatch.supervisor.commands import Commands
from tokenwatch.supervisor.optimize import build_levers, recover_switched, shows_switch
from tokenwatch.supervisor.policy import build_policy, load_config
from tokenwatch.supervisor.reload import ConfigWatch, apply, seed_quietly
from tokenwatch.supervisor.server import SocketServer

if TYPE_CHECKING:
    from tokenwatch.engine.agents import AgentRecord
    from tokenwatch.ledger.store import Store
    from tokenwatch.proxy.levers import Levers

log = logging.getLogger("tokenwatch.supervisor")

SHUTDOWN_FLUSH_TIMEOUT = 2.0
"""Seconds a stopping supervisor gives peers to receive what was already queued for them."""
GC_THRESHOLD: Final[tuple[int, int, int]] = (10_000, 50, 50)
"""The daemon's collector thresholds. It keeps a large, steady heap (every agent's recent calls)
and allocates a few objects per usage event; at Python's default (700, 10, 10) the collector
walked that heap so often that ingest ran about 30 % slower (docs/benchmarks.md, Ingest)."""


def wire(obj: Any) -> Any:
    """A published object as push data. Usage events go as they are (the encoder writes dataclasses
    natively, several times faster than building a dict; there can be 50,000 a second)."""
    if isinstance(obj, UsageEvent):
        return obj
    to_dict = getattr(obj, "to_dict", None)
    return to_dict() if to_dict is not None else obj


@dataclass(frozen=True, slots=True)
class ProxyRoutes:
    """The engine's view of the proxy: routes per agent and the URLs agents are given. Routes
    added and removed are saved (`save_to`), so a supervisor that restarts serves the same ones."""

    table: Any
    proxy: Any
    url: str
    save_to: Path | None = None
    endpoint: str = ""
    """The stable endpoint's URL, or "" when it is off or could not listen."""

    def add_route(
        self, agent: Agent, openai_upstream: str, anthropic_upstream: str, token: str = ""
    ) -> str:
        from tokenwatch.proxy.server import AgentRoute

        route = AgentRoute(
            agent=agent.name,
            run_id=agent.run_id,
            task=agent.task,
            user=agent.user,
            tags=dict(agent.tags),
            openai_upstream=openai_upstream,
            anthropic_upstream=anthropic_upstream,
        )
        token = str(self.table.add(route, token))
        self.save()
        return token

    def remove_route(self, token: str) -> None:
        self.table.remove(token)
        self.save()

    def set_task(self, agent: str, task: str) -> None:
        # not saved: a restored route takes its task from the agent's record, and task changes
        # can come many times a second
        self.table.set_task(agent, task)

    def base_urls(self, token: str) -> dict[str, str]:
        return dict(self.proxy.base_urls(token))

    def save(self) -> None:
        if self.save_to is None:
            return
        from tokenwatch.proxy.routes import save_routes

        try:
            save_routes(self.save_to, self.proxy.port, self.table)
        except OSError as exc:
            # the routes still serve; only a restarted supervisor would not know them
            log.warning("could not save the proxy routes to %s: %s", self.save_to, exc.strerror)


class Supervisor:
    """One per user: `await tg.start(sup.run)` serves until `request_shutdown()` (or cancel)."""

    def __init__(
        self,
        paths: Paths,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        spawner: Spawner = spawn,
        proxy: bool = True,
        exporters: bool = True,
    ) -> None:
        self.paths = paths
        self.config = config
        self._clock = clock
        self._spawner = spawner
        self._with_proxy = proxy
        self._with_exporters = exporters
        self._stop = anyio.Event()
        self.started_at = clock()
        self.engine: Engine | None = None
        self.notifier: Notifier | None = None
        self.server: SocketServer | None = None
        self.commands: Commands | None = None
        self.store: Store | None = None
        self.proxy_url = ""
        self.endpoint_url = ""
        self.metrics_url = ""
        self.recovered: list[str] = []
        self.levers: Levers | None = None

    def _config_in_use(self) -> Config:
        return self.commands.config if self.commands is not None else self.config

    def request_shutdown(self) -> None:
        self._stop.set()

    def info(self) -> dict[str, Any]:
        from tokenwatch import __version__

        return {
            "pid": os.getpid(),
            "version": __version__,
            "socket": str(self.paths.socket),
            "proxy_url": self.proxy_url,
            "endpoint_url": self.endpoint_url,
            "metrics_url": self.metrics_url,
            "db": str(self.paths.db),
            "config": self.config.source,
            "started_at": self.started_at,
        }

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[Supervisor] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until asked to stop; then resume what it paused and flush the ledger."""
        from tokenwatch.ledger.store import Store
        from tokenwatch.ledger.unstored import store_kept

        with instance_lock(self.paths):
            self.paths.ensure_state()
            store = self.store = await Store.open(self.paths.db, writer_process=True)
            await store_kept(store, self.paths.unstored)  # before budgets are counted from it
            try:
                await self._serve(store, task_status)
            finally:
                with anyio.CancelScope(shield=True):
                    await self._close_ledger(store)
                remove_pid(self.paths)
                log.info("supervisor stopped")

    async def _close_ledger(self, store: Store) -> None:
        """Keep the usage the engine could not store (the proxy's last settlements included)
        for the next start, then flush and close: nothing is lost without a line saying so."""
        from tokenwatch.ledger.store import StoreUnavailable
        from tokenwatch.ledger.unstored import keep_unstored

        if self.engine is not None:
            left, error = self.engine.take_unstored(), self.engine.statistics().store_error
            await anyio.to_thread.run_sync(keep_unstored, self.paths.unstored, left, error)
        try:
            await store.aclose()
        except StoreUnavailable as exc:
            log.error("the ledger was not closed cleanly: %s", exc)

    async def _serve(self, store: Store, task_status: anyio.abc.TaskStatus[Supervisor]) -> None:
        engine = self.engine = self._build_engine(store)
        if self._with_proxy:
            self.levers = build_levers(self.paths, self._config_in_use, engine, self._clock)
        commands = self.commands = Commands(
            engine,
            self.config,
            on_shutdown=self.request_shutdown,
            on_reload=self.reload_config,
            info=self.info,
            store=store,
            logs_dir=self.paths.logs_dir,
            switch=self.levers.switch if self.levers is not None else None,
        )
        server = self.server = SocketServer(self.paths.socket, commands)
        if self.levers is not None:  # first: records carry the switch when they are published
            engine.add_listener(shows_switch(self.levers.switch))
        engine.add_listener(lambda kind, obj: server.publish_nowait(kind, wire(obj)))
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run, name="tokenwatch.engine")
            await self._start_fleet(tg, engine)
            await self._start_shipper(tg)
            await self._seed(engine, store)
            switch = self.levers.switch if self.levers is not None else None
            found = await recover_switched(engine, store, switch)
            await _count_runs_so_far(found, store)
            self.recovered = [rec.name for rec in found]
            await self._start_notifier(tg)
            if self._with_proxy:
                await self._start_proxy(tg, engine)
            if self._with_exporters:
                await self._start_exporters(tg, engine)
            if self.config.session_logs.follow:
                await self._follow_session_logs(tg, engine, store)
            if self.config.overlay:  # read from files (not built in code): watch them
                watch = ConfigWatch(self._config_files, self._config_edited)
                await tg.start(watch.run, name="tokenwatch.config-watch")
            write_pid(self.paths)  # before the socket answers: whoever connects can read it
            await tg.start(server.serve, name="tokenwatch.socket-server")
            # genai-prices takes ~0.2 s to load: in a thread now, not on the loop at a first call
            tg.start_soon(anyio.to_thread.run_sync, INSTALLED.warm, name="load genai-prices")
            log.info("supervisor %d serving on %s", os.getpid(), self.paths.socket)
            task_status.started(self)
            await self._stop.wait()
            log.info("shutting down: resuming paused agents, flushing the ledger")
            with anyio.CancelScope(shield=True):
                await engine.release_all()
                with anyio.move_on_after(SHUTDOWN_FLUSH_TIMEOUT):
                    await server.wait_flushed()  # e.g. the reply to `shutdown` itself
            tg.cancel_scope.cancel()

    async def reload_config(self) -> str:
        """Read the config files again and apply what can change while running; raises
        ConfigError (changing nothing) when they cannot be read or are refused."""
        assert self.engine is not None
        assert self.commands is not None
        old = self.commands.config
        new = await anyio.to_thread.run_sync(self._read_config, old)
        reloaded = apply(self.engine, old, new)
        self.commands.config = new
        if reloaded.fresh_budgets and self.store is not None:
            await seed_quietly(self.engine, self.store, reloaded.fresh_budgets)
        log.info("config reloaded: %s", reloaded.summary())
        return reloaded.summary()

    def _read_config(self, old: Config) -> Config:
        """The config again, from the file in use (or, started without one, wherever one is
        found now). A file in use that is gone is refused: its settings stay."""
        source = _config_file(old)
        if source is None:
            return load_config(None, self.paths)
        if not source.is_file():
            raise ConfigError(f"{source}: the file in use is gone; put it back to change settings")
        return load_config(source, self.paths)

    def _config_files(self) -> list[Path]:
        """The files an edit of the config lands in: the one in use (or, started without one,
        where one would be found) and its overlay."""
        config = self.commands.config if self.commands is not None else self.config
        source = _config_file(config)
        found = self.paths.config_candidates() if source is None else [source]
        return [*found, Path(config.overlay)]

    async def _config_edited(self) -> None:
        try:
            await self.reload_config()
        except ConfigError as exc:
            self._config_refused(str(exc))
        except Exception as exc:
            # whatever an edit holds, it must not stop the supervisor
            log.exception("config not reloaded")
            self._config_refused(f"could not apply the edit ({type(exc).__name__}: {exc})")

    def _config_refused(self, why: str) -> None:
        log.warning("config not reloaded: %s", why)
        if self.engine is not None:
            message = f"config not reloaded: {why}; the settings in use stay"
            self.engine.alert_nowait(Alert(rule="config", agent="", message=message))

    def _build_engine(self, store: Store) -> Engine:
        cfg = self.config
        policy = build_policy(
            cfg, clock=self._clock, is_critical=lambda name: _is_critical(engine, name)
        )
        engine = Engine(
            store,
            policy.prices,
            policy.budgets,
            policy.rules,
            settings=cfg.supervisor,
            clock=self._clock,
            spawner=self._spawner,
            child_env=child_env,
            agents=cfg.agents,
            logs_dir=self.paths.logs_dir,
            socket_path=str(self.paths.socket),
        )
        if cfg.alerts.webhook or cfg.alerts.desktop:
            notifier = self.notifier = Notifier(cfg.alerts)
            engine.add_listener(lambda kind, obj: _notify(notifier, kind, obj))
        return engine

    async def _seed(self, engine: Engine, store: Store) -> None:
        """What is already in the ledger for today, so budgets and figures start where they were."""
        await engine.seed_budgets(store)
        since = engine.live.day_start
        for group in GROUPS:
            for row in await store.aggregate(group, since):
                engine.seed_today(
                    group,
                    row.key,
                    row.total_tokens,
                    row.cost_usd,
                    row.estimated_usd,
                    row.unpriced_requests,
                )

    async def _start_shipper(self, tg: anyio.abc.TaskGroup) -> None:
        """With [fleet]: this ledger's events sent on to the team's table, from where the last
        run left off (tokenwatch/fleet/shipper.py)."""
        if self.config.fleet is None:
            return
        from tokenwatch.fleet.shipper import Shipper

        await tg.start(Shipper(self.config.fleet, self.paths.db).run, name="fleet: ledger")

    async def _start_fleet(self, tg: anyio.abc.TaskGroup, engine: Engine) -> None:
        """With [fleet]: shared budgets on the team's database (the supervisor starts even
        while it is unreachable: each shared budget then does what its policy says)."""
        fleet = self.config.fleet
        if fleet is None:
            return
        from tokenwatch.fleet.budgets import SharedBook

        book = SharedBook(fleet, self.config.budget, tz=self.config.supervisor.timezone,
                          clock=self._clock, keep=self.paths.fleet_unsent)  # fmt: skip
        await tg.start(book.run, name="fleet: shared budgets")
        engine.use_shared_budgets(book)

    async def _start_notifier(self, tg: anyio.abc.TaskGroup) -> None:
        if self.notifier is not None:
            await tg.start(self.notifier.run, name="alert notifier")

    async def _start_proxy(self, tg: anyio.abc.TaskGroup, engine: Engine) -> None:
        from tokenwatch.proxy.routes import load_routes
        from tokenwatch.proxy.server import RouteTable

        saved = load_routes(self.paths.proxy_routes)
        table = RouteTable()
        proxy, port = await self._listen(tg, engine, table, saved.port)
        self.proxy_url = f"http://{self.config.proxy.host}:{port}"
        self.endpoint_url = proxy.endpoint_url()
        routes = ProxyRoutes(
            table, proxy, self.proxy_url, self.paths.proxy_routes, self.endpoint_url
        )
        if proxy.endpoint is not None and proxy.endpoint.error:
            engine.alert_nowait(Alert(rule="endpoint", agent="", message=proxy.endpoint.error))
        engine.use_routes(routes)
        if port == saved.port:
            for token, r in saved.routes.items():
                if engine.restore_route(
                    token, r.agent, r.run_id, r.openai_upstream, r.anthropic_upstream
                ):
                    log.info("%s's proxy route restored", r.agent)
        routes.save()
        log.info(
            "proxy listening on %s (stable endpoint: %s)",
            self.proxy_url,
            self.endpoint_url or "off",
        )

    async def _listen(
        self, tg: anyio.abc.TaskGroup, engine: Engine, table: Any, saved_port: int
    ) -> tuple[Any, int]:
        """The proxy serving on the configured port; unless one is configured, on the port the
        previous supervisor had (its agents' base URLs name it) when that port is free."""
        from tokenwatch.proxy.server import ProxyServer

        settings = _endpoint_override(self.config.proxy)
        callers = engine.caller
        if not settings.port and saved_port:
            again = ProxyServer(
                engine,
                table,
                replace(settings, port=saved_port),
                clock=self._clock,
                levers=self.levers,
                callers=callers,
            )
            try:
                port = await tg.start(again.serve, name="tokenwatch.proxy")
            except* OSError as group:  # the bind fails inside the proxy's own task group
                log.info(
                    "the previous proxy port %d is taken (%s)", saved_port, group.exceptions[0]
                )
            else:
                return again, port
        proxy = ProxyServer(
            engine, table, settings, clock=self._clock, levers=self.levers, callers=callers
        )
        return proxy, await tg.start(proxy.serve, name="tokenwatch.proxy")

    async def _follow_session_logs(
        self, tg: anyio.abc.TaskGroup, engine: Engine, store: Store
    ) -> None:
        from tokenwatch.supervisor.session_follow import SessionFollower

        follower = SessionFollower(engine, store, self.config.session_logs)
        await tg.start(follower.run, name="tokenwatch.session-logs")

    async def _start_exporters(self, tg: anyio.abc.TaskGroup, engine: Engine) -> None:
        settings = self.config.export
        if settings.prometheus.listen:
            from tokenwatch.config import parse_listen
            from tokenwatch.export.prometheus import PrometheusExporter

            prom = PrometheusExporter(settings.prometheus, engine.snapshot)
            engine.add_listener(prom.observe)
            port = await tg.start(prom.serve, name="tokenwatch.prometheus")
            host, _ = parse_listen(settings.prometheus.listen)
            self.metrics_url = f"http://{host}:{port}/metrics"
            log.info("metrics on %s", self.metrics_url)
        if settings.otlp.endpoint:
            from tokenwatch.export.otlp import OtlpExporter

            otlp = OtlpExporter(settings.otlp, engine.snapshot)
            engine.add_listener(otlp.observe)
            tg.start_soon(_shut_down_at_exit, otlp, name="tokenwatch.otlp-shutdown")


async def _shut_down_at_exit(exporter: Any) -> None:
    """Keep an SDK-threaded exporter until the supervisor stops, then flush it off the loop."""
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(exporter.shutdown)


async def _count_runs_so_far(found: list[AgentRecord], store: Store) -> None:
    """What the ledger holds for each run a previous supervisor supervised part of: `status`
    and `tokenwatch run`'s summary count the whole run, whoever supervised which part."""
    for rec in found:
        agent = rec.agent
        if not agent.run_id:
            continue
        for run in await store.sessions(agent.started_at - 1.0, agent=agent.name):
            if run.run_id == agent.run_id:
                rec.requests, rec.tokens = run.requests, run.total_tokens
                priced = run.requests > run.unpriced_requests
                rec.cost_usd = run.cost_usd if priced else None


def _endpoint_override(settings: ProxySettings) -> ProxySettings:
    """`[proxy]` with the stable endpoint's port from TOKENWATCH_ENDPOINT_PORT, when set."""
    from tokenwatch import environ

    port = os.environ.get(environ.ENDPOINT_PORT, "").strip().lower()
    if port in ("off", "0") or (port.isdigit() and int(port) <= 65535):
        return replace(settings, endpoint_port=0 if port == "off" else int(port))
    if port:
        log.warning("ignoring %s=%r: a port (0 to 65535) or off", environ.ENDPOINT_PORT, port)
    return settings


def _config_file(config: Config) -> Path | None:
    """The file a config was read from; None for one built on defaults or in code."""
    return None if config.source in ("", "<defaults>") else Path(config.source)


def _notify(notifier: Notifier, kind: str, obj: object) -> None:
    """The alert notifier hears alerts only (webhook, desktop)."""
    if kind == "alert" and isinstance(obj, Alert):
        notifier.notify_nowait(obj)


def child_env(env: Mapping[str, str]) -> Mapping[str, str]:
    """A launched agent's environment, with the SDK auto-instrumentation on its path."""
    from tokenwatch.client.autoinstrument import child_env as instrumented

    return instrumented(env)


def _is_critical(engine: Engine | None, name: str) -> bool:
    rec = engine.roster.get(name) if engine is not None else None
    return rec is not None and rec.agent.critical


async def serve_until_signalled(paths: Paths, config: Config) -> None:
    """Run a supervisor in this process until SIGTERM, SIGINT or SIGHUP (or a shutdown request)."""
    sup = Supervisor(paths, config)
    gc.set_threshold(*GC_THRESHOLD)
    try:
        async with anyio.create_task_group() as tg:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                tg.start_soon(_stop_on_signal, sigs, sup, name="tokenwatch.signals")
                async with anyio.create_task_group() as serving:
                    await serving.start(sup.run, name="tokenwatch.supervisor")
                    # What start-up built (modules, config, the seeded engine) lives as long as
                    # the process: keep it out of every later collection.
                    gc.freeze()
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _sole(group) from None


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one failure inside nested task groups (AlreadyRunning, a config error...), or the group."""
    while len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        group = inner
    return group


async def _stop_on_signal(signals: Any, sup: Supervisor) -> None:
    async for signum in signals:
        log.info("received %s", signal.Signals(signum).name)
        sup.request_shutdown()

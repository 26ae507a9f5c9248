"""Alerts reach a Slack-compatible webhook and the desktop; a failing receiver never holds anything up."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web
from budget_fixtures import Clock, at
from supervisor_fixtures import running_supervisor
from test_detect import sent

from tokenwatch.config import AlertSettings, Config, RuleSettings
from tokenwatch.core.models import Alert
from tokenwatch.export.alerting import Notifier, slack_payload
from tokenwatch.paths import Paths

ALERT = Alert(
    rule="runaway",
    agent="researcher",
    message="researcher repeated the same prompt 3 times in 20 s; paused",
    severity="critical",
    action="pause",
)


@contextlib.asynccontextmanager
async def webhook(status: int = 200, *, hang: bool = False) -> AsyncIterator[tuple[str, list[Any]]]:
    """A local HTTP receiver: its URL and the JSON bodies it got."""
    got: list[Any] = []
    release = anyio.Event()

    async def receive(request: web.Request) -> web.Response:
        got.append(await request.json())
        if hang:
            await release.wait()
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/hook", got
    finally:
        release.set()
        await runner.cleanup()


async def wait_for(predicate: Any) -> None:
    with anyio.fail_after(30):
        while not predicate():
            await anyio.sleep(0.01)


def test_the_webhook_payload_is_slack_json_with_the_whole_story() -> None:
    payload = slack_payload(ALERT)
    assert payload["text"] == (
        ":rotating_light: tokenwatch critical: researcher repeated the same prompt 3 times in "
        "20 s; paused"
    )
    context = payload["blocks"][1]["elements"][0]["text"]
    assert "agent *researcher*" in context
    assert "rule `runaway`" in context
    assert "action pause" in context


async def test_alerts_are_posted_to_the_webhook_and_counted() -> None:
    async with webhook() as (url, got), anyio.create_task_group() as tg:
        notifier = Notifier(AlertSettings(webhook=url))
        await tg.start(notifier.run)
        notifier.notify_nowait(ALERT)
        notifier.notify_nowait(Alert(rule="budget:daily", agent="writer", message="80% used"))
        await wait_for(lambda: notifier.statistics().sent == 2)
        tg.cancel_scope.cancel()
    assert [body["text"] for body in got] == [
        f":rotating_light: tokenwatch critical: {ALERT.message}",
        ":warning: tokenwatch warning: 80% used",
    ]
    assert notifier.statistics().failed == 0


async def test_a_failing_or_unreachable_webhook_is_counted_and_delivery_goes_on() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    async with webhook(status=500) as (url, got), anyio.create_task_group() as tg:
        broken = Notifier(AlertSettings(webhook=url))
        unreachable = Notifier(AlertSettings(webhook=dead))
        await tg.start(broken.run)
        await tg.start(unreachable.run)
        for _ in range(3):
            broken.notify_nowait(ALERT)
            unreachable.notify_nowait(ALERT)
        await wait_for(lambda: broken.statistics().failed == 3)
        await wait_for(lambda: unreachable.statistics().failed == 3)
        tg.cancel_scope.cancel()
    assert len(got) == 3  # each alert was tried, none stuck behind a failed one
    assert broken.statistics().sent == unreachable.statistics().sent == 0


async def test_a_hanging_webhook_never_blocks_the_caller_it_drops_and_counts() -> None:
    async with webhook(hang=True) as (url, got), anyio.create_task_group() as tg:
        notifier = Notifier(AlertSettings(webhook=url), queue_size=5, timeout=2.0)
        await tg.start(notifier.run)
        notifier.notify_nowait(ALERT)
        await wait_for(lambda: len(got) == 1)  # the first is stuck in delivery
        for _ in range(20):
            notifier.notify_nowait(ALERT)  # returns at once, however stuck delivery is
        stats = notifier.statistics()
        assert (stats.queued, stats.dropped, stats.sent) == (5, 15, 0)
        await wait_for(lambda: notifier.statistics().failed >= 1)  # the stuck one timed out
        tg.cancel_scope.cancel()


async def test_desktop_notifications_go_through_notify_send(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "notified"
    fake = tmp_path / "bin" / "notify-send"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {log}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    async with anyio.create_task_group() as tg:
        notifier = Notifier(AlertSettings(desktop=True))
        await tg.start(notifier.run)
        notifier.notify_nowait(ALERT)
        await wait_for(lambda: notifier.statistics().sent == 1)
        tg.cancel_scope.cancel()
    assert log.read_text().splitlines() == [
        "--app-name=tokenwatch",
        "--urgency=critical",
        "tokenwatch: researcher",
        ALERT.message,
    ]


async def test_a_supervisor_posts_a_rules_alert_to_the_configured_webhook() -> None:
    clock = Clock(at("2026-11-23 10:00"))
    loop = [{"role": "user", "content": "again"}]
    async with webhook() as (url, got):
        config = Config(
            rule=[RuleSettings(name="loop", detector="runaway", action="pause")],
            alerts=AlertSettings(webhook=url),
        )
        async with running_supervisor(
            Paths.discover(), config, clock=clock, proxy=False, exporters=False
        ) as sup:
            assert sup.engine is not None
            for i in range(3):
                clock.now = at("2026-11-23 10:00") + 5 * i  # 5 s apart: not a poller
                await sup.engine.ingest([sent(clock.now, loop, 500)])
            await wait_for(lambda: len(got) == 1)
    assert got[0]["text"] == (
        ":rotating_light: tokenwatch critical: researcher repeated the same prompt 3 times in a "
        "row in 10 s; paused"
    )

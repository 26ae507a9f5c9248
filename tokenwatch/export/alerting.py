"""Alert delivery: a Slack-compatible webhook and desktop notifications, off a bounded queue, so a
slow or failing receiver never holds up enforcement."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from dataclasses import dataclass
from typing import Any, Final

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from tokenwatch.config import AlertSettings
from tokenwatch.core.models import Alert, Severity

log = logging.getLogger(__name__)

QUEUE_SIZE: Final = 256
"""Alerts waiting for delivery; beyond, new ones are dropped and counted (they are still stored)."""
SEND_TIMEOUT: Final = 10.0
"""Seconds one delivery may take before it counts as failed."""
_URGENCY: Final[dict[str, str]] = {
    Severity.INFO: "low",
    Severity.WARNING: "normal",
    Severity.CRITICAL: "critical",
}
_ICON: Final[dict[str, str]] = {
    Severity.INFO: ":information_source:",
    Severity.WARNING: ":warning:",
    Severity.CRITICAL: ":rotating_light:",
}


@dataclass(frozen=True, slots=True)
class NotifierStatistics:
    sent: int
    """Deliveries that succeeded (a webhook post and a desktop notification count apart)."""
    failed: int
    """Deliveries that failed or timed out."""
    dropped: int
    """Alerts never delivered because the queue was full."""
    queued: int


def slack_payload(alert: Alert) -> dict[str, Any]:
    """The alert as Slack incoming-webhook JSON (`text` is enough for Slack, Mattermost, Discord's
    /slack endpoint and most chat tools)."""
    when = dt.datetime.fromtimestamp(alert.ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    icon = _ICON.get(alert.severity, "")
    headline = f"{icon} tokenwatch {alert.severity}: {alert.message}".strip()
    return {
        "text": headline,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": headline}},
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": f"agent *{alert.agent}* · rule `{alert.rule}` · "
                        f"action {alert.action} · {when}",
                    }
                ],
            },
        ],
    }


class Notifier:
    """Queues alerts (`notify_nowait`, never blocks) and delivers them in `run`."""

    def __init__(
        self,
        settings: AlertSettings,
        *,
        queue_size: int = QUEUE_SIZE,
        timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.settings = settings
        self.timeout = timeout
        self._send: MemoryObjectSendStream[Alert]
        self._receive: MemoryObjectReceiveStream[Alert]
        self._send, self._receive = anyio.create_memory_object_stream[Alert](queue_size)
        self._sent = 0
        self._failed = 0
        self._dropped = 0
        self._notify_send = shutil.which("notify-send") if settings.desktop else None
        if settings.desktop and self._notify_send is None:
            log.warning("desktop alerts are on but notify-send is not installed")

    def notify_nowait(self, alert: Alert) -> None:
        """Queue an alert for delivery; when the queue is full it is dropped and counted."""
        if not (self.settings.webhook or self._notify_send):
            return
        try:
            self._send.send_nowait(alert)
        except anyio.WouldBlock:
            self._dropped += 1

    def statistics(self) -> NotifierStatistics:
        return NotifierStatistics(
            sent=self._sent,
            failed=self._failed,
            dropped=self._dropped,
            queued=self._receive.statistics().current_buffer_used,
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver queued alerts one at a time until cancelled."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            task_status.started()
            async for alert in self._receive:
                if self.settings.webhook:
                    self._count(await self._post(session, alert))
                if self._notify_send:
                    self._count(await self._desktop(alert))

    def _count(self, ok: bool) -> None:
        if ok:
            self._sent += 1
        else:
            self._failed += 1

    async def _post(self, session: Any, alert: Alert) -> bool:
        import aiohttp

        try:
            async with session.post(self.settings.webhook, json=slack_payload(alert)) as resp:
                if resp.status < 300:
                    return True
                log.warning("alert webhook answered HTTP %d", resp.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("alert webhook failed: %s", type(exc).__name__)
        return False

    async def _desktop(self, alert: Alert) -> bool:
        assert self._notify_send is not None
        urgency = _URGENCY.get(alert.severity, "normal")
        argv = [
            self._notify_send,
            "--app-name=tokenwatch",
            f"--urgency={urgency}",
            f"tokenwatch: {alert.agent}",
            alert.message,
        ]
        with anyio.move_on_after(self.timeout):
            try:
                done = await anyio.run_process(argv, check=False)
            except OSError as exc:
                log.warning("notify-send failed: %s", exc)
                return False
            return done.returncode == 0
        return False

"""Notices on `tokenwatch run`'s terminal when its agent is paused, resumed, throttled or killed
(a paused agent otherwise looks hung)."""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO

import anyio
import anyio.from_thread
import anyio.lowlevel

SUBSCRIBE_TIMEOUT = 5.0
"""Seconds to wait for the subscription before starting the agent without notices."""
STOP_TIMEOUT = 2.0
RECONNECT_INTERVAL = 1.0
"""Seconds between tries to reach a supervisor again after it went away."""


def notice(action: dict[str, Any]) -> str:
    """One line for an action on the agent, as `tokenwatch run` prints it."""
    kind, agent, who = action.get("kind"), action.get("agent"), action.get("who")
    why = f": {action['why']}" if action.get("why") else ""
    if not action.get("ok", True):
        return f"tokenwatch: {kind} of {agent} by {who} failed: {action.get('detail', '')}"
    if kind == "pause":
        return f"tokenwatch: {agent} paused by {who}{why} (`tokenwatch resume {agent}` to go on)"
    if kind == "resume":
        return f"tokenwatch: {agent} resumed by {who}"
    if kind == "throttle":
        return f"tokenwatch: {agent} throttled by {who} ({action.get('detail', '')}){why}"
    if kind == "kill":
        return f"tokenwatch: {agent} stopped by {who}{why}"
    return f"tokenwatch: {kind} {agent} by {who}{why}"


class ActionNotices:
    """Prints a line to `out` for every action on the agent `name`, from a thread of its own
    (the main thread waits for the agent); `start` returns once subscribed, `stop` ends it."""

    def __init__(self, name: str, out: TextIO = sys.stderr) -> None:
        self.name = name
        self._out = out
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tokenwatch-notices", daemon=True)
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._scope: anyio.CancelScope | None = None

    def start(self) -> bool:
        """Subscribe to the supervisor's actions; False if that did not happen in time."""
        self._thread.start()
        return self._ready.wait(SUBSCRIBE_TIMEOUT)

    def stop(self) -> None:
        token, scope = self._token, self._scope
        if token is not None and scope is not None and self._thread.is_alive():
            try:
                anyio.from_thread.run_sync(scope.cancel, token=token)
            except RuntimeError:
                pass  # its loop has just ended
        self._thread.join(STOP_TIMEOUT)

    def _run(self) -> None:
        try:
            anyio.run(self._watch)
        except Exception:  # notices are a courtesy: never fail the run for them
            self._ready.set()

    async def _watch(self) -> None:
        with anyio.CancelScope() as scope:
            self._token, self._scope = anyio.lowlevel.current_token(), scope
            try:
                await self._follow()
            finally:
                self._ready.set()

    async def _follow(self) -> None:
        """Tell the actions on the agent; while no supervisor answers, say so once (its calls
        through the proxy fail meanwhile, and would otherwise fail silently), then wait for
        one to come back and follow that one."""
        from tokenwatch.client.control import SupervisorClient, SupervisorUnavailable

        lost = False
        while True:
            try:
                async with await SupervisorClient.connect(start=False) as client:
                    await client.request("subscribe", interval=3600, kinds=["action"])
                    self._ready.set()
                    if lost:
                        self._say(f"a supervisor answers again: {self.name}'s calls go through")
                        lost = False
                    async for kind, data in client.pushes():
                        if kind == "action" and data.get("agent") == self.name:
                            print(notice(data), file=self._out, flush=True)
            except SupervisorUnavailable:
                pass
            if not self._ready.is_set():
                return  # never subscribed: the run goes on without notices
            if not lost:
                self._say(
                    f"no supervisor answers: {self.name}'s LLM calls through tokenwatch fail "
                    "until one runs again (`tokenwatch serve --detach` starts one)"
                )
                lost = True
            await anyio.sleep(RECONNECT_INTERVAL)

    def _say(self, message: str) -> None:
        print(f"tokenwatch: {message}", file=self._out, flush=True)

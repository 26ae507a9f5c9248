"""Test doubles for the client SDK: a real Unix-socket supervisor that records and acks messages."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from tokenwatch.client import session
from tokenwatch.client.reporter import Identity, Reporter
from tokenwatch.core import protocol

AdmitPolicy = Callable[[dict[str, Any]], dict[str, Any] | None]
"""Gets an admit message; returns the reply data, or None to never answer."""

Timeline = list[tuple[str, Any]]
"""What happened, in order, across the fake supervisor, the SDK and the HTTP client."""


def allow_all(msg: dict[str, Any]) -> dict[str, Any] | None:
    return {"allowed": True, "wait": 0, "message": "", "budget": "", "reservation": ""}


class FakeSupervisor:
    """Serves the agent side of the protocol on a real Unix socket and records every message.

    Usage, settle and task messages are acked (unless `ack` is False); admit gets `admit(msg)`.
    """

    def __init__(self, path: Path, *, admit: AdmitPolicy = allow_all, ack: bool = True) -> None:
        self.path = path
        self.admit = admit
        self.ack = ack
        self.messages: list[dict[str, Any]] = []
        self.sequence: Timeline = []
        self.connections = 0
        self.errors: list[str] = []
        """Protocol errors in what the SDK sent (a correct SDK sends none)."""
        self._changed = anyio.Event()
        self._streams: list[anyio.abc.SocketStream] = []

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    def events(self) -> list[dict[str, Any]]:
        """Usage events received, from usage and settle messages, in arrival order."""
        return [m["event"] for m in self.messages if m.get("type") in ("usage", "settle")]

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 30) -> None:
        with anyio.fail_after(timeout):
            while not condition():
                await self._changed.wait()

    async def push(self, kind: str, data: Any) -> None:
        for stream in list(self._streams):
            await stream.send(protocol.dumps(protocol.push(kind, data)))

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with await anyio.create_unix_listener(self.path) as listener:
            task_status.started()
            await listener.serve(self._handle)

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        self._streams.append(stream)
        lines = BufferedByteReceiveStream(stream)
        try:
            async with stream:
                await self._converse(stream, lines)
        finally:
            self._streams.remove(stream)

    async def _converse(
        self, stream: anyio.abc.SocketStream, lines: BufferedByteReceiveStream
    ) -> None:
        try:
            while True:
                line = await lines.receive_until(b"\n", protocol.MAX_LINE_BYTES)
                try:
                    msg = protocol.decode(line)
                except protocol.ProtocolError as exc:
                    self.errors.append(f"{exc.code}: {exc.message}")
                    await stream.send(
                        protocol.dumps(protocol.reply_error(None, exc.code, exc.message))
                    )
                    continue
                await self._answer(stream, msg)
        except (
            anyio.EndOfStream,
            anyio.IncompleteRead,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
        ):
            pass

    async def _answer(self, stream: anyio.abc.SocketStream, msg: dict[str, Any]) -> None:
        self.messages.append(msg)
        self.sequence.append((msg["type"], msg))
        self._changed.set()
        self._changed = anyio.Event()
        kind = msg["type"]
        if kind == "admit":
            data = self.admit(msg)
            if data is None:
                return
            self.sequence.append(("admit-reply", data))
            await stream.send(protocol.dumps(protocol.reply_ok(msg.get("id"), data)))
        elif kind in ("usage", "settle", "task") and not self.ack:
            return
        else:
            await stream.send(protocol.dumps(protocol.reply_ok(msg.get("id"))))


@asynccontextmanager
async def running_supervisor(path: Path, **kwargs: Any) -> AsyncIterator[FakeSupervisor]:
    sup = FakeSupervisor(path, **kwargs)
    async with anyio.create_task_group() as tg:
        await tg.start(sup.serve)
        try:
            yield sup
        finally:
            tg.cancel_scope.cancel()
    await anyio.Path(path).unlink(missing_ok=True)


@contextmanager
def installed_reporter(
    socket_path: Path, name: str = "agent-1", **kwargs: Any
) -> Iterator[Reporter]:
    """A reporter for this test as the process's reporter; closed and removed afterwards."""
    kwargs.setdefault("backoff", (0.01, 0.1))
    reporter = Reporter(str(socket_path), Identity(name=name, pid=os.getpid()), **kwargs)
    session.install(reporter)
    try:
        yield reporter
    finally:
        session.install(None)
        reporter.close()


def event_keys(events: list[dict[str, Any]]) -> list[str]:
    return [e["call_id"] for e in events]

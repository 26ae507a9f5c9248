"""The async control client the CLI and the dashboard use to talk to the supervisor: requests with
replies by id, and a stream of pushes (snapshots, usage, alerts, actions, agent changes)."""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import anyio
import anyio.abc
import anyio.to_thread

from tokenwatch import environ
from tokenwatch.core import protocol
from tokenwatch.paths import Paths, socket_path_problem

MAX_BUFFERED_PUSHES: Final = 10_000
"""Pushes kept while nobody iterates `subscribe()`; the oldest go first."""
READ_BYTES: Final = 256 * 1024


class SupervisorError(Exception):
    """The supervisor refused a request: `code` (protocol.ErrorCode) and a message for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SupervisorUnavailable(SupervisorError):
    """No supervisor answers (or it went away)."""

    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)


class SupervisorClient:
    """One connection to the supervisor. Any number of tasks may call `request` and iterate
    `subscribe` at once: whichever is waiting reads the socket for all of them, so the client
    needs no background task of its own."""

    def __init__(self, stream: anyio.abc.ByteStream, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._stream = stream
        self._ids = itertools.count(1)
        self._send_lock = anyio.Lock()
        self._read_lock = anyio.Lock()
        self._arrived = anyio.Event()
        self._replies: dict[int, dict[str, Any]] = {}
        self._waiting: set[int] = set()
        self._pushes: deque[tuple[str, Any]] = deque(maxlen=MAX_BUFFERED_PUSHES)
        self._buf = b""
        self._gone: SupervisorUnavailable | None = None

    @classmethod
    async def connect(
        cls,
        paths: Paths | None = None,
        *,
        start: bool = True,
        timeout: float = 10.0,
        socket_path: Path | None = None,
    ) -> SupervisorClient:
        """Connect, starting a background supervisor first when none runs and `start` is true."""
        paths = paths or Paths.discover()
        path = socket_path or Path(os.environ.get(environ.SOCKET) or paths.socket)
        problem = socket_path_problem(path)
        if problem is not None:  # no supervisor could listen there either: never start one
            raise SupervisorError("bad_socket", problem)
        try:
            return await cls._open(path)
        except SupervisorUnavailable:
            if not start or socket_path is not None:
                raise
        await anyio.to_thread.run_sync(_start_daemon, paths, timeout)
        return await cls._open(paths.socket)

    @classmethod
    async def _open(cls, path: Path) -> SupervisorClient:
        try:
            stream = await anyio.connect_unix(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise SupervisorUnavailable(f"no supervisor is running (socket {path})") from None
        except OSError as exc:
            raise SupervisorUnavailable(
                f"cannot reach the supervisor at {path}: {exc.strerror or exc}"
            ) from None
        return cls(stream, path)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def request(self, kind: str, **fields: Any) -> Any:
        """Send a request; its reply's data, or SupervisorError(code, message)."""
        mid = next(self._ids)
        self._waiting.add(mid)
        try:
            await self._send(protocol.request(kind, mid, **fields))
            while mid not in self._replies:
                await self._pump()
            reply = self._replies.pop(mid)
        finally:
            self._waiting.discard(mid)
            self._replies.pop(mid, None)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise SupervisorError(str(error.get("code", "error")), str(error.get("message", "")))
        return reply.get("data")

    async def subscribe(
        self, interval: float = 1.0, kinds: Sequence[str] | None = None
    ) -> AsyncIterator[tuple[str, Any]]:
        """Pushes as (kind, data): "snapshot" (Snapshot dict, every `interval` s), "usage",
        "alert", "action", "agent" (models' to_dict shapes), or only the `kinds` named.
        Ends when the supervisor goes away."""
        await self.request("subscribe", interval=interval, kinds=list(kinds) if kinds else None)
        async for push in self.pushes():
            yield push

    async def pushes(self) -> AsyncIterator[tuple[str, Any]]:
        """The pushes of a `subscribe` request already answered, as (kind, data), for a caller
        that must know it is subscribed before it goes on. Ends when the supervisor goes away."""
        while True:
            while self._pushes:
                yield self._pushes.popleft()
            try:
                await self._pump()
            except SupervisorUnavailable:
                while self._pushes:
                    yield self._pushes.popleft()
                return

    async def _send(self, msg: dict[str, Any]) -> None:
        if self._gone is not None:
            raise self._gone
        async with self._send_lock:
            try:
                await self._stream.send(protocol.dumps(msg))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                raise self._lost() from None

    def _lost(self) -> SupervisorUnavailable:
        if self._gone is None:
            self._gone = SupervisorUnavailable("the supervisor closed the connection")
        return self._gone

    async def _pump(self) -> None:
        """Read once for everyone waiting, or wait for whoever is reading."""
        if self._gone is not None:
            raise self._gone
        arrived = self._arrived
        if self._read_lock.locked():
            await arrived.wait()
            return
        async with self._read_lock:
            try:
                self._dispatch(await self._stream.receive(READ_BYTES))
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                OSError,
            ):
                self._lost()
            finally:
                # wakes the others to look for their replies (or to take over reading if we
                # were cancelled)
                self._arrived = anyio.Event()
                arrived.set()
        if self._gone is not None:
            raise self._gone

    def _dispatch(self, chunk: bytes) -> None:
        if not chunk:
            return
        *lines, self._buf = (self._buf + chunk).split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                msg = protocol.loads(line)
            except ValueError:
                continue  # not from a tokenwatch supervisor; nothing to do with it
            if not isinstance(msg, dict):
                continue
            if msg.get("type") == "push":
                self._pushes.append((str(msg.get("kind")), msg.get("data")))
            elif msg.get("type") == "reply":
                self._reply(msg)

    def _reply(self, msg: dict[str, Any]) -> None:
        mid = msg.get("re")
        if isinstance(mid, int) and mid in self._waiting:
            self._replies[mid] = msg
        elif mid is None and not msg.get("ok"):
            error = msg.get("error") or {}  # refused before any request (e.g. another uid)
            self._gone = SupervisorUnavailable(str(error.get("message", "refused")))


def _start_daemon(paths: Paths, timeout: float) -> None:
    from tokenwatch.instance import StartFailed, ensure_running

    try:
        ensure_running(paths, timeout)
    except (StartFailed, OSError) as exc:
        raise SupervisorUnavailable(f"could not start the supervisor: {exc}") from None

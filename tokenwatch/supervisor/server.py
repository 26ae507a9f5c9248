"""The supervisor's Unix-socket server: private socket, peer uid check, NDJSON framing, bounded outboxes."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import anyio
import anyio.abc
import anyio.to_thread
from anyio.abc import SocketAttribute

from tokenwatch.core import protocol
from tokenwatch.core.models import UsageEvent
from tokenwatch.core.protocol import ErrorCode, ProtocolError
from tokenwatch.core.usage_wire import decode_usage_line, usage_from_wire
from tokenwatch.instance import socket_answers
from tokenwatch.paths import socket_path_problem

log = logging.getLogger("tokenwatch.server")

CHUNK_BYTES: Final = 256 * 1024
MAX_PUSHES: Final = 4096
"""Events held for one subscriber; past this the oldest are dropped (and counted)."""
MAX_REPLY_BACKLOG: Final = 4096
"""Replies waiting to be written before the server stops reading that connection."""
MAX_QUEUED_EVENTS: Final = 20_000
"""Usage events one connection may have waiting for the store before the server stops reading it."""
CONCURRENT_TYPES: Final = frozenset(
    {"admit", "settle", "kill", "launch", "pause_all", "resume_all", "adopt", "shutdown", "exited"}
) | {"fleet_hosts"}  # the team's database may take connect_timeout to answer
"""Requests that may take long: run beside the connection's other traffic, replies by id."""
MIN_SNAPSHOT_INTERVAL: Final = 0.1


class AddressInUse(Exception):
    """Another supervisor answers on the socket."""


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


class Outbox:
    """What the server still has to write to one peer: replies (never dropped), pushes (bounded,
    oldest dropped first) and the latest snapshot (coalesced: a newer one replaces it)."""

    def __init__(self, max_pushes: int | None = None) -> None:
        self._replies: list[bytes] = []
        self._pushes: deque[bytes] = deque()
        self._max_pushes = max_pushes or MAX_PUSHES
        self._snapshot: bytes | None = None
        self._wakeup = anyio.Event()
        self._room = anyio.Event()
        self._closing = False
        self._writing = False
        self._dead = False
        self._flushed = anyio.Event()
        self.dropped = 0
        self.snapshots_coalesced = 0

    def reply_nowait(self, line: bytes) -> None:
        self._replies.append(line)
        self._wakeup.set()

    def replies_nowait(self, lines: list[bytes]) -> None:
        self._replies.extend(lines)
        self._wakeup.set()

    def push_nowait(self, line: bytes) -> None:
        if len(self._pushes) >= self._max_pushes:
            self._pushes.popleft()
            self.dropped += 1
        self._pushes.append(line)
        self._wakeup.set()

    def snapshot_nowait(self, line: bytes) -> None:
        if self._snapshot is not None:
            self.snapshots_coalesced += 1
        self._snapshot = line
        self._wakeup.set()

    def close_nowait(self) -> None:
        """Write what is queued, then stop."""
        self._closing = True
        self._wakeup.set()

    async def wait_room(self) -> None:
        """Return once the reply backlog is small enough to read more requests."""
        while len(self._replies) >= MAX_REPLY_BACKLOG and not self._closing:
            self._room = anyio.Event()
            await self._room.wait()

    def pending(self) -> bool:
        """Something is queued or being written."""
        return bool(self._replies or self._pushes or self._snapshot is not None or self._writing)

    async def wait_flushed(self) -> None:
        """Return once everything queued so far has been written (or the peer is gone)."""
        while self.pending() and not self._dead:
            self._flushed = anyio.Event()
            await self._flushed.wait()

    def _take(self) -> bytes:
        parts = self._replies
        self._replies = []
        if self._snapshot is not None:
            parts.append(self._snapshot)
            self._snapshot = None
        if self._pushes:
            parts.extend(self._pushes)
            self._pushes.clear()
        return b"".join(parts)

    async def run(self, stream: anyio.abc.ByteSendStream) -> None:
        """Write until closed; a slow peer only ever holds up its own outbox."""
        while True:
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            data = self._take()
            self._room.set()
            if data:
                self._writing = True
                try:
                    await stream.send(data)
                except BaseException:
                    self._dead = True
                    raise
                finally:
                    self._writing = False
            if not self.pending():
                self._flushed.set()
            if self._closing and not self.pending():
                return


_session_ids = itertools.count(1)


@dataclass(eq=False, slots=True)
class Session:
    """One connected peer: an agent, `tokenwatch run`, the dashboard or a CLI command."""

    peer: Peer
    outbox: Outbox
    id: int = dataclasses.field(default_factory=lambda: next(_session_ids))
    agent: str = ""
    """Set by `hello`: the agent this connection reports for."""
    subscribed: bool = False
    kinds: frozenset[str] = frozenset(protocol.PUSH_KINDS)
    """The push kinds this subscriber asked for."""
    snapshot_interval: float = 1.0
    last_snapshot: float = 0.0

    def reply_nowait(self, mid: int | str | None, data: Any = None) -> None:
        self.outbox.reply_nowait(protocol.dumps(protocol.reply_ok(mid, data)))

    def error_nowait(self, mid: int | str | None, code: ErrorCode | str, message: str) -> None:
        self.outbox.reply_nowait(protocol.dumps(protocol.reply_error(mid, code, message)))


class Handler(Protocol):
    """What the server asks to act on messages (the supervisor's command layer)."""

    async def handle(self, session: Session, msg: dict[str, Any]) -> Any:
        """Act on one request; the return value is the reply's data; raise ProtocolError to refuse."""
        ...

    async def ingest(self, session: Session, events: list[UsageEvent]) -> None:
        """Record usage events; return only once they are stored."""
        ...

    def session_closed(self, session: Session) -> None: ...

    def snapshot(self) -> Any:
        """The current snapshot as wire data."""
        ...


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    connections: int
    subscribers: int
    messages: int
    errors: int
    refused_peers: int
    dropped_pushes: int


class SocketServer:
    """Serves the NDJSON protocol on a Unix socket only the owner's uid may use."""

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        uid: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._handler = handler
        self._uid = os.getuid() if uid is None else uid
        self._clock = clock
        self._sessions: set[Session] = set()
        self._wanting: dict[str, list[Session]] | None = None
        """Subscribers by push kind, worked out again only when one subscribes or leaves
        (every usage event is published: scanning all connections each time added up)."""
        self._messages = 0
        self._errors = 0
        self._refused = 0
        self._dropped_closed = 0
        self._listener: anyio.abc.SocketListener | None = None

    # -- publishing -------------------------------------------------------------------------

    def subscribers(self, kind: str = "") -> list[Session]:
        """Every subscriber, or those that asked for pushes of `kind`."""
        if not kind:
            return [s for s in self._sessions if s.subscribed]
        if self._wanting is None:
            subs = self.subscribers()
            self._wanting = {k: [s for s in subs if k in s.kinds] for k in protocol.PUSH_KINDS}
        return self._wanting.get(kind, [])

    def _subscriptions_changed(self) -> None:
        self._wanting = None

    def publish_nowait(self, kind: str, data: Any) -> None:
        """Send a push to every subscriber that wants its kind (encoded once, if anyone does)."""
        subs = self.subscribers(kind)
        if not subs:
            return
        line = protocol.dumps(protocol.push(kind, data))
        for session in subs:
            session.outbox.push_nowait(line)

    async def wait_flushed(self) -> None:
        """Until every peer has been sent what was queued for it (replies to a shutdown...)."""
        for session in list(self._sessions):
            await session.outbox.wait_flushed()

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            connections=len(self._sessions),
            subscribers=len(self.subscribers()),
            messages=self._messages,
            errors=self._errors,
            refused_peers=self._refused,
            dropped_pushes=self._dropped_closed + sum(s.outbox.dropped for s in self._sessions),
        )

    # -- lifetime ---------------------------------------------------------------------------

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[Path] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind (refusing to take over a live supervisor's socket), then serve until cancelled."""
        sock = await anyio.to_thread.run_sync(bind_private_socket, self.path)
        inode = os.stat(self.path).st_ino
        listener = self._listener = await anyio.abc.SocketListener.from_socket(sock)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._snapshot_ticker, name="server.snapshot-ticker")
                task_status.started(self.path)
                async with listener:
                    while True:
                        stream = await listener.accept()
                        tg.start_soon(self._serve_connection, stream, name="server.connection")
        finally:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == inode:  # not a newer supervisor's socket
                    self.path.unlink()

    async def _snapshot_ticker(self) -> None:
        while True:
            await anyio.sleep(MIN_SNAPSHOT_INTERVAL)
            now = self._clock()
            due = [
                s
                for s in self.subscribers("snapshot")
                if now - s.last_snapshot >= s.snapshot_interval
            ]
            if due:
                self._send_snapshot(due, now)

    def _send_snapshot(self, sessions: Iterable[Session], now: float) -> None:
        line = protocol.dumps(protocol.push("snapshot", self._handler.snapshot()))
        for session in sessions:
            session.last_snapshot = now
            session.outbox.snapshot_nowait(line)

    async def _serve_connection(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            raw = stream.extra(SocketAttribute.raw_socket)
            peer = peer_credentials(raw)
            outbox = Outbox()
            if peer.uid != self._uid:
                self._refused += 1
                log.warning("refused a connection from uid %d (pid %d)", peer.uid, peer.pid)
                message = f"this supervisor belongs to uid {self._uid}; you are uid {peer.uid}"
                with contextlib.suppress(anyio.BrokenResourceError, OSError):
                    await stream.send(
                        protocol.dumps(protocol.reply_error(None, ErrorCode.FORBIDDEN, message))
                    )
                return
            session = Session(peer, outbox)
            self._sessions.add(session)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._write, outbox, stream, name="server.connection-writer")
                    await self._read(session, stream, tg)
                    outbox.close_nowait()
            finally:
                self._sessions.discard(session)
                self._subscriptions_changed()
                self._dropped_closed += outbox.dropped
                self._handler.session_closed(session)

    async def _write(self, outbox: Outbox, stream: anyio.abc.SocketStream) -> None:
        try:
            await outbox.run(stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the peer went away; its reader sees EOF

    async def _read(
        self, session: Session, stream: anyio.abc.SocketStream, tg: anyio.abc.TaskGroup
    ) -> None:
        buf = b""

        async def ingest(batch: list[tuple[Any, UsageEvent]]) -> None:
            await self._ingest(session, batch)

        ingests = _Ingestor(ingest)
        try:
            while True:
                try:
                    chunk = await stream.receive(CHUNK_BYTES)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    break
                buf += chunk
                if b"\n" not in chunk:
                    if len(buf) > protocol.MAX_LINE_BYTES:
                        self._too_large(session)
                        return
                    continue
                *lines, buf = buf.split(b"\n")
                if not await self._handle_lines(session, lines, tg, ingests):
                    return
                await session.outbox.wait_room()
        finally:
            await ingests.wait_idle()

    def _too_large(self, session: Session) -> None:
        self._errors += 1
        session.error_nowait(
            None, ErrorCode.TOO_LARGE, f"line over {protocol.MAX_LINE_BYTES} bytes; closing"
        )

    async def _handle_lines(
        self,
        session: Session,
        lines: list[bytes],
        tg: anyio.abc.TaskGroup,
        ingests: _Ingestor,
    ) -> bool:
        """Act on complete lines; False when the connection must close."""
        batch: list[tuple[Any, UsageEvent]] = []
        for line in lines:
            if len(line) > protocol.MAX_LINE_BYTES:
                self._too_large(session)
                return False
            if not line.strip():
                continue
            self._messages += 1
            usage = decode_usage_line(line)
            if usage is not None:
                batch.append(usage)
                continue
            msg = self._decode(session, line)
            if msg is None:
                continue
            mid = msg.get("id")
            if msg["type"] == "usage":
                try:
                    batch.append((mid, usage_from_wire(msg["event"])))
                except ProtocolError as exc:
                    self._errors += 1
                    session.error_nowait(mid, exc.code, exc.message)
                continue
            if batch:
                await ingests.put(tg, batch)
                batch = []
            if msg["type"] != "heartbeat":
                await ingests.wait_idle()  # keep order: usage before e.g. the task end after it
            if msg["type"] in CONCURRENT_TYPES:
                tg.start_soon(self._dispatch, session, msg, name="server.dispatch")
            else:
                await self._dispatch(session, msg)
        if batch:
            await ingests.put(tg, batch)
        return True

    def _decode(self, session: Session, line: bytes) -> dict[str, Any] | None:
        try:
            return protocol.decode(line)
        except ProtocolError as exc:
            self._errors += 1
            session.error_nowait(_guess_id(line), exc.code, exc.message)
            return None

    async def _ingest(self, session: Session, batch: list[tuple[Any, UsageEvent]]) -> None:
        try:
            await self._handler.ingest(session, [event for _, event in batch])
        except ProtocolError as exc:
            for mid, _ in batch:
                session.error_nowait(mid, exc.code, exc.message)
            return
        session.outbox.replies_nowait(protocol.acks(mid for mid, _ in batch))

    async def _dispatch(self, session: Session, msg: dict[str, Any]) -> None:
        mid = msg.get("id")
        try:
            data = await self._handler.handle(session, msg)
        except ProtocolError as exc:
            self._errors += 1
            session.error_nowait(mid, exc.code, exc.message)
            return
        except Exception as exc:
            self._errors += 1
            log.exception("internal error handling %s", msg.get("type"))
            session.error_nowait(mid, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        session.reply_nowait(mid, data)
        if msg["type"] == "subscribe":
            self._subscriptions_changed()
            if "snapshot" in session.kinds:
                self._send_snapshot([session], self._clock())


class _Ingestor:
    """A connection's usage on its way to the store: up to `IN_FLIGHT` batches of up to `BATCH`
    events at a time (so the next is priced and counted while the last one commits), whatever
    arrives meanwhile gathered into the next (group commit), up to a bound that stops reading."""

    IN_FLIGHT: Final = 2
    BATCH: Final = 4096
    """Events taken at a time: small enough that the loop prices the next batch while the store
    commits the last, big enough that a commit's fixed costs stay small (docs/benchmarks.md)."""

    def __init__(
        self,
        ingest: Callable[[list[tuple[Any, UsageEvent]]], Awaitable[None]],
        limit: int = MAX_QUEUED_EVENTS,
    ) -> None:
        self._ingest = ingest
        self._limit = limit
        self._queued: list[tuple[Any, UsageEvent]] = []
        self._running = 0
        self._idle = anyio.Event()
        self._idle.set()
        self._room = anyio.Event()

    async def put(self, tg: anyio.abc.TaskGroup, items: list[tuple[Any, UsageEvent]]) -> None:
        while len(self._queued) >= self._limit:
            self._room = anyio.Event()
            await self._room.wait()
        self._queued.extend(items)
        if self._running < self.IN_FLIGHT:
            if not self._running:
                self._idle = anyio.Event()
            self._running += 1
            tg.start_soon(self._drain, name="server.drain")

    async def _drain(self) -> None:
        # The store commits in the order batches reach it, so acks keep the order of the lines.
        try:
            while self._queued:
                batch = self._queued[: self.BATCH]
                del self._queued[: self.BATCH]
                self._room.set()
                await self._ingest(batch)
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


def _guess_id(line: bytes) -> Any:
    """The id of a message that failed validation, so the error reply can name it."""
    try:
        msg = protocol.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(msg, dict):
        mid = msg.get("id")
        if isinstance(mid, int | str) and not isinstance(mid, bool):
            return mid
    return None


def bind_private_socket(path: Path) -> socket.socket:
    """A listening socket at `path`, mode 0600 from the start; replaces only a stale socket."""
    problem = socket_path_problem(path)
    if problem is not None:
        raise OSError(errno.ENAMETOOLONG, problem)
    if path.exists() or path.is_symlink():
        if socket_answers(path):
            raise AddressInUse(f"a supervisor already answers on {path}")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is born 0600: no window where others could connect
    try:
        sock.bind(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(512)
    sock.setblocking(False)
    return sock

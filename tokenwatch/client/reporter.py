"""The agent's connection to the supervisor: a background thread, a bounded buffer kept until acked,
reconnect with backoff, heartbeats, and the throttle waits the supervisor pushes."""

from __future__ import annotations

import collections
import concurrent.futures
import enum
import logging
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenwatch import environ
from tokenwatch.core import protocol

log = logging.getLogger("tokenwatch")

MAX_BUFFER = 10_000
"""Unacknowledged messages kept while the supervisor is away; the oldest go first, counted."""
HEARTBEAT_S = 5.0
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
RETRY_STORE_S = 1.0
"""When the supervisor says its store is unavailable, resend after this long."""
_RETRYABLE = {protocol.ErrorCode.STORE_UNAVAILABLE.value, protocol.ErrorCode.INTERNAL.value}
_READ_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class Identity:
    """Who this agent is, as announced in `hello`."""

    name: str
    pid: int
    run_id: str = ""
    task: str = ""
    user: str = ""
    session: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Identity:
        env = os.environ if env is None else env
        return cls(
            name=env.get(environ.AGENT) or script_name(),
            pid=os.getpid(),
            run_id=env.get(environ.RUN_ID, ""),
            task=env.get(environ.TASK, ""),
            user=env.get(environ.USER) or env.get("USER", ""),
            session=env.get(environ.SESSION, ""),
        )

    def hello(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "run_id": self.run_id,
            "task": self.task,
            "user": self.user,
            "session": self.session,
            "tags": dict(self.tags),
        }


def script_name(argv: list[str] | None = None) -> str:
    """A recognisable default agent name: the script's basename, a `-m` package's name."""
    argv = sys.argv if argv is None else argv
    first = argv[0] if argv else ""
    if first in ("", "-c", "-"):
        return "python"
    path = Path(first)
    if path.stem == "__main__":
        return path.parent.name or "python"
    return path.stem or "python"


def socket_path_from_env(env: Mapping[str, str] | None = None) -> str:
    """TOKENWATCH_SOCKET, else the supervisor's default socket for this user."""
    env = os.environ if env is None else env
    explicit = env.get(environ.SOCKET)
    if explicit:
        return explicit
    from tokenwatch.paths import Paths

    return str(Paths.discover(dict(env)).socket)


class LinkState(enum.StrEnum):
    CONNECTING = "connecting"
    """Not connected yet, and no attempt has failed since the last connection."""
    CONNECTED = "connected"
    DOWN = "down"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ReporterStatistics:
    state: str
    pending: int
    """Messages not yet acknowledged (buffered or in flight)."""
    sent: int
    acked: int
    dropped: int
    """Messages given up because the buffer was full, since the reporter started."""
    connects: int


class _Link:
    """One live socket connection: non-blocking writes and line-framed reads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.wbuf = bytearray()
        self.rbuf = bytearray()

    def flush(self) -> None:
        while self.wbuf:
            try:
                n = self.sock.send(self.wbuf)
            except BlockingIOError:
                return
            del self.wbuf[:n]

    def read_lines(self) -> list[bytes]:
        """Complete lines received so far; raises ConnectionError when the peer closed."""
        try:
            data = self.sock.recv(_READ_CHUNK)
        except BlockingIOError:
            return []
        if not data:
            raise ConnectionError("supervisor closed the connection")
        self.rbuf += data
        if len(self.rbuf) > protocol.MAX_LINE_BYTES and b"\n" not in self.rbuf:
            raise ConnectionError("line from supervisor too long")
        *lines, rest = bytes(self.rbuf).split(b"\n")
        self.rbuf = bytearray(rest)
        return [line for line in lines if line.strip()]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Reporter:
    """Delivers messages to the supervisor from a daemon thread; never blocks or raises in callers.

    Reliable messages (`send_nowait`: usage, settle, task) stay buffered until the supervisor acks
    them and are resent after a reconnect; `request` is a one-shot round trip (admit) that gives up
    fast. When the buffer is full the oldest message is dropped and counted; the count goes to the
    supervisor in the next heartbeat.
    """

    def __init__(
        self,
        socket_path: str,
        identity: Identity,
        *,
        max_buffer: int = MAX_BUFFER,
        heartbeat_s: float = HEARTBEAT_S,
        backoff: tuple[float, float] = (BACKOFF_FIRST_S, BACKOFF_MAX_S),
        connect_timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.socket_path = socket_path
        self.identity = identity
        self._max_buffer = max_buffer
        self._heartbeat_s = heartbeat_s
        self._backoff_first, self._backoff_max = backoff
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pending: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._outbox: collections.deque[int] = collections.deque()
        self._oneshot: dict[int, bytes] = {}
        self._futures: dict[int, concurrent.futures.Future[dict[str, Any]]] = {}
        self._retry: list[tuple[float, int]] = []
        self._heartbeat_dropped: dict[int, int] = {}
        self._next_id = 1
        self._state = LinkState.CONNECTING
        self._dropped_total = 0
        self._dropped_unreported = 0
        self._sent = 0
        self._acked = 0
        self._connects = 0
        self._throttle_until = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None

    # -- caller side (any thread) ------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name="tokenwatch-reporter", daemon=True
            )
        self._thread.start()

    @property
    def state(self) -> LinkState:
        return self._state

    def send_nowait(self, kind: str, **fields: Any) -> int:
        """Queue a reliable message; returns its id. Kept until acked, resent after reconnects."""
        with self._lock:
            mid = self._new_id()
            self._pending[mid] = protocol.dumps(protocol.request(kind, mid, **fields))
            # One wakeup per burst: a non-empty outbox already has one on its way; while not
            # connected the thread sends the whole buffer once it connects.
            wake = not self._outbox and self._state is LinkState.CONNECTED
            self._outbox.append(mid)
            self._trim()
        if wake:
            self._wake()
        return mid

    def request_future(self, kind: str, **fields: Any) -> concurrent.futures.Future[dict[str, Any]]:
        """Send a one-shot request now if connected; the future gets the reply (or an error)."""
        fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        with self._lock:
            if self._state is not LinkState.CONNECTED:
                fut.set_exception(ConnectionError("supervisor not connected"))
                return fut
            mid = self._new_id()
            self._oneshot[mid] = protocol.dumps(protocol.request(kind, mid, **fields))
            self._futures[mid] = fut
            self._outbox.append(mid)
        self._wake()
        return fut

    def request(self, kind: str, timeout: float, **fields: Any) -> dict[str, Any] | None:
        """One round trip from a sync caller; None when not connected or no answer in time."""
        deadline = self._clock() + timeout
        if not self.wait_connected(timeout):
            return None
        return wait_reply(self.request_future(kind, **fields), max(0.0, deadline - self._clock()))

    def wait_connected(self, timeout: float) -> bool:
        """Wait while a connection attempt is under way; True when connected."""
        deadline = self._clock() + timeout
        with self._changed:
            while self._state is LinkState.CONNECTING:
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._changed.wait(min(left, 0.05))
            return self._state is LinkState.CONNECTED

    def throttle_wait(self) -> float:
        """Seconds the supervisor asked this agent to wait before its next call (0 when none)."""
        return max(0.0, self._throttle_until - self._clock())

    def wait_flushed(self, timeout: float) -> bool:
        """Wait until everything is acked; gives up at once when the supervisor is unreachable."""
        deadline = self._clock() + timeout
        with self._changed:
            while self._pending and self._state in (LinkState.CONNECTED, LinkState.CONNECTING):
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._changed.wait(min(left, 0.05))
            return not self._pending

    def close(self, flush_timeout: float = 0.0) -> None:
        if flush_timeout > 0:
            self.wait_flushed(flush_timeout)
        with self._lock:
            self._state = LinkState.CLOSED
            thread = self._thread
        self._wake()
        if thread is None:  # never started: nobody else will close the wakeup pair
            self._wake_r.close()
            self._wake_w.close()
        elif thread is not threading.current_thread():
            thread.join(2.0)

    def statistics(self) -> ReporterStatistics:
        with self._lock:
            return ReporterStatistics(
                state=self._state.value,
                pending=len(self._pending),
                sent=self._sent,
                acked=self._acked,
                dropped=self._dropped_total,
                connects=self._connects,
            )

    def _new_id(self) -> int:
        mid = self._next_id
        self._next_id += 1
        return mid

    def _trim(self) -> None:
        while len(self._pending) > self._max_buffer:
            self._pending.popitem(last=False)
            self._dropped_total += 1
            self._dropped_unreported += 1

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wakeup is already pending, or we are closed

    # -- the reporter thread ---------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self._backoff_first
        while self._state is not LinkState.CLOSED:
            link = self._connect()
            if link is None:
                self._set_state(LinkState.DOWN)
                self._sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max)
                continue
            backoff = self._backoff_first
            try:
                self._serve(link)
            except (OSError, ValueError) as exc:
                log.debug("tokenwatch: supervisor connection lost: %s", exc)
            finally:
                link.close()
                self._disconnected()
        self._wake_r.close()
        self._wake_w.close()

    def _connect(self) -> _Link | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self._connect_timeout)
            sock.connect(self.socket_path)
            sock.setblocking(False)
        except OSError:
            sock.close()
            return None
        link = _Link(sock)
        with self._lock:
            link.wbuf += protocol.dumps(protocol.request("hello", 0, **self.identity.hello()))
            self._outbox = collections.deque(self._pending)
            self._retry.clear()
            self._connects += 1
            self._state = LinkState.CONNECTED
            self._changed.notify_all()
        if self._dropped_unreported:
            self._queue_heartbeat()
        return link

    def _disconnected(self) -> None:
        with self._lock:
            futures = list(self._futures.values())
            self._futures.clear()
            self._oneshot.clear()
            self._heartbeat_dropped.clear()
            if self._state is not LinkState.CLOSED:
                self._state = LinkState.DOWN
            self._changed.notify_all()
        for fut in futures:
            if not fut.done():
                fut.set_exception(ConnectionError("supervisor connection lost"))

    def _set_state(self, state: LinkState) -> None:
        with self._lock:
            if self._state is not LinkState.CLOSED:
                self._state = state
            self._changed.notify_all()

    def _sleep(self, seconds: float) -> None:
        """Wait before reconnecting; only closing cuts it short (new messages just queue)."""
        deadline = self._clock() + seconds
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            while self._state is not LinkState.CLOSED:
                left = deadline - self._clock()
                if left <= 0:
                    return
                if sel.select(left):
                    self._drain_wakeups()

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _serve(self, link: _Link) -> None:
        next_heartbeat = self._clock() + self._heartbeat_s
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            sel.register(link.sock, selectors.EVENT_READ)
            while self._state is LinkState.CONNECTED:
                self._fill(link)
                link.flush()
                sel.modify(
                    link.sock,
                    selectors.EVENT_READ | (selectors.EVENT_WRITE if link.wbuf else 0),
                )
                now = self._clock()
                if now >= next_heartbeat:
                    self._queue_heartbeat()
                    next_heartbeat = now + self._heartbeat_s
                    continue
                timeout = min(next_heartbeat, self._next_retry()) - now
                for key, mask in sel.select(max(0.0, timeout)):
                    if key.fileobj is self._wake_r:
                        self._drain_wakeups()
                    elif mask & selectors.EVENT_READ:
                        for line in link.read_lines():
                            self._handle(line)

    def _fill(self, link: _Link) -> None:
        """Move queued messages into the write buffer, bounded so acks keep flowing."""
        now = self._clock()
        with self._lock:
            due = [mid for at, mid in self._retry if at <= now]
            if due:
                self._retry = [(at, mid) for at, mid in self._retry if at > now]
                self._outbox.extend(due)
            while self._outbox and len(link.wbuf) < _READ_CHUNK * 4:
                mid = self._outbox.popleft()
                line = self._pending.get(mid) or self._oneshot.pop(mid, None)
                if line is None:
                    continue  # dropped from a full buffer, or a cancelled request
                link.wbuf += line
                self._sent += 1

    def _next_retry(self) -> float:
        with self._lock:
            return min((at for at, _ in self._retry), default=float("inf"))

    def _queue_heartbeat(self) -> None:
        with self._lock:
            mid = self._new_id()
            dropped = self._dropped_unreported
            fields: dict[str, Any] = {"dropped": dropped} if dropped else {}
            if dropped:
                self._heartbeat_dropped[mid] = dropped
            self._oneshot[mid] = protocol.dumps(protocol.request("heartbeat", mid, **fields))
            self._outbox.append(mid)

    def _handle(self, line: bytes) -> None:
        try:
            msg = protocol.loads(line)
        except ValueError:
            log.debug("tokenwatch: unreadable line from supervisor")
            return
        if not isinstance(msg, dict):
            return
        if msg.get("type") == "push":
            self._handle_push(msg)
        elif msg.get("type") == "reply":
            self._handle_reply(msg)

    def _handle_reply(self, msg: dict[str, Any]) -> None:
        mid = msg.get("re")
        if not isinstance(mid, int):
            return
        with self._lock:
            fut = self._futures.pop(mid, None)
            dropped = self._heartbeat_dropped.pop(mid, 0)
            if msg.get("ok"):
                self._dropped_unreported = max(0, self._dropped_unreported - dropped)
            if mid in self._pending:
                self._settle_pending(mid, msg)
            self._changed.notify_all()
        if fut is not None and not fut.done():
            fut.set_result(msg)
        if mid == 0 and not msg.get("ok"):
            log.warning("tokenwatch: supervisor refused hello: %s", _error_text(msg))

    def _settle_pending(self, mid: int, msg: dict[str, Any]) -> None:
        error = msg.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        if not msg.get("ok") and code in _RETRYABLE:
            self._retry.append((self._clock() + RETRY_STORE_S, mid))
            return
        del self._pending[mid]
        self._acked += 1
        if not msg.get("ok"):
            log.warning("tokenwatch: supervisor rejected a report: %s", _error_text(msg))

    def _handle_push(self, msg: dict[str, Any]) -> None:
        data = msg.get("data")
        if msg.get("kind") != "throttle" or not isinstance(data, dict):
            return
        wait = data.get("wait")
        if isinstance(wait, int | float) and not isinstance(wait, bool):
            self._throttle_until = self._clock() + max(0.0, float(wait))


def wait_reply(
    fut: concurrent.futures.Future[dict[str, Any]], timeout: float
) -> dict[str, Any] | None:
    """The reply to a `request_future`, or None when not connected or not answered in time."""
    try:
        return fut.result(timeout)
    except (concurrent.futures.TimeoutError, ConnectionError):
        fut.cancel()
        return None


def _error_text(msg: dict[str, Any]) -> str:
    error = msg.get("error")
    if isinstance(error, dict):
        return f"{error.get('code')}: {error.get('message')}"
    return "unknown error"

"""The ledger's writer process: a child that commits batches on its own core, and its stand-in
in the parent (`ChildCommitter`), which speaks to it over a pipe.

The supervisor's event loop and a writer thread share one GIL; with the SQLite work in a child,
the loop keeps a core to itself (docs/architecture.md, "The ledger writer"). Frames on the pipe
are a 4-byte big-endian length and a msgpack body; each request gets exactly one reply.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

import msgspec

from tokenwatch.core.errors import StoreUnavailable
from tokenwatch.ledger.transaction import (
    Committed,
    Committer,
    Outcome,
    Row,
    Statement,
    connect_writer,
    split_unbindable,
    widen,
)

EXIT_GRACE: Final = 10.0
"""Seconds the child gets to finish and close the file once told to, before it is killed."""
_HEADER = struct.Struct(">I")
_READY = "ready"
_OK = "ok"
_STORE = "store"
"""A reply saying the file is in trouble (sqlite3.Error); the parent retries."""
_INTERNAL = "internal"
"""A reply saying the child met a bug; the batch is failed, not retried."""

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


class ChildCommitter:
    """Commits batches in a child process (started now, and again if it dies); raises what
    `Committer.commit` raises, with sqlite3.OperationalError for a child that is gone."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._proc: subprocess.Popen[bytes] | None = None
        self._pipes = (-1, -1)
        """(requests, replies): the child's stdin and stdout."""
        self._start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def commit(self, rows: Sequence[Row], statements: Sequence[Statement]) -> Committed:
        wire_statements = [(s.sql, s.params, s.many, s.lastrowid) for s in statements]
        try:
            body = _encode((rows, wire_statements))
        except (TypeError, OverflowError, msgspec.EncodeError):
            kept, rejected = split_unbindable(rows)
            body = _encode(([rows[i] for i in kept], wire_statements))
            return widen(self._call(body), kept, rejected)
        return self._call(body)

    def close(self) -> None:
        """Let the child finish and close the file; kill it if it does not in time."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(EXIT_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def _start(self) -> None:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(self._path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
                close_fds=True,
            )
        except OSError as exc:
            # Like a file that cannot be written for now: the batch is kept and retried.
            raise sqlite3.OperationalError(
                f"cannot start the ledger's writer process: {exc.strerror or exc}"
            ) from None
        self._proc = proc
        self._pipes = (_fileno(proc.stdin), _fileno(proc.stdout))
        try:
            reply = self._receive()
        except sqlite3.OperationalError:
            self.close()
            raise
        if reply[0] != _READY:
            self.close()
            raise sqlite3.OperationalError(str(reply[1]))

    def _call(self, body: bytes) -> Committed:
        if self._proc is None or self._proc.poll() is not None:
            self._restart()
        try:
            write_frame(self._pipes[0], body)
        except BrokenPipeError:
            # It died before reading this batch (nothing of it written): a new one takes it.
            self._restart()
            try:
                write_frame(self._pipes[0], body)
            except BrokenPipeError:
                self._lost()
        reply = self._receive()
        if reply[0] == _OK:
            inserted, duplicates, rejected, outcomes, cpu = reply[1:]
            return Committed(
                inserted=inserted,
                duplicates=duplicates,
                rejected={int(i): why for i, why in rejected},
                outcomes=[Outcome(*o) for o in outcomes],
                cpu_seconds=cpu,
            )
        if reply[0] == _STORE:
            raise sqlite3.OperationalError(reply[1])
        raise RuntimeError(reply[1])

    def _restart(self) -> None:
        self.close()
        self._start()

    def _receive(self) -> list[Any]:
        try:
            body = read_frame(self._pipes[1])
        except OSError:
            body = None
        if body is None:
            self._lost()
        reply: list[Any] = _decode(body)
        return reply

    def _lost(self) -> NoReturn:
        proc = self._proc
        self.close()
        code = proc.returncode if proc is not None else None
        raise sqlite3.OperationalError(f"the ledger's writer process exited (status {code})")


def _fileno(pipe: typing.IO[bytes] | None) -> int:
    if pipe is None:
        raise ValueError("the writer process was started without its pipes")
    return pipe.fileno()


def write_frame(fd: int, body: bytes) -> None:
    view = memoryview(_HEADER.pack(len(body)) + body)
    while view:
        view = view[os.write(fd, view) :]


def read_frame(fd: int) -> bytes | None:
    """One frame's body; None at end of file."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    return _read_exactly(fd, _HEADER.unpack(header)[0])


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks: list[bytes] = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


# -- the child -----------------------------------------------------------------------------------


def serve(path: Path, requests: int, replies: int) -> None:
    """Commit each batch read from `requests`, answering on `replies`, until end of file."""
    try:
        committer = Committer(connect_writer(path))
    except (sqlite3.Error, StoreUnavailable) as exc:
        write_frame(replies, _encode((_STORE, str(exc))))
        return
    write_frame(replies, _encode((_READY, "")))
    try:
        while (body := read_frame(requests)) is not None:
            write_frame(replies, _encode(_answer(committer, body)))
    finally:
        committer.close()


def _answer(committer: Committer, body: bytes) -> tuple[Any, ...]:
    started = time.process_time()
    try:
        rows, statements = _decode(body)
        done = committer.commit(rows, [Statement(*s) for s in statements])
    except sqlite3.Error as exc:
        return (_STORE, str(exc))
    except Exception as exc:
        return (_INTERNAL, f"{type(exc).__name__}: {exc}")
    return (
        _OK,
        done.inserted,
        done.duplicates,
        list(done.rejected.items()),
        [(o.value, o.error_type, o.error) for o in done.outcomes],
        time.process_time() - started,
    )


def main() -> None:
    # Ctrl-C in a terminal reaches the whole process group: the supervisor decides when this
    # child stops (by closing its pipe), so a half-written batch is never cut off.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Replies get a descriptor of their own: a stray print can never corrupt a frame.
    replies = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(Path(sys.argv[1]), sys.stdin.fileno(), replies)


if __name__ == "__main__":
    main()

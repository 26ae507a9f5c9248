"""Starting the supervisor tmux-style: one instance per user (lock file + socket probe), launched in
the background by the first client that needs it, which waits until it answers. Standard library only."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from tokenwatch.paths import Paths

LOCK_NAME: Final = "supervisor.lock"
LOG_NAME: Final = "supervisor.log"
START_TIMEOUT: Final = 20.0
"""Seconds a client waits for a supervisor it started to answer (imports + opening the ledger)."""
LAST_WORDS_BYTES: Final = 4096
"""How much of the end of the log a failed start is explained from."""


class AlreadyRunning(Exception):
    """Another supervisor holds the lock (it is running or starting)."""


class StartFailed(Exception):
    """A background supervisor did not come up; the message points at its log."""


def socket_answers(path: Path, timeout: float = 2.0) -> bool:
    """True when something accepts connections on the Unix socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(timeout)
        probe.connect(os.fspath(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


@contextlib.contextmanager
def instance_lock(paths: Paths) -> Iterator[None]:
    """Hold the per-user supervisor lock (fcntl.flock); raises AlreadyRunning when another has it.

    The kernel drops the lock when its holder dies, so a crashed supervisor never blocks the next.
    """
    paths.ensure_private_runtime()
    fd = os.open(paths.runtime_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = read_pid(paths)
            who = f" (pid {pid})" if pid else ""
            raise AlreadyRunning(
                f"a supervisor is already running{who} on {paths.socket}"
            ) from None
        yield
    finally:
        os.close(fd)


def read_pid(paths: Paths) -> int | None:
    try:
        return int(paths.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def write_pid(paths: Paths) -> None:
    tmp = paths.pidfile.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(paths.pidfile)


def remove_pid(paths: Paths) -> None:
    if read_pid(paths) == os.getpid():
        with contextlib.suppress(OSError):
            paths.pidfile.unlink()


def log_path(paths: Paths) -> Path:
    return paths.state_dir / LOG_NAME


def start_background(
    paths: Paths, *, env: dict[str, str] | None = None, options: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """Launch `tokenwatch serve [OPTIONS]` detached (own session, no terminal), logging to the
    state dir."""
    paths.ensure_state()
    log = os.open(log_path(paths), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "tokenwatch", "serve", "--background", *options],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    finally:
        os.close(log)


def wait_until_answers(
    paths: Paths,
    timeout: float = START_TIMEOUT,
    proc: subprocess.Popen[bytes] | None = None,
    log_from: int = 0,
) -> None:
    """Poll the socket until a supervisor answers; raises StartFailed after `timeout`, or when
    `proc` exits in error (saying what it wrote to its log after offset `log_from`)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not socket_answers(paths.socket):
        if time.monotonic() > deadline:
            raise StartFailed(
                f"the supervisor did not answer on {paths.socket} within {timeout:g}s "
                f"(see {log_path(paths)})"
            )
        # A background supervisor that lost the start race exits at once; the winner answers.
        if proc is not None and proc.poll() not in (None, 0):
            said = _last_words(log_path(paths), log_from)
            where = f"exited with {proc.returncode}; log {log_path(paths)}"
            raise StartFailed(f"{said} ({where})" if said else f"the supervisor {where}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def ensure_running(
    paths: Paths, timeout: float = START_TIMEOUT, options: Sequence[str] = ()
) -> bool:
    """Start a background supervisor (`serve OPTIONS`) unless one answers; True when this call
    started it."""
    if socket_answers(paths.socket):
        return False
    try:
        offset = log_path(paths).stat().st_size
    except FileNotFoundError:
        offset = 0
    proc = start_background(paths, options=options)
    wait_until_answers(paths, timeout, proc, offset)
    return True


def _last_words(log: Path, offset: int) -> str:
    """The last line a failed supervisor wrote (its one-line error), without the program name."""
    try:
        with log.open("rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(offset, end - LAST_WORDS_BYTES))
            tail = f.read()
    except OSError:
        return ""
    lines = [line.strip() for line in tail.decode("utf-8", "replace").splitlines()]
    last = next((line for line in reversed(lines) if line), "")
    return last.removeprefix("tokenwatch: ")

"""A command run as the terminal's foreground job in a process group of its own: signals forwarded,
Ctrl-Z handed on to the shell, exit status reported the way a shell does."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Final

FORWARDED: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
"""Signals sent to the run process that go on to the child's whole process group."""
JOB_CONTROL_STOPS: Final = frozenset({signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
"""Stops that mean the terminal's user suspended the job (a SIGSTOP is tokenwatch pausing it)."""


class Interrupted(BaseException):
    """A forwarded signal arrived before the child existed; `code` is 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.code = 128 + signum


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + the signal that killed it."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _terminal() -> int | None:
    """The first of stdin, stdout and stderr that is a terminal."""
    for fd in (0, 1, 2):
        if os.isatty(fd):
            return fd
    return None


def _foreground_of(fd: int | None) -> int | None:
    """The process group the terminal delivers Ctrl-C to."""
    if fd is None:
        return None
    try:
        return os.tcgetpgrp(fd)
    except OSError:
        return None


@contextlib.contextmanager
def _sigttou_blocked() -> Iterator[None]:
    # tcsetpgrp from a background group raises SIGTTOU unless it is blocked
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _set_foreground(fd: int, pgid: int) -> None:
    with _sigttou_blocked(), contextlib.suppress(OSError):
        os.tcsetpgrp(fd, pgid)


def _child_setup(tty: int | None) -> Callable[[], None]:
    def setup() -> None:
        os.setpgid(0, 0)
        if tty is not None:
            # the child takes the terminal itself, so it can never read it from the background
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            os.tcsetpgrp(tty, os.getpgrp())
            signal.signal(signal.SIGTTOU, signal.SIG_DFL)

    return setup


class ForegroundChild:
    """Use as a context manager around `start` and `wait`; signal handlers live for the block.

    While the child runs, SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to this process go to the
    child's process group, followed by SIGCONT so a paused child acts on them (one the shell
    ignored stays ignored, for the child too). When this
    process is the terminal's foreground job, the child's group becomes the foreground, so
    Ctrl-C and terminal reads reach it directly; Ctrl-Z stops the child, then this process, so
    the shell sees the job stopped, and `fg` gives the terminal back to the child.
    """

    def __init__(self) -> None:
        self.pid: int | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._tty = _terminal()
        self._owned_tty = self._tty if _foreground_of(self._tty) == os.getpgrp() else None
        """The terminal we are the foreground job of: handed to the child at start."""
        self._group: int | None = None
        self._saved: dict[
            int, signal.Handlers | Callable[[int, FrameType | None], object] | int | None
        ] = {}

    def __enter__(self) -> ForegroundChild:
        for sig in FORWARDED:
            previous = signal.getsignal(sig)
            if previous == signal.SIG_IGN:
                continue
            self._saved[sig] = previous
            signal.signal(sig, self._on_signal)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, previous in self._saved.items():
            signal.signal(sig, previous)
        self._saved.clear()
        tty, group = self._tty, self._group
        if tty is not None and group is not None and _foreground_of(tty) == group:
            _set_foreground(tty, os.getpgrp())

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.pid is None:
            raise Interrupted(signum)
        # an unreaped child keeps its pid, and so its group id: this cannot hit a stranger
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)
            # a stopped child (paused by tokenwatch) would leave it pending until resumed: a CI
            # timeout or a closed terminal must end it now, as a shell's `kill %job` does
            os.killpg(self.pid, signal.SIGCONT)

    def start(self, argv: list[str], *, env: dict[str, str], cwd: str | None = None) -> int:
        """Start the child with our stdin, stdout and stderr; returns its pid. Raises OSError."""
        self._popen = subprocess.Popen(
            argv, env=env, cwd=cwd, preexec_fn=_child_setup(self._owned_tty)
        )
        self.pid = self._group = self._popen.pid
        return self.pid

    @property
    def started(self) -> bool:
        """True once `start` succeeded (and ever after)."""
        return self._group is not None

    def exited_nowait(self) -> bool:
        """True once the child has exited (it stays unreaped until `wait`)."""
        if self.pid is None:
            return True
        info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return info is not None

    def wait(self) -> int:
        """Wait for the child to exit (acting on job-control stops); its shell-style exit code."""
        pid = self.pid
        if pid is None or self._popen is None:
            raise RuntimeError("wait() before start()")
        while True:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WSTOPPED | os.WNOWAIT)
            if info is None or info.si_code != os.CLD_STOPPED:
                break
            # consume that stop; WNOHANG because a resume may have withdrawn it meanwhile
            os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG)
            if info.si_status in JOB_CONTROL_STOPS and self._tty is not None:
                self._suspend_with_child(pid)
        return self._reap(pid)

    def _reap(self, pid: int) -> int:
        blocked = set(self._saved)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            _, status = os.waitpid(pid, 0)
            self.pid = None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        code = exit_code(status)
        if self._popen is not None:
            self._popen.returncode = code
        return code

    def _suspend_with_child(self, pid: int) -> None:
        """Ctrl-Z, or a terminal read from the background: stop ourselves too, so the shell
        shows the job stopped; once continued, continue the child (with the terminal if `fg`)."""
        assert self._tty is not None
        if _foreground_of(self._tty) == pid:
            _set_foreground(self._tty, os.getpgrp())
        os.kill(os.getpid(), signal.SIGTSTP)
        if _foreground_of(self._tty) == os.getpgrp():
            _set_foreground(self._tty, pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGCONT)

"""Process control through pidfds: attach or spawn an agent, walk its tree, pause, resume, kill."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import anyio

KILL_GRACE_PERIOD: Final = 5.0
"""Seconds between SIGTERM and SIGKILL (SupervisorSettings.kill_grace overrides it)."""
POLL_INTERVAL: Final = 0.05
"""Seconds between checks while waiting for a killed tree to exit."""
KILL_WAIT: Final = 2.0
"""Seconds to wait for SIGKILLed processes to vanish before reporting them as survivors."""
MAX_SWEEPS: Final = 20
"""Walks of the tree per pause: each catches children forked before the previous stop landed."""
PROC: Final = Path("/proc")
_PF_KTHREAD: Final = 0x00200000

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


class ProcessGone(Exception):
    """The process exited, or its pid now names another process."""


class NotPermitted(Exception):
    """The process belongs to another user, or is tokenwatch itself (or init, or a kernel thread)."""


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """One process as /proc shows it."""

    pid: int
    ppid: int
    state: str
    """Single letter from /proc/PID/stat: R running, S sleeping, T stopped, Z zombie, ..."""
    start_time: int
    """Clock ticks after boot (stat field 22): with the pid, identifies the process for good."""
    uid: int
    """Real user id."""
    argv: list[str]
    pgid: int = 0
    sid: int = 0


@dataclass(slots=True)
class KillReport:
    """Who died of SIGTERM within the grace period, and who needed SIGKILL."""

    terminated: list[int] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)
    """Still there after SIGKILL (uninterruptible sleep); rare, reported rather than hidden."""


@dataclass(frozen=True, slots=True)
class _Stat:
    pid: int
    state: str
    ppid: int
    pgid: int
    sid: int
    flags: int
    start_time: int


def _read_proc(pid: int, name: str) -> bytes:
    # os.open/os.read: a tree walk reads every process's stat, and this is 4x faster than Path
    try:
        fd = os.open(f"{PROC}/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(f"no process with pid {pid}") from None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except ProcessLookupError:
        raise ProcessGone(f"no process with pid {pid}") from None
    finally:
        os.close(fd)


def _read_stat(pid: int) -> _Stat:
    raw = _read_proc(pid, "stat")
    # comm may hold spaces and parentheses: the fields start after the last ')'
    rest = raw[raw.rindex(b")") + 2 :].split()
    return _Stat(
        pid=pid,
        state=rest[0].decode(),
        ppid=int(rest[1]),
        pgid=int(rest[2]),
        sid=int(rest[3]),
        flags=int(rest[6]),
        start_time=int(rest[19]),
    )


def _read_uid(pid: int) -> int:
    status = _read_proc(pid, "status").decode(errors="replace")
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise ProcessGone(f"pid {pid} has no uid (exiting)")


_JOB_CONTROL_BITS: Final = sum(1 << (sig - 1) for sig in (20, 21, 22))
"""SIGTSTP, SIGTTIN and SIGTTOU in /proc's pending-signal masks (bit n - 1 for signal n)."""


def _stop_pending(pid: int) -> bool:
    """A job-control stop (Ctrl-Z) sent to a process that was already stopped waits, pending,
    until the next SIGCONT throws it away; /proc shows it meanwhile."""
    status = _read_proc(pid, "status").decode(errors="replace")
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & _JOB_CONTROL_BITS:
            return True
    return False


def stopped_quietly(pid: int) -> bool:
    try:
        return _read_stat(pid).state in "Tt"
    except ProcessGone:
        return False


def _pending_quietly(pid: int) -> bool:
    try:
        return _stop_pending(pid)
    except ProcessGone:
        return False


def _read_argv(pid: int) -> list[str]:
    try:
        raw = _read_proc(pid, "cmdline")
    except ProcessGone:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def process_info(pid: int) -> ProcessInfo:
    """What /proc says about `pid`; raises ProcessGone when there is no such process."""
    st = _read_stat(pid)
    return ProcessInfo(
        pid=pid,
        ppid=st.ppid,
        state=st.state,
        start_time=st.start_time,
        uid=_read_uid(pid),
        argv=_read_argv(pid),
        pgid=st.pgid,
        sid=st.sid,
    )


def _check_permitted(st: _Stat, uid: int) -> None:
    """Refuse what no one should stop: another user's process, init, kernel threads."""
    pid = st.pid
    if pid == 1 or st.flags & _PF_KTHREAD:
        raise NotPermitted(f"pid {pid} is init or a kernel thread: tokenwatch leaves it alone")
    if uid != os.getuid():
        raise NotPermitted(f"pid {pid} belongs to another user (uid {uid}), not to you")


def _check_not_self(st: _Stat) -> None:
    if st.pid == os.getpid():
        raise NotPermitted(f"pid {st.pid} is tokenwatch itself")
    if st.pgid == os.getpgrp():
        raise NotPermitted(f"pid {st.pid} is in tokenwatch's own process group")


def check_controllable(pid: int) -> ProcessInfo:
    """What a client checks before asking the supervisor to take `pid`: it exists, is yours,
    and is neither init nor a kernel thread. Raises ProcessGone or NotPermitted."""
    info = process_info(pid)
    st = _read_stat(pid)
    _check_permitted(st, info.uid)
    if st.state in ("Z", "X"):
        raise ProcessGone(f"pid {pid} has exited")
    return info


def _children_by_parent() -> dict[int, list[_Stat]]:
    children: dict[int, list[_Stat]] = {}
    with os.scandir(PROC) as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                st = _read_stat(int(entry.name))
            except ProcessGone:
                continue
            children.setdefault(st.ppid, []).append(st)
    return children


class _Member:
    """One process of a tree, held by pidfd so a reused pid is never signalled."""

    __slots__ = ("pid", "pidfd", "start_time")

    def __init__(self, pid: int, start_time: int, pidfd: int) -> None:
        self.pid = pid
        self.start_time = start_time
        self.pidfd = pidfd

    @classmethod
    def open(cls, st: _Stat) -> _Member | None:
        """Open a pidfd for a process seen in /proc, or None if it is no longer that process."""
        try:
            fd = os.pidfd_open(st.pid)
        except ProcessLookupError:
            return None
        try:
            again = _read_stat(st.pid)
        except ProcessGone:
            again = None
        if again is None or again.start_time != st.start_time:
            os.close(fd)
            return None
        return cls(st.pid, st.start_time, fd)

    def exited(self) -> bool:
        """True once the process is a zombie or gone (the pidfd turns readable)."""
        if self.pidfd < 0:
            return True
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(0))

    def send(self, sig: int) -> bool:
        if self.pidfd < 0:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            return False
        return True

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class ProcessHandle:
    """An agent process (and the tree below it) that tokenwatch may pause, resume and kill.

    The handle holds a pidfd for the root and for every descendant it has seen, so a process
    that double-forked away from the root (reparented to init) is still part of the tree.
    """

    def __init__(
        self,
        root: _Member,
        *,
        popen: subprocess.Popen[bytes] | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        self._root = root
        self._members: dict[int, _Member] = {}
        self._popen = popen
        self._clock = clock
        self._sleep = sleep
        self._killing, self._close_after_kill = 0, False

    @property
    def pid(self) -> int:
        return self._root.pid

    @property
    def start_time(self) -> int:
        return self._root.start_time

    @classmethod
    def attach(
        cls,
        pid: int,
        *,
        start_time: int | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
        control: bool = True,
    ) -> ProcessHandle:
        """Take hold of a running process of ours.

        `start_time` (from an earlier ProcessInfo) makes sure the pid still names that process,
        as when a restarted supervisor re-adopts its agents. Raises ProcessGone or NotPermitted.
        `control=False`: a handle only to see it end, never signalled, so any process will do.
        """
        st = _read_stat(pid)
        if control:
            _check_not_self(st)
            _check_permitted(st, _read_uid(pid))
        if start_time is not None and st.start_time != start_time:
            raise ProcessGone(f"pid {pid} is now another process")
        if st.state in ("Z", "X"):
            raise ProcessGone(f"pid {pid} has exited")
        member = _Member.open(st)
        if member is None:
            raise ProcessGone(f"pid {pid} exited while attaching")
        return cls(member, clock=clock, sleep=sleep)

    def alive(self) -> bool:
        """False once the root process has exited (its pid may then be reused; we never touch it)."""
        return not self._root.exited()

    def _walk(self) -> list[_Member]:
        """The live members of the tree, root first; newly seen descendants are opened by pidfd."""
        children = _children_by_parent()
        # A parent still alive *after* the /proc scan proves its pid was not reused during it.
        frontier = [m for m in (self._root, *self._members.values()) if not m.exited()]
        found = {m.pid: m for m in frontier}
        me, my_group = os.getpid(), os.getpgrp()
        while frontier:
            parent = frontier.pop()
            for st in children.get(parent.pid, ()):
                if st.pid in found or st.pid == me or st.pgid == my_group or st.state in "ZX":
                    continue
                member = self._members.get(st.pid)
                if member is None or member.start_time != st.start_time:
                    member = _Member.open(st)
                if member is None:
                    continue
                found[st.pid] = member
                frontier.append(member)
        self._forget_dead(found)
        live = [m for m in found.values() if m is not self._root]
        self._members.update((m.pid, m) for m in live)
        return ([self._root] if self._root.pid in found else []) + live

    def _forget_dead(self, found: dict[int, _Member]) -> None:
        for pid, member in list(self._members.items()):
            if found.get(pid) is not member and member.exited():
                member.close()
                del self._members[pid]

    def tree(self) -> list[ProcessInfo]:
        """This process and all its descendants (setsid ones too), root first."""
        infos = []
        for member in self._walk():
            try:
                infos.append(process_info(member.pid))
            except ProcessGone:
                continue
        return infos

    def _live_or_gone(self) -> list[_Member]:
        members = self._walk()
        if not members:
            raise ProcessGone(f"pid {self.pid} has exited")
        return members

    def pause(self) -> list[int]:
        """SIGSTOP the whole tree; returns the pids stopped. Raises ProcessGone if none is left."""
        stopped: dict[int, _Member] = {}
        members = self._live_or_gone()
        for _ in range(MAX_SWEEPS):
            fresh = [m for m in members if stopped.get(m.pid) is not m]
            if not fresh:
                break
            for member in fresh:
                if member.send(signal.SIGSTOP):
                    stopped[member.pid] = member
            members = self._walk()
        return list(stopped)

    def resume(self) -> list[int]:
        """SIGCONT the whole tree; returns the pids continued. Raises ProcessGone if none is left.
        A Ctrl-Z its user pressed while it was stopped is handed on (see `continue_tree`)."""
        return self.continue_tree()[0]

    def continue_tree(self) -> tuple[list[int], list[int]]:
        """SIGCONT the whole tree. A Ctrl-Z pressed while it was stopped waits, pending, on the
        processes of the terminal's job, and SIGCONT would throw it away: it is handed on as a
        SIGTSTP to those processes (not to others of the tree, which `fg` would not continue), so
        the job ends up stopped by its user, as the shell expects. Returns the pids continued,
        and those the Ctrl-Z was handed on to. Raises ProcessGone if none is left."""
        members = self._live_or_gone()
        waiting = [m for m in members if _pending_quietly(m.pid)]
        pids = [m.pid for m in members if m.send(signal.SIGCONT)]
        for member in waiting:
            member.send(signal.SIGTSTP)
        return pids, [m.pid for m in waiting]

    def stopped(self) -> bool:
        """The root process is stopped, by whoever (False once it has exited: the rest of the
        tree may live on, and is then ours to continue)."""
        return stopped_quietly(self.pid)

    def stop_pending(self) -> bool:
        """A job-control stop waits on the (stopped) root: its user pressed Ctrl-Z meanwhile."""
        return _pending_quietly(self.pid)

    async def kill(self, grace: float = KILL_GRACE_PERIOD) -> KillReport:
        """SIGTERM (and SIGCONT, so a paused tree can act on it) every process, SIGKILL who is
        left after `grace` seconds, reap our own child. Never raises ProcessGone. A `close()`
        meanwhile waits for the end: a closed pidfd would read as a process that ended."""
        self._killing += 1
        try:
            return await self._kill(grace)
        finally:
            self._killing -= 1
            if self._close_after_kill and not self._killing:
                self.close()

    async def _kill(self, grace: float) -> KillReport:
        targets: dict[int, _Member] = {}
        self._terminate_new(targets)
        deadline = self._clock() + grace
        while self._clock() < deadline and not self._all_exited(targets):
            await self._sleep(POLL_INTERVAL)
            self._terminate_new(targets)
        report = KillReport()
        needed_kill = [m for m in targets.values() if not m.exited()]
        report.terminated = [m.pid for m in targets.values() if m not in needed_kill]
        for member in needed_kill:
            member.send(signal.SIGKILL)
        report.killed = [m.pid for m in needed_kill]
        deadline = self._clock() + KILL_WAIT
        while self._clock() < deadline and not self._all_exited(targets):
            await self._sleep(POLL_INTERVAL)
        report.survivors = [m.pid for m in needed_kill if not m.exited()]
        self.wait_exit_nowait()
        return report

    def _terminate_new(self, targets: dict[int, _Member]) -> None:
        for member in self._walk():
            if targets.get(member.pid) is member:
                continue
            targets[member.pid] = member
            member.send(signal.SIGTERM)
            member.send(signal.SIGCONT)

    def _all_exited(self, targets: dict[int, _Member]) -> bool:
        self.wait_exit_nowait()
        return all(m.exited() for m in targets.values())

    def wait_exit_nowait(self) -> int | None:
        """Exit code if this is our child and it exited (reaping it), else None.

        Killed by a signal reads as 128 + the signal number, as a shell reports it.
        """
        if self._popen is None:
            return None
        code = self._popen.poll()
        if code is None:
            return None
        return 128 - code if code < 0 else code

    async def wait_exit(self) -> int | None:
        """Wait until the root exits; its exit code when it is our child, else None."""
        if not self._root.exited():
            await anyio.wait_readable(self._root.pidfd)
        return self.wait_exit_nowait()

    def close(self) -> None:
        """Close every pidfd (reaping our child if it has exited); during a `kill`, at its end.
        The processes are left alone."""
        self.wait_exit_nowait()
        if self._killing:
            self._close_after_kill = True
            return
        self._root.close()
        for member in self._members.values():
            member.close()
        self._members.clear()

    def __enter__(self) -> ProcessHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ProcessHandle(pid={self.pid}, start_time={self.start_time})"


def spawn(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str | None = None,
    log_path: Path | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep = anyio.sleep,
) -> ProcessHandle:
    """Launch an agent in its own session: stdin /dev/null, stdout and stderr appended to
    `log_path` (0600) or discarded. Raises OSError when the command cannot be run."""
    if not argv:
        raise ValueError("an empty command cannot be launched")
    out = subprocess.DEVNULL
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        popen = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd or None,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if log_path is not None:
            os.close(out)
    # Our unreaped child keeps its pid, so opening the pidfd by pid cannot race with reuse.
    root = _Member(popen.pid, _read_stat(popen.pid).start_time, os.pidfd_open(popen.pid))
    return ProcessHandle(root, popen=popen, clock=clock, sleep=sleep)


Spawner = Callable[..., ProcessHandle]
"""What the supervisor calls to launch an agent: `spawn` itself, or a fake in tests."""

"""Real process trees for process-control tests: a root, its child, and a grandchild that called setsid."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from tokenwatch.process.processes import ProcessHandle, spawn

# argv: DEPTH PIDFILE [FLAGS]; FLAGS may hold "setsid" (for the last level) and "ignore-term"
TREE_SCRIPT = r"""
import os, signal, subprocess, sys
depth, pidfile, flags = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if depth == 0 and "setsid" in flags:
    os.setsid()
if depth == 0 and "ignore-term" in flags:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if depth > 0:
    child = subprocess.Popen([sys.executable, __file__, str(depth - 1), pidfile, flags])
with open(pidfile, "a") as fh:
    fh.write(f"{os.getpid()}\n")
while True:
    signal.pause()
"""


def state(pid: int) -> str | None:
    """The process's state letter, or None when it no longer exists."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(b")") + 2 :].split()[0].decode()


def dead(pid: int) -> bool:
    """Gone, or a zombie (pid 1 here may never reap the orphans it inherits)."""
    return state(pid) in (None, "Z", "X")


async def wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll `check` until it holds; fail with `what` after a generous timeout."""
    with anyio.move_on_after(timeout):
        while not check():
            await anyio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting until {what}")


def write_tree_script(directory: Path) -> Path:
    script = directory / "tree.py"
    script.write_text(TREE_SCRIPT)
    return script


async def spawn_tree(directory: Path, flags: str = "setsid") -> tuple[ProcessHandle, list[int]]:
    """Launch root -> child -> grandchild; returns the handle and the three pids once all run."""
    script = write_tree_script(directory)
    pidfile = directory / "pids"
    handle = spawn(
        [sys.executable, str(script), "2", str(pidfile), flags],
        env=dict(os.environ),
        log_path=directory / "tree.log",
    )

    def pids() -> list[int]:
        if not pidfile.exists():
            return []
        return [int(line) for line in pidfile.read_text().split()]

    await wait_until(lambda: len(pids()) == 3, "the three processes of the tree run")
    parent = {pid: _ppid(pid) for pid in pids()}
    child = next(pid for pid, ppid in parent.items() if ppid == handle.pid)
    grandchild = next(pid for pid, ppid in parent.items() if ppid == child)
    return handle, [handle.pid, child, grandchild]


def _ppid(pid: int) -> int:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return int(raw[raw.rindex(b")") + 2 :].split()[1])


def start_sleeper(*extra: str) -> subprocess.Popen[bytes]:
    """A long sleep in its own session (so tokenwatch's group rule does not refuse it)."""
    return subprocess.Popen([*extra, "sleep", "600"], start_new_session=True)


def start_as_nobody() -> subprocess.Popen[bytes]:
    """A long sleep owned by `nobody` (needs root), returned once setpriv has switched users."""
    proc = start_sleeper("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
    deadline = time.monotonic() + 30
    while _argv0(proc.pid) != "sleep":
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError("setpriv did not start sleep as nobody")
        time.sleep(0.02)
    return proc


def _argv0(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


# A shell in miniature: session leader on a pty, runs argv as a foreground job, reports job
# control events as JSON lines on fd argv[1], and does `fg` whenever the job stops.
MINI_SHELL = r"""
import json, os, signal, sys
report = os.fdopen(int(sys.argv[1]), "w", buffering=1)
os.setsid()
tty = os.open(sys.argv[2], os.O_RDWR)
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    os.tcsetpgrp(tty, os.getpgrp())
    for fd in (0, 1, 2):
        os.dup2(tty, fd)
    signal.signal(signal.SIGTTOU, signal.SIG_DFL)
    os.execvp(sys.argv[3], sys.argv[3:])
try:
    os.setpgid(pid, pid)
except OSError:
    pass
while True:
    _, status = os.waitpid(pid, os.WUNTRACED)
    if os.WIFSTOPPED(status):
        report.write(json.dumps({"stopped": os.WSTOPSIG(status)}) + "\n")
        os.tcsetpgrp(tty, pid)
        os.killpg(pid, signal.SIGCONT)
        continue
    report.write(json.dumps({"exited": os.waitstatus_to_exitcode(status)}) + "\n")
    break
"""


class Terminal:
    """A pty with MINI_SHELL running a command on it; type keys, read the screen and the events."""

    def __init__(self, directory: Path, argv: list[str], env: dict[str, str]) -> None:
        import pty

        self.master, self._slave = pty.openpty()
        report_r, report_w = os.pipe()
        shell = directory / "mini_shell.py"
        shell.write_text(MINI_SHELL)
        self.proc = subprocess.Popen(
            [sys.executable, str(shell), str(report_w), os.ttyname(self._slave), *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            pass_fds=(report_w,),
        )
        os.close(report_w)
        self._events = os.fdopen(report_r)
        self.screen = ""

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def read_until(self, text: str, timeout: float = 30) -> str:
        import select

        deadline = time.monotonic() + timeout
        while text not in self.screen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.master], [], [], left)[0]:
                raise AssertionError(f"{text!r} never showed; the screen: {self.screen!r}")
            self.screen += os.read(self.master, 4096).decode(errors="replace")
        return self.screen

    def event(self, timeout: float | None = None) -> dict[str, int]:
        """The mini shell's next report (a job stopped or exited); {} if none within `timeout`."""
        import json
        import select

        if timeout is not None and not select.select([self._events], [], [], timeout)[0]:
            return {}
        line = self._events.readline()
        assert line, "the mini shell ended without a report"
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._events.close()
        os.close(self.master)
        os.close(self._slave)


def state_soon(pid: int, want: str, timeout: float = 30.0) -> str | None:
    """The process's state once it reads `want` (signals land asynchronously), or the last seen."""
    deadline = time.monotonic() + timeout
    seen = state(pid)
    while seen != want and time.monotonic() < deadline:
        time.sleep(0.01)
        seen = state(pid)
    return seen

"""Real process trees for process-control tests: a root, its child, and a grandchild that called setsid."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from tokenwatch.core.processes import ProcessHandle, spawn

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

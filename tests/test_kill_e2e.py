"""`tokenwatch kill` ends a whole `tokenwatch run` tree through a real supervisor, paused or not."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.process_fixtures import dead, state_soon
from tests.supervisor_fixtures import ServeProcess, supervisor_process, tokenwatch_env

TIMEOUT = 60

STUBBORN_TREE = """
import os, signal, sys, time
# a child, and a grandchild that left the session (setsid) and ignores SIGTERM
if os.fork() == 0:
    if os.fork() == 0:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(os.getpid(), flush=True)
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)  # so `tokenwatch run`'s output ends with it
        os.dup2(quiet, 2)
while True:
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def supervisor() -> Iterator[ServeProcess]:
    """A `tokenwatch serve` with a short kill grace period (the SIGKILL comes 0.5 s after)."""
    home = Path(tempfile.mkdtemp(prefix="twk-"))
    (home / "config").mkdir()
    (home / "config" / "tokenwatch.toml").write_text("[supervisor]\nkill_grace = 0.5\n")
    with supervisor_process(tokenwatch_env(home)) as sp:
        yield sp


def tokenwatch(sp: ServeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenwatch", *args], env=sp.env, capture_output=True,
        text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL, cwd=sp.paths.state_dir,
    )  # fmt: skip


@pytest.mark.parametrize("paused", [True, False], ids=["paused", "running"])
def test_kill_ends_a_setsid_grandchild_that_ignores_sigterm(
    supervisor: ServeProcess, paused: bool
) -> None:
    name = f"stubborn-{'paused' if paused else 'running'}"
    run = subprocess.Popen(
        [sys.executable, "-m", "tokenwatch", "run", "-q", "--name", name, "--",
         sys.executable, "-c", STUBBORN_TREE],
        env=supervisor.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=supervisor.paths.state_dir,
    )  # fmt: skip
    grandchild = 0
    try:
        assert run.stdout is not None
        grandchild = int(run.stdout.readline())
        if paused:
            assert tokenwatch(supervisor, "pause", name).stdout == f"{name} paused (3 processes)\n"
            assert state_soon(grandchild, "T") == "T"
        killed = tokenwatch(supervisor, "kill", name)
        run.communicate(timeout=TIMEOUT)
        grandchild_dead = dead(grandchild)
    finally:
        for pid in (run.pid, grandchild):
            if pid:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        run.wait()
    assert killed.stdout == f"{name} killed (2 ended on SIGTERM, 1 needed SIGKILL)\n"
    assert grandchild_dead

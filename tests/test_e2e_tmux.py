"""The real `tokenwatch` in a real terminal (tmux): `p` pauses a real agent's process, `k` + `y`
kills another; quitting leaves the rest running under the supervisor."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.process_fixtures import dead
from tests.process_fixtures import state as proc_state

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
]

AGENT = [sys.executable, "-c", "import time\nwhile True: time.sleep(0.5)"]
TIMEOUT = 60.0


def tokenwatch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenwatch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


class Terminal:
    """A tmux session on a private server: keys in, screen text out."""

    def __init__(self, socket: str) -> None:
        self.socket = socket

    def tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=TIMEOUT,
        ).stdout

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "tw", *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "tw")

    def wait_for(self, text: str) -> str:
        eventually(lambda: text in self.screen(), f"{text!r} is on screen")
        return self.screen()


@pytest.fixture
def project(short_tmp: Path) -> Path:
    (short_tmp / "tokenwatch.toml").write_text(
        "\n".join(f"[agents.{name}]\ncommand = {json.dumps(AGENT)}\n" for name in ("alpha", "beta"))
    )
    return short_tmp


@pytest.fixture
def terminal(project: Path, tokenwatch_home: Path) -> Iterator[Terminal]:
    term = Terminal(f"tw-test-{os.getpid()}")
    env = f"TOKENWATCH_HOME={tokenwatch_home} TERM=xterm-256color"
    cmd = f"cd {project} && env {env} {sys.executable} -m tokenwatch; echo EXITED $?; sleep 600"
    term.tmux("new-session", "-d", "-s", "tw", "-x", "120", "-y", "36", cmd)
    try:
        yield term
    finally:
        subprocess.run(["tmux", "-L", term.socket, "kill-server"], capture_output=True)
        tokenwatch("stop", cwd=project)


def agent_pids(project: Path) -> dict[str, int]:
    status = json.loads(tokenwatch("status", "--json", cwd=project).stdout)
    return {v["agent"]["name"]: v["agent"]["pid"] for v in status["agents"] if v["agent"]["pid"]}


def test_keys_pause_and_kill_real_agents(terminal: Terminal, project: Path) -> None:
    terminal.wait_for("supervisor")
    for name in ("alpha", "beta"):
        launched = tokenwatch("launch", name, cwd=project)
        assert launched.returncode == 0, launched.stderr
    terminal.wait_for("beta")
    pids = agent_pids(project)
    try:
        # Both spend nothing, so the table is in name order and the cursor starts on alpha.
        terminal.keys("p")
        eventually(lambda: proc_state(pids["alpha"]) == "T", "alpha's process is stopped")
        terminal.wait_for("paused alpha")
        assert proc_state(pids["beta"]) in {"S", "R"}

        terminal.keys("Down", "k")
        terminal.wait_for("Kill beta")
        terminal.keys("n")
        terminal.wait_for("beta not killed")
        assert not dead(pids["beta"])
        terminal.keys("k")
        terminal.wait_for("Kill beta")
        terminal.keys("y")
        eventually(lambda: dead(pids["beta"]), "beta's process is gone")
        terminal.wait_for("killed beta")

        terminal.keys("q")
        screen = terminal.wait_for("EXITED 0")
        assert "agents keep running under the supervisor" in screen
        assert proc_state(pids["alpha"]) == "T", "quitting the dashboard leaves agents as they are"
    finally:
        for pid in pids.values():
            if not dead(pid):
                os.kill(pid, 18)  # SIGCONT so it can die
                os.kill(pid, 9)


def dashboard_pid(term: Terminal) -> int:
    """The python process running `tokenwatch` under the tmux pane's shell."""
    shell = int(term.tmux("list-panes", "-t", "tw", "-F", "#{pane_pid}").split()[0])

    def child() -> int | None:
        for task in Path(f"/proc/{shell}/task").iterdir():
            kids = (task / "children").read_text().split()
            if kids:
                return int(kids[0])
        return None

    eventually(lambda: child() is not None, "the dashboard process exists")
    pid = child()
    assert pid is not None
    return pid


def test_sigterm_restores_the_terminal(terminal: Terminal) -> None:
    terminal.wait_for("Pause/resume")
    os.kill(dashboard_pid(terminal), 15)
    screen = terminal.wait_for("EXITED 0")
    assert "agents keep running under the supervisor" in screen
    assert "Pause/resume" not in screen  # the alternate screen is gone: the terminal is back


def test_dashboard_without_a_terminal_says_so(project: Path) -> None:
    done = tokenwatch("dashboard", cwd=project)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "tokenwatch: the dashboard needs a terminal; `tokenwatch status` prints the same figures"
    )

"""The real coding-agent CLIs (npm) in tests: found or failed for, given a home of their own, run
under `tokenwatch run`, on a pseudo-terminal when full-screen, and their calls checked against
what fake-llm served."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.supervisor_fixtures import ServeProcess, ask
from tokenwatch.demo.fake_exchange import CountedCall
from tokenwatch.demo.fake_llm import FakeLLM

AGENTS_BIN = Path(__file__).resolve().parent.parent / ".coding-agents" / "node_modules" / ".bin"


def agent_program(name: str) -> str:
    program = AGENTS_BIN / name
    if not program.exists():
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed: the real coding agents cannot be installed")
        pytest.fail(f"{program} is missing: run `make .coding-agents/.installed` (needs npm)")
    return str(program)


def agent_env(base: Mapping[str, str], home: Path, **env: str) -> dict[str, str]:
    """`base` with the agent's config, sessions and logs in `home`, and its update checks and
    telemetry off (they would call out past fake-llm)."""
    (home / ".codex").mkdir(exist_ok=True)
    return {
        **base, "HOME": str(home), "CODEX_HOME": str(home / ".codex"),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"), "XDG_CONFIG_HOME": str(home / ".config"),
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1", **env,
    }  # fmt: skip


def run_agent(
    sp: ServeProcess, home: Path, name: str, command: list[str], **env: str
) -> subprocess.CompletedProcess[str]:
    """`tokenwatch run --name NAME -- COMMAND` against the supervisor `sp`, to its end."""
    return subprocess.run(
        [sys.executable, "-m", "tokenwatch", "run", "--name", name, "--", *command],
        capture_output=True, text=True, timeout=180, env=agent_env(sp.env, home, **env), cwd=home,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def assert_recorded_exactly(sp: ServeProcess, name: str, served: list[CountedCall]) -> None:
    assert served, "the agent made no call"
    deadline = time.monotonic() + 60
    while len(calls := ask(sp, "history", agent=name)["calls"]) < len(served):
        assert time.monotonic() < deadline, f"{name}: {len(calls)} calls recorded of {len(served)}"
        time.sleep(0.1)  # the ledger commits a moment after the call is counted
    assert len(calls) == len(served)
    # Concurrent calls (interactive Codex names its thread while it answers) may finish in either
    # order, so each recorded call is matched to a served one, not zipped by position.
    got = sorted(
        (c["input_tokens"], c["output_tokens"], c["cache_read_tokens"], c["model"]) for c in calls
    )
    billed = sorted((b.input_tokens, b.output_tokens, b.cache_read_tokens, b.model) for b in served)
    assert got == billed
    assert not any(call["estimated"] for call in calls)


def wait_until_answered(fake: FakeLLM) -> None:
    """Until every request fake-llm took has been answered (two looks a second apart agree)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        first = fake.statistics()
        time.sleep(1)
        if first == fake.statistics() and first["requests"] == first["calls"]:
            return


class Pty:
    """A program on a pseudo-terminal, answering what a terminal is asked (cursor position,
    colours, device attributes), so a full-screen agent runs as in a real one."""

    ANSWERS = {
        b"\x1b[6n": b"\x1b[1;1R",
        b"\x1b]10;?": b"\x1b]10;rgb:ffff/ffff/ffff\x1b\\",
        b"\x1b]11;?": b"\x1b]11;rgb:0000/0000/0000\x1b\\",
        b"\x1b[c": b"\x1b[?62;c",
    }

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        import fcntl
        import pty
        import struct
        import termios

        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
        )
        os.close(slave)
        self.seen = b""

    def wait_for(self, text: bytes, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            assert time.monotonic() < deadline, f"{text!r} never showed: {self.seen[-2000:]!r}"
            if select.select([self.master], [], [], 0.5)[0]:
                try:
                    data = os.read(self.master, 65536)
                except OSError:
                    raise AssertionError(f"the terminal closed: {self.seen[-2000:]!r}") from None
                self.seen += data
                for question, answer in self.ANSWERS.items():
                    for _ in range(data.count(question)):
                        os.write(self.master, answer)

    def close(self) -> int:
        try:
            return self.proc.wait(120)
        finally:
            # the whole session: a launcher's native child, paused when a test failed before
            # resuming it, would otherwise stay stopped on the machine (SIGKILL reaches it)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            os.close(self.master)

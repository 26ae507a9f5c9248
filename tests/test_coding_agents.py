"""Known coding agents under `tokenwatch run` with no extra flag: what each is given (`--dry-run`),
and the real npm packages (Codex, Claude Code) recorded exactly against fake-llm."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.supervisor_fixtures import (
    ServeProcess,
    clean_supervisor,
    quiet_config,
    running_supervisor,
    tokenwatch_env,
)
from tokenwatch.client.control import SupervisorClient
from tokenwatch.config import AgentSettings
from tokenwatch.core.coding_agents import find_agent, plan
from tokenwatch.demo.fake_exchange import CountedCall
from tokenwatch.demo.fake_llm import FakeLLM, fake_llm_in_thread
from tokenwatch.paths import Paths

AGENTS_BIN = Path(__file__).resolve().parent.parent / ".coding-agents" / "node_modules" / ".bin"
URLS = {
    "OPENAI_BASE_URL": "http://127.0.0.1:9/a/T/v1",
    "ANTHROPIC_BASE_URL": "http://127.0.0.1:9/a/T",
}


@pytest.mark.parametrize(
    ("command", "at"),
    [
        (["codex", "exec", "hi"], 0),
        (["npx", "-y", "@openai/codex", "exec"], 2),
        (["env", "A=1", "/usr/local/bin/claude", "-p", "x"], 2),
        (["python", "codex.py"], None),
        (["make", "codex"], None),
    ],
)
def test_the_agent_is_found_past_launchers_only(command: list[str], at: int | None) -> None:
    assert find_agent(command) == at


def test_codex_gets_a_provider_of_its_own_on_the_proxy() -> None:
    setup = plan(["npx", "codex", "exec", "fix it"], URLS)
    assert setup.agent == "Codex CLI"
    assert setup.command[:2] == ["npx", "codex"]
    assert setup.command[-2:] == ["exec", "fix it"]
    assert 'model_providers.tokenwatch.base_url="http://127.0.0.1:9/a/T/v1"' in setup.command
    assert 'model_providers.tokenwatch.wire_api="responses"' in setup.command


def test_codex_on_the_stable_endpoint_has_no_route_token_on_its_command_line() -> None:
    setup = plan(["codex", "exec", "x"], {**URLS, "TOKENWATCH_ENDPOINT": "http://127.0.0.1:8"})
    assert 'model_providers.tokenwatch.base_url="http://127.0.0.1:8/v1"' in setup.command
    assert not [word for word in setup.command if "/a/" in word], "ps would show the token"
    assert not [note for note in setup.notes if "route token" in note]
    without = plan(["codex", "exec", "x"], URLS)
    assert "no stable endpoint: the run's route token is on its command line" in without.notes


FAKE_CODEX = """#!/bin/sh
printf '%s\n' "$@" > "$0.args"
"""


async def test_launch_gives_codex_the_flags_run_gives(short_tmp: Path) -> None:
    codex = short_tmp / "codex"
    codex.write_text(FAKE_CODEX)
    codex.chmod(0o755)
    config = quiet_config(agents={"cx": AgentSettings(command=[str(codex), "exec", "hi"])})
    paths = Paths.discover()
    async with (
        running_supervisor(paths, config, exporters=False),
        await SupervisorClient.connect(paths, start=False) as client,
    ):
        await client.request("launch", name="cx")
        with anyio.fail_after(30):
            while not (short_tmp / "codex.args").exists():
                await anyio.sleep(0.02)
    args = (short_tmp / "codex.args").read_text().splitlines()
    assert args[-2:] == ["exec", "hi"]
    assert 'model_provider="tokenwatch"' in args
    assert 'model_providers.tokenwatch.wire_api="responses"' in args


def test_codex_with_a_provider_of_its_own_is_left_alone() -> None:
    command = ["codex", "-c", "model_provider=ollama", "exec", "x"]
    setup = plan(command, URLS)
    assert setup.command == command
    assert "not tracked" in setup.notes[0]


def test_dry_run_shows_what_would_run_and_registers_nothing(tokenwatch_home: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tokenwatch", "run", "--dry-run", "--", "codex", "exec", "hi"],
        capture_output=True, text=True, timeout=60, env=tokenwatch_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "agent:   codex (Codex CLI)"
    assert "-c 'model_provider=\"tokenwatch\"'" in done.stdout
    assert not (tokenwatch_home / "run" / "tokenwatch.sock").exists(), "no supervisor started"


# -- the real packages ---------------------------------------------------------------------


def agent_program(name: str) -> str:
    program = AGENTS_BIN / name
    if not program.exists():
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed: the real coding agents cannot be installed")
        pytest.fail(f"{program} is missing: run `make .coding-agents/.installed` (needs npm)")
    return str(program)


@pytest.fixture(scope="module")
def supervisor() -> Iterator[ServeProcess]:
    with clean_supervisor("twa-") as sp:
        yield sp


def agent_env(sp: ServeProcess, home: Path, **env: str) -> dict[str, str]:
    """The supervisor's environment with the agent's config, sessions and logs in `home`."""
    (home / ".codex").mkdir(exist_ok=True)
    return {
        **sp.env, "HOME": str(home), "CODEX_HOME": str(home / ".codex"),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"), "XDG_CONFIG_HOME": str(home / ".config"),
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1", **env,
    }  # fmt: skip


def run_agent(
    sp: ServeProcess, home: Path, name: str, command: list[str], **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenwatch", "run", "--name", name, "--", *command],
        capture_output=True, text=True, timeout=180, env=agent_env(sp, home, **env), cwd=home,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def recorded(sp: ServeProcess, name: str) -> list[dict[str, Any]]:
    async def fetch() -> Any:
        async with await SupervisorClient.connect(sp.paths, start=False) as client:
            return await client.request("history", agent=name)

    calls: list[dict[str, Any]] = anyio.run(fetch)["calls"]
    return sorted(calls, key=lambda c: c["ts"])


def assert_recorded_exactly(sp: ServeProcess, name: str, served: list[CountedCall]) -> None:
    assert served, "the agent made no call"
    deadline = time.monotonic() + 60
    while len(calls := recorded(sp, name)) < len(served) and time.monotonic() < deadline:
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


@pytest.mark.slow
def test_codex_exec_is_recorded_exactly_with_no_extra_flag(
    supervisor: ServeProcess, short_tmp: Path
) -> None:
    codex = agent_program("codex")
    with fake_llm_in_thread() as fake:
        done = run_agent(
            supervisor, short_tmp, "codex-exec",
            [codex, "exec", "--skip-git-repo-check", "-m", "gpt-4o-mini", "say hi"],
            OPENAI_BASE_URL=fake.url + "/v1", OPENAI_API_KEY="sk-test-not-a-secret",
        )  # fmt: skip
        served = list(fake.calls)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_recorded_exactly(supervisor, "codex-exec", served)
    total = sum(c.input_tokens + c.output_tokens for c in served)
    assert f"codex-exec exited 0 · {total:,} tokens" in done.stderr


@pytest.mark.slow
def test_claude_code_print_mode_is_recorded_exactly_with_no_extra_flag(
    supervisor: ServeProcess, short_tmp: Path
) -> None:
    claude = agent_program("claude")
    with fake_llm_in_thread() as fake:
        done = run_agent(
            supervisor, short_tmp, "claude-p",
            [claude, "-p", "--model", "claude-haiku-4-5", "say hi"],
            ANTHROPIC_BASE_URL=fake.url, ANTHROPIC_API_KEY="sk-ant-test-not-a-secret",
        )  # fmt: skip
        served = list(fake.calls)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_recorded_exactly(supervisor, "claude-p", served)


@pytest.mark.slow
def test_an_agent_that_makes_no_call_through_tokenwatch_is_told_and_alerted(
    supervisor: ServeProcess, short_tmp: Path
) -> None:
    done = run_agent(supervisor, short_tmp, "quiet-one", ["sh", "-c", "exit 0"])
    assert "no LLM call went through tokenwatch (if it made any: docs/agents.md)" in done.stderr

    async def alerts() -> Any:
        async with await SupervisorClient.connect(supervisor.paths, start=False) as client:
            return await client.request("alerts")

    deadline = time.monotonic() + 60
    while ("quiet-one", "no-calls") not in [(a["agent"], a["rule"]) for a in anyio.run(alerts)]:
        assert time.monotonic() < deadline, anyio.run(alerts)
        time.sleep(0.1)


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
                for ask, answer in self.ANSWERS.items():
                    for _ in range(data.count(ask)):
                        os.write(self.master, answer)

    def close(self) -> int:
        try:
            return self.proc.wait(120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)


@pytest.mark.slow
def test_codex_interactive_is_recorded_exactly_with_no_extra_flag(
    supervisor: ServeProcess, short_tmp: Path
) -> None:
    codex = agent_program("codex")
    with fake_llm_in_thread() as fake:
        env = agent_env(
            supervisor, short_tmp, TERM="xterm-256color", OPENAI_BASE_URL=fake.url + "/v1",
            OPENAI_API_KEY="sk-test-not-a-secret",
        )  # fmt: skip
        argv = [sys.executable, "-m", "tokenwatch", "run", "--name", "codex-tui", "--"]
        term = Pty([*argv, codex, "-m", "gpt-4o-mini", "say hi"], env, short_tmp)
        try:
            term.wait_for(b"Worked for")
            wait_until_answered(fake)  # its side call (the thread's title) may still be going
            os.write(term.master, b"\x03")  # Ctrl-C at an idle prompt quits
            term.wait_for(b"tokenwatch: codex-tui exited 0")
        finally:
            code = term.close()
        served = list(fake.calls)
    assert code == 0, term.seen[-2000:]
    assert_recorded_exactly(supervisor, "codex-tui", served)

"""Known coding agents under `tokenwatch run` with no extra flag: what each is given (`--dry-run`),
and the real npm packages (Codex, Claude Code) recorded exactly against fake-llm."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.coding_agent_fixtures import (
    Pty,
    agent_env,
    agent_program,
    assert_recorded_exactly,
    run_agent,
    wait_until_answered,
)
from tests.supervisor_fixtures import (
    ServeProcess,
    ask,
    clean_supervisor,
    quiet_config,
    running_supervisor,
    tokenwatch_env,
)
from tokenwatch.client.control import SupervisorClient
from tokenwatch.config import AgentSettings
from tokenwatch.core.coding_agents import find_agent, plan
from tokenwatch.demo.fake_llm import fake_llm_in_thread
from tokenwatch.paths import Paths

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


@pytest.fixture(scope="module")
def supervisor() -> Iterator[ServeProcess]:
    with clean_supervisor("twa-") as sp:
        yield sp


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

    deadline = time.monotonic() + 60
    while ("quiet-one", "no-calls") not in (alerted := rules_alerted(supervisor)):
        assert time.monotonic() < deadline, alerted
        time.sleep(0.1)


def rules_alerted(sp: ServeProcess) -> set[tuple[str, str]]:
    """(agent, rule) of every alert the supervisor has raised."""
    return {(a["agent"], a["rule"]) for a in ask(sp, "alerts")}


@pytest.mark.slow
def test_codex_interactive_is_recorded_exactly_with_no_extra_flag(
    supervisor: ServeProcess, short_tmp: Path
) -> None:
    codex = agent_program("codex")
    with fake_llm_in_thread() as fake:
        env = agent_env(
            supervisor.env, short_tmp, TERM="xterm-256color", OPENAI_BASE_URL=fake.url + "/v1",
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

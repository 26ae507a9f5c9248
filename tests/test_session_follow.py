"""Coding agents run outside tokenwatch, followed through their own session logs: the real npm CLIs
against fake-llm, shown live by the supervisor within 2 s of each call, totals equal to what
fake-llm served, attributed to the live process (which can then be paused), and `import --from`
on the same logs agreeing."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.supervisor_fixtures import ServeProcess, clean_supervisor, state_of
from tests.test_coding_agents import Pty, agent_program, run_agent
from tokenwatch.client.control import SupervisorClient
from tokenwatch.demo.fake_exchange import CountedCall
from tokenwatch.demo.fake_llm import FakeLLM, fake_llm_in_thread
from tokenwatch.paths import Paths

LIVE_WITHIN = 2.0
"""Seconds from a call's answer to the supervisor showing it (the brief's promise)."""


@pytest.fixture
def supervisor() -> Iterator[ServeProcess]:
    with clean_supervisor("twsf-") as sp:
        yield sp


def request(sp: ServeProcess, kind: str, **fields: Any) -> Any:
    async def ask() -> Any:
        async with await SupervisorClient.connect(sp.paths, start=False) as client:
            return await client.request(kind, **fields)

    return anyio.run(ask)


def agents(sp: ServeProcess, prefix: str) -> dict[str, dict[str, Any]]:
    rows = request(sp, "status")["agents"]
    return {r["agent"]["name"]: r for r in rows if r["agent"]["name"].startswith(prefix)}


def recorded(sp: ServeProcess, prefix: str) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    for name in agents(sp, prefix):
        calls += request(sp, "history", agent=name)["calls"]
    return sorted(calls, key=lambda c: c["ts"])


def figures(calls: list[dict[str, Any]] | list[CountedCall]) -> list[tuple[int, int, int]]:
    rows = [c if isinstance(c, dict) else dataclasses.asdict(c) for c in calls]
    return sorted((r["input_tokens"], r["output_tokens"], r["cache_read_tokens"]) for r in rows)


def follow_live(sp: ServeProcess, fake: FakeLLM, prefix: str, done: Callable[[], bool]) -> None:
    """While the agent runs: every call fake-llm answers is in the supervisor within 2 s."""
    shown, deadline = 0, time.monotonic() + 180
    while not done() or shown < len(fake.calls):
        assert time.monotonic() < deadline, "the agent never finished"
        served = len(fake.calls)
        if served == shown:
            time.sleep(0.05)
            continue
        answered = time.monotonic()
        while len(recorded(sp, prefix)) < served:
            waited = time.monotonic() - answered
            assert waited < LIVE_WITHIN, f"call {served} not shown after {waited:.1f} s"
            time.sleep(0.05)
        shown = served


def agent_env(home: Path, **extra: str) -> dict[str, str]:
    (home / ".codex").mkdir(exist_ok=True)
    return {
        "PATH": os.environ["PATH"], "HOME": str(home), "TERM": "xterm-256color",
        "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", **extra,
    }  # fmt: skip


def import_totals(source: str, home: Path, root: Path) -> list[tuple[int, int, int]]:
    """What `tokenwatch import --from` makes of the same logs, in a ledger of its own."""
    env = {**os.environ, "TOKENWATCH_HOME": str(home / "import"), "HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-m", "tokenwatch", "import", "--from", source, "--path", str(root)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    db = Paths.discover(env).db
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT input_tokens, output_tokens, cache_read_tokens FROM events")
        return sorted(tuple(r) for r in rows)  # type: ignore[misc]


@pytest.mark.slow
def test_claude_code_outside_tokenwatch_is_shown_live_and_exactly(
    supervisor: ServeProcess,
) -> None:
    claude = agent_program("claude")
    home = Path(supervisor.env["HOME"])
    with fake_llm_in_thread() as fake:
        env = agent_env(home, ANTHROPIC_BASE_URL=fake.url, ANTHROPIC_API_KEY="sk-ant-test")
        for prompt in ("say hi", "say bye"):
            proc = subprocess.Popen(
                [claude, "-p", "--model", "claude-haiku-4-5", prompt], env=env, cwd=home,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            follow_live(supervisor, fake, "claude-code", lambda p=proc: p.poll() is not None)
            assert proc.wait() == 0, proc.stderr.read() if proc.stderr else ""
        served = list(fake.calls)
    calls = recorded(supervisor, "claude-code")
    assert figures(calls) == figures(served)
    assert {c["source"] for c in calls} == {"log"}
    assert sorted(c["model"] for c in calls) == sorted(c.model for c in served)
    projects = home / ".claude" / "projects"
    assert import_totals("claude-code", home, projects) == figures(served)


def codex_argv(codex: str, fake: FakeLLM, *args: str) -> list[str]:
    """Codex on fake-llm through a provider of its own (Codex ignores OPENAI_BASE_URL)."""
    p = "model_providers.fake"
    return [codex, "-c", 'model_provider="fake"', "-c", f'{p}.name="fake"',
            "-c", f'{p}.base_url="{fake.url}/v1"', "-c", f'{p}.wire_api="responses"',
            "-c", f'{p}.env_key="OPENAI_API_KEY"', *args]  # fmt: skip


@pytest.mark.slow
def test_codex_exec_outside_tokenwatch_is_shown_live_and_exactly(supervisor: ServeProcess) -> None:
    codex = agent_program("codex")
    home = Path(supervisor.env["HOME"])
    with fake_llm_in_thread() as fake:
        env = agent_env(home, OPENAI_API_KEY="sk-test-not-a-secret")
        for prompt in ("say hi", "say bye"):
            argv = codex_argv(codex, fake, "exec", "--skip-git-repo-check", "-m", "gpt-4o-mini")
            proc = subprocess.Popen(
                [*argv, prompt], env=env, cwd=home, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            follow_live(supervisor, fake, "codex", lambda p=proc: p.poll() is not None)
            assert proc.wait() == 0, proc.stderr.read() if proc.stderr else ""
        served = list(fake.calls)
    calls = recorded(supervisor, "codex")
    assert figures(calls) == figures(served)
    assert all(c["response_id"].startswith("resp_") for c in calls)
    assert import_totals("codex", home, home / ".codex" / "sessions") == figures(served)


@pytest.mark.slow
def test_an_interactive_codex_is_shown_on_its_own_process_which_can_be_paused(
    supervisor: ServeProcess,
) -> None:
    codex = agent_program("codex")
    home = Path(supervisor.env["HOME"])
    with fake_llm_in_thread() as fake:
        env = agent_env(home, OPENAI_API_KEY="sk-test-not-a-secret")
        term = Pty(codex_argv(codex, fake, "-m", "gpt-4o-mini", "say hi"), env, home)
        try:
            term.wait_for(b"Worked for")
            deadline = time.monotonic() + LIVE_WITHIN
            while not (shown := agents(supervisor, "codex")):
                assert time.monotonic() < deadline, "the session's call was not shown"
                time.sleep(0.05)
            [(name, row)] = shown.items()
            assert row["agent"]["pid"] == term.proc.pid, row  # the launcher, over native codex
            assert row["summary"]["requests"] >= 1
            request(supervisor, "pause", agent=name)
            assert state_of(term.proc.pid) in "Tt"
            request(supervisor, "resume", agent=name)
            os.write(term.master, b"\x03")  # Ctrl-C at an idle prompt quits
        finally:
            code = term.close()
    assert code == 0, term.seen[-2000:]


@pytest.mark.slow
def test_a_call_seen_by_the_proxy_and_in_the_log_is_stored_once(supervisor: ServeProcess) -> None:
    """Claude Code under `tokenwatch run` while its logs are followed: the proxy's record and
    the log's line name one answer (`msg_...`), stored once, as the run's agent."""
    claude = agent_program("claude")
    home = Path(supervisor.env["HOME"])
    with fake_llm_in_thread() as fake:
        done = run_agent(
            supervisor, home, "claude-run", [claude, "-p", "--model", "claude-haiku-4-5", "hi"],
            ANTHROPIC_BASE_URL=fake.url, ANTHROPIC_API_KEY="sk-ant-test-not-a-secret",
        )  # fmt: skip
        served = list(fake.calls)
    assert done.returncode == 0, done.stderr[-2000:]
    time.sleep(3 * LIVE_WITHIN)  # time for the follower to read the log too
    calls = recorded(supervisor, "")
    assert figures(calls) == figures(served)
    assert {c["agent"] for c in calls} == {"claude-run"}
    assert all(c["response_id"].startswith("msg_") for c in calls)

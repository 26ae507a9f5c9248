"""`tokenwatch import --from claude-code|codex`: usage read from the agents' own session logs, each
call once; the real agents write the logs (against fake-llm, in a temporary HOME)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import anyio
import pytest

from tests.test_coding_agents import agent_program
from tokenwatch.cli import main
from tokenwatch.core.models import UsageEvent
from tokenwatch.demo.fake_exchange import CountedCall
from tokenwatch.demo.fake_llm import fake_llm_in_thread
from tokenwatch.ledger.session_logs import events
from tokenwatch.ledger.store import Store
from tokenwatch.paths import Paths


def stored_events() -> list[UsageEvent]:
    async def read() -> list[UsageEvent]:
        async with await Store.open(Paths.discover().db) as store:
            return [e async for e in store.iter_events()]

    return sorted(anyio.run(read), key=lambda e: e.ts)


def figures(calls: list[UsageEvent] | list[CountedCall]) -> list[tuple[str, int, int, int]]:
    return [(c.model, c.input_tokens, c.output_tokens, c.cache_read_tokens) for c in calls]


def import_logs(source: str, root: Path) -> int:
    return main(["import", "--from", source, "--path", str(root), "--no-price"])


def agent_env(home: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"], "HOME": str(home), "CODEX_HOME": str(home / ".codex"),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"), "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", **extra,
    }  # fmt: skip


@pytest.mark.slow
def test_a_claude_code_session_is_imported_once_however_often_it_is_logged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    claude = agent_program("claude")
    with fake_llm_in_thread() as fake:
        env = agent_env(tmp_path, ANTHROPIC_BASE_URL=fake.url, ANTHROPIC_API_KEY="sk-ant-test")
        for prompt in ("say hi", "say bye"):
            done = subprocess.run(
                [claude, "-p", "--model", "claude-haiku-4-5", prompt],
                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr[-2000:]
        served = list(fake.calls)
    projects = tmp_path / ".claude" / "projects"
    assert import_logs("claude-code", projects) == 0
    assert figures(stored_events()) == figures(served)
    # the same messages in a second file (a resumed session, a subagent's copy) add nothing
    first = next(projects.rglob("*.jsonl"))
    shutil.copy(first, first.parent / "subagents-copy.jsonl")
    assert import_logs("claude-code", projects) == 0
    assert figures(stored_events()) == figures(served)
    assert "imported 0 events" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.slow
def test_a_codex_session_is_imported_turn_by_turn(tmp_path: Path) -> None:
    codex = agent_program("codex")
    (tmp_path / ".codex").mkdir()
    with fake_llm_in_thread() as fake:
        env = agent_env(tmp_path, OPENAI_API_KEY="sk-test")
        provider = "model_providers.fake"
        done = subprocess.run(
            [codex, "-c", 'model_provider="fake"', "-c", f'{provider}.name="fake"',
             "-c", f'{provider}.base_url="{fake.url}/v1"', "-c", f'{provider}.wire_api="responses"',
             "-c", f'{provider}.env_key="OPENAI_API_KEY"',
             "exec", "--skip-git-repo-check", "-m", "gpt-4o-mini", "say hi"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        served = list(fake.calls)
    assert done.returncode == 0, done.stderr[-2000:]
    assert import_logs("codex", tmp_path / ".codex" / "sessions") == 0
    assert figures(stored_events()) == figures(served)


def token_count(total: int, output: int) -> str:
    usage = {"input_tokens": total, "cached_input_tokens": 0, "output_tokens": output,
             "reasoning_output_tokens": 0}  # fmt: skip
    payload = {"type": "token_count", "info": {"total_token_usage": usage}}
    return json.dumps(
        {"timestamp": "2026-12-01T10:00:00Z", "type": "event_msg", "payload": payload}
    )


def test_codex_running_totals_become_turns_and_a_repeat_counts_nothing(tmp_path: Path) -> None:
    lines = [
        json.dumps({"type": "session_meta", "payload": {"id": "s1"}}),
        json.dumps({"type": "turn_context", "payload": {"model": "gpt-5"}}),
        token_count(100, 10),
        token_count(100, 10),  # the same total again (a rate-limit update): no new turn
        token_count(250, 30),
    ]
    (tmp_path / "rollout-1.jsonl").write_text("\n".join(lines) + "\n")
    found = events("codex", tmp_path)
    assert [(e.input_tokens, e.output_tokens, e.model) for e in found] == [
        (100, 10, "gpt-5"),
        (150, 20, "gpt-5"),
    ]


def test_a_line_cut_short_is_read_once_it_is_complete(tmp_path: Path) -> None:
    message = {"id": "msg_1", "model": "claude-haiku-4-5",
               "usage": {"input_tokens": 5, "cache_read_input_tokens": 20, "output_tokens": 7}}  # fmt: skip
    line = json.dumps({"type": "assistant", "message": message, "requestId": "req_1",
                       "timestamp": "2026-12-01T10:00:00Z"})  # fmt: skip
    log = tmp_path / "p" / "s.jsonl"
    log.parent.mkdir()
    log.write_text(line[:40])
    assert events("claude-code", tmp_path) == []
    log.write_text(line + "\n" + line + "\n")
    (event,) = events("claude-code", tmp_path)
    assert (event.input_tokens, event.cache_read_tokens, event.output_tokens) == (25, 20, 7)


def test_import_from_a_missing_directory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert import_logs("codex", tmp_path / "nowhere") == 1
    err = capsys.readouterr().err
    assert (
        err
        == f"tokenwatch: no codex logs in {tmp_path / 'nowhere'} (not a directory; see --path)\n"
    )

"""`tokenwatch import --from claude-code|codex|gemini`: usage read from the agents' own session logs, each
call once; the real agents write the logs (against fake-llm, in a temporary HOME)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.test_coding_agents import agent_program
from tokenwatch.cli import main
from tokenwatch.core.models import UsageEvent
from tokenwatch.demo.fake_exchange import CountedCall
from tokenwatch.demo.fake_llm import fake_llm_in_thread
from tokenwatch.ledger.session_logs import LogFile, events, read_new
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


def claude_line(message_id: str, output: int, stop: str | None = "end_turn") -> str:
    message = {"id": message_id, "model": "claude-haiku-4-5", "stop_reason": stop,
               "usage": {"input_tokens": 5, "cache_read_input_tokens": 20, "output_tokens": output}}  # fmt: skip
    return json.dumps({"type": "assistant", "message": message, "requestId": f"req_{message_id}",
                       "timestamp": "2026-12-01T10:00:00Z", "cwd": "/w"}) + "\n"  # fmt: skip


@given(st.lists(st.integers(0, 10_000), max_size=6))
def test_a_log_written_in_any_pieces_is_read_once_each_line_when_complete(cuts: list[int]) -> None:
    text = "".join(claude_line(f"msg_{i}", i + 1) for i in range(4)).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.jsonl"
        log, found = LogFile(path), []
        points = sorted({min(c, len(text)) for c in cuts} | {len(text)})
        written = 0
        with open(path, "wb") as f:
            for point in points:
                f.write(text[written:point])
                f.flush()
                written = point
                found += read_new("claude-code", log)
        assert [e.output_tokens for e in found] == [1, 2, 3, 4]
        assert [e.response_id for e in found] == [f"msg_{i}" for i in range(4)]


def test_a_message_in_two_files_and_on_two_lines_counts_once(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    lines = claude_line("msg_1", 3, stop=None) + claude_line("msg_1", 7) + claude_line("msg_1", 7)
    (tmp_path / "a" / "s.jsonl").write_text(lines)
    (tmp_path / "a" / "s" / "subagents").mkdir(parents=True)
    (tmp_path / "a" / "s" / "subagents" / "agent-1.jsonl").write_text(lines)
    [event] = events("claude-code", tmp_path)
    assert event.output_tokens == 7  # the final figures, not the streaming line's


def test_gemini_chats_count_each_model_message_once(tmp_path: Path) -> None:
    """A format sample of Gemini CLI 0.61's JSON lines (what the real CLI wrote, in
    test_session_logs_gemini): a message is written again whenever it changes."""
    chats = tmp_path / "proj" / "chats"
    chats.mkdir(parents=True)
    message = {"id": "m1", "timestamp": "2026-12-01T10:00:00Z", "type": "gemini", "content": "hi",
               "tokens": {"input": 100, "output": 9, "cached": 40, "thoughts": 3, "tool": 0,
                          "total": 112}, "model": "gemini-2.5-flash"}  # fmt: skip
    lines = [{"sessionId": "s1", "kind": "main"}, message, {"$set": {"lastUpdated": "x"}},
             {**message, "toolCalls": []}, {"$set": {"messages": [message]}}]  # fmt: skip
    (chats / "session-2026-12-01T10-00-s1.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in lines)
    )
    [event] = events("gemini", tmp_path)
    assert (event.input_tokens, event.output_tokens, event.cache_read_tokens) == (100, 12, 40)
    assert (event.reasoning_tokens, event.model, event.session) == (3, "gemini-2.5-flash", "s1")


@pytest.mark.slow
def test_a_gemini_cli_chat_is_imported_as_it_was_served(tmp_path: Path) -> None:
    gemini = agent_program("gemini")
    (tmp_path / ".gemini").mkdir()
    settings = {"security": {"auth": {"selectedType": "gemini-api-key"}}}
    (tmp_path / ".gemini" / "settings.json").write_text(json.dumps(settings))
    with fake_llm_in_thread() as fake:
        env = agent_env(tmp_path, GEMINI_API_KEY="test-not-a-secret",
                        GOOGLE_GEMINI_BASE_URL=fake.url, GEMINI_CLI_TRUST_WORKSPACE="true")  # fmt: skip
        done = subprocess.run(
            [gemini, "-m", "gemini-2.5-flash", "-p", "say hi"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        served = list(fake.calls)
    assert done.returncode == 0, done.stderr[-2000:]
    assert import_logs("gemini", tmp_path / ".gemini" / "tmp") == 0
    assert figures(stored_events()) == figures(served)

"""Keys on a command line are redacted before the command is recorded; the rest is kept."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwatch.core.redaction import REDACTED, redact_command

KEY = "sk-proj-Zq3vX9kLmN2pR7tW4yB8cD1f"


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["agent.py", "--api-key", KEY], ["agent.py", "--api-key", REDACTED]),
        (["agent.py", "--api-key", "hunter2"], ["agent.py", "--api-key", REDACTED]),
        (["agent.py", f"--token={KEY}"], ["agent.py", f"--token={REDACTED}"]),
        (["env", "OPENAI_API_KEY=hunter2", "x"], ["env", f"OPENAI_API_KEY={REDACTED}", "x"]),
        (["env", "DB_PASSWORD=hunter2", "x"], ["env", f"DB_PASSWORD={REDACTED}", "x"]),
        (["agent.py", KEY], ["agent.py", REDACTED]),
        (["-c", f"OpenAI(api_key='{KEY}')"], ["-c", f"OpenAI(api_key='{REDACTED}')"]),
        (
            ["fetch", "https://bob:hunter2@example.com/x"],
            ["fetch", f"https://{REDACTED}@example.com/x"],
        ),
        (["x", "ghp_" + "a1" * 18, "AKIAIOSFODNN7EXAMPLE"], ["x", REDACTED, REDACTED]),
        (["x", "0123456789abcdef0123456789abcdef01234567"], ["x", REDACTED]),
    ],
)
def test_secret_values_are_redacted(argv: list[str], shown: list[str]) -> None:
    assert redact_command(argv) == shown


@pytest.mark.parametrize(
    "argv",
    [
        ["python", "agents/coder.py", "--max-tokens", "100", "--model", "gpt-4o-mini"],
        ["uv", "run", "bot.py", "--run", "run-2026-12-05-experiment-number-42", "--bypass", "x"],
        ["node", "index.js", "--tokens-per-call=500", "MODE=fast"],
    ],
)
def test_ordinary_command_lines_are_kept_as_given(argv: list[str]) -> None:
    assert redact_command(argv) == argv


@given(
    st.lists(st.text(max_size=20)),
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", min_size=24),
    st.sampled_from(["sk-", "sk-ant-api03-", "gsk_", "hf_"]),
)
def test_a_key_never_survives_wherever_it_is(words: list[str], body: str, prefix: str) -> None:
    key = prefix + body
    for i in range(len(words) + 1):
        shown = redact_command([*words[:i], key, *words[i:]])
        assert key not in " ".join(shown)
        assert len(shown) == len(words) + 1

"""Token counting: hand-checked counts, the chat overhead rule, offline loading, async, hashes, CLI."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenwatch.cli import main as cli_main
from tokenwatch.core.tokens import (
    IMAGE_TOKENS,
    count_anthropic,
    count_messages,
    count_messages_async,
    count_responses_input,
    count_text,
    count_text_async,
    normalise_prompt,
    prompt_hash,
    prompt_hashes,
    prompt_shape_hash,
)

HELLO = [{"role": "user", "content": "hello world"}]


@pytest.mark.parametrize(
    "model", ["", "gpt-4", "gpt-3.5-turbo", "gpt-4o", "gpt-4.1-mini", "o3", "gpt-5"]
)
def test_hand_checked_strings_are_exact_for_openai_models(model: str) -> None:
    # "hello world" is 2 tokens and "tiktoken is great!" 6 in both cl100k_base and o200k_base
    assert count_text("hello world", model).tokens == 2
    great = count_text("tiktoken is great!", model)
    assert great.tokens == 6
    assert great.estimated is False
    assert count_text("", model).tokens == 0


def test_model_picks_its_encoding() -> None:
    assert count_text("x", "gpt-4").encoding == "cl100k_base"
    assert count_text("x", "gpt-4o-2024-08-06").encoding == "o200k_base"
    assert count_text("x", "openai/gpt-4o").encoding == "o200k_base"
    assert count_text("x").encoding == "cl100k_base"


@pytest.mark.parametrize(
    "model",
    ["claude-sonnet-4-5", "gemini-2.5-pro", "llama-3.1-70b", "mistral-large", "no-such-model"],
)
def test_models_without_a_public_tokenizer_are_estimated(model: str) -> None:
    count = count_text("Some ordinary English text for counting.", model)
    assert count.estimated is True
    assert count.tokens > 0


def test_special_token_text_is_counted_not_rejected() -> None:
    assert count_text("<|endoftext|>", "gpt-4").tokens > 1


def test_chat_overhead_follows_the_openai_cookbook() -> None:
    # 3 per message + "user" (1) + "hello world" (2) + 3 reply priming
    assert count_messages(HELLO, "gpt-4").tokens == 9
    named = [{"role": "user", "name": "bob", "content": "hello world"}]
    # "bob" is 1 token, plus 1 for having a name
    assert count_messages(named, "gpt-4").tokens == 11
    two = [*HELLO, {"role": "assistant", "content": "hello world"}]
    # "assistant" is 1 token: a second message costs 3 + 1 + 2
    assert count_messages(two, "gpt-4").tokens == 15


def test_content_parts_count_their_text_and_estimate_images() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}]
    assert count_messages(parts, "gpt-4") == count_messages(HELLO, "gpt-4")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with_image = [{"role": "user", "content": [{"type": "text", "text": "hello world"}, image]}]
    counted = count_messages(with_image, "gpt-4")
    assert counted.estimated is True
    assert counted.tokens == 9 + IMAGE_TOKENS


def test_tool_calls_are_counted_as_an_estimate() -> None:
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    counted = count_messages([*HELLO, call], "gpt-4o")
    assert counted.estimated is True
    assert counted.tokens > count_messages(HELLO, "gpt-4o").tokens + 3


def test_bad_messages_raise_type_error() -> None:
    with pytest.raises(TypeError):
        count_messages("hello", "gpt-4")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        count_messages(["hello"], "gpt-4")  # type: ignore[list-item]


def test_anthropic_counts_are_estimates_and_include_the_system_prompt() -> None:
    bare = count_anthropic(None, HELLO, "claude-sonnet-4-5")
    blocks = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    with_system = count_anthropic(blocks, HELLO, "claude-sonnet-4-5")
    assert bare.estimated
    assert with_system.estimated
    assert bare.tokens == 9
    assert with_system.tokens > bare.tokens
    assert count_anthropic("You are terse.", HELLO, "claude-sonnet-4-5") == with_system


def test_responses_input_counts_like_chat_messages() -> None:
    assert count_responses_input("hello world", None, "gpt-4.1") == count_messages(HELLO, "gpt-4.1")
    items = [
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "hello world"}],
        }
    ]
    assert count_responses_input(items, None, "gpt-4.1").tokens == 9
    assert count_responses_input("hello world", "Be brief.", "gpt-4.1").tokens > 9
    with pytest.raises(TypeError):
        count_responses_input(5, None)  # type: ignore[arg-type]


@settings(max_examples=200)
@given(st.text(max_size=200))
def test_count_is_bounded_by_bytes(text: str) -> None:
    count = count_text(text, "gpt-4o")
    assert 0 <= count.tokens <= len(text.encode())
    assert (count.tokens == 0) == (text == "")


MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system"]), "content": st.text(max_size=50)}
    ),
    max_size=5,
)


@settings(max_examples=100)
@given(MESSAGES, MESSAGES)
def test_messages_are_counted_independently(
    first: list[dict[str, str]], second: list[dict[str, str]]
) -> None:
    # BPE is not subadditive on raw text ("Tue" + "true" is 4 tokens, not 2), but messages are
    # tokenized one by one, so a conversation costs the sum of its parts and one reply priming.
    whole = count_messages(first + second, "gpt-4o").tokens
    parts = count_messages(first, "gpt-4o").tokens + count_messages(second, "gpt-4o").tokens
    assert whole == parts - 3


@settings(max_examples=100)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "assistant", "system"]),
                "content": st.text(max_size=50),
            }
        ),
        max_size=5,
    ),
    st.text(max_size=50),
)
def test_each_message_costs_at_least_its_overhead(
    messages: list[dict[str, str]], extra: str
) -> None:
    before = count_messages(messages, "gpt-4o").tokens
    after = count_messages([*messages, {"role": "user", "content": extra}], "gpt-4o").tokens
    assert after >= before + 4  # 3 per message + at least one for the role


def test_prompt_hash_is_stable_and_key_order_blind() -> None:
    a = [{"role": "user", "content": "hi"}]
    b = [{"content": "hi", "role": "user"}]
    assert prompt_hash(a) == prompt_hash(b)
    assert prompt_hash(a) != prompt_hash([{"role": "user", "content": "hi!"}])
    assert len(prompt_hash("secret prompt")) == 16
    assert "secret" not in prompt_hash("secret prompt")


def test_shape_hash_collides_for_near_duplicates() -> None:
    first = "Retry 3 of job 0b7e1c2a-9f7d-4c62-8d2e-5e2f5b1a9c33 at 2026-11-23T10:00:01Z, commit 3f2a9bc1d"
    second = "Retry 4 of job 7c1a0e55-0000-4c62-8d2e-aaaaaaaaaaaa at 2026-11-24T11:30:59Z, commit 77aa9bc1e"
    assert prompt_hash(first) != prompt_hash(second)
    assert prompt_shape_hash(first) == prompt_shape_hash(second)
    assert prompt_shape_hash(first) != prompt_shape_hash(first.replace("Retry", "Abort"))
    assert prompt_shape_hash([{"role": "user", "content": first}]) == prompt_shape_hash(
        [{"role": "user", "content": second}]
    )


# The placeholder passes as first written: one `re.sub` each, in order, none skipped. The shape
# hash of every stored call was made this way, so the faster `normalise_prompt` must agree.
_PLAIN_PASSES = (
    (r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", "<uuid>"),
    (r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?", "<ts>"),
    (r"\b\d{1,2}:\d{2}(?::\d{2})?\b", "<ts>"),
    (r"\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{7,}\b", "<hex>"),
    (r"\b(?:[a-z]+[_-])+[A-Za-z0-9]{12,}\b", "<id>"),
    (r"\d+(?:\.\d+)?", "<n>"),
    (r"\s+", " "),
)


def _plain_normalise(text: str) -> str:
    for pattern, placeholder in _PLAIN_PASSES:
        text = re.sub(pattern, placeholder, text)
    return text


# Pieces of what the passes replace, the characters each skipped pass depends on (digits,
# Arabic-Indic too, "-", "_", ":"), whitespace of several kinds, and any text between them.
_PIECES = st.sampled_from(
    [
        "0b7e1c2a-9f7d-4c62-8d2e-5e2f5b1a9c33",
        "deadbeef42",
        "2026-11-23",
        "T10:00:01Z",
        "+02:00",
        "9:05",
        "10:00",
        " 23:59:59.5",
        "call_",
        "req-",
        "AbCdEf123456",
        "7",
        "٣",
        ".5",
        "-",
        "_",
        ":",
        " ",
        "  ",
        "\n",
        "\t",
        "\u00a0",
        "x",
        "abcdef",
        "ABC",
    ]
)
_TRICKY = st.lists(_PIECES | st.text(max_size=6), max_size=16).map("".join)


@settings(max_examples=1500, deadline=None)
@given(_TRICKY)
def test_shape_normalising_skips_only_passes_that_cannot_match(text: str) -> None:
    assert normalise_prompt(text) == _plain_normalise(text)


def test_both_hashes_at_once_are_the_two_hashes() -> None:
    messages = [{"role": "user", "content": "Retry 3 at 10:00:01, job deadbeef42"}]
    for prompt in (messages, "plain text 12", ["a", 1]):
        assert prompt_hashes(prompt) == (prompt_hash(prompt), prompt_shape_hash(prompt))


async def test_async_counting_keeps_the_loop_ticking() -> None:
    text = "tokenwatch counts tokens without blocking. " * 100_000
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        await anyio.lowlevel.checkpoint()
        before = ticks
        blocking = count_text(text, "gpt-4o")
        during_blocking = ticks - before
        before = ticks
        threaded = await count_text_async(text, "gpt-4o")
        during_async = ticks - before
        tg.cancel_scope.cancel()
    assert threaded == blocking
    assert during_blocking == 0
    assert during_async > during_blocking


async def test_async_message_counting_matches_sync() -> None:
    small = await count_messages_async(HELLO, "gpt-4")
    big_messages = [{"role": "user", "content": "word " * 50_000}]
    big = await count_messages_async(big_messages, "gpt-4")
    assert small == count_messages(HELLO, "gpt-4")
    assert big == count_messages(big_messages, "gpt-4")


def _run_offline(code: str, env: dict[str, str], unset: tuple[str, ...] = ()) -> dict[str, object]:
    """Run `code` in a fresh interpreter whose sockets refuse to connect; return its JSON line."""
    guard = (
        "import socket, json\n"
        "attempts = []\n"
        "def refuse(self, *a, **k):\n"
        "    attempts.append(a)\n"
        "    raise OSError('network is absent in this test')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = lambda *a, **k: refuse(None, *a)\n"
    )
    done = "print(json.dumps({'result': result, 'attempts': len(attempts)}))\n"
    proc = subprocess.run(
        [sys.executable, "-c", guard + code + done],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in {**os.environ, **env}.items() if k not in unset},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


COUNT_GPT4O = (
    "from tokenwatch.core.tokens import count_text\n"
    "c = count_text('tiktoken is great!', 'gpt-4o')\n"
    "result = [c.tokens, c.estimated, c.encoding]\n"
)


def test_loading_is_offline_with_an_empty_cache(tmp_path: Path) -> None:
    out = _run_offline(COUNT_GPT4O, {"TIKTOKEN_CACHE_DIR": str(tmp_path)})
    assert out == {"result": [6, False, "o200k_base"], "attempts": 0}


def test_the_tokenizer_file_goes_to_tokenwatchs_cache_not_the_temp_dir(tmp_path: Path) -> None:
    temp, home = tmp_path / "tmp", tmp_path / "home"
    temp.mkdir()
    claude = "c = count_text('tiktoken is great!', 'claude-haiku-4-5')\nresult += [c.encoding]\n"
    out = _run_offline(
        COUNT_GPT4O + claude,  # o200k made from quicktok's vocabulary, and the offline cl100k
        {"TMPDIR": str(temp), "TOKENWATCH_HOME": str(home)},
        unset=("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"),
    )
    assert out == {"result": [6, False, "o200k_base", "cl100k_base"], "attempts": 0}
    assert list(temp.iterdir()) == [], "nothing left in the system temp dir"
    assert len(list((home / "cache" / "tiktoken").iterdir())) == 2


def test_without_a_bundled_o200k_it_falls_back_to_an_estimate(tmp_path: Path) -> None:
    hide = "import sys\nsys.modules['quicktok'] = None\n"
    out = _run_offline(hide + COUNT_GPT4O, {"TIKTOKEN_CACHE_DIR": str(tmp_path)})
    assert out == {"result": [6, True, "cl100k_base"], "attempts": 0}


def test_with_tiktokens_cache_disabled_it_falls_back_without_downloading() -> None:
    out = _run_offline(COUNT_GPT4O, {"TIKTOKEN_CACHE_DIR": ""})
    assert out == {"result": [6, True, "cl100k_base"], "attempts": 0}


def test_without_tiktoken_it_estimates_from_characters(tmp_path: Path) -> None:
    hide = "import sys\nsys.modules['tiktoken'] = None\n"
    out = _run_offline(hide + COUNT_GPT4O, {"TIKTOKEN_CACHE_DIR": str(tmp_path)})
    assert out == {"result": [5, True, "chars/4"], "attempts": 0}


def test_importing_tokens_does_not_load_tiktoken() -> None:
    code = "import sys, tokenwatch.core.tokens; print('tiktoken' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_count_cli_counts_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "prompt.txt"
    path.write_text("tiktoken is great!")
    assert cli_main(["count", str(path), "--model", "gpt-4o"]) == 0
    assert capsys.readouterr().out.strip() == "6 tokens (text, o200k_base, exact for gpt-4o)"


def test_count_cli_reads_a_chat_request_from_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    request = {"model": "claude-sonnet-4-5", "system": "Be brief.", "messages": HELLO}
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(json.dumps(request).encode())))
    assert cli_main(["count", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "messages"
    assert out["estimated"] is True
    assert out["model"] == "claude-sonnet-4-5"
    assert out["tokens"] > 9


def test_count_cli_message_list_and_text_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(HELLO))
    assert cli_main(["count", str(path), "-m", "gpt-4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 9
    assert cli_main(["count", str(path), "-m", "gpt-4", "--json", "--text"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "text"


def test_count_cli_missing_file_is_one_line_and_nonzero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["count", str(tmp_path / "absent.txt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no such file" in err


@pytest.mark.parametrize("messages", ["hi", {"role": "user"}, 3, None])
def test_count_cli_refuses_a_request_whose_messages_are_not_a_list(
    messages: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    request = json.dumps({"model": "gpt-4o", "messages": messages})
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(request.encode())))
    assert cli_main(["count"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        err
        == "tokenwatch: not a valid chat request: `messages` must be a list of message objects\n"
    )


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=15,
)


@settings(max_examples=300)
@given(JSON, JSON)
def test_any_json_counts_or_raises_type_error(messages: object, system: object) -> None:
    for count in (
        lambda: count_messages(messages, "gpt-4o"),  # type: ignore[arg-type]
        lambda: count_anthropic(system, messages, "claude-haiku-4-5"),  # type: ignore[arg-type]
        lambda: count_responses_input(messages, None, "gpt-4.1"),  # type: ignore[arg-type]
    ):
        try:
            result = count()
        except TypeError:
            continue
        assert result.tokens >= 0

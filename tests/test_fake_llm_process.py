"""`tokenwatch fake-llm` as a real process, driven by the official synchronous SDKs."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tokenwatch.demo.fake_llm import READY_LINE, fake_llm_in_thread, fake_llm_process

HELLO: list[Any] = [{"role": "user", "content": "Hello from a synchronous client."}]
KEY = "sk-test-not-a-secret"


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    with fake_llm_process("--quiet") as url:
        yield url


def counted(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(url + "/_fake/calls", timeout=30) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def last_call(url: str) -> dict[str, Any]:
    return counted(url)[-1]


def test_sync_openai_chat_and_stream(fake_url: str) -> None:
    with openai.OpenAI(base_url=fake_url + "/v1", api_key=KEY, max_retries=0) as client:
        reply = client.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert reply.usage is not None
        call = last_call(fake_url)
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
            call["input_tokens"],
            call["output_tokens"],
        )
        with client.chat.completions.create(
            model="gpt-4o", messages=HELLO, stream=True, stream_options={"include_usage": True}
        ) as stream:
            usage = [c.usage for c in stream if c.usage is not None]
        call = last_call(fake_url)
        assert [(u.prompt_tokens, u.completion_tokens) for u in usage] == [
            (call["input_tokens"], call["output_tokens"])
        ]
        assert call["stream"] is True


def test_sync_openai_embeddings_and_models(fake_url: str) -> None:
    with openai.OpenAI(base_url=fake_url + "/v1", api_key=KEY, max_retries=0) as client:
        vectors = client.embeddings.create(model="text-embedding-3-large", input="hello world")
        assert len(vectors.data[0].embedding) == 3072
        assert vectors.usage.prompt_tokens == last_call(fake_url)["input_tokens"] == 2
        assert "gpt-4o" in [m.id for m in client.models.list()]


def test_sync_anthropic_create_and_stream(fake_url: str) -> None:
    with anthropic.Anthropic(base_url=fake_url, api_key=KEY, max_retries=0) as client:
        message = client.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=HELLO)
        call = last_call(fake_url)
        assert (message.usage.input_tokens, message.usage.output_tokens) == (
            call["input_tokens"],
            call["output_tokens"],
        )
        with client.messages.stream(
            model="claude-haiku-4-5", max_tokens=100, messages=HELLO
        ) as stream:
            final = stream.get_final_message()
        assert final.usage.output_tokens == last_call(fake_url)["output_tokens"]
        assert final.content[0].text == message.content[0].text  # type: ignore[union-attr]


def test_sync_fault_header_over_the_process(fake_url: str) -> None:
    with (
        openai.OpenAI(base_url=fake_url + "/v1", api_key=KEY, max_retries=0) as client,
        pytest.raises(openai.RateLimitError),
    ):
        client.chat.completions.create(
            model="gpt-4o", messages=HELLO, extra_headers={"x-fake-llm-fault": "429"}
        )
    assert last_call(fake_url)["status"] == 429


def test_in_thread_server_for_sync_tests() -> None:
    with (
        fake_llm_in_thread() as fake,
        openai.OpenAI(base_url=fake.url + "/v1", api_key=KEY, max_retries=0) as client,
    ):
        reply = client.chat.completions.create(model="gpt-4.1-mini", messages=HELLO)
        assert reply.usage is not None
        assert [c.input_tokens for c in fake.calls] == [reply.usage.prompt_tokens]


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tokenwatch", "fake-llm", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_exits_cleanly_and_never_logs_keys(sig: signal.Signals) -> None:
    proc = start("--port", "0")
    assert proc.stdout is not None
    ready = proc.stdout.readline().strip()
    match = READY_LINE.match(ready)
    assert match, ready
    with openai.OpenAI(base_url=match.group(1) + "/v1", api_key=KEY, max_retries=0) as client:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == ""  # the ready line is the only thing on stdout
    assert "/v1/chat/completions 200" in err
    assert KEY not in err
    assert "Traceback" not in err


def test_port_in_use_is_one_line_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = start("--port", str(port))
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert out == ""
    assert err.startswith(f"tokenwatch: cannot listen on 127.0.0.1:{port}")
    assert err.count("\n") == 1


def test_bad_flag_values_are_rejected() -> None:
    proc = start("--fail-status", "200")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip() == "tokenwatch: --fail-status must be an HTTP error status (400-599)"


def test_help_lists_the_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tokenwatch", "fake-llm", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    for flag in ("--host", "--port", "--latency-ms", "--chunk-ms", "--fail-every", "--cut-every"):
        assert flag in out
    assert "x-fake-llm-fault" in out

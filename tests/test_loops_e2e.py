"""A tool loop caught end to end: a real agent under `tokenwatch run`, the official SDK calling
fake-llm through the proxy, the default rules pausing the agent's process on its third repeat."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from process_fixtures import state_soon
from supervisor_fixtures import ServeProcess, clean_supervisor

from tokenwatch.demo.fake_llm import fake_llm_in_thread

TIMEOUT = 60

# The tool's only argument is an enum, so fake-llm answers with the same call every time.
OPENAI_LOOP = """
import os, openai
client = openai.OpenAI(api_key="dummy", max_retries=0)
tools = [{"type": "function", "function": {"name": "search_files", "parameters": {
    "type": "object", "properties": {"pattern": {"type": "string", "enum": ["payment*.yaml"]}}}}}]
messages = [{"role": "system", "content": "You are a coder."},
            {"role": "user", "content": "Find the payment config."}]
print(os.getpid(), flush=True)
for _ in range(40):
    answer = client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, tools=tools, tool_choice="required")
    message = answer.choices[0].message
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "no files found"})
"""

ANTHROPIC_LOOP = """
import os, anthropic
client = anthropic.Anthropic(api_key="dummy", max_retries=0)
tools = [{"name": "search_files", "input_schema": {
    "type": "object", "properties": {"pattern": {"type": "string", "enum": ["payment*.yaml"]}}}}]
messages = [{"role": "user", "content": "Find the payment config."}]
print(os.getpid(), flush=True)
for _ in range(40):
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=200, messages=messages,
                                tools=tools, tool_choice={"type": "any"}) as stream:
        answer = stream.get_final_message()
    messages.append({"role": "assistant", "content": [b.model_dump() for b in answer.content]})
    messages.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": b.id, "content": "no files found"}
        for b in answer.content if b.type == "tool_use"]})
"""


@pytest.fixture(scope="module")
def supervisor() -> Iterator[ServeProcess]:
    """`tokenwatch serve` with no [[rule]]: the default rules."""
    with clean_supervisor("twl-") as sp:
        yield sp


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "script", "base"),
    [("chat-coder", OPENAI_LOOP, "OPENAI_BASE_URL"), ("claude-coder", ANTHROPIC_LOOP, "")],
)
def test_a_tool_loop_is_paused_on_its_third_repeat_through_the_proxy(
    supervisor: ServeProcess, name: str, script: str, base: str
) -> None:
    with fake_llm_in_thread() as fake:
        url = fake.url + "/v1" if base else fake.url
        env = {**supervisor.env, base or "ANTHROPIC_BASE_URL": url}
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenwatch", "run", "--name", name, "--",
             sys.executable, "-c", script],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            assert proc.stderr is not None
            agent_pid = int(proc.stdout.readline())
            told = proc.stderr.readline()  # on the terminal once the agent is held
            assert state_soon(agent_pid, "T") == "T"
            calls = len(fake.calls)
            kill = [sys.executable, "-m", "tokenwatch", "kill", name]
            assert subprocess.run(kill, env=supervisor.env, timeout=TIMEOUT).returncode == 0
            proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    assert told == (
        f"tokenwatch: {name} paused by rule:tool-loop: {name} called "
        f'search_files(pattern="payment*.yaml") 3 times in a row, same result; paused '
        f"(`tokenwatch resume {name}` to go on)\n"
    )
    # The 4th call carried the 3rd repeat (the first carries none); later ones may have been on
    # their way while the pause landed, and held ones never reach fake-llm.
    assert 4 <= calls < 40

"""Python children started with child_env() report their openai calls without code changes."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from tests.client_fixtures import FakeSupervisor, running_supervisor
from tokenwatch.client.autoinstrument import child_env
from tokenwatch.demo.fake_llm import FakeLLM, running_fake_llm

AGENT = """
import json, os, sys
import openai
client = openai.OpenAI(base_url=os.environ["FAKE_URL"] + "/v1", api_key="sk-test", max_retries=0)
reply = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "hello from a child"}]
)
print(json.dumps({"pid": os.getpid(), "prompt_tokens": reply.usage.prompt_tokens}))
"""

NOT_AN_AGENT = """
import json, sys
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("tokenwatch", "openai"))))
"""


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    async with running_fake_llm() as server:
        yield server


@pytest.fixture
async def sup(short_tmp: Path) -> AsyncIterator[FakeSupervisor]:
    async with running_supervisor(short_tmp / "sup.sock") as server:
        yield server


async def run_child(code: str, env: dict[str, str], tmp: Path) -> str:
    script = tmp / "agent.py"
    await anyio.Path(script).write_text(code)
    with anyio.fail_after(60):
        done = await anyio.run_process([sys.executable, str(script)], env=env, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def agent_env(sup: FakeSupervisor, fake: FakeLLM) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TOKENWATCH_SOCKET=str(sup.path), TOKENWATCH_AGENT="child-agent", FAKE_URL=fake.url)
    return env


@pytest.mark.slow
async def test_child_reports_without_code_changes(
    fake: FakeLLM, sup: FakeSupervisor, short_tmp: Path
) -> None:
    out = json.loads(await run_child(AGENT, child_env(agent_env(sup, fake)), short_tmp))
    await sup.wait_until(lambda: len(sup.events()) == 1)
    (hello,) = sup.of_type("hello")
    assert (hello["name"], hello["pid"]) == ("child-agent", out["pid"])
    (event,) = sup.events()
    billed = fake.calls[-1]
    assert (event["input_tokens"], event["output_tokens"]) == (
        billed.input_tokens,
        billed.output_tokens,
    )
    assert event["input_tokens"] == out["prompt_tokens"]
    assert (event["agent"], event["pid"]) == ("child-agent", out["pid"])


@pytest.mark.slow
async def test_existing_sitecustomize_still_runs(
    fake: FakeLLM, sup: FakeSupervisor, short_tmp: Path
) -> None:
    theirs = short_tmp / "theirs"
    await anyio.Path(theirs).mkdir()
    marker = short_tmp / "marker"
    await anyio.Path(theirs / "sitecustomize.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
    )
    env = agent_env(sup, fake)
    env["PYTHONPATH"] = str(theirs)
    await run_child(AGENT, child_env(env), short_tmp)
    await sup.wait_until(lambda: len(sup.events()) == 1)
    assert await anyio.Path(marker).read_text() == "ran"


@pytest.mark.slow
async def test_child_that_never_imports_openai_loads_nothing(
    fake: FakeLLM, sup: FakeSupervisor, short_tmp: Path
) -> None:
    loaded = json.loads(await run_child(NOT_AN_AGENT, child_env(agent_env(sup, fake)), short_tmp))
    assert loaded == []
    assert sup.connections == 0


def test_child_env_is_idempotent_and_keeps_the_users_path() -> None:
    once = child_env({"PYTHONPATH": "/opt/mine", "HOME": "/h"})
    twice = child_env(once)
    assert twice == once
    parts = once["PYTHONPATH"].split(os.pathsep)
    assert parts[1:] == ["/opt/mine"]
    assert (Path(parts[0]) / "sitecustomize.py").is_file()
    assert (Path(once["TOKENWATCH_CLIENT_PATH"]) / "tokenwatch" / "client").is_dir()

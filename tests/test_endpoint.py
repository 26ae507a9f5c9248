"""The stable endpoint as a user meets it: a fixed loopback port with no route token, each call
attributed to the calling process's supervised ancestor, else to a new agent named after its
program (which pause and kill then reach); the same Host and loopback rules as the proxy."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.coding_agent_fixtures import agent_env, agent_program, assert_recorded_exactly, run_agent
from tests.process_fixtures import state_soon
from tests.supervisor_fixtures import ServeProcess, ask, supervisor_process, tokenwatch_env
from tokenwatch.demo.fake_llm import fake_llm_in_thread

TIMEOUT = 60
API_KEY = "sk-test-not-a-secret"
OPENAI_CALL = f"""
import os, openai
client = openai.OpenAI(base_url=os.environ["TOKENWATCH_ENDPOINT"] + "/v1", api_key="{API_KEY}",
                       max_retries=0)
reply = client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{{"role": "user", "content": "hi"}}])
print(reply.usage.total_tokens, flush=True)
"""
LOOPING_CALLER = f"""
import os, sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="{API_KEY}", max_retries=0)
for line in sys.stdin:
    reply = client.chat.completions.create(model="gpt-4o-mini",
                                           messages=[{{"role": "user", "content": "hi"}}])
    print(reply.usage.total_tokens, flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fake() -> Iterator[Any]:
    with fake_llm_in_thread() as server:
        yield server


@pytest.fixture(scope="module")
def supervisor(fake: Any) -> Iterator[ServeProcess]:
    """`tokenwatch serve` with its stable endpoint on a free port, upstreams on fake-llm."""
    home = Path(tempfile.mkdtemp(prefix="twe-"))
    config = home / "endpoint.toml"
    config.write_text(
        f'[proxy]\nopenai_upstream = "{fake.url}/v1"\nanthropic_upstream = "{fake.url}"\n'
    )
    env = tokenwatch_env(home, TOKENWATCH_ENDPOINT_PORT=str(free_port()))
    for var in ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "TOKENWATCH_SOCKET", "TOKENWATCH_AGENT"):
        env.pop(var, None)
    try:
        with supervisor_process(env, "--config", str(config)) as sp:
            yield sp
    finally:
        shutil.rmtree(home, ignore_errors=True)


def endpoint(sp: ServeProcess) -> str:
    url = str(ask(sp, "status")["supervisor"]["endpoint_url"])
    assert url.startswith("http://127.0.0.1:"), url
    return url


def agents(sp: ServeProcess) -> dict[str, dict[str, Any]]:
    return {row["agent"]["name"]: row["agent"] for row in ask(sp, "status")["agents"]}


def recorded(sp: ServeProcess, name: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + TIMEOUT
    while len(calls := ask(sp, "history", agent=name)["calls"]) < count:
        assert time.monotonic() < deadline, f"{name}: {len(calls)} calls of {count}"
        time.sleep(0.05)  # the ledger commits a moment after the call is counted
    return list(calls)


def tokenwatch(sp: ServeProcess, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenwatch", *args], env={**sp.env, **env},
        capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.slow
def test_a_grandchild_of_a_run_agent_calling_the_endpoint_counts_for_that_agent(
    supervisor: ServeProcess, fake: Any
) -> None:
    # run -> python (the agent) -> sh -> python with the openai SDK on the stable endpoint
    parent = f"import subprocess, sys; subprocess.run(['sh', '-c', {sys.executable!r} + ' -c \"$0\"; true', sys.argv[1]], check=True)"
    before = len(fake.calls)
    done = tokenwatch(
        supervisor, "run", "--name", "boss", "--", sys.executable, "-c", parent, OPENAI_CALL,
        OPENAI_BASE_URL=fake.url + "/v1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    bill = fake.calls[before]
    total = bill.input_tokens + bill.output_tokens
    assert done.stdout.split() == [str(total)]
    assert f"boss exited 0 · {total:,} tokens" in done.stderr
    [call] = recorded(supervisor, "boss", 1)
    assert (call["input_tokens"], call["output_tokens"]) == (bill.input_tokens, bill.output_tokens)


DOUBLE_FORK = """
import os, subprocess, sys, time
if os.fork() == 0:  # the caller leaves the agent's tree: its parent exits, init adopts it
    os.setsid()
    if os.fork() == 0:
        subprocess.run([sys.executable, "-c", sys.argv[1]])
    os._exit(0)
os.wait()
while not os.path.exists(sys.argv[2]):  # the agent lives until the call is answered
    time.sleep(0.02)
"""


@pytest.mark.slow
def test_a_caller_that_left_the_run_agents_tree_still_counts_for_it(
    supervisor: ServeProcess, fake: Any, tmp_path: Path
) -> None:
    out = tmp_path / "answer"
    call = OPENAI_CALL.replace(
        "print(reply.usage.total_tokens, flush=True)",
        f"open({str(out)!r}, 'w').write(str(reply.usage.total_tokens))",
    )
    before = len(fake.calls)
    done = tokenwatch(
        supervisor, "run", "--name", "forker", "--", sys.executable, "-c", DOUBLE_FORK,
        call, str(out), OPENAI_BASE_URL=fake.url + "/v1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    bill = fake.calls[before]
    assert out.read_text() == str(bill.input_tokens + bill.output_tokens)
    [call_seen] = recorded(supervisor, "forker", 1)
    assert call_seen["output_tokens"] == bill.output_tokens
    assert not [name for name in agents(supervisor) if name.startswith("python")]


@pytest.mark.slow
def test_curl_outside_tokenwatch_becomes_an_agent_named_after_it(
    supervisor: ServeProcess, fake: Any
) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed for this test"
    body = {"model": "claude-haiku-4-5", "max_tokens": 50,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    before = len(fake.calls)
    done = subprocess.run(
        [curl, "-sS", endpoint(supervisor) + "/v1/messages", "-H", f"x-api-key: {API_KEY}",
         "-H", "anthropic-version: 2023-06-01", "-H", "content-type: application/json",
         "-d", json.dumps(body)],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["type"] == "message"
    bill = fake.calls[before]
    [call] = recorded(supervisor, "curl", 1)
    assert (call["provider"], call["input_tokens"], call["output_tokens"]) == (
        "anthropic", bill.input_tokens, bill.output_tokens,
    )  # fmt: skip


@pytest.mark.slow
def test_a_program_outside_tokenwatch_is_shown_with_its_pid_and_can_be_paused(
    supervisor: ServeProcess, tmp_path: Path
) -> None:
    script = tmp_path / "looper.py"
    script.write_text(LOOPING_CALLER)
    proc = subprocess.Popen(
        [sys.executable, str(script), endpoint(supervisor)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert int(proc.stdout.readline()) > 0
        shown = agents(supervisor)["looper"]
        assert (shown["pid"], shown["state"]) == (proc.pid, "running")
        paused = tokenwatch(supervisor, "pause", "looper")
        assert paused.returncode == 0, paused.stderr
        assert state_soon(proc.pid, "T") == "T"  # stopped, as `tokenwatch attach` does
        assert agents(supervisor)["looper"]["state"] == "paused"
        killed = tokenwatch(supervisor, "kill", "looper")
        assert killed.returncode == 0, killed.stderr
        assert proc.wait(TIMEOUT) < 0
    finally:
        proc.kill()
        proc.wait()
    assert len(recorded(supervisor, "looper", 1)) == 1


def test_the_endpoint_checks_the_host_header(supervisor: ServeProcess, fake: Any) -> None:
    before = len(fake.calls)
    url = endpoint(supervisor)
    done = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", url + "/v1/chat/completions",
         "-H", "Host: evil.example", "-H", "content-type: application/json", "-d", "{}"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.stdout == "403"
    assert len(fake.calls) == before
    assert "evil" not in " ".join(agents(supervisor)), "no agent for a refused request"


def test_the_endpoint_listens_on_loopback_only(supervisor: ServeProcess) -> None:
    port = int(endpoint(supervisor).rsplit(":", 1)[1])
    listening = [
        line.split()[1]
        for name in ("tcp", "tcp6")
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        if line.split()[3] == "0A" and line.split()[1].endswith(f":{port:04X}")
    ]
    assert listening, "nothing listens on the endpoint's port"
    loopback = {"0100007F", "00000000000000000000000001000000"}
    assert {address.split(":")[0] for address in listening} <= loopback


def test_a_taken_endpoint_port_is_one_log_line_and_an_alert(short_tmp: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = tokenwatch_env(short_tmp, TOKENWATCH_ENDPOINT_PORT=str(port))
        with supervisor_process(env) as sp:
            info = ask(sp, "status")["supervisor"]
            deadline = time.monotonic() + TIMEOUT
            alerts = ask(sp, "alerts")
            while "endpoint" not in [a["rule"] for a in alerts]:
                assert time.monotonic() < deadline, alerts
                time.sleep(0.05)
                alerts = ask(sp, "alerts")
            assert info["proxy_url"], "the routed proxy serves all the same"
            assert info["endpoint_url"] == ""
    lines = [line for line in sp.output().splitlines() if "stable endpoint could not" in line]
    assert len(lines) == 1, sp.output()
    assert f"port {port}" in lines[0]
    assert [a["rule"] for a in alerts if a["rule"] == "endpoint"] == ["endpoint"]


def codex_command_lines(seen: list[str], stop: threading.Event) -> None:
    """Every command line that gives Codex tokenwatch's provider, as `ps` shows it, until `stop`."""
    while not stop.is_set():
        for entry in Path("/proc").iterdir():
            try:
                line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "model_providers.tokenwatch.base_url" in line and line not in seen:
                seen.append(line)
        time.sleep(0.02)


@pytest.mark.slow
def test_codex_under_run_calls_the_endpoint_with_no_route_token_in_ps(
    supervisor: ServeProcess, fake: Any, short_tmp: Path
) -> None:
    codex = agent_program("codex")
    seen: list[str] = []
    stop = threading.Event()
    watcher = threading.Thread(target=codex_command_lines, args=(seen, stop), daemon=True)
    watcher.start()
    before = len(fake.calls)
    try:
        done = run_agent(
            supervisor, short_tmp, "codex-stable",
            [codex, "exec", "--skip-git-repo-check", "-m", "gpt-4o-mini", "say hi"],
            OPENAI_BASE_URL=fake.url + "/v1", OPENAI_API_KEY=API_KEY,
        )  # fmt: skip
    finally:
        stop.set()
        watcher.join()
    served = fake.calls[before:]
    assert done.returncode == 0, done.stderr[-2000:]
    assert_recorded_exactly(supervisor, "codex-stable", served)
    assert seen, "Codex was given no provider of tokenwatch's"
    assert all(endpoint(supervisor) + "/v1" in line and "/a/" not in line for line in seen), seen


@pytest.mark.slow
def test_claude_code_outside_tokenwatch_is_shown_as_claude_and_recorded_exactly(
    supervisor: ServeProcess, fake: Any, short_tmp: Path
) -> None:
    claude = agent_program("claude")
    before = len(fake.calls)
    env = agent_env(supervisor.env, short_tmp, ANTHROPIC_BASE_URL=endpoint(supervisor),
                    ANTHROPIC_API_KEY="sk-ant-test-not-a-secret")  # fmt: skip
    done = subprocess.run(
        [claude, "-p", "--model", "claude-haiku-4-5", "say hi"], env=env, cwd=short_tmp,
        capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    served = fake.calls[before:]
    assert done.returncode == 0, done.stderr[-2000:]
    names = [name for name in agents(supervisor) if name.startswith("claude")]
    assert names == ["claude"], names
    assert_recorded_exactly(supervisor, "claude", served)

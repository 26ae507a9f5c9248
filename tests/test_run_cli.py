"""`tokenwatch run` and `tokenwatch attach` as a user runs them, against a real supervisor."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.process_fixtures import Terminal, dead, start_as_nobody, state, state_soon
from tests.supervisor_fixtures import (
    ServeProcess,
    clean_supervisor,
    stop_serve,
    supervisor_process,
    tokenwatch_env,
)
from tokenwatch.cli.run import default_name, summary_line
from tokenwatch.client.control import SupervisorClient
from tokenwatch.core.quantities import parse_amount
from tokenwatch.demo.fake_llm import fake_llm_in_thread
from tokenwatch.demo.fault_load import RETRIED_CALLS
from tokenwatch.process.processes import process_info

TIMEOUT = 60


@pytest.fixture(scope="module")
def supervisor() -> Iterator[ServeProcess]:
    """One `tokenwatch serve` for the module (each test uses agent names of its own)."""
    with clean_supervisor("twr-") as sp:
        yield sp


def tokenwatch(
    sp: ServeProcess, *args: str, input: bytes | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenwatch", *args],
        env={**sp.env, **env},
        input=input.decode() if input is not None else None,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def status_of(sp: ServeProcess, name: str) -> dict[str, Any]:
    """The agent's row in the supervisor's status (asked in-process: a CLI start costs seconds)."""

    async def fetch() -> Any:
        async with await SupervisorClient.connect(sp.paths, start=False) as client:
            return await client.request("status")

    rows = [row for row in anyio.run(fetch)["agents"] if row["agent"]["name"] == name]
    assert rows, f"{name} is not in the status"
    return rows[-1]  # type: ignore[no-any-return]


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.parametrize(
    ("script", "code", "note"),
    [("exit 0", 0, ""), ("exit 3", 3, ""), ("kill -TERM $$", 128 + 15, " (SIGTERM)")],
)
def test_exits_with_the_agents_exit_code(
    supervisor: ServeProcess, script: str, code: int, note: str
) -> None:
    name = f"exit-{code}"
    out = tokenwatch(supervisor, "run", "--name", name, "--", "sh", "-c", script)
    assert out.returncode == code
    lines = out.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"tokenwatch: {name} exited {code}{note} · 0 tokens")
    assert status_of(supervisor, name)["agent"]["exit_code"] == code


def test_stdin_and_stdout_pass_straight_through(supervisor: ServeProcess) -> None:
    out = tokenwatch(
        supervisor,
        "run",
        "-q",
        "--",
        *py("import sys; sys.stdout.write(sys.stdin.read().upper())"),
        input=b"line one\nline two\n",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "LINE ONE\nLINE TWO\n"
    assert out.stderr == ""


SHOW_ENV = (
    "import json, os; print(json.dumps({'pid': os.getpid(), "
    "'env': {k: v for k, v in os.environ.items() if k.startswith(('TOKENWATCH_', 'OPENAI_', "
    "'ANTHROPIC_', 'PYTHONPATH'))}}))"
)


def test_the_agent_gets_the_supervisors_environment(supervisor: ServeProcess) -> None:
    out = tokenwatch(
        supervisor, "run", "-q", "--name", "envy", "--task", "t-42", "--tag", "team=ml", "--",
        *py(SHOW_ENV),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    env = seen["env"]
    row = status_of(supervisor, "envy")
    assert env["TOKENWATCH_AGENT"] == "envy"
    assert env["TOKENWATCH_RUN_ID"] == row["agent"]["run_id"] != ""
    assert env["TOKENWATCH_SOCKET"] == str(supervisor.paths.socket)
    assert env["TOKENWATCH_TASK"] == "t-42"
    assert row["agent"]["pid"] == seen["pid"]
    assert row["agent"]["tags"] == {"team": "ml"}
    assert env["OPENAI_BASE_URL"].startswith(env["TOKENWATCH_PROXY_URL"])
    assert env["ANTHROPIC_BASE_URL"].startswith(env["TOKENWATCH_PROXY_URL"])
    assert "autoinstrument" in env["PYTHONPATH"].split(os.pathsep)[0]


OPENAI_CALL = """
import openai
client = openai.OpenAI(api_key="sk-test-not-a-secret", max_retries=0)
reply = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "count my tokens"}])
print(reply.usage.total_tokens)
"""


@pytest.mark.slow
def test_an_agents_openai_calls_are_counted_once_through_the_proxy(
    supervisor: ServeProcess,
) -> None:
    from tokenwatch.demo.fake_llm import fake_llm_in_thread

    with fake_llm_in_thread() as fake:
        out = tokenwatch(
            supervisor, "run", "--name", "caller", "--", *py(OPENAI_CALL),
            OPENAI_BASE_URL=fake.url + "/v1",
        )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert len(fake.calls) == 1
    billed = fake.calls[0].input_tokens + fake.calls[0].output_tokens
    assert int(out.stdout) == billed
    assert f"caller exited 0 · {billed:,} tokens · $" in out.stderr
    assert out.stderr.rstrip().endswith("· 1 request")


CATCH = """
import os, signal, sys, time
def caught(sig, frame):
    print(f"child got {signal.Signals(sig).name}", flush=True)
    sys.exit(7)
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, caught)
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(0.05)
"""


def kill_if_running(pid: int, marker: str) -> None:
    """SIGKILL `pid` if it is still the process whose command line holds `marker`."""
    try:
        if marker in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
            os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
def test_signals_to_tokenwatch_run_reach_the_agent(
    supervisor: ServeProcess, sig: signal.Signals, paused: bool
) -> None:
    name = f"catch-{sig.name.lower()}-{paused}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenwatch", "run", "-q", "--name", name, "--", *py(CATCH)],
        env=supervisor.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as a shell starts a job: a signal the test runner ignores (SIGINT when run in the
        # background) would rightly stay ignored by tokenwatch run, and not be forwarded
        preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL),
    )
    child = 0
    try:
        assert proc.stdout is not None
        ready, child_pid = proc.stdout.readline().split()
        assert ready == "ready"
        child = int(child_pid)
        if paused:  # held by tokenwatch: a CI timeout or a closed terminal must still end it
            assert tokenwatch(supervisor, "pause", name).returncode == 0
            assert state_soon(child, "T") == "T"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if child:
            kill_if_running(child, "def caught")  # never left behind, whatever failed
    assert out == f"child got {sig.name}\n"
    assert proc.returncode == 7, err


def test_names_are_unique_among_live_agents(supervisor: ServeProcess) -> None:
    first = subprocess.Popen(
        [sys.executable, "-m", "tokenwatch", "run", "-q", "--name", "twin", "--", *py(
            "import os, sys; print(os.environ['TOKENWATCH_AGENT'], flush=True); sys.stdin.read()"
        )],
        env=supervisor.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert first.stdout is not None
        assert first.stdout.readline() == "twin\n"
        second = tokenwatch(supervisor, "run", "-q", "--name", "twin", "--", *py(SHOW_ENV))
        assert json.loads(second.stdout)["env"]["TOKENWATCH_AGENT"] == "twin-2"
    finally:
        first.communicate(timeout=TIMEOUT)
    assert first.returncode == 0


def test_a_missing_command_is_one_line_and_exit_127(supervisor: ServeProcess) -> None:
    out = tokenwatch(supervisor, "run", "--name", "ghost", "--", "no-such-agent-cmd")
    assert out.returncode == 127
    assert out.stderr == "tokenwatch: no-such-agent-cmd: command not found\n"
    assert status_of(supervisor, "ghost")["agent"]["exit_code"] == 127


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tag", "oops", "--", "true"], "--tag 'oops': expected KEY=VALUE"),
        (["--budget", "lots", "--", "true"], "--budget: not a limit"),
        (
            ["--budget", "5", "--", "true"],
            "--budget: '5' has no unit: did you mean 5k (5,000 tokens) or $5",
        ),
        ([], "nothing to run"),
        (["--", ""], "nothing to run"),
    ],
)
def test_bad_options_are_one_line_and_run_nothing(
    supervisor: ServeProcess, args: list[str], message: str
) -> None:
    out = tokenwatch(supervisor, "run", *args)
    assert out.returncode == 2
    assert out.stderr.startswith(f"tokenwatch: {message}")
    assert out.stderr.count("\n") == 1


def test_without_a_supervisor_run_fails_unless_unsupervised(short_tmp: Path) -> None:
    unusable = short_tmp / "not-a-dir"
    unusable.write_text("")
    env = {**os.environ, "TOKENWATCH_HOME": str(unusable)}
    cmd = [sys.executable, "-m", "tokenwatch", "run", "--name", "solo"]
    out = subprocess.run(
        [*cmd, "--", "sh", "-c", "echo ran; exit 4"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 125
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1
    assert "--unsupervised" in out.stderr

    out = subprocess.run(
        [*cmd, "--unsupervised", "--", "sh", "-c", "echo ran; exit 4"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 4
    assert out.stdout == "ran\n"
    assert out.stderr.splitlines()[0].startswith("tokenwatch: running unsupervised:")
    assert out.stderr.splitlines()[1] == "tokenwatch: solo exited 4"


def test_attach_then_pause_and_kill_by_name(supervisor: ServeProcess) -> None:
    sleeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        out = tokenwatch(supervisor, "attach", str(sleeper.pid), "--name", "napper")
        assert out.returncode == 0, out.stderr
        assert "napper" in out.stdout
        assert status_of(supervisor, "napper")["agent"]["pid"] == sleeper.pid

        assert tokenwatch(supervisor, "pause", "napper").returncode == 0
        assert state_soon(sleeper.pid, "T") == "T"
        assert tokenwatch(supervisor, "kill", "napper").returncode == 0
        assert sleeper.wait(TIMEOUT) == -signal.SIGTERM
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_attach_errors_are_one_line(supervisor: ServeProcess) -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    out = tokenwatch(supervisor, "attach", str(pid_max + 1))
    assert (out.returncode, out.stderr) == (1, f"tokenwatch: no process with pid {pid_max + 1}\n")

    out = tokenwatch(supervisor, "attach", "1")
    assert out.returncode == 1
    assert out.stderr.startswith("tokenwatch: pid 1 ")
    assert out.stderr.count("\n") == 1


def test_attach_refuses_another_users_process(supervisor: ServeProcess) -> None:
    if os.getuid() != 0:
        pytest.skip("starting a process as nobody needs root")
    other = start_as_nobody()
    try:
        out = tokenwatch(supervisor, "attach", str(other.pid))
        assert out.returncode == 1
        assert out.stderr == (
            f"tokenwatch: pid {other.pid} belongs to another user "
            f"(uid {process_info(other.pid).uid}), not to you\n"
        )
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize(
    ("command", "name"),
    [
        (["python3", "agents/coder.py", "--fast"], "coder"),
        (["/usr/bin/python3.11", "-u", "bot.py"], "bot"),
        (["python", "-m", "pkg.researcher"], "pkg.researcher"),
        (["python3", "-c", "print(1)"], "python3"),
        (["uv", "run", "triage.py"], "triage"),
        (["env", "A=1", "node", "server.js"], "server"),
        (["claude"], "claude"),
        (["./my agent!"], "my-agent"),
    ],
)
def test_default_names_are_recognisable(command: list[str], name: str) -> None:
    assert default_name(command) == name


def test_summary_line_reads_like_the_docs() -> None:
    summary = {
        "tokens": 12345,
        "cost_usd": 0.0123,
        "requests": 7,
        "actions": ["paused by rule:runaway"],
    }
    assert summary_line("coder", 0, summary) == (
        "coder exited 0 · 12,345 tokens · $0.0123 · 7 requests · paused by rule:runaway"
    )
    assert summary_line("coder", 130, None) == "coder exited 130 (SIGINT)"


def test_summary_line_marks_a_cost_holding_estimated_prices() -> None:
    summary = {
        "tokens": 63275,
        "cost_usd": 0.1,
        "requests": 3,
        "unpriced_requests": 2,
        "estimated_from": "claude-opus-4-5",
    }
    assert summary_line("claude3", 0, summary) == (
        "claude3 exited 0 · 63,275 tokens · $0.1000* (2 calls price: estimated from "
        "claude-opus-4-5) · 3 requests"
    )


ON_A_TERMINAL = """
import os, signal, sys, time
def foreground():
    return os.tcgetpgrp(0) == os.getpgrp()
def caught(sig, frame):
    print(f"got SIGINT foreground={foreground()}", flush=True)
    sys.exit(7)
signal.signal(signal.SIGINT, caught)
signal.signal(signal.SIGCONT, lambda *_: print(f"continued foreground={foreground()}", flush=True))
print(f"ready foreground={foreground()}", flush=True)
while True:
    time.sleep(0.05)
"""


@pytest.mark.slow
def test_on_a_terminal_ctrl_z_and_ctrl_c_behave_as_without_tokenwatch(
    supervisor: ServeProcess, short_tmp: Path
) -> None:
    argv = [sys.executable, "-m", "tokenwatch", "run", "-q", "--", *py(ON_A_TERMINAL)]
    term = Terminal(short_tmp, argv, supervisor.env)
    try:
        term.read_until("ready foreground=True")
        term.type(b"\x1a")  # Ctrl-Z: the job stops as a whole, the shell sees it
        assert term.event() == {"stopped": signal.SIGTSTP}
        term.read_until("continued foreground=True")  # the shell's `fg` reached the agent
        term.type(b"\x03")
        term.read_until("got SIGINT foreground=True")
        assert term.event() == {"exited": 7}
    finally:
        term.close()


@pytest.mark.slow
def test_no_ctrl_z_is_lost_while_the_agent_is_duty_cycled(
    supervisor: ServeProcess, short_tmp: Path
) -> None:
    argv = [sys.executable, "-m", "tokenwatch", "run", "-q", "--name", "cycled", "--"]
    term = Terminal(short_tmp, [*argv, *py(ON_A_TERMINAL)], supervisor.env)
    try:
        term.read_until("ready foreground=True")
        assert tokenwatch(supervisor, "throttle", "cycled", "50%").returncode == 0
        stops = []
        for _ in range(6):  # 0.37 s apart: some land while the cycle has the agent stopped
            time.sleep(0.37)
            term.type(b"\x1a")
            stops.append(term.event(timeout=10))  # the mini shell then does `fg`
    finally:
        term.close()
    assert stops == [{"stopped": signal.SIGTSTP}] * 6


def test_the_supervisor_pauses_and_kills_a_run_agent_by_name(supervisor: ServeProcess) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenwatch", "run", "--name", "looper", "--", *py(
            "import os, time; print(os.getpid(), flush=True); time.sleep(600)"
        )],
        env=supervisor.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        agent_pid = int(proc.stdout.readline())
        assert status_of(supervisor, "looper")["agent"]["pid"] == agent_pid
        assert tokenwatch(supervisor, "pause", "looper").returncode == 0
        assert state_soon(agent_pid, "T") == "T"
        assert state(proc.pid) != "T", "tokenwatch run itself is not part of the agent's tree"
        assert proc.stderr is not None
        told = proc.stderr.readline()  # on the terminal while the agent is held
        assert tokenwatch(supervisor, "kill", "looper").returncode == 0
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    summary = err.splitlines()[-1]
    assert told == "tokenwatch: looper paused by cli (`tokenwatch resume looper` to go on)\n"
    assert summary.startswith("tokenwatch: looper exited 143 (SIGTERM) · 0 tokens")
    assert "paused by cli" in summary
    assert "killed by cli" in summary


@settings(max_examples=200)
@given(st.lists(st.text(min_size=0, max_size=30), min_size=1, max_size=6))
def test_a_default_name_is_always_a_valid_agent_name(command: list[str]) -> None:
    assert re.fullmatch(r"[A-Za-z0-9._@:+-]{1,64}", default_name(command))


POST_CHAT = """
import json, os, urllib.error, urllib.request
body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
request = urllib.request.Request(
    os.environ["OPENAI_BASE_URL"] + "/chat/completions", data=body.encode(),
    headers={"content-type": "application/json", "authorization": "Bearer sk-test"})
try:
    urllib.request.urlopen(request, timeout=30)
    print("sent")
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode())
"""


def test_a_run_budget_refuses_calls_that_would_exceed_it(supervisor: ServeProcess) -> None:
    out = tokenwatch(supervisor, "run", "-q", "--name", "frugal", "--budget", "30tokens", "--",
                     *py(POST_CHAT))  # fmt: skip
    assert out.returncode == 0, out.stderr
    status, _, body = out.stdout.partition(" ")
    assert status == "429"
    assert "run:frugal" in body


CALL_PER_LINE = """
import json, os, urllib.error, urllib.request
body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
request = urllib.request.Request(
    os.environ["OPENAI_BASE_URL"] + "/chat/completions", data=body.encode(),
    headers={"content-type": "application/json", "authorization": "Bearer sk-test"})
for line in iter(input, "done"):
    try:
        urllib.request.urlopen(request, timeout=30)
        print("sent", flush=True)
    except urllib.error.HTTPError as exc:
        print(exc.code, exc.read().decode(), flush=True)
"""
"""POST_CHAT once per line read, until `done`."""


def test_the_raise_a_run_budget_refusal_suggests_lets_the_next_call_go(
    supervisor: ServeProcess, tmp_path: Path
) -> None:
    with fake_llm_in_thread() as fake:
        agent = subprocess.Popen(
            [sys.executable, "-m", "tokenwatch", "run", "-q", "--name", "thrifty", "--budget",
             "30tokens", "--", *py(CALL_PER_LINE)],
            env={**supervisor.env, "OPENAI_BASE_URL": fake.url + "/v1"}, cwd=tmp_path,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert agent.stdin is not None
        assert agent.stdout is not None
        try:
            agent.stdin.write("call\n")
            agent.stdin.flush()
            refused = agent.stdout.readline()
            assert refused.startswith("429 "), refused
            hint = re.search(r"Raise it with `([^`]+)`", refused)
            assert hint is not None, refused
            command = shlex.split(hint.group(1))
            raised = subprocess.run(
                [sys.executable, "-m", *command],
                env=supervisor.env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
            )  # fmt: skip
            agent.stdin.write("call\n")
            agent.stdin.flush()
            second = agent.stdout.readline()
            listed = tokenwatch(supervisor, "budget", "list", "--json")
            agent.stdin.write("done\n")
            agent.stdin.flush()
            assert agent.wait(timeout=TIMEOUT) == 0
        finally:
            agent.kill()
    assert raised.returncode == 0, raised.stderr
    assert "for this run of thrifty" in raised.stdout
    assert "not saved" in raised.stdout
    assert second == "sent\n"
    (budget,) = [b for b in json.loads(listed.stdout) if b["name"] == "run:thrifty"]
    # one budget, raised in place to what the refusal suggested
    assert command[:4] == ["tokenwatch", "budget", "set", "agent:thrifty"]
    assert (budget["limit"], budget["action"]) == (parse_amount(command[4]).value, "deny")
    assert not list(tmp_path.iterdir()), "nothing written to the project"
    assert not list(supervisor.paths.config_dir.glob("*.toml")), "nothing written to the config"
    after = tokenwatch(supervisor, "budget", "list", "--json")
    assert "run:thrifty" not in after.stdout  # it ended with the run


CALL_UNTIL_REFUSED = """
import json, os, urllib.error, urllib.request
tasks = ["parse the config", "render the table", "fix the flaky test", "rename the module",
         "document the API", "profile the loop", "add a migration", "split the class",
         "review the diff", "write the changelog", "bump the version", "trim the logs"]
for task in tasks:
    body = json.dumps({"model": "acme-coder-7", "max_tokens": 200,
                       "messages": [{"role": "user", "content": task}]})
    request = urllib.request.Request(
        os.environ["OPENAI_BASE_URL"] + "/chat/completions", data=body.encode(),
        headers={"content-type": "application/json", "authorization": "Bearer sk-test"})
    try:
        urllib.request.urlopen(request, timeout=30)
        print("sent", flush=True)
    except urllib.error.HTTPError as exc:
        print(exc.code, json.loads(exc.read())["error"]["message"], flush=True)
        break
"""
"""POST_CHAT on a model no price table knows, until refused."""


def test_an_agent_on_a_model_no_table_knows_is_stopped_at_its_dollar_budget(
    supervisor: ServeProcess, tmp_path: Path
) -> None:
    with fake_llm_in_thread() as fake:
        out = tokenwatch(supervisor, "run", "--name", "guessed", "--budget", "$0.01", "--",
                         *py(CALL_UNTIL_REFUSED), OPENAI_BASE_URL=fake.url + "/v1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    *sent, refused = out.stdout.splitlines()
    assert sent
    assert set(sent) == {"sent"}  # calls went while they fitted...
    assert refused.startswith("429 budget run:guessed ($0.0100 in total for guessed) would be")
    assert "used, all of it at an estimated price (price: estimated from gpt-5.5)" in refused
    assert "(price: estimated from gpt-5.5)" in refused  # ...priced at the named fallback
    summary = out.stderr.strip().splitlines()[-1]
    assert re.search(r"· \$0\.00\d+\* \(\d+ calls price: estimated from gpt-5.5\) ·", summary)
    alerts = tokenwatch(supervisor, "alerts", "--json")
    messages = [a["message"] for a in json.loads(alerts.stdout) if a["agent"] == "guessed"]
    assert f"guessed: {refused.removeprefix('429 ')}; its calls are refused" in messages


def test_the_terminal_is_told_when_its_agent_is_paused_and_resumed(
    supervisor: ServeProcess,
) -> None:
    agent = subprocess.Popen(
        [sys.executable, "-m", "tokenwatch", "run", "--name", "told", "--", *py(
            "print('ready', flush=True); input()"
        )],
        env=supervisor.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert agent.stdin is not None
    assert agent.stdout is not None
    assert agent.stderr is not None
    try:
        assert agent.stdout.readline() == "ready\n"
        paused = tokenwatch(supervisor, "pause", "told", "--why", "looks stuck")
        told_paused = agent.stderr.readline()
        resumed = tokenwatch(supervisor, "resume", "told")
        told_resumed = agent.stderr.readline()
        agent.stdin.write("\n")
        agent.stdin.flush()
        assert agent.wait(timeout=TIMEOUT) == 0
        summary = agent.stderr.read()
    finally:
        agent.kill()
    assert paused.returncode == 0, paused.stderr
    assert resumed.returncode == 0, resumed.stderr
    assert told_paused == (
        "tokenwatch: told paused by cli: looks stuck (`tokenwatch resume told` to go on)\n"
    )
    assert told_resumed == "tokenwatch: told resumed by cli\n"
    assert summary.startswith("tokenwatch: told exited 0 · ")


def test_a_signal_the_shell_ignored_stays_ignored_for_the_agent(supervisor: ServeProcess) -> None:
    # what `nohup` or `cmd &` in a script does: the agent must inherit it, as without tokenwatch
    out = subprocess.run(
        [sys.executable, "-m", "tokenwatch", "run", "-q", "--", *py(
            "import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN,"
            " signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)"
        )],
        env=supervisor.env, capture_output=True, text=True, timeout=TIMEOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == "True True\n"


@pytest.mark.slow
def test_run_starts_a_supervisor_when_none_runs(tokenwatch_home: Path) -> None:
    env = {**os.environ, "TOKENWATCH_HOME": str(tokenwatch_home)}
    run = [sys.executable, "-m", "tokenwatch"]
    try:
        out = subprocess.run(
            [*run, "run", "--name", "cold", "--", "sh", "-c", "echo $TOKENWATCH_AGENT; exit 5"],
            env=env, capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert out.returncode == 5, out.stderr
        assert out.stdout == "cold\n"
        assert out.stderr.startswith("tokenwatch: cold exited 5 · 0 tokens")
    finally:
        stop = subprocess.run(
            [*run, "stop"], env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
    assert stop.returncode == 0, "the supervisor `run` started was running"
    daemon = int(stop.stdout.split()[1])  # "supervisor PID is stopping"
    deadline = time.monotonic() + TIMEOUT
    while not dead(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)  # let it finish before the home directory is removed


@pytest.mark.slow
def test_a_duty_cycled_run_agent_runs_to_its_end(
    supervisor: ServeProcess,
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenwatch", "run", "--name", "cycled", "--", *py(
            "import time; print('ready', flush=True)\n"
            "for _ in range(40): time.sleep(0.05)\n"
            "print('done')"
        )],
        env=supervisor.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        throttle = tokenwatch(supervisor, "throttle", "cycled", "30%")
        assert throttle.returncode == 0, throttle.stderr
        # each SIGSTOP of the duty cycle wakes the run process's wait, which must carry on
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, out) == (0, "done\n")
    assert err.splitlines()[0].startswith("tokenwatch: cycled throttled by cli (runs 30% of the")
    assert err.splitlines()[-1].startswith("tokenwatch: cycled exited 0")


@pytest.mark.slow
def test_sdk_retries_are_each_recorded_and_a_run_budget_still_refuses(
    supervisor: ServeProcess,
) -> None:
    # every second request is a 429 the SDK retries with the same headers, call id included
    with fake_llm_in_thread(fail_every=2, fail_status=429, retry_after_s=0.1) as fake:
        out = tokenwatch(
            supervisor, "run", "--name", "retrier", "--budget", "200tokens", "--", *py(RETRIED_CALLS),
            OPENAI_BASE_URL=fake.url + "/v1",
        )  # fmt: skip
    assert out.returncode == 0, out.stderr
    answers = out.stdout.split()
    assert set(answers) == {"ok", "refused"}, out.stdout
    assert answers.index("refused") == answers.count("ok")  # refused once spent, and from then on
    answered = [c for c in fake.calls if c.status == 200]
    assert answers.count("ok") == len(answered) > 2
    assert len(fake.calls) > len(answered), "some calls were retried"
    billed = sum(c.input_tokens + c.output_tokens for c in answered)
    assert billed <= 200
    assert f"retrier exited 0 · {billed:,} tokens · $" in out.stderr


def stored_agent(sp: ServeProcess, name: str) -> str:
    """The agent's row in the ledger's agents table, once it is there."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        with sqlite3.connect(f"file:{sp.paths.db}?mode=ro", uri=True) as db:
            row = db.execute("SELECT data FROM agents WHERE name = ?", (name,)).fetchone()
        if row is not None:
            return str(row[0])
        time.sleep(0.05)
    raise AssertionError(f"{name} never reached the agents table")


def test_a_key_on_the_agents_command_line_is_neither_stored_nor_shown(
    supervisor: ServeProcess,
) -> None:
    key = "sk-proj-" + os.urandom(12).hex()
    out = tokenwatch(supervisor, "run", "-q", "--name", "keyed", "--", "env",
                     f"OPENAI_API_KEY={key}", *py("pass"), "--api-key", key)  # fmt: skip
    assert out.returncode == 0, out.stderr
    shown = tokenwatch(supervisor, "status", "--json")
    (row,) = [r for r in json.loads(shown.stdout)["agents"] if r["agent"]["name"] == "keyed"]
    assert row["agent"]["command"] == [
        "env", "OPENAI_API_KEY=[redacted]", sys.executable, "-c", "pass", "--api-key", "[redacted]"
    ]  # fmt: skip
    assert "[redacted]" in stored_agent(supervisor, "keyed")
    files = supervisor.paths.state_dir.glob("usage.db*")
    assert not [f for f in files if key.encode() in f.read_bytes()]


def test_a_run_whose_supervisor_goes_away_says_so_once_and_sums_up_from_the_ledger(
    short_tmp: Path,
) -> None:
    env = tokenwatch_env(short_tmp / "home")
    with fake_llm_in_thread() as fake, supervisor_process(env) as sp:
        agent = subprocess.Popen(
            [sys.executable, "-m", "tokenwatch", "run", "--name", "orphan", "--",
             *py(CALL_PER_LINE)],
            env={**sp.env, "OPENAI_BASE_URL": fake.url + "/v1"}, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert agent.stdin is not None
        assert agent.stdout is not None
        assert agent.stderr is not None
        try:
            agent.stdin.write("call\n")
            agent.stdin.flush()
            assert agent.stdout.readline() == "sent\n"
            assert stop_serve(sp) == 0
            told = agent.stderr.readline()  # said while the agent runs, not at its end
            agent.stdin.write("done\n")
            agent.stdin.flush()
            assert agent.wait(timeout=TIMEOUT) == 0
            rest = agent.stderr.read().splitlines()
        finally:
            agent.kill()
    assert told == (
        "tokenwatch: no supervisor answers: orphan's LLM calls through tokenwatch fail until "
        "one runs again (`tokenwatch serve --detach` starts one)\n"
    )
    assert rest[0].startswith("tokenwatch: could not report the exit to the supervisor")
    assert re.fullmatch(r"tokenwatch: orphan exited 0 · \d+ tokens · \$\S+ · 1 request", rest[-1])
    assert len(rest) == 2

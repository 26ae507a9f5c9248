"""The control commands as a user runs them: real `tokenwatch` processes against a real supervisor
controlling real process trees."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.supervisor_fixtures import (
    RUNNING_STATES,
    ServeProcess,
    descendants,
    kill_tree,
    quiet_config,
    running_supervisor,
    start_tree,
    state_of,
    supervisor_process,
    tokenwatch_env,
    wait_for_states,
)
from tokenwatch.client.control import SupervisorClient
from tokenwatch.paths import Paths


@pytest.fixture(scope="module")
def supervisor() -> Iterator[ServeProcess]:
    home = Path(tempfile.mkdtemp(prefix="twc-"))
    try:
        with supervisor_process(tokenwatch_env(home)) as sp:
            yield sp
    finally:
        shutil.rmtree(home, ignore_errors=True)


def tw(sp: ServeProcess | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = sp.env if sp is not None else tokenwatch_env()
    return subprocess.run(
        [sys.executable, "-m", "tokenwatch", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def request(sp: ServeProcess, kind: str, **fields: object) -> Any:
    async def go() -> Any:
        async with await SupervisorClient.connect(sp.paths, start=False) as client:
            return await client.request(kind, **fields)

    return anyio.run(go)


def attach(sp: ServeProcess, pid: int, name: str) -> None:
    request(sp, "attach", pid=pid, name=name)


def agent_row(sp: ServeProcess, name: str) -> dict[str, object]:
    status = json.loads(tw(sp, "status", "--json").stdout)
    row: dict[str, object] = next(
        a["agent"] for a in status["agents"] if a["agent"]["name"] == name
    )
    return row


@pytest.mark.slow
def test_pause_resume_kill_a_real_process_tree(supervisor: ServeProcess) -> None:
    tree = start_tree()
    pids = descendants(tree.pid)
    try:
        attach(supervisor, tree.pid, "tree")
        paused = tw(supervisor, "pause", "tree", "--why", "testing")
        stopped = wait_for_states(pids, {"T"})
        state_paused = agent_row(supervisor, "tree")["state"]
        resumed = tw(supervisor, "resume", "tree")
        running = wait_for_states(pids, RUNNING_STATES)
        request(supervisor, "pause", agent="tree")
        wait_for_states(pids, {"T"})
        killed = tw(supervisor, "kill", "tree")
        tree.wait(30)
        gone = wait_for_states(pids, {"gone", "Z"})
        state_killed = agent_row(supervisor, "tree")["state"]
    finally:
        kill_tree(pids)
        tree.wait()
    assert len(pids) == 3, "the root, its child and a setsid grandchild"
    assert paused.returncode == 0
    assert paused.stdout.startswith("tree paused (3 processes)")
    assert set(stopped.values()) == {"T"}
    assert state_paused == "paused"
    assert resumed.returncode == 0
    assert set(running.values()) <= RUNNING_STATES
    assert killed.returncode == 0
    assert killed.stdout.startswith("tree killed")
    assert set(gone.values()) <= {"gone", "Z"}
    assert state_killed == "exited"


@pytest.mark.slow
def test_pause_all_spares_critical_agents(supervisor: ServeProcess) -> None:
    plain, critical = start_tree(), start_tree()
    plain_pids, critical_pids = descendants(plain.pid), descendants(critical.pid)
    try:
        attach(supervisor, plain.pid, "plain")
        keeper = request(supervisor, "register", name="keeper", critical=True)
        request(supervisor, "started", name=keeper["name"], pid=critical.pid)
        done = tw(supervisor, "pause", "--all")
        wait_for_states(plain_pids, {"T"})
        critical_states = {p: state_of(p) for p in critical_pids}
        request(supervisor, "kill", agent="plain")
        request(supervisor, "kill", agent=keeper["name"])
    finally:
        kill_tree(plain_pids + critical_pids)
        plain.wait()
        critical.wait()
    assert done.returncode == 0
    assert "plain paused" in done.stdout
    assert "keeper" not in done.stdout
    assert set(critical_states.values()) <= RUNNING_STATES


@pytest.mark.slow
def test_resume_all_resumes_every_paused_agent_critical_ones_too(supervisor: ServeProcess) -> None:
    plain, critical = start_tree(), start_tree()
    pids = descendants(plain.pid) + descendants(critical.pid)
    try:
        attach(supervisor, plain.pid, "sleepy")
        keeper = request(supervisor, "register", name="guard", critical=True)
        request(supervisor, "started", name=keeper["name"], pid=critical.pid)
        for name in ("sleepy", keeper["name"]):
            request(supervisor, "pause", agent=name)
        wait_for_states(pids, {"T"})
        done = tw(supervisor, "resume", "--all")
        wait_for_states(pids, RUNNING_STATES)
        again = tw(supervisor, "resume", "--all")
        request(supervisor, "kill", agent="sleepy")
        request(supervisor, "kill", agent=keeper["name"])
    finally:
        kill_tree(pids)
        plain.wait()
        critical.wait()
    assert done.returncode == 0, done.stderr
    assert "sleepy resumed" in done.stdout
    assert f"{keeper['name']} resumed" in done.stdout
    assert again.stdout.strip() == "no paused agent to resume"


@pytest.mark.slow
def test_throttle_by_rate_and_by_duty_cycle(supervisor: ServeProcess) -> None:
    tree = start_tree()
    pids = descendants(tree.pid)
    try:
        attach(supervisor, tree.pid, "slowpoke")
        by_rate = tw(supervisor, "throttle", "slowpoke", "20k/min")
        rate_row = agent_row(supervisor, "slowpoke")
        by_share = tw(supervisor, "throttle", "slowpoke", "10%")
        cycled = wait_for_states(pids, {"T"})  # stopped 90% of each second
        off = tw(supervisor, "throttle", "slowpoke", "off")
        after = wait_for_states(pids, RUNNING_STATES)
        off_row = agent_row(supervisor, "slowpoke")
        bad = tw(supervisor, "throttle", "slowpoke", "fast please")
        request(supervisor, "kill", agent="slowpoke")
    finally:
        kill_tree(pids)
        tree.wait()
    assert by_rate.returncode == 0
    assert (rate_row["state"], rate_row["throttle"]) == ("throttled", "20k/min")
    assert by_share.returncode == 0
    assert set(cycled.values()) == {"T"}
    assert off.returncode == 0
    assert set(after.values()) <= RUNNING_STATES
    assert (off_row["state"], off_row["throttle"]) == ("running", "")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("tokenwatch: not a rate")


def states_over(pids: list[int], seconds: float) -> set[str]:
    """Every state the processes were seen in over `seconds` (sampled every 10 ms)."""
    seen: set[str] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.update(s for p in pids if (s := state_of(p)) is not None)
        time.sleep(0.01)
    return seen


@pytest.mark.slow
def test_a_duty_cycled_agent_paused_stays_paused_and_resumed_runs_one_cycle(
    supervisor: ServeProcess,
) -> None:
    tree = start_tree()
    pids = descendants(tree.pid)
    try:
        attach(supervisor, tree.pid, "cycled")
        tw(supervisor, "throttle", "cycled", "50%")
        wait_for_states(pids, {"T"})  # the cycle runs
        tw(supervisor, "pause", "cycled")
        wait_for_states(pids, {"T"})  # its SIGSTOP lands when each process is next scheduled
        while_paused = states_over(pids, 2.5)  # more than two periods of the cycle
        tw(supervisor, "resume", "cycled")
        tw(supervisor, "resume", "cycled")  # twice: still one cycle
        tw(supervisor, "throttle", "cycled", "off")
        wait_for_states(pids, RUNNING_STATES)
        after_off = states_over(pids, 2.5)
    finally:
        kill_tree(pids)
        tree.wait()
    assert while_paused == {"T"}, "the cancelled cycle must not continue a paused agent"
    assert after_off <= RUNNING_STATES, "no second cycle left running after `throttle off`"


async def test_a_pause_that_comes_with_the_end_of_a_cycle_holds() -> None:
    tree = start_tree()
    pids = descendants(tree.pid)
    try:
        async with running_supervisor(Paths.discover(), quiet_config(), proxy=False) as sup:
            engine = sup.engine
            assert engine is not None
            engine.attach(tree.pid, "racing")
            await engine.throttle("racing", "30%", who="cli")
            await anyio.to_thread.run_sync(wait_for_states, pids, {"T"})  # the cycle runs
            async with anyio.create_task_group() as tg:  # two rules act in the same moment
                tg.start_soon(partial(engine.throttle, "racing", "off", who="rule:a"))
                tg.start_soon(partial(engine.pause, "racing", who="rule:b"))
            # the pause's SIGSTOP lands when each process is next scheduled: from then on
            await anyio.to_thread.run_sync(wait_for_states, pids, {"T"})
            held = await anyio.to_thread.run_sync(states_over, pids, 2.5)
    finally:
        kill_tree(pids)
        tree.wait()
    assert held == {"T"}, "the ended cycle must not continue the agent after the pause"


@pytest.mark.slow
def test_when_a_cycled_agents_root_dies_the_rest_of_its_tree_is_continued(
    supervisor: ServeProcess,
) -> None:
    tree = start_tree()
    root, *rest = descendants(tree.pid)
    try:
        attach(supervisor, tree.pid, "orphaning")
        tw(supervisor, "throttle", "orphaning", "10%")
        wait_for_states([root, *rest], {"T"})  # held stopped 90% of each second
        tree.kill()  # the root dies while the cycle holds its tree stopped
        tree.wait()
        after = wait_for_states(rest, RUNNING_STATES)
    finally:
        kill_tree(rest)
    assert set(after.values()) <= RUNNING_STATES


@pytest.mark.slow
def test_env_prints_what_a_process_needs_to_report_and_use_the_proxy(
    supervisor: ServeProcess,
) -> None:
    done = tw(supervisor, "env", "outsider")
    script = done.stdout + 'echo "$TOKENWATCH_AGENT|$TOKENWATCH_SOCKET|$OPENAI_BASE_URL"\n'
    seen = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    agent, sock, base = seen.stdout.strip().split("|")
    assert done.returncode == 0
    assert agent == "outsider"
    assert sock == str(supervisor.paths.socket)
    assert base.startswith("http://127.0.0.1:")
    assert base.endswith("/v1")


@pytest.mark.slow
def test_env_keeps_the_callers_base_url_as_the_upstream(supervisor: ServeProcess) -> None:
    from tests.test_run_cli import OPENAI_CALL
    from tokenwatch.demo.fake_llm import fake_llm_in_thread

    with fake_llm_in_thread() as fake:
        env = {**supervisor.env, "OPENAI_BASE_URL": fake.url + "/v1"}
        exports = subprocess.run(
            [sys.executable, "-m", "tokenwatch", "env", "upstreamed"],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        script = (
            exports.stdout + f"exec {shlex.quote(sys.executable)} -c {shlex.quote(OPENAI_CALL)}"
        )
        called = subprocess.run(
            ["sh", "-c", script], capture_output=True, text=True, timeout=60, env=env
        )
    assert called.returncode == 0, called.stderr[-500:]
    assert len(fake.calls) == 1
    assert int(called.stdout) == fake.calls[0].input_tokens + fake.calls[0].output_tokens


@pytest.mark.slow
def test_an_agent_registered_by_env_ends_with_the_shell_that_asked(
    supervisor: ServeProcess,
) -> None:
    tokenwatch = f"{shlex.quote(sys.executable)} -m tokenwatch"
    shell = subprocess.run(
        ["sh", "-c", f'eval "$({tokenwatch} env ender)" && echo "$TOKENWATCH_AGENT"'],
        capture_output=True, text=True, timeout=60, env=supervisor.env,
    )  # fmt: skip
    assert shell.stdout == "ender\n", shell.stderr
    deadline = time.monotonic() + 60
    while agent_row(supervisor, "ender")["state"] != "exited":
        assert time.monotonic() < deadline, "the agent registered by env never ended"
        time.sleep(0.1)
    assert request(supervisor, "register", name="ender")["name"] == "ender"


@pytest.mark.slow
def test_status_json_lists_agents_with_state_and_figures(supervisor: ServeProcess) -> None:
    tw(supervisor, "env", "listed")
    status = json.loads(tw(supervisor, "status", "--json").stdout)
    row = next(a for a in status["agents"] if a["agent"]["name"] == "listed")
    table = tw(supervisor, "status").stdout
    assert status["supervisor"]["socket"] == str(supervisor.paths.socket)
    assert row["agent"]["state"] == "running"
    assert {"tokens_per_min", "usd_per_hour", "burn", "summary"} <= set(row)
    assert any(line.split()[:2] == ["listed", "running"] for line in table.splitlines())


@pytest.mark.slow
def test_unknown_agent_is_one_clear_line(supervisor: ServeProcess) -> None:
    for verb in ("pause", "kill"):
        done = tw(supervisor, verb, "nobody-by-that-name")
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1
        assert done.stderr.startswith("tokenwatch: no agent named 'nobody-by-that-name'")


def test_no_supervisor_is_one_clear_line() -> None:
    for args, meaning in (
        (("pause", "x"), "no agent is supervised"),
        (("resume", "x"), "no agent is supervised"),
        (("kill", "x"), "no agent is supervised"),
        (("throttle", "x", "50%"), "no agent is supervised"),
        (("stop",), "nothing to stop"),
    ):
        done = tw(None, *args)
        assert done.returncode == 1
        (line,) = done.stderr.splitlines()
        assert line.startswith("tokenwatch: no supervisor is running")
        assert meaning in line
        assert "serve" not in line  # advice to start one, to stop it, was no advice


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
def test_status_with_no_supervisor_says_so_and_starts_none(
    json_flag: list[str], tokenwatch_home: Path
) -> None:
    done = tw(None, "status", *json_flag)
    assert done.returncode == 3
    if json_flag:
        assert json.loads(done.stdout) == {"supervisor": None, "agents": []}
    else:
        assert done.stdout.startswith("no supervisor is running")
    assert not Paths.discover().socket.exists()
    assert not Paths.discover().pidfile.exists()


@pytest.mark.parametrize(
    "argv", [["pause"], ["resume"], ["kill"], ["throttle", "20k/min"]], ids=lambda a: a[0]
)
def test_acting_on_an_agent_that_has_exited_says_so(
    supervisor: ServeProcess, argv: list[str]
) -> None:
    name = f"gone-{argv[0]}"
    request(supervisor, "register", name=name)
    request(supervisor, "exited", name=name, code=0)
    done = tw(supervisor, argv[0], name, *argv[1:])
    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr == f"tokenwatch: {name} has exited: there is nothing to {argv[0]}\n"
    assert agent_row(supervisor, name)["state"] == "exited"  # and it stays so


def test_env_for_an_unusable_name_is_one_line_and_registers_nothing(
    supervisor: ServeProcess,
) -> None:
    before = request(supervisor, "list")
    done = tw(supervisor, "env", "")
    assert done.returncode != 0
    assert done.stderr == "tokenwatch: agent name '': use 1-64 letters, digits and . _ @ : + -\n"
    assert request(supervisor, "list") == before


def _commands(
    parser: argparse.ArgumentParser, prefix: str = "tokenwatch"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                yield f"{prefix} {name}", command
                yield from _commands(command, f"{prefix} {name}")


def test_every_commands_help_says_what_it_does() -> None:
    from tokenwatch.cli import build_parser

    commands = dict(_commands(build_parser()))
    assert {"tokenwatch stop", "tokenwatch budget rm", "tokenwatch rules test"} <= set(commands)
    for name, command in commands.items():
        text = command.format_help()
        assert command.description, f"`{name} --help` does not say what it does"
        assert "%%" not in text, f"`{name} --help` shows a doubled %"


@pytest.mark.parametrize("argv", [["status"], ["serve"], ["pause", "a"], ["run", "--", "true"]])
def test_a_home_too_long_for_a_socket_is_one_clear_line(argv: list[str], tmp_path: Path) -> None:
    home = tmp_path / ("h" * 120)  # the socket would be DIR/run/tokenwatch.sock
    done = subprocess.run(
        [sys.executable, "-m", "tokenwatch", *argv],
        env=tokenwatch_env(home), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"tokenwatch: the socket path {home}/run/tokenwatch.sock is too long")
    assert line.endswith("use a shorter TOKENWATCH_HOME, XDG_RUNTIME_DIR or TOKENWATCH_SOCKET")
    assert not (home / "run").exists(), "no supervisor was started"

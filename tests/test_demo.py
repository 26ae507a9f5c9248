"""`tokenwatch demo --headless`: real agents through the real proxy to the fake LLM; the looper is
caught by the runaway rule, the healthy agents are left alone, and nothing is left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.process_fixtures import dead
from tokenwatch.demo.agents import KINDS, PARENT_ENV, parent_alive

HEALTHY = ("researcher", "coder", "summariser", "claude-writer")


def demo(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenwatch", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_headless_demo_pauses_the_looper_and_leaves_the_rest(tokenwatch_home: Path) -> None:
    home = tokenwatch_home / "demo"
    done = demo("--headless", "--duration", "25", "--json", "--home", str(home))
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)
    agents = {a["name"]: a for a in state["agents"]}
    assert set(agents) == set(KINDS)

    assert agents["looper"]["state"] == "paused"
    looper_alerts = [a for a in state["alerts"] if a["agent"] == "looper"]
    assert any(a["rule"] == "runaway" and a["action"] == "pause" for a in looper_alerts)
    assert any(
        a["kind"] == "pause" and a["agent"] == "looper" and a["who"].startswith("rule:")
        for a in state["actions"]
    )

    for name in HEALTHY:
        assert agents[name]["state"] == "running", name
        assert agents[name]["tokens"] > 0, f"{name} made no call through the proxy"
        assert not [a for a in state["actions"] if a["agent"] == name and a["kind"] == "pause"]
        assert not [a for a in state["alerts"] if a["agent"] == name and a["rule"] == "runaway"]
    assert agents["claude-writer"]["models"] == ["claude-haiku-4-5"]
    assert state["usage"]["tokens"] == sum(a["tokens"] for a in agents.values())

    # The demo stops what it started: every agent process is gone once it returns.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(dead(a["pid"]) for a in agents.values()):
        time.sleep(0.05)
    assert [a["name"] for a in agents.values() if not dead(a["pid"])] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--json"], "--json goes with --headless"),
        (["--headless", "--duration", "0"], "--duration must be above zero"),
        (["--headless", "--duration", "nan"], "--duration must be above zero and under a day"),
        (["--screenshot", "/tmp"], "--screenshot /tmp: a directory; give a file name"),
        (["--screenshot", "/no/such/dir/x.svg"], "no directory /no/such/dir"),
        (["--headless", "--home", "/etc/passwd"], "--home /etc/passwd: not a directory"),
        ([], "needs a terminal"),
    ],
)
def test_demo_refuses_bad_options_in_one_line(args: list[str], message: str) -> None:
    done = demo(*args, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert message in done.stderr


def test_demo_agents_notice_their_demo_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    monkeypatch.setenv(PARENT_ENV, str(gone.pid))
    assert not parent_alive()
    monkeypatch.setenv(PARENT_ENV, str(os.getpid()))
    assert parent_alive()


def test_a_demo_agent_exits_by_itself_when_its_demo_dies() -> None:
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    env = {
        **os.environ,
        PARENT_ENV: str(parent.pid),
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",  # nothing listens: calls fail fast, offline
    }
    agent = subprocess.Popen(
        [sys.executable, "-m", "tokenwatch.demo.agents", "summariser"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        parent.kill()
        parent.wait()
        assert agent.wait(timeout=60) == 0
        assert "call failed" in (agent.stdout.read() if agent.stdout else "")
    finally:
        agent.kill()
        agent.wait()


def test_a_demo_agent_run_by_hand_stops_after_its_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenwatch.demo import agents

    made: list[int] = []

    def counting() -> Iterator[float]:
        for n in range(1_000):
            agents._guarded(made.append, n)
            yield 0.0

    monkeypatch.setitem(agents.BEHAVIOURS, "researcher", counting)
    monkeypatch.setattr(agents, "_calls_made", 0)
    assert agents.main(["researcher", "--calls", "3"]) == 0
    assert made == [0, 1, 2]
    assert agents.main(["researcher", "--calls", "x"]) == 2  # usage

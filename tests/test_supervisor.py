"""The supervisor's lifetime with real processes: single instance, background start, clean exit,
and recovery after SIGKILL (no agent is ever left stopped)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
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
    start_serve,
    start_tree,
    state_of,
    stop_serve,
    supervisor_process,
    tokenwatch_env,
    usage_event,
    wait_answers,
    wait_states,
)
from tokenwatch.client.control import SupervisorClient, SupervisorError
from tokenwatch.config import AgentSettings
from tokenwatch.core.models import Agent, UsageEvent
from tokenwatch.ledger.store import Store
from tokenwatch.paths import Paths

pytestmark = pytest.mark.anyio


def alive(pid: int) -> bool:
    return state_of(pid) not in ("gone", "Z")


async def wait_gone(pid: int) -> None:
    with anyio.fail_after(30):
        while alive(pid):
            await anyio.sleep(0.02)


def wait_first_exit(*procs: ServeProcess) -> ServeProcess:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for sp in procs:
            if sp.proc.poll() is not None:
                return sp
        time.sleep(0.02)
    raise AssertionError("neither supervisor gave way")


@pytest.mark.slow
def test_two_supervisors_started_at_once_end_with_one() -> None:
    env = tokenwatch_env()
    first, second = start_serve(env), start_serve(env)
    try:
        loser = wait_first_exit(first, second)
        winner = second if loser is first else first
        wait_answers(winner)
        code = loser.proc.wait(30)
        survivors = [p for p in (first, second) if p.proc.poll() is None]
        assert code == 1
        assert "already running" in loser.output()
        assert survivors == [winner]
        assert Paths.discover(env).pidfile.read_text().strip() == str(winner.pid)
    finally:
        for sp in (first, second):
            stop_serve(sp)


def tw_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenwatch", *args],
        capture_output=True, text=True, timeout=60, env=tokenwatch_env(),
    )  # fmt: skip


@pytest.mark.slow
def test_serve_detach_keeps_config_and_verbose(tokenwatch_home: Path, tmp_path: Path) -> None:
    config = tmp_path / "elsewhere.toml"
    config.write_text('[[budget]]\nscope = "global"\nlimit = "$7"\nperiod = "day"\n')
    started = tw_cli("serve", "--detach", "--config", str(config), "-v")
    status = json.loads(tw_cli("status", "--json").stdout)
    pid = status["supervisor"]["pid"]
    try:
        assert started.returncode == 0, started.stderr
        assert status["supervisor"]["config"] == str(config)
        log = (Paths.discover().state_dir / "supervisor.log").read_text()
        assert " DEBUG " in log, "-v reached the background supervisor"
        again = tw_cli("serve", "--detach", "--config", str(config))
        assert again.returncode == 1
        assert again.stderr.endswith("--config not applied (`tokenwatch stop` it first)\n")
    finally:
        tw_cli("stop")
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
    anyio.run(wait_gone, pid)


@pytest.mark.slow
def test_a_client_starts_the_supervisor_in_the_background(tokenwatch_home: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "tokenwatch", "env", "probe"],
        capture_output=True, text=True, timeout=60, check=True, env=tokenwatch_env(),
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "tokenwatch", "status", "--json"],
        capture_output=True, text=True, timeout=60, check=True, env=tokenwatch_env(),
    )  # fmt: skip
    pid = json.loads(out.stdout)["supervisor"]["pid"]
    try:
        assert alive(pid)
        assert os.getsid(pid) == pid, "detached: a session of its own, no terminal"
        assert (Paths.discover().state_dir / "supervisor.log").exists()
        again = subprocess.run(
            [sys.executable, "-m", "tokenwatch", "status", "--json"],
            capture_output=True, text=True, timeout=60, check=True, env=tokenwatch_env(),
        )  # fmt: skip
        assert json.loads(again.stdout)["supervisor"]["pid"] == pid, "the running one is reused"
        stop = subprocess.run(
            [sys.executable, "-m", "tokenwatch", "stop"],
            capture_output=True, text=True, timeout=60, env=tokenwatch_env(),
        )  # fmt: skip
        assert stop.returncode == 0
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
    anyio.run(wait_gone, pid)


@pytest.mark.slow
def test_a_supervisor_that_cannot_start_says_why_in_one_line(tokenwatch_home: Path) -> None:
    config = Paths.discover().user_config
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[proxy]\nport = 'abc'\n")
    out = subprocess.run(
        [sys.executable, "-m", "tokenwatch", "env", "probe"],
        capture_output=True, text=True, timeout=60, env=tokenwatch_env(), cwd=tokenwatch_home,
    )  # fmt: skip
    assert out.returncode != 0
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith(
        f"tokenwatch: could not start the supervisor: {config}: proxy.port: expected an "
        "integer, got 'abc' (exited with 2; log "
    )


async def attach_and_pause(paths: Paths, pid: int, name: str) -> None:
    async with await SupervisorClient.connect(paths, start=False) as client:
        await client.request("attach", pid=pid, name=name)
        await client.request("pause", agent=name)


@pytest.mark.slow
async def test_sigterm_resumes_paused_agents_and_flushes_the_ledger() -> None:
    tree = start_tree()
    pids = descendants(tree.pid)
    try:
        with supervisor_process() as sp:
            await attach_and_pause(sp.paths, tree.pid, "sleepy")
            stopped = await wait_states(pids, {"T"})
            async with await SupervisorClient.connect(sp.paths, start=False) as client:
                await client.request("hello", name="reporter")
                await client.request("usage", event=usage_event("", "before-exit"))
            code = stop_serve(sp)
        after = await wait_states(pids, RUNNING_STATES)
        with sqlite3.connect(sp.paths.db) as db:
            stored = [r[0] for r in db.execute("SELECT call_id FROM events")]
    finally:
        kill_tree(pids)
        tree.wait()
    assert len(pids) == 3
    assert set(stopped.values()) == {"T"}
    assert code == 0
    assert set(after.values()) <= RUNNING_STATES
    assert stored == ["before-exit"]


@pytest.mark.slow
async def test_a_sigkilled_supervisor_leaves_no_agent_stopped() -> None:
    tree = start_tree()
    pids = descendants(tree.pid)
    try:
        with supervisor_process() as sp:
            await attach_and_pause(sp.paths, tree.pid, "victim")
            await wait_states(pids, {"T"})
            sp.proc.send_signal(signal.SIGKILL)
            sp.proc.wait(30)
            still_stopped = {p: state_of(p) for p in pids}
        # the next client brings up a new supervisor, which continues the agent at once
        async with await SupervisorClient.connect(sp.paths, start=True, timeout=30) as client:
            resumed = await wait_states(pids, RUNNING_STATES)
            status = await client.request("status")
            adopted = await client.request("adopt", agent="victim", decision="kill")
            await client.request("shutdown")
        for pid in pids:
            await wait_gone(pid)
    finally:
        kill_tree(pids)
        tree.wait()
    assert set(still_stopped.values()) == {"T"}, "SIGKILL gave the old supervisor no say"
    assert set(resumed.values()) <= RUNNING_STATES
    victim = next(a for a in status["agents"] if a["agent"]["name"] == "victim")
    assert victim["agent"]["state"] == "detached"
    assert adopted["kind"] == "kill"


async def test_a_reused_pid_is_never_taken_for_an_old_agent() -> None:
    paths = Paths.discover()
    paths.ensure_state()
    tree = start_tree()
    pids = descendants(tree.pid)
    try:
        async with await Store.open(paths.db) as store:
            # the record says the pid belonged to a process that started at another time
            await store.save_agent(Agent(name="ghost", pid=tree.pid, start_time=1, state="paused"))
        os.kill(tree.pid, signal.SIGSTOP)
        async with running_supervisor(paths, quiet_config(), proxy=False, exporters=False) as sup:
            assert sup.engine is not None
            ghost = sup.engine.roster.get("ghost")
            async with await SupervisorClient.connect(paths, start=False) as client:
                with pytest.raises(SupervisorError) as refused:
                    await client.request("kill", agent="ghost")
        state = state_of(tree.pid)
    finally:
        kill_tree(pids)
        tree.wait()
    assert ghost is None or ghost.agent.state == "exited"
    assert state == "T", "nobody continued (or touched) a process that is not the agent"
    assert refused.value.code == "unknown_agent"


LAUNCHED = "import os, time; print('hello from', os.environ['TOKENWATCH_AGENT'], flush=True); time.sleep(60)"


async def test_launch_starts_a_configured_agent_with_its_log() -> None:
    paths = Paths.discover()
    agents = {"echoer": AgentSettings(command=[sys.executable, "-c", LAUNCHED], task="chores")}
    config = quiet_config(agents=agents)
    async with (
        running_supervisor(paths, config, proxy=False, exporters=False),
        await SupervisorClient.connect(paths, start=False) as client,
    ):
        launched = await client.request("launch", name="echoer")
        log = paths.logs_dir / "echoer.log"
        with anyio.fail_after(30):
            while b"hello from echoer" not in (log.read_bytes() if log.exists() else b""):
                await anyio.sleep(0.02)
        row = next(a for a in await client.request("list") if a["name"] == "echoer")
        history = await client.request("history", agent="echoer")
        with pytest.raises(SupervisorError) as unknown:
            await client.request("launch", name="nope")
        await client.request("kill", agent="echoer")
        await wait_gone(launched["pid"])
    assert (row["state"], row["task"], row["launched"]) == ("running", "chores", True)
    assert history["log"] == ["hello from echoer"]
    assert unknown.value.code == "unknown_agent"


async def test_history_and_report_come_from_the_ledger() -> None:
    paths = Paths.discover()
    async with (
        running_supervisor(paths, quiet_config(), proxy=False, exporters=False),
        await SupervisorClient.connect(paths, start=False) as client,
    ):
        await client.request("hello", name="reporter")
        for n in range(3):
            await client.request("usage", event=usage_event("", f"h{n}", input_tokens=10 * (n + 1)))
        history = await client.request("history", agent="reporter", limit=2)
        report = await client.request("report", by="agent", since=0)
        with pytest.raises(SupervisorError) as bad:
            await client.request("report", by="colour")
    assert [c["call_id"] for c in history["calls"]] == ["h2", "h1"]
    assert report["rows"][0]["agent"] == "reporter"
    assert report["rows"][0]["requests"] == 3
    assert report["rows"][0]["input_tokens"] == 60
    assert bad.value.code == "bad_message"


async def test_reports_an_sdk_had_to_drop_raise_an_alert() -> None:
    paths = Paths.discover()
    async with (
        running_supervisor(paths, quiet_config(), proxy=False, exporters=False),
        await SupervisorClient.connect(paths, start=False) as client,
    ):
        await client.request("hello", name="flooded")
        await client.request("heartbeat")
        await client.request("heartbeat", dropped=12)
        with anyio.fail_after(30):
            while not (alerts := await client.request("alerts")):
                await anyio.sleep(0.05)
    [alert] = alerts
    assert alert["agent"] == "flooded"
    assert alert["rule"] == "reports-dropped"
    assert "dropped 12 usage reports" in alert["message"]


async def test_one_client_can_subscribe_and_send_commands_at_once() -> None:
    paths = Paths.discover()
    seen: list[tuple[str, Any]] = []
    async with (
        running_supervisor(paths, quiet_config(), proxy=False, exporters=False),
        await SupervisorClient.connect(paths, start=False) as client,
    ):

        async def watch() -> None:
            async for kind, data in client.subscribe(interval=0.2):
                seen.append((kind, data))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                registered = await client.request("register", name="busy")
                action = await client.request("throttle", agent="busy", rate="1k/min")
                while not any(k == "action" for k, _ in seen):
                    await anyio.sleep(0.01)
                while sum(k == "snapshot" for k, _ in seen) < 2:
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
    snapshots = [d for k, d in seen if k == "snapshot"]
    assert registered["name"] == "busy"
    assert action["kind"] == "throttle"
    assert any(d["name"] == "busy" and d["throttle"] == "1k/min" for k, d in seen if k == "agent")
    assert any(a["agent"]["name"] == "busy" for a in snapshots[-1]["agents"])


async def test_a_bad_budget_sent_over_the_socket_is_a_clear_error() -> None:
    from tokenwatch.client.control import SupervisorClient, SupervisorError

    paths = Paths.discover()
    async with (
        running_supervisor(paths, quiet_config(), proxy=False),
        await SupervisorClient.connect(paths, start=False) as client,
    ):
        with pytest.raises(SupervisorError) as bad_scope:
            await client.request("set_budget", budget={"scope": "planet", "limit": "1k"})
        throttle = {"limit": "1k", "action": "throttle", "rate": "bogus"}
        with pytest.raises(SupervisorError) as bad_rate:
            await client.request("set_budget", budget=throttle)
        with pytest.raises(SupervisorError) as unknown:
            await client.request("remove_budget", name="never-set")
        saved = await client.request("set_budget", budget={"name": "ok", "limit": "$3"})
    assert bad_scope.value.code == "bad_message"
    assert "unknown scope 'planet'" in bad_scope.value.message
    assert (
        bad_rate.value.message
        == "budget global:*:day: not a rate: 'bogus' (try 20k/min, $1/h, 50% or off)"
    )
    assert unknown.value.code == "bad_message"
    assert "never-set" in unknown.value.message
    assert saved == {"name": "ok", "saved_to": str(paths.overlay)}


async def test_out_of_range_since_and_limit_are_bad_messages() -> None:
    paths = Paths.discover()
    bad = [
        ("report", {"since": -1e300}),
        ("report", {"since": 99999999999999999999999}),
        ("report", {"since": "yesterday"}),
        ("alerts", {"since": 99999999999999999999999}),
        ("alerts", {"limit": 0}),
        ("alerts", {"limit": 1.5}),
        ("history", {"agent": "a", "limit": "all"}),
    ]
    async with (
        running_supervisor(paths, quiet_config(), proxy=False, exporters=False),
        await SupervisorClient.connect(paths, start=False) as client,
    ):
        codes = []
        for kind, fields in bad:
            with pytest.raises(SupervisorError) as refused:
                await client.request(kind, **fields)
            codes.append((kind, refused.value.code, str(refused.value)))
        alerts = await client.request("alerts", limit=2**63 - 1)  # what `alerts --limit` sends
    assert [c for _, c, _ in codes] == ["bad_message"] * len(bad)
    assert "'since' must be Unix seconds" in codes[0][2]
    assert "'limit' must be a whole number" in codes[4][2]
    assert alerts == []


async def test_a_ledger_that_cannot_be_read_is_said_so_not_an_internal_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tokenwatch.core.errors import StoreUnavailable

    async def damaged(**_: Any) -> list[Any]:
        raise StoreUnavailable("cannot read the ledger usage.db: database disk image is malformed")

    async with running_supervisor(proxy=False, exporters=False) as sup:
        monkeypatch.setattr(sup.store, "history", damaged)
        async with await SupervisorClient.connect(socket_path=sup.paths.socket) as client:
            with pytest.raises(SupervisorError) as refused:
                await client.request("history", agent="anyone")
            assert await client.request("list") == []  # and it goes on serving
    assert refused.value.code == "store_unavailable"
    assert str(refused.value) == "cannot read the ledger usage.db: database disk image is malformed"


async def test_a_run_counts_what_every_supervisor_saw_of_it() -> None:
    # `tokenwatch stop` and a new supervisor in the middle of a run: its summary and `status`
    # showed only the second supervisor's part (the ledger held all of it).
    paths = Paths.discover()
    agent = start_tree()
    pids = descendants(agent.pid)

    def call(run_id: str, tokens: int) -> UsageEvent:
        return UsageEvent(ts=time.time(), agent="r", run_id=run_id, model="gpt-4o",
                          input_tokens=tokens)  # fmt: skip

    try:
        async with running_supervisor(paths, quiet_config(), proxy=False, exporters=False) as sup:
            assert sup.engine is not None
            async with await SupervisorClient.connect(paths, start=False) as client:
                run_id = (await client.request("register", name="r", launched=True))["run_id"]
                await client.request("started", name="r", pid=agent.pid)
            await sup.engine.ingest([call(run_id, 100), call(run_id, 200)])
        async with running_supervisor(paths, quiet_config(), proxy=False, exporters=False) as sup:
            assert sup.engine is not None
            async with await SupervisorClient.connect(paths, start=False) as client:
                status = await client.request("status")
                await sup.engine.ingest([call(run_id, 300)])
                exited = await client.request("exited", name="r", code=0)
    finally:
        kill_tree(pids)
        agent.wait()
    (row,) = [a for a in status["agents"] if a["agent"]["name"] == "r"]
    assert (row["summary"]["requests"], row["summary"]["tokens"]) == (2, 300)
    summary = exited["summary"]
    assert (summary["requests"], summary["tokens"]) == (3, 600)
    assert summary["cost_usd"] == pytest.approx(600 * 2.50 / 1e6)  # gpt-4o input

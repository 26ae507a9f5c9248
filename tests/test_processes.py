"""Process control on real process trees: pause, resume, kill, pid-reuse safety, duty cycle, spawn."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from tests.process_fixtures import (
    dead,
    spawn_tree,
    start_as_nobody,
    start_sleeper,
    state,
    wait_until,
)
from tokenwatch.process import processes
from tokenwatch.process.duty import DutyCycle
from tokenwatch.process.processes import (
    NotPermitted,
    ProcessGone,
    ProcessHandle,
    process_info,
    spawn,
)


def all_stopped(pids: list[int]) -> bool:
    return all(state(pid) == "T" for pid in pids)


def none_stopped(pids: list[int]) -> bool:
    return all(state(pid) not in ("T", None) for pid in pids)


async def test_pause_resume_kill_reach_a_setsid_grandchild(short_tmp: Path) -> None:
    handle, pids = await spawn_tree(short_tmp)
    root, _child, grandchild = pids
    assert process_info(grandchild).sid != process_info(root).sid
    assert sorted(info.pid for info in handle.tree()) == sorted(pids)

    assert sorted(handle.pause()) == sorted(pids)
    await wait_until(lambda: all_stopped(pids), "every process is stopped (T)")

    assert sorted(handle.resume()) == sorted(pids)
    await wait_until(lambda: none_stopped(pids), "every process runs again")

    report = await handle.kill(grace=30)
    assert sorted(report.terminated) == sorted(pids)
    assert report.killed == []
    assert all(dead(pid) for pid in pids)
    assert state(root) is None, "our own child is reaped, not left a zombie"
    assert handle.wait_exit_nowait() == 128 + signal.SIGTERM
    handle.close()


async def test_a_process_ignoring_sigterm_is_killed_after_the_grace(short_tmp: Path) -> None:
    handle, pids = await spawn_tree(short_tmp, flags="setsid,ignore-term")
    root, child, grandchild = pids
    report = await handle.kill(grace=0.3)
    assert sorted(report.terminated) == sorted([root, child])
    assert report.killed == [grandchild]
    assert report.survivors == []
    assert all(dead(pid) for pid in pids)
    handle.close()


async def test_a_paused_tree_dies_of_sigterm(short_tmp: Path) -> None:
    handle, pids = await spawn_tree(short_tmp)
    handle.pause()
    await wait_until(lambda: all_stopped(pids), "the tree is stopped")
    # without the SIGCONT that goes with SIGTERM, a stopped process would only die of SIGKILL
    report = await handle.kill(grace=30)
    assert sorted(report.terminated) == sorted(pids)
    assert report.killed == []
    handle.close()


async def test_an_exited_process_is_never_signalled(short_tmp: Path) -> None:
    handle = spawn(["true"], env=dict(os.environ))
    assert await handle.wait_exit() == 0
    assert not handle.alive()
    with pytest.raises(ProcessGone):
        handle.pause()
    with pytest.raises(ProcessGone):
        handle.resume()
    assert handle.tree() == []
    report = await handle.kill(grace=0.1)
    assert (report.terminated, report.killed) == ([], [])
    handle.close()


async def test_a_reused_pid_is_refused_when_adopting() -> None:
    sleeper = start_sleeper()
    try:
        real = process_info(sleeper.pid).start_time
        with pytest.raises(ProcessGone, match="another process"):
            ProcessHandle.attach(sleeper.pid, start_time=real + 1)
        with ProcessHandle.attach(sleeper.pid, start_time=real) as handle:
            assert handle.alive()
        assert state(sleeper.pid) != "T"
    finally:
        sleeper.kill()
        sleeper.wait()


async def test_a_descendant_whose_pid_was_reused_is_left_alone(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle, pids = await spawn_tree(short_tmp, flags="")
    root, child, grandchild = pids
    real_scan = processes._children_by_parent

    def scan_seeing_an_older_grandchild() -> dict[int, list[processes._Stat]]:
        # as if /proc was read just before the grandchild's pid went to a new process
        children = real_scan()
        children[child] = [
            processes._Stat(s.pid, s.state, s.ppid, s.pgid, s.sid, s.flags, s.start_time - 1)
            for s in children.get(child, [])
        ]
        return children

    monkeypatch.setattr(processes, "_children_by_parent", scan_seeing_an_older_grandchild)
    assert sorted(handle.pause()) == sorted([root, child])
    await wait_until(lambda: all_stopped([root, child]), "root and child are stopped")
    assert state(grandchild) != "T"
    monkeypatch.undo()
    await handle.kill(grace=30)
    assert all(dead(pid) for pid in pids)
    handle.close()


def test_attach_refuses_tokenwatch_itself_its_group_and_init() -> None:
    with pytest.raises(NotPermitted, match="tokenwatch itself"):
        ProcessHandle.attach(os.getpid())
    same_group = subprocess.Popen(["sleep", "600"])
    try:
        with pytest.raises(NotPermitted, match="process group"):
            ProcessHandle.attach(same_group.pid)
    finally:
        same_group.kill()
        same_group.wait()
    if os.getpgid(1) != os.getpgrp():
        with pytest.raises(NotPermitted):
            ProcessHandle.attach(1)


def test_attach_refuses_another_users_process() -> None:
    if os.getuid() != 0:
        pytest.skip("starting a process as nobody needs root")
    other = start_as_nobody()
    try:
        with pytest.raises(NotPermitted, match="another user"):
            ProcessHandle.attach(other.pid)
    finally:
        other.kill()
        other.wait()


def test_attach_a_missing_pid_is_process_gone() -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    with pytest.raises(ProcessGone):
        ProcessHandle.attach(pid_max + 1)


INSIDE_THE_TREE = r"""
import json, os, sys
from tokenwatch.process.processes import ProcessHandle
handle = ProcessHandle.attach(os.getppid())
stopped = handle.pause()
resumed = handle.resume()
print(json.dumps({"me": os.getpid(), "stopped": stopped, "tree": [i.pid for i in handle.tree()]}))
"""


def test_a_tree_that_contains_tokenwatch_skips_it(short_tmp: Path) -> None:
    # a parent (own session) runs tokenwatch code in a child of its own: the child pauses its
    # parent's tree; if it stopped itself it would hang and this test would time out
    script = short_tmp / "inside.py"
    script.write_text(INSIDE_THE_TREE)
    parent_code = (
        "import subprocess, sys\n"
        f"out = subprocess.run([sys.executable, {str(script)!r}], start_new_session=True,"
        " capture_output=True, text=True, timeout=60)\n"
        "sys.stdout.write(out.stdout + out.stderr)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", parent_code],
        start_new_session=True,
        capture_output=True,
        text=True,
        timeout=90,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["me"] not in result["stopped"]
    assert result["me"] not in result["tree"]
    assert len(result["stopped"]) == 1


class PhaseRecorder:
    """A scripted sleep for DutyCycle: records each phase once the tree is in the expected state."""

    def __init__(self, pids: list[int], phases: int) -> None:
        self.pids = pids
        self.phases = phases
        self.seen: list[tuple[float, str]] = []
        self.scope = anyio.CancelScope()

    async def sleep(self, seconds: float) -> None:
        running = len(self.seen) % 2 == 0
        if running:
            await wait_until(lambda: none_stopped(self.pids), "the tree runs")
        else:
            await wait_until(lambda: all_stopped(self.pids), "the tree is stopped")
        self.seen.append((seconds, "running" if running else "stopped"))
        if len(self.seen) == self.phases:
            self.scope.cancel()
        await anyio.lowlevel.checkpoint()


async def test_duty_cycle_alternates_and_leaves_the_tree_running(short_tmp: Path) -> None:
    handle, pids = await spawn_tree(short_tmp)
    recorder = PhaseRecorder(pids, phases=4)
    cycle = DutyCycle(handle, run_fraction=0.25, period=2.0, sleep=recorder.sleep)
    with recorder.scope:
        await cycle.run()
    # cancelled during a stopped phase: the tree must have been continued on the way out
    assert recorder.seen == [
        (0.5, "running"),
        (1.5, "stopped"),
        (0.5, "running"),
        (1.5, "stopped"),
    ]
    await wait_until(lambda: none_stopped(pids), "the tree runs after the cycle ends")
    await handle.kill(grace=30)
    handle.close()


class UserAtTheTerminal:
    """A scripted sleep for DutyCycle: at given phases the user presses Ctrl-Z or types `fg`."""

    def __init__(self, pid: int, script: dict[int, str], phases: int) -> None:
        self.pid, self.script, self.phases = pid, script, phases
        self.states: list[str] = []
        self.scope = anyio.CancelScope()

    async def sleep(self, seconds: float) -> None:
        # as the cycle left it, once its stop and a stop it handed on (if any) have landed
        await wait_until(lambda: not stop_signal_pending(self.pid), "signals delivered")
        self.states.append("stopped" if state(self.pid) == "T" else "runs")
        action = self.script.get(len(self.states))
        if action == "ctrl-z":
            os.kill(self.pid, signal.SIGTSTP)
            await wait_until(lambda: state(self.pid) == "T", "stopped by its user")
        elif action == "fg":
            os.kill(self.pid, signal.SIGCONT)
            await wait_until(lambda: state(self.pid) != "T", "continued by its user")
        if len(self.states) == self.phases:
            self.scope.cancel()
        await anyio.lowlevel.checkpoint()


def stop_signal_pending(pid: int) -> bool:
    """A SIGSTOP or job-control stop sent to `pid` has not landed yet: on a busy machine the
    process reads as running until it is next scheduled."""
    mask = sum(
        1 << (sig - 1) for sig in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
    )
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    pending = (
        line.split()[1] for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))
    )
    return any(int(bits, 16) & mask for bits in pending)


def stopped_by(pid: int) -> int | None:
    """The signal that last stopped our child `pid`, if it is stopped now (left to be waited)."""
    info = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
    return info.si_status if info is not None and info.si_code == os.CLD_STOPPED else None


def _start_job(argv: tuple[str, ...]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(list(argv), process_group=0)


@asynccontextmanager
async def job(
    argv: tuple[str, ...] = ("sleep", "600"),
) -> AsyncIterator[tuple[subprocess.Popen[bytes], ProcessHandle]]:
    """A job as a shell starts one: a process group of its own in our session (in a session of
    its own, an orphaned group, the kernel would drop its Ctrl-Z); killed at the end."""
    proc = _start_job(argv)
    handle = ProcessHandle.attach(proc.pid)
    try:
        yield proc, handle
    finally:
        await handle.kill(grace=30)
        handle.close()
        proc.wait()


LAUNCHER = (
    sys.executable,
    "-c",
    "import subprocess, time; subprocess.Popen(['sleep', '600'], process_group=0); time.sleep(600)",
)
"""A root that starts a job of its own: a sleep in a process group of its own."""


async def test_a_ctrl_z_while_the_cycle_lets_it_run_is_left_to_its_user() -> None:
    async with job() as (_, handle):
        user = UserAtTheTerminal(handle.pid, {1: "ctrl-z", 3: "fg"}, phases=5)
        with user.scope:
            await DutyCycle(handle, run_fraction=0.5, period=2.0, sleep=user.sleep).run()
        # phase 1 runs (Ctrl-Z in it); 2 and 3 are held, stopped, untouched; `fg` at the end of
        # 3 hands it back to the cycle, which stops it for phase 4 and lets it run in phase 5
        assert user.states == ["runs", "stopped", "stopped", "stopped", "runs"]
        await wait_until(lambda: state(handle.pid) != "T", "running after the cycle ends")


async def test_a_ctrl_z_while_the_cycle_holds_it_stopped_is_not_lost() -> None:
    async with job() as (_, handle):
        user = UserAtTheTerminal(handle.pid, {2: "ctrl-z"}, phases=4)
        with user.scope:
            await DutyCycle(handle, run_fraction=0.5, period=2.0, sleep=user.sleep).run()
        # phase 2 is the cycle's stop; the Ctrl-Z pressed then is handed on when it would have
        # continued the agent: stopped by SIGTSTP, as the shell expects, and held from then on
        assert user.states == ["runs", "stopped", "stopped", "stopped"]
        assert state(handle.pid) == "T", "the user's stop outlives the cycle"
        assert stopped_by(handle.pid) == signal.SIGTSTP


async def test_resuming_a_paused_job_hands_on_its_users_ctrl_z() -> None:
    async with job() as (_, handle), job() as (plain, other):
        handle.pause()
        await wait_until(lambda: state(handle.pid) == "T", "paused")
        os.kill(handle.pid, signal.SIGTSTP)  # Ctrl-Z while tokenwatch holds it
        await wait_until(handle.stop_pending, "the Ctrl-Z waits, pending")
        handle.resume()
        await wait_until(lambda: stopped_by(handle.pid) == signal.SIGTSTP, "stopped by its user")
        assert state(handle.pid) == "T"
        other.pause()
        await wait_until(lambda: state(plain.pid) == "T", "paused")
        other.resume()  # nothing pending: simply continued
        await wait_until(lambda: state(plain.pid) != "T", "running again")


async def test_a_tree_whose_root_dies_while_stopped_is_continued(short_tmp: Path) -> None:
    handle, (root, *rest) = await spawn_tree(short_tmp)
    seen: list[bool] = []
    scope = anyio.CancelScope()

    async def sleep(seconds: float) -> None:
        expected = all_stopped if len(seen) % 2 else none_stopped  # run, stop, run, stop
        with anyio.move_on_after(5):
            while not expected(rest):
                await anyio.sleep(0.01)
        seen.append(all_stopped(rest))
        if len(seen) == 2:  # the cycle holds the tree stopped: its root dies and is reaped
            os.kill(root, signal.SIGKILL)
            await handle.wait_exit()
        if len(seen) == 4:
            scope.cancel()
        await anyio.lowlevel.checkpoint()

    with scope:
        await DutyCycle(handle, run_fraction=0.5, period=2.0, sleep=sleep).run()
    try:
        assert seen == [False, True, False, True]  # the rest of the tree goes on being cycled
        await wait_until(lambda: none_stopped(rest), "the rest of the tree runs at the end")
    finally:
        await handle.kill(grace=30)
        handle.close()


async def test_a_handed_on_ctrl_z_reaches_only_the_terminals_job() -> None:
    # the job's own process, and a helper it started as a process group of its own
    async with job(LAUNCHER) as (proc, handle):
        await wait_until(lambda: len(handle.tree()) == 2, "the helper is seen")
        helper_pid = handle.tree()[1].pid
        handle.pause()
        await wait_until(lambda: all_stopped([proc.pid, helper_pid]), "paused")
        os.killpg(proc.pid, signal.SIGTSTP)  # Ctrl-Z: the terminal stops its job's group only
        await wait_until(handle.stop_pending, "pending on the job")
        handle.resume()
        await wait_until(lambda: stopped_by(proc.pid) == signal.SIGTSTP, "the job stopped")
        await wait_until(lambda: state(helper_pid) != "T", "the helper, outside the job, runs")


async def test_a_ctrl_z_handed_on_to_a_job_below_the_root_is_held_for_its_user() -> None:
    # the root (a launcher) starts the job the terminal controls, in a group of its own
    async with job(LAUNCHER) as (_, handle):
        await wait_until(lambda: len(handle.tree()) == 2, "the job is seen")
        user = UserAtTheTerminal(handle.tree()[1].pid, {}, phases=5)
        pressed = False

        async def sleep(seconds: float) -> None:
            nonlocal pressed
            await user.sleep(seconds)
            if len(user.states) == 2 and not pressed:  # the cycle holds everything stopped
                pressed = True
                os.killpg(user.pid, signal.SIGTSTP)  # Ctrl-Z: the terminal's job only
                await wait_until(lambda: processes._pending_quietly(user.pid), "pending")

        with user.scope:
            await DutyCycle(handle, run_fraction=0.5, period=2.0, sleep=sleep).run()
        # phase 1 runs, 2 is the cycle's stop (Ctrl-Z in it), then the job stays its user's
        assert user.states == ["runs", "stopped", "stopped", "stopped", "stopped"]
        assert state(user.pid) == "T", "still the user's when the cycle ends"


async def test_duty_cycle_ends_when_the_agent_exits() -> None:
    handle = spawn(["true"], env=dict(os.environ))
    await handle.wait_exit()
    with anyio.fail_after(30):
        await DutyCycle(handle, run_fraction=0.5, period=0.01).run()
    handle.close()


def test_duty_cycle_rejects_a_fraction_out_of_range() -> None:
    handle = spawn(["true"], env=dict(os.environ))
    with pytest.raises(ValueError, match="fraction"):
        DutyCycle(handle, run_fraction=0)
    with pytest.raises(ValueError, match="fraction"):
        DutyCycle(handle, run_fraction=1.5)
    handle.close()


async def test_spawn_logs_output_with_no_stdin_and_reports_the_exit_code(short_tmp: Path) -> None:
    log = short_tmp / "logs" / "agent.log"
    handle = spawn(
        ["sh", "-c", 'echo out; echo err >&2; cat; echo "cwd=$PWD var=$TW_TEST"; exit 3'],
        env={"PATH": os.environ["PATH"], "TW_TEST": "yes"},
        cwd=str(short_tmp),
        log_path=log,
    )
    with anyio.fail_after(30):
        assert await handle.wait_exit() == 3
    assert log.read_text().splitlines() == ["out", "err", f"cwd={short_tmp} var=yes"]
    assert log.stat().st_mode & 0o777 == 0o600
    handle.close()


async def test_a_spawned_agent_has_its_own_session(short_tmp: Path) -> None:
    handle = spawn(["sleep", "600"], env=dict(os.environ))
    assert process_info(handle.pid).sid == handle.pid
    await handle.kill(grace=30)
    assert handle.wait_exit_nowait() == 128 + signal.SIGTERM
    handle.close()


def test_spawn_of_a_missing_command_raises_oserror() -> None:
    with pytest.raises(OSError):
        spawn(["/nonexistent/agent"], env=dict(os.environ))


async def test_waiting_on_an_attached_process_ends_when_it_exits() -> None:
    sleeper = start_sleeper()
    try:
        with ProcessHandle.attach(sleeper.pid) as handle:
            sleeper.terminate()
            with anyio.fail_after(30):
                assert await handle.wait_exit() is None  # not our child: no exit code to read
            assert not handle.alive()
    finally:
        sleeper.kill()
        sleeper.wait()


ODD_NAME = "x) S 1 (y"


def test_a_process_name_with_parentheses_does_not_confuse_the_parser() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c",
         f"open('/proc/self/comm', 'w').write({ODD_NAME!r}); print(flush=True); input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == ODD_NAME
        info = process_info(proc.pid)
        assert (info.ppid, info.sid, info.uid) == (os.getpid(), proc.pid, os.getuid())
        assert info.state in ("R", "S")  # the fields after the name are read from the right place
    finally:
        proc.kill()
        proc.wait()

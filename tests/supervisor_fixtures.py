"""Start a real supervisor for a test: in-process (`running_supervisor`) or as a `tokenwatch serve`
subprocess (`supervisor_process`); plus a raw NDJSON socket client and helpers for process trees."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from tokenwatch.config import Config, RuleSettings
from tokenwatch.core import protocol
from tokenwatch.core.models import UsageEvent
from tokenwatch.instance import socket_answers
from tokenwatch.paths import Paths
from tokenwatch.supervisor.service import Supervisor

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 30.0
RUNNING_STATES = frozenset({"R", "S", "D"})
"""/proc states of a process that is not stopped."""


def quiet_config(**fields: Any) -> Config:
    """A config whose rules never fire (the default rule set pauses runaway agents)."""
    off = RuleSettings(name="off", detector="runaway", enabled=False)
    return Config(**{"rule": [off], **fields})


@contextlib.asynccontextmanager
async def running_supervisor(
    paths: Paths | None = None, config: Config | None = None, **kwargs: Any
) -> AsyncIterator[Supervisor]:
    """A supervisor serving in this event loop (socket at paths.socket) until the block ends.

    kwargs go to Supervisor (clock, spawner, proxy=False, exporters=False).
    """
    sup = Supervisor(paths or Paths.discover(), config or Config(), **kwargs)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(TIMEOUT):
            await tg.start(sup.run)
        try:
            yield sup
        finally:
            sup.request_shutdown()


async def stored(sup: Supervisor, agent: str, count: int) -> list[UsageEvent]:
    """The agent's stored events, oldest first, once at least `count` are in the ledger."""
    assert sup.store is not None
    with anyio.fail_after(TIMEOUT):
        while len(rows := await sup.store.history(agent=agent)) < count:
            await anyio.sleep(0.02)
    return [row.event for row in reversed(rows)]


@dataclass
class ServeProcess:
    """A `tokenwatch serve` subprocess and where it lives."""

    proc: subprocess.Popen[bytes]
    paths: Paths
    env: dict[str, str]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def tokenwatch_env(home: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment a tokenwatch subprocess runs with in tests."""
    env = dict(os.environ)
    if home is not None:
        env["TOKENWATCH_HOME"] = str(home)
        env["HOME"] = str(home)  # set up outside a test (module scope): never the user's own logs
        for var in ("CLAUDE_CONFIG_DIR", "CODEX_HOME", "GEMINI_CLI_HOME"):
            env.pop(var, None)
    env.update(extra)
    return env


def start_serve(env: dict[str, str], *args: str) -> ServeProcess:
    """Start `tokenwatch serve` without waiting for it (see wait_answers)."""
    paths = Paths.discover(env)
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    log = paths.state_dir / f"serve-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenwatch", "serve", *args],
            env=env,
            cwd=str(paths.state_dir),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return ServeProcess(proc, paths, env, log)


def wait_answers(sp: ServeProcess, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not socket_answers(sp.paths.socket):
        if sp.proc.poll() is not None:
            raise AssertionError(f"supervisor exited {sp.proc.returncode}: {sp.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"supervisor did not answer in {timeout}s: {sp.output()}")
        time.sleep(0.02)


def stop_serve(sp: ServeProcess, sig: int = signal.SIGTERM) -> int:
    if sp.proc.poll() is None:
        sp.proc.send_signal(sig)
    try:
        return sp.proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        sp.proc.kill()
        return sp.proc.wait(TIMEOUT)


@contextlib.contextmanager
def supervisor_process(env: dict[str, str] | None = None, *args: str) -> Iterator[ServeProcess]:
    """A `tokenwatch serve` subprocess answering on its socket; SIGTERMed at the end."""
    sp = start_serve(env if env is not None else tokenwatch_env(), *args)
    try:
        wait_answers(sp)
        yield sp
    finally:
        stop_serve(sp)


@dataclass
class RawClient:
    """A bare NDJSON connection (what an agent SDK or a fuzzer sees)."""

    stream: anyio.abc.SocketStream
    buf: bytes = b""
    ids: Iterator[int] = field(default_factory=lambda: iter(range(1, 10**9)))

    async def send(self, msg: dict[str, Any] | bytes) -> None:
        await self.stream.send(msg if isinstance(msg, bytes) else protocol.dumps(msg))

    async def receive(self) -> dict[str, Any]:
        """The next message (reply or push); raises EndOfStream when the server closed."""
        while b"\n" not in self.buf:
            self.buf += await self.stream.receive()
        line, self.buf = self.buf.split(b"\n", 1)
        msg: dict[str, Any] = protocol.loads(line)
        return msg

    async def reply_to(self, mid: Any) -> dict[str, Any]:
        while True:
            msg = await self.receive()
            if msg.get("type") == "reply" and msg.get("re") == mid:
                return msg

    async def call(self, kind: str, **fields: Any) -> dict[str, Any]:
        mid = next(self.ids)
        await self.send(protocol.request(kind, mid, **fields))
        return await self.reply_to(mid)


@contextlib.asynccontextmanager
async def raw_client(path: Path) -> AsyncIterator[RawClient]:
    async with await anyio.connect_unix(path) as stream:
        yield RawClient(stream)


def usage_event(agent: str, call_id: str, **fields: Any) -> dict[str, Any]:
    """A usage event as an SDK sends it."""
    event: dict[str, Any] = {
        "agent": agent,
        "call_id": call_id,
        "provider": "openai",
        "model": "gpt-4o-mini",
        "input_tokens": 100,
        "output_tokens": 20,
        "ts": time.time(),
    }
    event.update(fields)
    return event


# -- real process trees ------------------------------------------------------------------------

TREE_SCRIPT = """
import os, time
# a child, and a grandchild that left the session (setsid); the grandchild says when all exist
if os.fork() == 0:
    if os.fork() == 0:
        os.setsid()
        print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def start_tree() -> subprocess.Popen[bytes]:
    """A python process with a child and a setsid grandchild; returns once they exist."""
    proc = subprocess.Popen(
        [sys.executable, "-c", TREE_SCRIPT],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    return proc


def descendants(pid: int) -> list[int]:
    """pid and every process below it (by /proc ppid links)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(proc_stat(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def proc_stat(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def state_of(pid: int) -> str:
    """One-letter /proc state (R, S, T, Z...), or "gone"."""
    try:
        return proc_stat(pid)[0]
    except OSError:
        return "gone"


async def wait_states(pids: list[int], want: Set[str], timeout: float = TIMEOUT) -> dict[int, str]:
    """Poll /proc until every pid is in one of `want` (a signal is delivered asynchronously)."""
    with anyio.fail_after(timeout):
        while True:
            states = {p: state_of(p) for p in pids}
            if all(s in want for s in states.values()):
                return states
            await anyio.sleep(0.01)


def wait_for_states(pids: list[int], want: Set[str], timeout: float = TIMEOUT) -> dict[int, str]:
    """wait_states for synchronous tests."""
    deadline = time.monotonic() + timeout
    while True:
        states = {p: state_of(p) for p in pids}
        if all(s in want for s in states.values()):
            return states
        if time.monotonic() > deadline:
            raise AssertionError(f"states {states}, wanted {sorted(want)}")
        time.sleep(0.01)


def kill_tree(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def clean_supervisor(prefix: str) -> Iterator[ServeProcess]:
    """`tokenwatch serve` in a fresh home (default rules), its environment clear of any SDK base
    URL or supervisor of the user's; the home is removed after."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    env = tokenwatch_env(home)
    for var in ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "TOKENWATCH_SOCKET", "TOKENWATCH_AGENT"):
        env.pop(var, None)
    try:
        with supervisor_process(env) as sp:
            yield sp
    finally:
        shutil.rmtree(home, ignore_errors=True)

"""Ingest benchmark: usage events per second from 1, 8 and 64 agents over the Unix socket into the
ledger (acknowledged only once stored), with a dashboard-like subscriber attached.

How it measures: a real `tokenwatch serve` process with a fresh TOKENWATCH_HOME; one client
process (this one) opens one connection per agent plus one subscriber (asking for the pushes
the dashboard asks for; `--subscriber all` adds one push per call), sends pre-encoded usage
lines (unique call ids) pipelined in 64 KiB writes, and counts acks as they come back. The rate is
events acknowledged / seconds from the first write to the last ack; the ledger's row count is
checked afterwards, and the resident memory (VmRSS) of the supervisor and its ledger writer
process is read before and after; CPU is theirs together.

    .venv/bin/python bench/ingest.py [--events 100000] [--agents 1,8,64] [--rules default|off]
                                     [--subscriber dashboard|all]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tokenwatch.core import protocol  # noqa: E402
from tokenwatch.instance import socket_answers  # noqa: E402
from tokenwatch.paths import Paths  # noqa: E402
from tokenwatch.tui.source import DASHBOARD_KINDS  # noqa: E402

WRITE_BYTES = 64 * 1024
QUIET_RULES = '[[rule]]\nname = "off"\ndetector = "runaway"\nenabled = false\n'


@dataclass
class Result:
    agents: int
    events: int
    seconds: float
    stored: int
    pushes_seen: int
    rss_before_kb: int
    rss_after_kb: int
    supervisor_cpu_s: float

    @property
    def cpu_us_per_event(self) -> float:
        return self.supervisor_cpu_s / self.events * 1e6

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process, its threads and its live children (the
    ledger's writer process)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(child) for child in children(pid))


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def rss_tree_kb(pid: int) -> int:
    return rss_kb(pid) + sum(rss_tree_kb(child) for child in children(pid))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def supervisor(rules: str) -> Iterator[tuple[subprocess.Popen[bytes], Paths]]:
    home = Path(tempfile.mkdtemp(prefix="tw-bench-"))
    env = {**os.environ, "TOKENWATCH_HOME": str(home)}
    paths = Paths.discover(env)
    paths.config_dir.mkdir(parents=True)
    if rules == "off":
        (paths.config_dir / "tokenwatch.toml").write_text(QUIET_RULES)
    try:
        with serving(env, home) as proc:
            yield proc, paths
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def serving(env: dict[str, str], home: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`tokenwatch serve` in `env`, once its socket answers; stopped (SIGTERM) at the end."""
    paths = Paths.discover(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenwatch", "serve"],
        env=env,
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not socket_answers(paths.socket):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the supervisor did not start")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(60)


def payload(agent: int, count: int, run: int) -> bytes:
    lines = []
    for n in range(count):
        event = {
            "agent": f"bench-{agent}",
            "call_id": f"{run}-{agent}-{n}",
            "provider": "openai",
            "model": "gpt-4o-mini",
            "input_tokens": 1200 + n % 50,
            "output_tokens": 300,
            "cache_read_tokens": 1024,
            "task": f"t-{n // 100}",
            "prompt_hash": f"{n:016x}",
            "latency_ms": 812.5,
            "source": "sdk",
        }
        lines.append(protocol.dumps(protocol.request("usage", n, event=event)))
    return b"".join(lines)


async def agent_connection(path: Path, data: bytes, expected: int) -> None:
    async with await anyio.connect_unix(path) as stream:

        async def send() -> None:
            for i in range(0, len(data), WRITE_BYTES):
                await stream.send(data[i : i + WRITE_BYTES])

        acked = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            while acked < expected:
                acked += (await stream.receive(1 << 20)).count(b"\n")  # one reply per line


# What the dashboard subscribes to; "all" adds a push per call.
SUBSCRIPTIONS = {"dashboard": list(DASHBOARD_KINDS), "all": None}


async def subscriber(path: Path, seen: list[int], ready: anyio.Event, kinds: str) -> None:
    async with await anyio.connect_unix(path) as stream:
        wanted = SUBSCRIPTIONS[kinds]
        await stream.send(
            protocol.dumps(protocol.request("subscribe", 1, interval=1.0, kinds=wanted))
        )
        ready.set()
        while True:
            seen[0] += (await stream.receive(1 << 20)).count(b"\n")


async def one_run(path: Path, agents: int, events: int, run: int, kinds: str) -> tuple[float, int]:
    per_agent = events // agents
    datas = [payload(a, per_agent, run) for a in range(agents)]
    seen = [0]
    async with anyio.create_task_group() as tg:
        ready = anyio.Event()
        tg.start_soon(subscriber, path, seen, ready, kinds)
        await ready.wait()
        start = time.perf_counter()
        async with anyio.create_task_group() as agents_tg:
            for data in datas:
                agents_tg.start_soon(agent_connection, path, data, per_agent)
        elapsed = time.perf_counter() - start
        tg.cancel_scope.cancel()
    return elapsed, seen[0]


def stored_events(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events per run")
    parser.add_argument("--agents", default="1,8,64", help="comma-separated agent counts")
    parser.add_argument("--rules", choices=("default", "off"), default="default",
                        help="run the default detector rules, or none")  # fmt: skip
    parser.add_argument("--subscriber", choices=tuple(SUBSCRIPTIONS), default="dashboard",
                        help="the subscriber asks for what the dashboard does, or for every "
                             "push including one per call")  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    with supervisor(args.rules) as (proc, paths):
        total = 0
        for run, agents in enumerate(int(a) for a in args.agents.split(",")):
            before, cpu = rss_tree_kb(proc.pid), cpu_seconds(proc.pid)
            events = args.events // agents * agents
            seconds, pushes = anyio.run(one_run, paths.socket, agents, events, run, args.subscriber)
            cpu = cpu_seconds(proc.pid) - cpu
            total += events
            stored = stored_events(paths.db) - (total - events)
            results.append(
                Result(agents, events, seconds, stored, pushes, before, rss_tree_kb(proc.pid), cpu)
            )
    if args.json:
        rows = [
            r.__dict__ | {"rate": r.rate, "cpu_us_per_event": r.cpu_us_per_event} for r in results
        ]
        print(json.dumps(rows, indent=2))
        return
    print(f"ingest over the Unix socket, rules={args.rules}, subscriber={args.subscriber}, "
          f"{platform.machine()} "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}")  # fmt: skip
    print(f"{'agents':>6} {'events':>8} {'seconds':>8} {'events/s':>10} {'stored':>8} "
          f"{'pushes':>8} {'CPU us/event':>12} {'RSS MiB before/after':>22}")  # fmt: skip
    for r in results:
        print(f"{r.agents:>6} {r.events:>8} {r.seconds:>8.2f} {r.rate:>10,.0f} {r.stored:>8} "
              f"{r.pushes_seen:>8} {r.cpu_us_per_event:>12.1f} "
              f"{r.rss_before_kb / 1024:>10.0f} / {r.rss_after_kb / 1024:<10.0f}")  # fmt: skip


if __name__ == "__main__":
    main()

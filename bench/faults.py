"""Fault runs (issue #16), repeated: kill -9 while agents report, SDK retries, budgets with tools.

How it measures, on loopback only, each run against a fresh TOKENWATCH_HOME and a real
`tokenwatch serve` process; the provider is `fake-llm`, in this process:

- kill: three agents (child processes) send usage lines over the socket, up to 64
  unacknowledged at a time, and print each call id once its ack is read (an ack means
  "committed"); a fourth reports through the SDK (`tokenwatch.report`) in batches of 50 and
  prints a batch once the SDK says all of it was acknowledged. Once all four have had acks, after
  0.3 to 1.5 s more, one process is sent SIGKILL, in turn: the supervisor (then started again
  on the same ledger), its ledger writer child, or the SDK agent. The rest go on for another
  0.5 s, then everything stops and the ledger is read: lost = acknowledged call ids that are
  not in `events`.
- retries: a real openai-python agent with the SDK's default retries, under
  `tokenwatch run --budget 300`, against fake-llm answering every 2nd request with a 429
  (retry-after 0.1 s). dropped = calls the provider answered 200 minus the agent's `ok` events
  in the ledger; each run must also see the budget refuse.
- budget: 50 concurrent openai-python calls, each with eight tool definitions (about 600 input
  tokens, more than its prompt) and max_tokens 300, through the proxy against a token deny
  budget admitting 3 to 15 of them; the provider takes 1.5 s to answer, so all are in flight
  together. overshoot = tokens the provider billed beyond the limit (documented bound: 0 for
  text and tools; docs/budgets.md).

    .venv/bin/python bench/faults.py [--runs 12] [--seconds 600] [--only kill,retries,budget]

Runs stop at --runs per scenario or when --seconds have passed, whichever comes first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tokenwatch.core.request_tokens import CHAT, count_request  # noqa: E402
from tokenwatch.demo.fake_llm import fake_llm_in_thread  # noqa: E402
from tokenwatch.demo.fault_load import RETRIED_CALLS, TOOLS  # noqa: E402
from tokenwatch.instance import socket_answers  # noqa: E402
from tokenwatch.paths import Paths  # noqa: E402

QUIET_RULES = '[[rule]]\nname = "off"\ndetector = "runaway"\nenabled = false\n'
VICTIMS = ("supervisor", "writer", "sdk agent")

AGENT = """
import socket, sys, time
from tokenwatch.core import protocol
name, path = sys.argv[1], sys.argv[2]
sock = socket.socket(socket.AF_UNIX)
sock.connect(path)
buf, sent, acked, window = b"", 0, 0, 64
try:
    while True:
        while sent - acked < window:
            event = {"agent": name, "call_id": f"{name}-{sent}", "provider": "openai",
                     "model": "gpt-4o-mini", "input_tokens": 1000, "output_tokens": 100}
            sock.sendall(protocol.dumps(protocol.request("usage", sent, event=event)))
            sent += 1
        data = sock.recv(1 << 16)
        if not data:
            break
        buf += data
        *lines, buf = buf.split(b"\\n")
        for line in lines:
            msg = protocol.loads(line)
            if msg.get("type") == "reply" and msg.get("ok"):
                print(f"{name}-{msg['re']}", flush=True)
                acked += 1
except OSError:
    pass
"""
"""An agent reporting as fast as acks come back; prints each acknowledged call id."""

SDK_AGENT = """
import sys
import tokenwatch
from tokenwatch.client import session
name, batch = sys.argv[1], 0
while True:
    ids = [f"{name}-{batch}-{n}" for n in range(50)]
    for call_id in ids:
        tokenwatch.report(model="gpt-4o-mini", input_tokens=1000, output_tokens=100, call_id=call_id)
    if session.reporter().wait_flushed(30):  # every one acknowledged, so committed
        print("\\n".join(ids), flush=True)
    batch += 1
"""
"""An agent reporting through the SDK (`tokenwatch.report`); prints each batch once all of it
is acknowledged."""

MAX_TOKENS = 300


@dataclass
class Home:
    """A fresh TOKENWATCH_HOME and the supervisor serving it."""

    path: Path
    env: dict[str, str]
    paths: Paths
    serve: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.serve = subprocess.Popen(
            [sys.executable, "-m", "tokenwatch", "serve"], env=self.env, cwd=self.path,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not socket_answers(self.paths.socket):
            if self.serve.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the supervisor did not start in {self.path}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.serve is not None and self.serve.poll() is None:
            self.serve.terminate()
            self.serve.wait(60)

    def writer(self) -> int:
        assert self.serve is not None
        for task in Path(f"/proc/{self.serve.pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                if b"writer_process" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return int(child)
        raise SystemExit("the supervisor has no ledger writer process")


@contextlib.contextmanager
def home(config: str = QUIET_RULES) -> Iterator[Home]:
    path = Path(tempfile.mkdtemp(prefix="tw-faults-"))
    env = {**os.environ, "TOKENWATCH_HOME": str(path)}
    for var in ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "TOKENWATCH_SOCKET", "TOKENWATCH_AGENT"):
        env.pop(var, None)
    paths = Paths.discover(env)
    paths.config_dir.mkdir(parents=True)
    (paths.config_dir / "tokenwatch.toml").write_text(config)
    h = Home(path, env, paths)
    try:
        h.start()
        yield h
    finally:
        h.stop()
        shutil.rmtree(path, ignore_errors=True)


# -- kill -9 while agents report ------------------------------------------------------------------


@dataclass
class KillRun:
    victim: str
    acked: int
    sdk_acked: int
    lost: int


def start_agents(h: Home, count: int) -> list[subprocess.Popen[bytes]]:
    """`count` agents on the raw socket, and one through the SDK (first)."""
    env = {**h.env, "TOKENWATCH_SOCKET": str(h.paths.socket), "TOKENWATCH_AGENT": "sdk"}
    sdk = [sys.executable, "-c", SDK_AGENT, "sdk"]
    raw = [[sys.executable, "-c", AGENT, f"agent{i}", str(h.paths.socket)] for i in range(count)]
    agents = []
    for n, argv in enumerate([sdk, *raw]):
        # a file, not a pipe: a full pipe would stop the agent, and with it the load
        with open(h.path / f"acked-{n}.txt", "wb") as out:
            agents.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.DEVNULL))
    return agents


def wait_reporting(h: Home, count: int) -> None:
    """Until every agent has had an ack (the load is on: a kill before would find nothing)."""
    deadline = time.monotonic() + 60
    while sum(1 for f in h.path.glob("acked-*.txt") if f.stat().st_size) < count:
        if time.monotonic() > deadline:
            raise SystemExit("the agents did not start reporting")
        time.sleep(0.05)


def kill_run(victim: str, rng: random.Random) -> KillRun:
    with home() as h:
        agents = start_agents(h, 3)
        wait_reporting(h, len(agents))
        time.sleep(rng.uniform(0.3, 1.5))
        assert h.serve is not None
        pid = {"supervisor": h.serve.pid, "writer": h.writer(), "sdk agent": agents[0].pid}[victim]
        os.kill(pid, signal.SIGKILL)
        if victim == "supervisor":
            h.serve.wait()
            h.start()  # the next supervisor opens the ledger the killed one was writing
        time.sleep(0.5)
        for agent in agents:
            agent.terminate()
            agent.wait()
        # a line cut by the kill is not an ack: only whole lines count
        printed = [f.read_text().split("\n")[:-1] for f in h.path.glob("acked-*.txt")]
        acked = {line for lines in printed for line in lines}
        h.stop()
        with sqlite3.connect(h.paths.db) as db:
            stored = {row[0] for row in db.execute("SELECT call_id FROM events")}
    sdk = sum(1 for call_id in acked if call_id.startswith("sdk-"))
    return KillRun(victim, len(acked), sdk, len(acked - stored))


# -- SDK retries ----------------------------------------------------------------------------------


@dataclass
class RetryRun:
    answered: int
    recorded: int
    refused: int


def retry_run(n: int) -> RetryRun:
    with (
        home() as h,
        fake_llm_in_thread(fail_every=2, fail_status=429, retry_after_s=0.1) as fake,
    ):
        out = subprocess.run(
            [sys.executable, "-m", "tokenwatch", "run", "-q", "--name", f"retrier{n}",
             "--budget", "300tokens", "--", sys.executable, "-c", RETRIED_CALLS],
            env={**h.env, "OPENAI_BASE_URL": fake.url + "/v1"}, cwd=h.path,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        h.stop()
        with sqlite3.connect(h.paths.db) as db:
            query = "SELECT COUNT(*) FROM events WHERE status = 'ok' AND http_status = 200"
            (recorded,) = db.execute(query).fetchone()
    answered = sum(1 for c in fake.calls if c.status == 200)
    return RetryRun(answered, recorded, out.stdout.split().count("refused"))


# -- concurrent budget runs with tools ------------------------------------------------------------


@dataclass
class BudgetRun:
    limit: int
    ok: int
    refused: int
    billed: int

    @property
    def overshoot(self) -> int:
        return max(0, self.billed - self.limit)


def worst_case(i: int) -> int:
    body = {"messages": [question(i)], "tools": TOOLS}
    return count_request(CHAT, body, "gpt-4o-mini").tokens + MAX_TOKENS


def question(i: int) -> dict[str, str]:
    return {"role": "user", "content": f"Question {i}: why?"}


async def fifty_calls(base_url: str) -> list[str]:
    import openai

    outcomes: list[str] = []
    async with openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0) as client:

        async def one(i: int) -> None:
            try:
                await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[question(i)],  # type: ignore[list-item]
                    max_tokens=MAX_TOKENS, tools=TOOLS,  # type: ignore[arg-type]
                )  # fmt: skip
                outcomes.append("ok")
            except openai.RateLimitError:
                outcomes.append("refused")

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i, name=f"call-{i}")
    return outcomes


async def register(h: Home) -> str:
    from tokenwatch.client.control import SupervisorClient

    async with await SupervisorClient.connect(socket_path=h.paths.socket, start=False) as ctl:
        registered = await ctl.request("register", name="crowd")
    return str(registered["env"]["OPENAI_BASE_URL"])


def budget_run(rng: random.Random) -> BudgetRun:
    limit = worst_case(0) * rng.randint(3, 15) + rng.randint(0, worst_case(0) - 1)
    with fake_llm_in_thread(latency_ms=1500) as fake:
        config = QUIET_RULES + (
            f'[proxy]\nopenai_upstream = "{fake.url}/v1"\n'
            f'[[budget]]\nscope = "agent"\ntarget = "crowd"\nlimit = {limit}\naction = "deny"\n'
        )
        with home(config) as h:
            outcomes = anyio.run(lambda: fifty_calls_for(h))
        billed = sum(c.input_tokens + c.output_tokens for c in fake.calls if c.status == 200)
    return BudgetRun(limit, outcomes.count("ok"), outcomes.count("refused"), billed)


async def fifty_calls_for(h: Home) -> list[str]:
    return await fifty_calls(await register(h))


# -- report ---------------------------------------------------------------------------------------


@dataclass
class Figures:
    kills: list[KillRun] = field(default_factory=list)
    retries: list[RetryRun] = field(default_factory=list)
    budgets: list[BudgetRun] = field(default_factory=list)


def run_all(runs: int, seconds: float, only: set[str], seed: int) -> Figures:
    rng, figures = random.Random(seed), Figures()
    deadline = time.monotonic() + seconds
    for n in range(runs):
        if time.monotonic() > deadline:
            break
        if "kill" in only:
            figures.kills.append(kill_run(VICTIMS[n % len(VICTIMS)], rng))
        if "retries" in only and time.monotonic() < deadline:
            figures.retries.append(retry_run(n))
        if "budget" in only and time.monotonic() < deadline:
            figures.budgets.append(budget_run(rng))
    return figures


def report(figures: Figures, elapsed: float) -> dict[str, Any]:
    kills, retries, budgets = figures.kills, figures.retries, figures.budgets
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "seconds": round(elapsed, 1),
        "kill": {
            "runs": {v: sum(1 for k in kills if k.victim == v) for v in VICTIMS},
            "acknowledged": sum(k.acked for k in kills),
            "of_which_through_the_sdk": sum(k.sdk_acked for k in kills),
            "lost": sum(k.lost for k in kills),
        },
        "retries": {
            "runs": len(retries),
            "answered": sum(r.answered for r in retries),
            "recorded": sum(r.recorded for r in retries),
            "dropped": sum(max(0, r.answered - r.recorded) for r in retries),
            "runs_refused_by_the_budget": sum(1 for r in retries if r.refused),
        },
        "budget": {
            "runs": len(budgets),
            "calls": 50 * len(budgets),
            "admitted": sum(b.ok for b in budgets),
            "refused": sum(b.refused for b in budgets),
            "worst_case_per_call": worst_case(0),
            "max_overshoot_tokens": max((b.overshoot for b in budgets), default=0),
            "max_use_of_limit_pct": round(
                max((100 * b.billed / b.limit for b in budgets), default=0), 1
            ),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12, help="runs per scenario (default 12)")
    parser.add_argument("--seconds", type=float, default=600, help="stop after (default 600)")
    parser.add_argument("--only", default="kill,retries,budget", help="scenarios to run")
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    start = time.monotonic()
    figures = run_all(args.runs, args.seconds, set(args.only.split(",")), args.seed)
    out = report(figures, time.monotonic() - start)
    print(json.dumps(out, indent=2))
    bad = out["kill"]["lost"] or out["retries"]["dropped"] or out["budget"]["max_overshoot_tokens"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

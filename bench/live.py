"""The detection benchmark's live replay: wire-format traces replayed by real agent processes
under `tokenwatch run`, a real `tokenwatch serve` with the default rules, calls through its proxy
to fake-llm; where each agent stopped is read from /proc and compared with the Rules replay of
the same calls.

Each trace's first calls (a runaway's up to 6 past its start) are written as requests; a
bench/live_agent.py process sends them (a sampler's copies at once, from threads), waiting after
each answer the seconds the recorded agent did, so pollers keep their pace. All agents run at
once; an agent has stopped when /proc/PID/stat says T and it answers no more calls. Agreement:
the same traces are stopped live and in the replay, at the same call (live may count one more:
a call already answered while the pause landed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from ingest import serving
from traces.corpus import Trace

from tokenwatch.demo.fake_llm import fake_llm_in_thread

AGENT = Path(__file__).resolve().parent / "live_agent.py"
PAST_START = 6
HEALTHY_CALLS = 8
FAKE_LATENCY_MS = 300
"""fake-llm's time to answer: the sampler's 5 copies are in flight together. Its replies follow
the last message (`--reply-to-last`), so a question asked again is answered alike, as the
recorded turn loop's model did."""


@dataclass
class Live:
    trace: Trace
    calls: int
    run: subprocess.Popen[str]
    pid: int = 0
    answered: list[int] = field(default_factory=list)

    def follow(self) -> None:
        assert self.run.stdout is not None
        self.pid = int(self.run.stdout.readline())
        for line in self.run.stdout:
            self.answered.append(int(line))


def calls_of(trace: Trace) -> int:
    if trace.start is None:
        return min(HEALTHY_CALLS, len(trace.requests))
    return min(trace.start + PAST_START, len(trace.requests))


@contextlib.contextmanager
def supervised() -> Iterator[dict[str, str]]:
    """A `tokenwatch serve` with the default rules in a fresh home: the agents' environment."""
    home = Path(tempfile.mkdtemp(prefix="tw-live-"))
    env = {**os.environ, "TOKENWATCH_HOME": str(home)}
    for var in ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "TOKENWATCH_SOCKET", "TOKENWATCH_AGENT"):
        env.pop(var, None)
    try:
        with serving(env, home):
            yield env
    finally:
        shutil.rmtree(home, ignore_errors=True)


def replay_live(traces: list[Trace], settle: float = 5.0) -> dict[str, int | None]:
    """Each trace's stopping call live (index into its calls), or None if it ran to its end."""
    with (
        supervised() as env,
        fake_llm_in_thread(latency_ms=FAKE_LATENCY_MS, reply_to_last=True) as fake,
    ):
        env = {**env, "OPENAI_BASE_URL": fake.url + "/v1", "ANTHROPIC_BASE_URL": fake.url}
        work = Path(env["TOKENWATCH_HOME"])
        agents = [_start(t, env, work) for t in traces]
        followers = [
            threading.Thread(target=a.follow, name=f"follow-{a.trace.name}") for a in agents
        ]
        for f in followers:
            f.start()
        stopped = _wait(agents, settle)
        for a in agents:
            a.run.kill()  # `tokenwatch run`; its agent's whole tree goes with the supervisor's kill
            subprocess.run([sys.executable, "-m", "tokenwatch", "kill", a.trace.name], env=env,
                           capture_output=True, timeout=60)  # fmt: skip
            a.run.wait(60)
        for f in followers:
            f.join(60)
    return stopped


def _start(trace: Trace, env: dict[str, str], work: Path) -> Live:
    calls = calls_of(trace)
    script = work / f"{trace.name}.jsonl"
    script.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in trace.requests[:calls]))
    run = subprocess.Popen(
        [sys.executable, "-m", "tokenwatch", "run", "-q", "--name", trace.name, "--",
         sys.executable, str(AGENT), str(script)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    return Live(trace, calls, run)


def _wait(agents: list[Live], settle: float) -> dict[str, int | None]:
    """Until every agent has exited or stayed stopped (state T) for `settle` seconds."""
    stopped_since: dict[str, float] = {}
    while True:
        now = time.monotonic()
        pending = False
        for a in agents:
            if a.run.poll() is not None:
                continue
            if a.pid and _state(a.pid) == "T":
                stopped_since.setdefault(a.trace.name, now)
                if now - stopped_since[a.trace.name] >= settle:
                    continue
            else:
                stopped_since.pop(a.trace.name, None)
            pending = True
        if not pending:
            break
        time.sleep(0.2)
    return {
        a.trace.name: (a.answered[-1] if a.answered else -1)
        if a.trace.name in stopped_since
        else None
        for a in agents
    }


def _state(pid: int) -> str:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return "gone"
    return data[data.rindex(b")") + 2 :].split()[0].decode()

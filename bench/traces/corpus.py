"""Scripted agent traces for the detection benchmark: healthy ones that look like trouble, and
runaways of several kinds, each with the index of the call at which it started.

Usage: python bench/traces/corpus.py [--write DIR]   (one JSON-lines file per trace)

Prompts are made up and hashed the way the SDK and the proxy hash them
(tokenwatch.core.tokens.prompt_hash / prompt_shape_hash); only hashes and sizes reach detectors.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenwatch.core.models import UsageEvent
from tokenwatch.core.tokens import prompt_hash, prompt_shape_hash

from . import agents

T0 = 1_795_420_800.0  # 2026-11-23 00:00 UTC; every trace starts within the day
WORDS = [
    "invoice",
    "contract",
    "memo",
    "report",
    "letter",
    "minutes",
    "brief",
    "note",
    "schema",
    "parser",
    "cache",
    "index",
    "query",
    "router",
    "handler",
    "worker",
    "queue",
    "table",
    "column",
    "budget",
    "ledger",
    "socket",
    "stream",
    "token",
    "model",
    "agent",
]


@dataclass
class Trace:
    name: str
    kind: str
    """healthy, loop, near_loop, tool_loop, turn_loop, alternation, spike, snowball or overrun."""
    events: list[UsageEvent] = field(default_factory=list)
    start: int | None = None
    """Index of the first call of the runaway (None for a healthy trace)."""
    task_ends: dict[int, str] = field(default_factory=dict)
    """After the call at this index, the agent says its task is over."""
    requests: list[dict[str, Any]] = field(default_factory=list)
    """The wire-format kinds' requests, for the live replay (agents.Recording)."""

    @property
    def runaway(self) -> bool:
        return self.start is not None


class _Writer:
    """Builds one agent's calls on a moving clock."""

    def __init__(self, agent: str, rng: random.Random, start: float) -> None:
        self.agent, self.rng, self.now = agent, rng, start
        self.events: list[UsageEvent] = []

    def call(
        self,
        prompt: Any,
        tokens: int,
        *,
        after: float,
        task: str = "",
        out: int = 300,
        status: str = "ok",
        latency: float | None = None,
    ) -> None:
        self.now += after
        self.events.append(
            UsageEvent(
                ts=self.now,
                agent=self.agent,
                task=task,
                model="gpt-4o",
                provider="openai",
                input_tokens=tokens,
                output_tokens=out if status == "ok" else 0,
                cost_usd=(tokens * 2.5 + out * 10) / 1e6,
                status=status,
                prompt_hash=prompt_hash(prompt),
                prompt_shape=prompt_shape_hash(prompt),
                latency_ms=None if latency is None else latency * 1000,
            )
        )

    def sentence(self, n: int = 12) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(n))


# -- healthy ---------------------------------------------------------------------------------------


def chat(rng: random.Random) -> Trace:
    """A person chatting in short turns (`ok`, `go on`), the history growing each turn."""
    w = _Writer("chat", rng, T0 + rng.uniform(0, 3600))
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(rng.randint(30, 60)):
        messages.append({"role": "user", "content": rng.choice(["ok", "go on", "ok", "yes"])})
        w.call(list(messages), 60 + 80 * i, after=rng.uniform(2, 20))
        messages.append({"role": "assistant", "content": w.sentence(40)})
    return Trace("chat", "healthy", w.events)


def batch(rng: random.Random) -> Trace:
    """A batch job summarising many different documents as fast as the API allows."""
    w = _Writer("batch", rng, T0 + rng.uniform(0, 3600))
    for _ in range(rng.randint(150, 300)):
        w.call(f"Summarise: {w.sentence(60)}", rng.randint(600, 2500), after=rng.uniform(0.1, 0.6))
    return Trace("batch", "healthy", w.events)


def long_task(rng: random.Random) -> Trace:
    """One long, expensive task: a big fixed document, a different question each step."""
    w = _Writer("analyst", rng, T0 + rng.uniform(0, 3600))
    size = rng.randint(5000, 7500)
    for _ in range(rng.randint(30, 60)):
        w.call(
            f"<document> Q: {w.sentence(8)}",
            size + rng.randint(0, 200),
            after=rng.uniform(10, 40),
            task="audit",
            out=rng.randint(300, 1500),
        )
    return Trace("long-task", "healthy", w.events)


def coder(rng: random.Random) -> Trace:
    """A coding agent: tasks of a dozen steps, the context growing within each, then ending."""
    w = _Writer("coder", rng, T0 + rng.uniform(0, 3600))
    ends: dict[int, str] = {}
    for t in range(rng.randint(5, 10)):
        context = rng.randint(1500, 3000)
        _coding_task(w, ends, f"issue-{t}", context, [0] * rng.randint(6, 14))
    return Trace("coder", "healthy", w.events, task_ends=ends)


def paster(rng: random.Random) -> Trace:
    """A coding agent that, once, pastes a big file (6-12k tokens) into a task's context."""
    w = _Writer("paster", rng, T0 + rng.uniform(0, 3600))
    ends: dict[int, str] = {}
    tasks = rng.randint(4, 8)
    pasted_in = rng.randrange(tasks)
    for t in range(tasks):
        context = rng.randint(1500, 3000)
        steps = rng.randint(6, 14)
        paste_at = rng.randrange(1, steps) if t == pasted_in else -1
        paste = rng.randint(6000, 12000)
        extra = [paste if s == paste_at else 0 for s in range(steps)]
        _coding_task(w, ends, f"issue-{t}", context, extra)
    return Trace("paster", "healthy", w.events, task_ends=ends)


def reader(rng: random.Random) -> Trace:
    """A coding agent that starts each task by reading two to four files (1.5-5k tokens each)."""
    w = _Writer("reader", rng, T0 + rng.uniform(0, 3600))
    ends: dict[int, str] = {}
    for t in range(rng.randint(4, 8)):
        context = rng.randint(1500, 3000)
        files = [rng.randint(1300, 4100) for _ in range(rng.randint(2, 4))]
        _coding_task(w, ends, f"issue-{t}", context, files + [0] * rng.randint(4, 10))
    return Trace("reader", "healthy", w.events, task_ends=ends)


def big_reader(rng: random.Random) -> Trace:
    """A coding agent of small tasks that, once, opens a task by reading three big files (4-8k
    tokens each): three prompts in a row, each 10 % or more above the last and far above its
    usual, as a snowball's first three are."""
    w = _Writer("big-reader", rng, T0 + rng.uniform(0, 3600))
    ends: dict[int, str] = {}
    tasks = rng.randint(4, 8)
    once = rng.randrange(1, tasks)
    for t in range(tasks):
        files = [rng.randint(4000, 8000) for _ in range(3)] if t == once else []
        _coding_task(
            w, ends, f"issue-{t}", rng.randint(1500, 3000), files + [0] * rng.randint(4, 10)
        )
    return Trace("big-reader", "healthy", w.events, task_ends=ends)


def _coding_task(
    w: _Writer, ends: dict[int, str], task: str, context: int, extra: list[int]
) -> None:
    """A coding agent's task, a step per item of `extra`: each adds 200-900 tokens and its item."""
    for added in extra:
        context += w.rng.randint(200, 900) + added
        w.call(f"step {w.sentence(10)}", context, after=w.rng.uniform(3, 15), task=task)
    ends[len(w.events) - 1] = task
    w.now += w.rng.uniform(30, 120)


def _job(w: _Writer, ends: dict[int, str], name: str, calls: int) -> None:
    """One task of `calls` calls of 1.5-2k tokens, ended."""
    for _ in range(calls):
        w.call(
            f"work {w.sentence(12)}",
            w.rng.randint(1500, 2000),
            after=w.rng.uniform(5, 20),
            task=name,
        )
    ends[len(w.events) - 1] = name


def longer_once(rng: random.Random) -> Trace:
    """The overrun's worker on a good day: usual tasks, one twice as long as usual, usual again."""
    w = _Writer("worker", rng, T0 + rng.uniform(0, 3600))
    ends: dict[int, str] = {}
    for t in range(4):
        _job(w, ends, f"job-{t}", rng.randint(4, 6))
    _job(w, ends, "job-4", rng.randint(8, 12))
    for t in range(5, 7):
        _job(w, ends, f"job-{t}", rng.randint(4, 6))
    return Trace("longer-once", "healthy", w.events, task_ends=ends)


def retrier(rng: random.Random) -> Trace:
    """An agent whose SDK retries rate-limited calls with the very same prompt."""
    w = _Writer("retrier", rng, T0 + rng.uniform(0, 3600))
    for _ in range(rng.randint(40, 80)):
        prompt = f"Classify: {w.sentence(30)}"
        for _ in range(rng.choice([0, 0, 1, 2])):
            w.call(prompt, 900, after=rng.uniform(0.5, 2), status="error")
        w.call(prompt, 900, after=rng.uniform(0.5, 2))
    return Trace("retrier", "healthy", w.events)


def bursty(rng: random.Random) -> Trace:
    """Bursts of work with idle spells between, for an hour: its usual pace is bursty."""
    w = _Writer("bursty", rng, T0 + rng.uniform(0, 3600))
    end = w.now + 3600
    while w.now < end:
        for _ in range(rng.randint(4, 10)):
            w.call(f"tool {w.sentence(12)}", rng.randint(1500, 3000), after=rng.uniform(2, 6))
        w.now += rng.uniform(60, 240)
    return Trace("bursty", "healthy", w.events)


# -- runaways --------------------------------------------------------------------------------------


def _prefix(rng: random.Random, agent: str, minutes: float = 35) -> _Writer:
    """Normal work at a steady pace before something goes wrong."""
    w = _Writer(agent, rng, T0 + rng.uniform(0, 3600))
    end = w.now + minutes * 60
    while w.now < end:
        w.call(f"step {w.sentence(14)}", rng.randint(800, 2000), after=rng.uniform(30, 90))
    return w


def loop(rng: random.Random) -> Trace:
    """The same prompt sent again and again (a tool error the agent keeps retrying)."""
    w = _Writer("looper", rng, T0 + rng.uniform(0, 3600))
    for _ in range(rng.randint(3, 15)):
        w.call(f"step {w.sentence(14)}", rng.randint(800, 2000), after=rng.uniform(5, 30))
    start, prompt = len(w.events), [{"role": "user", "content": "Run the tests; fix what fails."}]
    for _ in range(30):
        # sent again as soon as the answer is in: the model's time is most of the gap
        after = rng.uniform(2, 9)
        w.call(prompt, 1800, after=after, latency=after * rng.uniform(0.5, 0.9))
    return Trace("loop", "loop", w.events, start)


def near_loop(rng: random.Random) -> Trace:
    """A loop where only an attempt counter and a timestamp change in the prompt."""
    w = _Writer("retry-bot", rng, T0 + rng.uniform(0, 3600))
    for _ in range(rng.randint(3, 15)):
        w.call(f"step {w.sentence(14)}", rng.randint(800, 2000), after=rng.uniform(5, 30))
    start = len(w.events)
    for n in range(30):
        after = rng.uniform(2, 9)
        w.now += after
        stamp = f"2026-11-23T{int(w.now // 3600 % 24):02d}:{int(w.now // 60 % 60):02d}:00Z"
        prompt = f"Attempt {n + 1} at {stamp}: deploy service-42 and report"
        w.call(prompt, 2100 + n % 3, after=0, latency=after * rng.uniform(0.5, 0.9))
    return Trace("near-loop", "near_loop", w.events, start)


def spike(rng: random.Random) -> Trace:
    """Steady work for half an hour, then a fan-out burning many times faster (all different)."""
    w = _prefix(rng, "planner")
    start = len(w.events)
    for _ in range(40):
        w.call(f"subtask {w.sentence(20)}", rng.randint(3000, 6000), after=rng.uniform(0.5, 3))
    return Trace("spike", "spike", w.events, start)


def snowball(rng: random.Random) -> Trace:
    """A task whose prompt grows every call (tool output appended, never trimmed)."""
    w = _Writer("snowball", rng, T0 + rng.uniform(0, 3600))
    for _ in range(rng.randint(3, 8)):
        w.call(
            f"step {w.sentence(14)}", rng.randint(2000, 4000), after=rng.uniform(5, 20), task="t"
        )
    start, size = len(w.events), rng.randint(8000, 12000)
    for _ in range(25):
        size = int(size * rng.uniform(1.15, 1.3))
        w.call(f"continue {w.sentence(10)}", size, after=rng.uniform(5, 20), task="t")
    return Trace("snowball", "snowball", w.events, start)


def overrun(rng: random.Random) -> Trace:
    """Usual tasks of ~10k tokens, then one that goes on and on.

    Its start is the first call at which the long task has used more tokens than any task the
    agent finished before: until then it is a task like the agent's others."""
    w = _Writer("worker", rng, T0 + rng.uniform(0, 3600))
    ends: dict[int, str] = {}
    for t in range(4):
        _job(w, ends, f"job-{t}", rng.randint(4, 6))
    largest = max(_task_sizes(w.events).values())
    first = len(w.events)
    for _ in range(60):
        w.call(
            f"work {w.sentence(12)}",
            rng.randint(1500, 2000),
            after=rng.uniform(5, 20),
            task="job-4",
        )
    used = itertools.accumulate(e.total_tokens for e in w.events[first:])
    start = first + next(i for i, tokens in enumerate(used) if tokens > largest)
    return Trace("overrun", "overrun", w.events, start, task_ends=ends)


def _task_sizes(events: list[UsageEvent]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for e in events:
        sizes[e.task] = sizes.get(e.task, 0) + e.total_tokens
    return sizes


HEALTHY: tuple[Callable[[random.Random], Trace], ...] = (
    chat,
    batch,
    long_task,
    coder,
    retrier,
    bursty,
    paster,
    reader,
    big_reader,
    longer_once,
)
RUNAWAY: tuple[Callable[[random.Random], Trace], ...] = (loop, near_loop, spike, snowball, overrun)


def corpus(variants: int = 10, seed: int = 2026) -> list[Trace]:
    """`variants` seeded traces of every kind (the wire-format kinds take the wires in turn)."""
    traces = []
    for make in (*HEALTHY, *RUNAWAY):
        for v in range(variants):
            trace = make(random.Random(f"{seed}-{make.__name__}-{v}"))
            trace.name = f"{trace.name}-{v}"
            traces.append(trace)
    for kind, healthy in agents.HEALTHY.items():
        for v in range(variants):
            wire = agents.wire_for(v)
            done = healthy(random.Random(f"{seed}-{kind}-{v}"), wire)
            traces.append(
                Trace(f"{kind}-{wire}-{v}", "healthy", done.events, requests=done.requests)
            )
    for kind, runaway in agents.RUNAWAYS.items():
        for v in range(variants):
            wire = agents.wire_for(v)
            done = runaway(random.Random(f"{seed}-{kind}-{v}"), wire)
            traces.append(Trace(f"{kind}-{wire}-{v}", kind, done.events, done.start,
                                requests=done.requests))  # fmt: skip
    return traces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--write", metavar="DIR", help="write each trace as JSON lines here")
    parser.add_argument("--variants", type=int, default=10)
    args = parser.parse_args()
    traces = corpus(args.variants)
    for t in traces:
        print(f"{t.name:16} {t.kind:9} calls={len(t.events):4} start={t.start}")
    if args.write:
        out = Path(args.write)
        out.mkdir(parents=True, exist_ok=True)
        for t in traces:
            meta = {"trace": t.name, "kind": t.kind, "start": t.start, "task_ends": t.task_ends}
            lines = [json.dumps(meta)] + [json.dumps(e.to_dict()) for e in t.events]
            (out / f"{t.name}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

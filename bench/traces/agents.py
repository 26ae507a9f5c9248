"""Traces of agents that talk in the real wire formats (bench/traces/wire.py): tool, turn and
alternation loops, and the healthy look-alikes that repeat themselves without looping (pollers,
best-of-n sampling, templated batches, "continue" chats, a coder reading many files, an agent
polling CI with waits). Each runaway says at which call it starts."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenwatch.core.models import UsageEvent

from .wire import WIRES, Talk, recorded

T0 = 1_795_420_800.0  # 2026-11-23 00:00 UTC, as corpus.py
WORDS = ["parse", "order", "token", "cache", "retry", "queue", "ledger", "budget", "user", "route"]
FILES = ["api.py", "models.py", "db.py", "auth.py", "cli.py", "routes.py", "tests.py", "util.py"]


@dataclass
class Recording:
    """What an agent did: the usage events the proxy records, the requests it sent (for the live
    replay: each with the seconds the agent spent before its next call, and how many copies it
    sent at once), and for a runaway the index of the call where it starts."""

    events: list[UsageEvent]
    requests: list[dict[str, Any]] = field(default_factory=list)
    start: int | None = None


class Agent:
    """One agent's calls on a moving clock: each call waits for the model (`latency`), then the
    agent works for `idle` seconds (runs a tool, sleeps) before its next call."""

    def __init__(self, name: str, rng: random.Random, wire: str) -> None:
        self.name, self.rng, self.wire = name, rng, wire
        self.now = T0 + rng.uniform(0, 3600)
        self.events: list[UsageEvent] = []
        self.requests: list[dict[str, Any]] = []
        self.talk = Talk(wire)
        self.tokens = rng.randint(7000, 9000)

    def call(self, answer: Callable[[], dict[str, Any]], *, idle: float | None = None) -> None:
        """Send the conversation as it stands; the model answers with `answer()`."""
        body = self.talk.body()
        latency = self.rng.uniform(1.0, 6.0)
        doc = answer()
        self.events.append(
            recorded(self.wire, body, doc, agent=self.name, ts=self.now, latency=latency,
                     tokens=self.tokens)
        )  # fmt: skip
        self.tokens += self.rng.randint(80, 400)
        gap = self.rng.uniform(0.05, 2.0) if idle is None else idle
        self.requests.append({"wire": self.wire, "body": body, "idle": gap, "copies": 1})
        self.now += latency + gap

    def recording(self, start: int | None = None) -> Recording:
        return Recording(self.events, self.requests, start)

    def tool(self, name: str, args: dict[str, Any], result: str, **kw: Any) -> None:
        """A call the model answers with a tool call; the agent runs it and keeps its result."""
        self.call(lambda: self.talk.tool_answer(name, args), **kw)
        self.talk.tool_result(result)

    def words(self, n: int = 12) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(n))

    def work(self, steps: int) -> None:
        """Ordinary steps: reading files, one after another."""
        for path in self.rng.sample(FILES, min(steps, len(FILES))):
            self.tool("read_file", {"path": f"src/{path}"}, f"# {path}\n{self.words(40)}")


def _start(agent: Agent, task: str) -> None:
    agent.talk.user(task)


# -- runaways -------------------------------------------------------------------------------------


def tool_loop(rng: random.Random, wire: str) -> Recording:
    """A coder that keeps searching for a file that is not there: same call, same result."""
    a = Agent("coder", rng, wire)
    _start(a, "Find where the payment provider is configured and switch it to sandbox.")
    a.work(rng.randint(2, 8))
    first = len(a.events) + 1  # the call that carries the first search and its result
    for _ in range(30):
        a.tool("search_files", {"pattern": "payment*.yaml"}, "no files found")
    return a.recording(first)


def turn_loop(rng: random.Random, wire: str) -> Recording:
    """An agent re-asking the same question while its conversation grows, answered alike."""
    a = Agent("checker", rng, wire)
    _start(a, "Check the deployment of service-42.")
    a.work(rng.randint(2, 6))
    start = 0
    for i in range(30):
        if i == 1:
            start = len(a.events)  # asking again is where it goes wrong
        a.talk.user("Is the deployment healthy? Answer yes or no.")
        a.call(lambda: a.talk.text_answer("I cannot tell from the information I have."))
    return a.recording(start)


def alternation(rng: random.Random, wire: str) -> Recording:
    """A coder undoing its own edit: set the version to 2, then back to 1, and again."""
    a = Agent("fixer", rng, wire)
    _start(a, "Make the build pass.")
    a.work(rng.randint(2, 6))
    first = len(a.events) + 1
    for i in range(30):
        a.tool("edit_file", {"path": "pyproject.toml", "version": 2 - i % 2}, "saved")
    return a.recording(first)


# -- healthy look-alikes --------------------------------------------------------------------------


def poller(rng: random.Random, wire: str) -> Recording:
    """A status check every 20 s: the same small prompt, no history, for half an hour."""
    a = Agent("poller", rng, wire)
    a.tokens = 120
    for _ in range(rng.randint(60, 90)):
        a.talk = Talk(wire, system="You watch a queue.")
        a.talk.user("How many jobs are waiting? Answer with a number.")
        a.call(lambda: a.talk.text_answer(str(rng.randint(0, 9))), idle=rng.uniform(17, 23))
        a.tokens = 120
    return a.recording()


def sampler(rng: random.Random, wire: str) -> Recording:
    """Best-of-5: every task's prompt sent 5 times at once, the best answer kept."""
    a = Agent("sampler", rng, wire)
    for t in range(rng.randint(20, 40)):
        a.talk = Talk(wire, system="Write a commit message.")
        a.talk.user(f"Diff of change {rng.randint(1000, 9999)}: {a.words(60)}")
        body = a.talk.body()
        for copy in range(5):
            doc = a.talk.text_answer(f"commit message {t}.{copy}")
            a.events.append(
                recorded(wire, body, doc, agent=a.name, ts=a.now + 0.01 * copy,
                         latency=rng.uniform(2, 5), tokens=900, overlap=copy)
            )  # fmt: skip
        idle = rng.uniform(5, 30)
        a.requests.append({"wire": wire, "body": body, "idle": idle, "copies": 5})
        a.now += idle
    return a.recording()


TICKETS = ["password reset for user {n}", "refund for order {n}", "login fails on device {n}"]


def template(rng: random.Random, wire: str) -> Recording:
    """A batch job over tickets, each classified then routed by two templates: the same few
    kinds of ticket with other numbers, so the classify prompt's shape repeats, interleaved."""
    a = Agent("triage", rng, wire)
    for _ in range(rng.randint(80, 150)):
        ticket = rng.choice(TICKETS).format(n=rng.randint(100, 99999))
        for step in ("Classify", "Route to a team"):
            a.talk = Talk(wire, system="You triage support tickets.")
            a.talk.user(f"{step}: ticket {rng.randint(1, 10**6)}: {ticket}")
            a.tokens = 400
            a.call(lambda: a.talk.text_answer("billing"), idle=rng.uniform(0.0, 0.3))
    return a.recording()


def continue_chat(rng: random.Random, wire: str) -> Recording:
    """A person reading a long answer in parts: "continue", again and again."""
    a = Agent("writer", rng, wire)
    _start(a, "Write a long tutorial about SQLite.")
    a.call(lambda: a.talk.text_answer("Part 1."))
    for i in range(rng.randint(20, 40)):
        a.talk.user("continue")
        a.call(lambda i=i: a.talk.text_answer(f"Part {i + 2}: {a.words(80)}"))
    return a.recording()


def file_reader(rng: random.Random, wire: str) -> Recording:
    """A coder reading many files one after another, and the same file again after an edit."""
    a = Agent("reader", rng, wire)
    _start(a, "Understand the code base.")
    for i in range(rng.randint(30, 60)):
        path = f"src/pkg{i // 8}/{FILES[i % 8]}"
        a.tool("read_file", {"path": path}, f"# {path}\n{a.words(60)}")
        if rng.random() < 0.2:
            a.tool("edit_file", {"path": path, "line": rng.randint(1, 300)}, "saved")
    return a.recording()


def ci_poller(rng: random.Random, wire: str) -> Recording:
    """An agent waiting for CI: asks its status, waits 30 s (itself, or through a wait tool),
    asks again; the same call and the same answer until the run ends."""
    a = Agent("ci-watcher", rng, wire)
    _start(a, "Merge the pull request once CI passes.")
    a.work(rng.randint(1, 4))
    with_tool = rng.random() < 0.5
    for _ in range(rng.randint(10, 30)):
        wait = rng.uniform(25, 40)
        if with_tool:
            a.tool("get_ci_status", {"run": 4242}, "running")
            a.tool("wait", {"seconds": 30}, "waited", idle=wait)
        else:
            a.tool("get_ci_status", {"run": 4242}, "running", idle=wait)
    a.tool("get_ci_status", {"run": 4242}, "passed")
    return a.recording()


RUNAWAYS = {"tool_loop": tool_loop, "turn_loop": turn_loop, "alternation": alternation}
HEALTHY = {
    "poller": poller,
    "sampler": sampler,
    "template": template,
    "continue": continue_chat,
    "file-reader": file_reader,
    "ci-poller": ci_poller,
}


def wire_for(variant: int) -> str:
    """Variants take the three wire formats in turn."""
    return WIRES[variant % len(WIRES)]

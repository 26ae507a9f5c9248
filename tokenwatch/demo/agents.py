"""The demo's agents: real processes calling the fake LLM through tokenwatch's proxy with the
official openai and anthropic SDKs. Run one with `python -m tokenwatch.demo.agents KIND`.

Each exits by itself when the demo that started it is gone (TOKENWATCH_DEMO_PARENT), and needs no
network and no real API key.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

PARENT_ENV: Final = "TOKENWATCH_DEMO_PARENT"
DUMMY_KEY: Final = "sk-tokenwatch-demo-not-a-real-key"
KINDS: Final = ("researcher", "coder", "summariser", "claude-writer", "looper")

# Healthy agents vary their prompts in words, not only numbers: the runaway rule compares prompt
# shapes with digits and ids blanked out, and a combination repeats only after the rule's window.
ASPECTS = (
    "in 80 words",
    "with one worked example",
    "for a new team member",
    "and its failure modes",
    "against the usual alternatives",
    "and where it came from",
    "and what it costs to run",
)
SOURCES = ("nginx", "postgres", "kafka", "redis", "the scheduler", "auth", "billing", "cdn", "dns")
LEVELS = ("errors", "warnings", "slow requests", "restarts")
FEATURES = (
    "retry budget",
    "dark mode",
    "CSV export",
    "SSO login",
    "rate limits",
    "audit log",
    "webhooks",
)
PLAN = (
    "list the tables",
    "diff the schemas",
    "write the backfill",
    "dry-run it on staging",
    "check the row counts",
    "switch the reads over",
)
MODULES = ("api", "cli", "web", "worker", "storage")

TOPICS = (
    "vector clocks",
    "B-tree page splits",
    "TCP slow start",
    "garbage collection pauses",
    "SQLite WAL checkpoints",
    "Raft leader election",
    "bloom filter sizing",
    "HTTP/2 flow control",
)


def parent_alive() -> bool:
    """False once the demo process that launched us has exited (or was never named)."""
    raw = os.environ.get(PARENT_ENV, "")
    if not raw.isdigit():
        return True
    try:
        os.kill(int(raw), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_calls_made = 0


def run_while_demo_lives(steps: Iterator[float], calls: int | None = None) -> int:
    """Drive an agent: each step makes its calls and says how long to rest before the next;
    it stops after about `calls` calls (the step that reaches them ends), if given."""
    for rest in steps:
        if not parent_alive() or (calls is not None and _calls_made >= calls):
            return 0
        time.sleep(rest)
    return 0


def _openai() -> Any:
    import openai

    return openai.OpenAI(api_key=DUMMY_KEY, max_retries=0, timeout=60)


def _anthropic() -> Any:
    import anthropic

    return anthropic.Anthropic(api_key=DUMMY_KEY, max_retries=0, timeout=60)


def _guarded(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """One call; a refusal (budget, paused supervisor going away) is printed, never fatal."""
    global _calls_made
    _calls_made += 1
    try:
        call(*args, **kwargs)
    except Exception as exc:  # the demo agent keeps going whatever the API says
        print(f"call failed: {type(exc).__name__}: {exc}", flush=True)


def researcher() -> Iterator[float]:
    """Steady: one modest question a second, each on a new topic."""
    client = _openai()
    for n in range(1_000_000):
        topic = f"{TOPICS[n % len(TOPICS)]} {ASPECTS[n % len(ASPECTS)]}"
        _guarded(
            client.chat.completions.create,
            model="gpt-4o-mini",
            messages=[
                {"role": "system", "content": "You are a careful research assistant."},
                {"role": "user", "content": f"Explain {topic}."},
            ],
            max_tokens=120,
        )
        yield 1.0


def coder() -> Iterator[float]:
    """Bursty with a growing context: bursts of streamed calls, each resending the conversation."""
    client = _openai()
    history: list[dict[str, str]] = [{"role": "system", "content": "You write Python code."}]
    rng = random.Random(7)
    for burst in range(1_000_000):
        for step in range(rng.randint(3, 6)):
            history.append({"role": "user", "content": f"burst {burst} step {step}: refactor it"})
            _guarded(_stream_code, client, history)
            if len(history) > 60:
                del history[1:21]  # the agent "summarises" its memory away now and then
            yield 0.2
        yield 4.0


def _stream_code(client: Any, history: list[dict[str, str]]) -> None:
    chunks = client.chat.completions.create(
        model="gpt-4o",
        messages=history,
        max_tokens=200,
        stream=True,
        stream_options={"include_usage": True},
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    history.append({"role": "assistant", "content": text})


def summariser() -> Iterator[float]:
    """Cheap: short summaries with the smallest model, every two seconds."""
    client = _openai()
    for n in range(1_000_000):
        _guarded(
            client.chat.completions.create,
            model="gpt-4.1-nano",
            messages=[
                {
                    "role": "user",
                    "content": f"Summarise the {LEVELS[n % len(LEVELS)]} in the {SOURCES[n % len(SOURCES)]} logs.",
                }
            ],
            max_tokens=40,
        )
        yield 2.0


def claude_writer() -> Iterator[float]:
    """An Anthropic model, streamed through the Messages API."""
    client = _anthropic()
    for n in range(1_000_000):
        _guarded(
            _write_note,
            client,
            f"Draft a release note on the {FEATURES[n % len(FEATURES)]} fix in {MODULES[n % len(MODULES)]}.",
        )
        yield 1.5


def _write_note(client: Any, prompt: str) -> None:
    with client.messages.stream(
        model="claude-haiku-4-5",
        max_tokens=160,
        system="You draft release notes.",
        messages=[{"role": "user", "content": prompt}],
    ) as stream:
        stream.get_final_message()


LOOP_AFTER: Final = 6
"""Healthy calls the looper makes before it gets stuck."""


def looper() -> Iterator[float]:
    """Healthy for a few calls, then stuck: the same prompt again and again, fast."""
    client = _openai()
    for n in range(1_000_000):
        stuck = n >= LOOP_AFTER
        prompt = (
            "The tool returned an error. Try the same fix again."
            if stuck
            else f"Plan the next migration step: {PLAN[n % len(PLAN)]}."
        )
        _guarded(
            client.chat.completions.create,
            model="gpt-4o",
            messages=[
                {"role": "system", "content": "You are an autonomous agent."},
                {"role": "user", "content": prompt},
            ],
            max_tokens=150,
        )
        yield 0.3 if stuck else 1.0


BEHAVIOURS: Final[dict[str, Callable[[], Iterator[float]]]] = {
    "researcher": researcher,
    "coder": coder,
    "summariser": summariser,
    "claude-writer": claude_writer,
    "looper": looper,
}


def main(argv: list[str] | None = None) -> int:
    """`python -m tokenwatch.demo.agents KIND [--calls N]`: runs until its demo ends (or Ctrl-C),
    or stops after N calls."""
    args = sys.argv[1:] if argv is None else argv
    calls = None
    if len(args) == 3 and args[1] == "--calls" and args[2].isdigit():
        args, calls = args[:1], int(args[2])
    if len(args) != 1 or args[0] not in BEHAVIOURS:
        print(
            f"usage: python -m tokenwatch.demo.agents {{{','.join(KINDS)}}} [--calls N]",
            file=sys.stderr,
        )
        return 2
    try:
        return run_while_demo_lives(BEHAVIOURS[args[0]](), calls)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

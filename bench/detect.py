"""Detection benchmark: precision, recall and calls-to-detection per detector over scripted traces,
and the time from the triggering call to a real agent process being stopped.

Usage: python bench/detect.py [--variants 10] [--stops 20] [--seeds 10] [--live 1]

1. Detection: every trace of bench/traces/corpus.py (`--variants` seeded variants of 16 healthy
   and 8 runaway kinds; the wire-format kinds of bench/traces/agents.py take Chat Completions,
   Responses and Anthropic Messages in turn) goes through `Rules(DEFAULT_RULES)` on a replay clock, with the agent's
   task ends where the trace has them, exactly as the engine feeds it. A detector's firing is
   right when it is on a runaway trace at or after the call where the runaway started.
   Precision = right firings / all trace firings of the detector; recall = runaway traces of
   the kinds the detector is meant for that it caught; calls to detection = index of the first
   firing - start + 1 (3 means on the third runaway call); calls to action = the same for the
   first throttle, pause or kill; calls to stopped = the same for the first pause or kill (a
   throttled process keeps running). The eager table runs the slow kinds and the healthy
   traces again with one default rule made eager enough to stop them within 3 calls, and
   lists the healthy traces it would stop. `--seeds N` runs the whole corpus again with seeds
   1..N (other random draws of the same kinds), so a rule that only fits one draw shows.
2. Live (`--live N`, off by default): N variants of every wire-format kind replayed end to end by
   real agent processes under `tokenwatch run`, through a real supervisor's proxy to fake-llm
   (bench/live.py says how); where each stopped, from /proc, against the Rules replay of the
   same calls.
3. Stop latency: an in-process supervisor (store, engine, default rules; no proxy) takes hold of
   a real `sleep` process started in its own session. Two looping calls are ingested, then the
   clock starts, the third (triggering) one is ingested through `Engine.ingest` (stored,
   budgets, rules, action), and the clock stops when /proc/PID/stat shows the process stopped
   (state T), polled every 0.2 ms. Repeated `--stops` times with a fresh process each time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from traces.corpus import Trace, corpus

from tokenwatch.config import Config, RuleSettings, SupervisorSettings
from tokenwatch.core.models import UsageEvent
from tokenwatch.core.rules import DEFAULT_RULES, Rules, rule_name
from tokenwatch.core.tokens import prompt_hash, prompt_shape_hash

MEANT_FOR = {
    "runaway": ("loop", "near_loop"),
    "tool_loop": ("tool_loop",),
    "turn_loop": ("turn_loop",),
    "alternation": ("alternation",),
    "spike": ("spike",),
    "context_growth": ("snowball",),
    "task_tokens": ("overrun",),
}
ENFORCING = ("throttle", "pause", "kill")
STOPPING = ("pause", "kill")
"""A throttled agent keeps running (at half speed by default): only these stop it."""
EAGER = {
    "snowball": RuleSettings(
        name="context-growth", detector="context_growth", threshold=3, action="pause"
    ),
    "overrun": RuleSettings(
        name="task-tokens", detector="task_tokens", threshold=1.5, action="pause"
    ),
}
"""What stopping the slow kinds within 3 calls would take: the default rule made eager (3 growing
calls instead of 4; 1.5x the usual task instead of 3x)."""
INFORMATIONAL = ("huge_request", "drift", "forecast")
"""Alert-only detectors about size or pace, not runaways: their firings are listed apart."""


@dataclass
class Firing:
    index: int
    detector: str
    action: str


@dataclass
class Outcome:
    trace: Trace
    firings: list[Firing] = field(default_factory=list)


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def run_trace(trace: Trace, settings: list[RuleSettings] = DEFAULT_RULES) -> Outcome:
    clock = _Clock()
    rules = Rules(settings, clock=clock)
    detector_of = {rule_name(r): r.detector for r in settings}
    outcome = Outcome(trace)
    for i, event in enumerate(trace.events):
        clock.now = event.ts
        signals = rules.observe(event)
        if i in trace.task_ends:
            signals += rules.task_ended(event.agent, trace.task_ends[i])
        outcome.firings += [Firing(i, detector_of[s.alert.rule], s.action) for s in signals]
    return outcome


def right(outcome: Outcome, firing: Firing) -> bool:
    start = outcome.trace.start
    return start is not None and firing.index >= start


def detection_table(outcomes: list[Outcome]) -> list[str]:
    lines = [
        "| detector | precision | recall | calls to detection (median / max) | healthy traces flagged |",
        "| --- | --- | --- | --- | --- |",
    ]
    for detector in sorted(
        {d for d in MEANT_FOR} | {f.detector for o in outcomes for f in o.firings}
    ):
        flagged = [o for o in outcomes if any(f.detector == detector for f in o.firings)]
        right_traces = [
            o for o in flagged if all(right(o, f) for f in o.firings if f.detector == detector)
        ]
        meant = [o for o in outcomes if o.trace.kind in MEANT_FOR.get(detector, ())]
        calls = [_first(o, detector) for o in meant]
        caught = [c for c in calls if c is not None]
        healthy = sorted({o.trace.name for o in flagged if not o.trace.runaway})
        lines.append(
            f"| {detector} | {_ratio(len(right_traces), len(flagged))} | "
            f"{_ratio(len(caught), len(meant)) if meant else 'n/a'} | "
            f"{_spread(caught)} | {len(healthy)}{': ' + ', '.join(healthy[:4]) if healthy else ''} |"
        )
    return lines


def action_table(outcomes: list[Outcome]) -> list[str]:
    lines = [
        "| runaway kind | traces | first action | calls to it (median / max) "
        "| calls to stopped (median / max) | stopped within 3 calls |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        if o.trace.runaway:
            by_kind[o.trace.kind].append(o)
    for kind, group in by_kind.items():
        acted = [_acted(o, ENFORCING) for o in group]
        stopped = [c for c in (_acted(o, STOPPING) for o in group) if c is not None]
        actions = {_what(o) for c, o in zip(acted, group, strict=True) if c is not None}
        within = sum(1 for c in stopped if c <= 3)
        lines.append(
            f"| {kind} | {len(group)} | {', '.join(sorted(actions)) or 'alert only'} | "
            f"{_spread([c for c in acted if c is not None])} | {_spread(stopped)} | "
            f"{within}/{len(group)} |"
        )
    return lines


def eager_table(traces: list[Trace]) -> list[str]:
    """The slow kinds under an eager rule: how many it stops within 3 calls, whom else it stops."""
    lines = [
        "| runaway kind | eager rule | stopped within 3 calls | healthy traces stopped |",
        "| --- | --- | --- | --- |",
    ]
    for kind, eager in EAGER.items():
        settings = [eager if rule_name(r) == rule_name(eager) else r for r in DEFAULT_RULES]
        outcomes = [run_trace(t, settings) for t in traces if t.kind in (kind, "healthy")]
        runaways = [o for o in outcomes if o.trace.runaway]
        within = sum(1 for o in runaways if (_acted(o, STOPPING) or 99) <= 3)
        healthy = [o.trace.name for o in outcomes if not o.trace.runaway and _stopped(o)]
        lines.append(
            f"| {kind} | {eager.detector} threshold {eager.threshold:g} | "
            f"{within}/{len(runaways)} | {len(healthy)}: {', '.join(healthy[:8])} |"
        )
    return lines


def seeds_table(seeds: int, variants: int) -> list[str]:
    """The default rules on other draws of the corpus: healthy traces acted on, runaways stopped."""
    acted: dict[str, list[str]] = defaultdict(list)
    stopped: dict[str, list[int | None]] = defaultdict(list)
    for seed in range(1, seeds + 1):
        for o in (run_trace(t) for t in corpus(variants, seed=seed)):
            if o.trace.runaway:
                stopped[o.trace.kind].append(_acted(o, STOPPING))
            else:
                detectors = {f.detector for f in o.firings if f.action in ENFORCING}
                acted[o.trace.name.rsplit("-", 1)[0]] += sorted(detectors)
    lines = [
        "| trace kind | traces | acted on (by detector) | calls to stopped (median / max) "
        "| stopped within 3 calls |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind, calls in stopped.items():
        done = [c for c in calls if c is not None]
        within = sum(1 for c in done if c <= 3)
        lines.append(
            f"| {kind} (runaway) | {len(calls)} | - | {_spread(done)} | {within}/{len(calls)} |"
        )
    for kind, names in acted.items():
        by = ", ".join(f"{d} {names.count(d)}" for d in sorted(set(names))) or "none"
        lines.append(f"| {kind} (healthy) | {seeds * variants} | {by} | - | - |")
    return lines


def _acted(o: Outcome, actions: tuple[str, ...]) -> int | None:
    """Calls from the runaway's start to its first action among `actions`."""
    hits = [f.index for f in o.firings if f.action in actions and right(o, f)]
    return hits[0] - (o.trace.start or 0) + 1 if hits else None


def _what(o: Outcome) -> str:
    return next(f.action for f in o.firings if f.action in ENFORCING and right(o, f))


def _stopped(o: Outcome) -> bool:
    return any(f.action in STOPPING for f in o.firings)


def _first(o: Outcome, detector: str) -> int | None:
    hits = [f.index for f in o.firings if f.detector == detector and right(o, f)]
    return hits[0] - (o.trace.start or 0) + 1 if hits else None


def _ratio(a: int, b: int) -> str:
    return f"{a}/{b} = {a / b:.2f}" if b else "n/a (never fired)"


def _spread(values: list[int]) -> str:
    return f"{statistics.median(values):g} / {max(values)}" if values else "-"


# -- live --------------------------------------------------------------------------------------------


def live_table(variants: int) -> list[str]:
    """The wire-format kinds replayed live against the Rules replay of the same calls."""
    from live import calls_of, replay_live

    traces = [t for t in corpus(variants) if t.requests]
    expected = {t.name: _replayed_stop(t, calls_of(t)) for t in traces}
    got = replay_live(traces)
    rows: dict[str, list[tuple[int | None, int | None]]] = defaultdict(list)
    for t in traces:
        rows[t.name.rsplit("-", 1)[0]].append((expected[t.name], got[t.name]))
    lines = [
        "| trace kind | traces | stopped in the replay (at call) | stopped live (at call) | agree |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind, pairs in rows.items():
        agree = sum(1 for e, g in pairs if e == g or (e is not None and g == e + 1))
        lines.append(
            f"| {kind} | {len(pairs)} | {_stops([e for e, _ in pairs])} | "
            f"{_stops([g for _, g in pairs])} | {agree}/{len(pairs)} |"
        )
    return lines


def _replayed_stop(trace: Trace, calls: int) -> int | None:
    """The request at which the Rules replay of its first `calls` requests pauses, if it does."""
    request_of = [i for i, r in enumerate(trace.requests[:calls]) for _ in range(r["copies"])]
    kept = Trace(trace.name, trace.kind, trace.events[: len(request_of)], trace.start)
    stops = [f.index for f in run_trace(kept).firings if f.action in STOPPING]
    return request_of[stops[0]] if stops else None


def _stops(values: list[int | None]) -> str:
    hits = [v for v in values if v is not None]
    return f"{len(hits)} ({', '.join(str(v) for v in hits)})" if hits else "0"


# -- stop latency ----------------------------------------------------------------------------------


def state_of(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        data = fh.read()
    return data[data.rindex(b")") + 2 : data.rindex(b")") + 3].decode()


async def stop_latencies(runs: int) -> list[float]:
    from tokenwatch.paths import Paths
    from tokenwatch.supervisor.service import Supervisor

    home = Path(tempfile.mkdtemp(prefix="twb-"))
    os.environ["TOKENWATCH_HOME"] = str(home)
    clock = _Clock()
    clock.now = time.time()
    config = Config(supervisor=SupervisorSettings(timezone="UTC"), rule=list(DEFAULT_RULES))
    sup = Supervisor(Paths.discover(), config, clock=clock, proxy=False, exporters=False)
    latencies: list[float] = []
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        assert sup.engine is not None
        for n in range(runs):
            latencies.append(await _one_stop(sup.engine, clock, n))
        sup.request_shutdown()
    return latencies


async def _one_stop(engine: Any, clock: _Clock, n: int) -> float:
    child = await anyio.open_process(["sleep", "600"], start_new_session=True)
    try:
        name = engine.register(f"looper-{n}", pid=child.pid).name
        prompt = [{"role": "user", "content": f"loop {n}"}]
        calls = []
        for _ in range(3):
            clock.now += 5
            calls.append(
                UsageEvent(
                    ts=clock.now,
                    agent=name,
                    input_tokens=900,
                    output_tokens=100,
                    prompt_hash=prompt_hash(prompt),
                    prompt_shape=prompt_shape_hash(prompt),
                )
            )
        await engine.ingest(calls[:2])
        started = time.perf_counter()
        await engine.ingest(calls[2:])
        with anyio.fail_after(30):
            while state_of(child.pid) != "T":
                await anyio.sleep(0.0002)
        return time.perf_counter() - started
    finally:
        child.kill()
        await child.wait()
        clock.now += 3600  # the next agent's loop starts clear of this one's cooldown


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--variants", type=int, default=10, help="seeded variants per trace kind")
    parser.add_argument("--stops", type=int, default=20, help="stop-latency repetitions")
    parser.add_argument(
        "--seeds", type=int, default=0, help="also run the corpus with seeds 1..N (other draws)"
    )
    parser.add_argument(
        "--live", type=int, default=0, help="replay N variants of each wire kind live (0: off)"
    )
    args = parser.parse_args()

    traces = corpus(args.variants)
    began = time.perf_counter()
    outcomes = [run_trace(t) for t in traces]
    elapsed = time.perf_counter() - began
    calls = sum(len(t.events) for t in traces)
    healthy = sum(1 for t in traces if not t.runaway)
    print(f"# tokenwatch detection benchmark ({platform.python_version()}, {os.cpu_count()} cores)")
    print(
        f"{len(traces)} traces ({healthy} healthy), {calls} calls, "
        f"{calls / elapsed:,.0f} calls/s through the default rules\n"
    )
    print("\n".join(detection_table(outcomes)))
    print()
    print("\n".join(action_table(outcomes)))
    print("\nwhat stopping the slow kinds within 3 calls would take:\n")
    print("\n".join(eager_table(traces)))
    for label, wanted in (("a runaway detector", False), ("an informational alert", True)):
        names = [
            o.trace.name
            for o in outcomes
            if not o.trace.runaway
            and any((f.detector in INFORMATIONAL) == wanted for f in o.firings)
        ]
        print(f"\nhealthy traces flagged by {label}: {len(names)}/{healthy} {names[:6]}")

    if args.seeds:
        print(f"\nover {args.seeds} other seeds ({args.variants} variants each):\n")
        print("\n".join(seeds_table(args.seeds, args.variants)))

    if args.live:
        print(f"\nlive replay ({args.live} of each wire-format kind), against the Rules replay:\n")
        print("\n".join(live_table(args.live)))

    if args.stops:
        latencies = anyio.run(stop_latencies, args.stops)
        ms = sorted(x * 1000 for x in latencies)
        print(
            f"\ntriggering call -> process stopped (state T), {len(ms)} runs: "
            f"median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms"
        )


if __name__ == "__main__":
    main()

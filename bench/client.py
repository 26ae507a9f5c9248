"""What the client SDK costs an agent: per-call overhead and report() throughput.

fake-llm runs in a thread of this process, the supervisor as a `tokenwatch serve` process, with
TOKENWATCH_HOME in a temporary directory. Usage: python bench/client.py [--calls N]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import openai

import tokenwatch
from tokenwatch.client import session, tracking
from tokenwatch.client.reporter import Identity, Reporter
from tokenwatch.demo.fake_llm import fake_llm_in_thread
from tokenwatch.paths import Paths

MESSAGES = [{"role": "user", "content": "Name three prime numbers and say why they are prime."}]
REPORTS = 9_000
"""Below the 10,000-event buffer, so nothing is dropped while the supervisor catches up."""


@contextmanager
def supervisor_process(paths: Paths) -> Iterator[None]:
    """`tokenwatch serve` in its own process, as agents meet it (not sharing this one's GIL)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenwatch", "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not _answers(paths.socket):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("supervisor did not start")
            time.sleep(0.05)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


def use_reporter(socket: Path) -> Reporter:
    rep = Reporter(str(socket), Identity(name="bench", pid=os.getpid()))
    old = session.install(rep)
    if old is not None:
        old.close()
    rep.wait_connected(5.0)
    return rep


def median_call_ms(client: openai.OpenAI, calls: int) -> float:
    def one() -> float:
        start = time.perf_counter()
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
        return (time.perf_counter() - start) * 1000

    for _ in range(5):
        one()
    return statistics.median(one() for _ in range(calls))


def report_many() -> None:
    for _ in range(REPORTS):
        tokenwatch.report(model="gpt-4o-mini", input_tokens=10, output_tokens=5)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per figure (default 200)")
    calls = parser.parse_args().calls
    os.environ["TOKENWATCH_HOME"] = tempfile.mkdtemp(prefix="tw-bench-")
    paths = Paths.discover()
    rows: list[tuple[str, str]] = []
    with fake_llm_in_thread() as fake:
        client = openai.OpenAI(base_url=fake.url + "/v1", api_key="sk-bench", max_retries=0)
        bare = median_call_ms(client, calls)
        rows.append(("chat call, not instrumented (median)", f"{bare:.2f} ms"))
        tokenwatch.instrument()
        use_reporter(paths.runtime_dir / "absent.sock")
        absent = median_call_ms(client, calls)
        rows.append(("instrumented, no supervisor", f"{absent:.2f} ms (+{absent - bare:.2f})"))
        alone = timed(report_many) / REPORTS * 1e6
        rows.append(("report(), caller's cost, no supervisor", f"{alone:.1f} µs a call"))
        with supervisor_process(paths):
            rep = use_reporter(paths.socket)
            present = median_call_ms(client, calls)
            rows.append(
                (
                    "instrumented, supervisor (admit + usage)",
                    f"{present:.2f} ms (+{present - bare:.2f})",
                )
            )
            rep.wait_flushed(60)
            tracking.reset_usage()
            enqueue = timed(report_many)
            acked = enqueue + timed(lambda: rep.wait_flushed(300))
            rows.append(
                ("report(), caller's cost, connected", f"{enqueue / REPORTS * 1e6:.1f} µs a call")
            )
            rows.append(
                (f"report() x {REPORTS:,}, stored and acked", f"{REPORTS / acked:,.0f} events/s")
            )
            rows.append(("still unacked after the wait", str(rep.statistics().pending)))
        tokenwatch.uninstrument()
    width = max(len(name) for name, _ in rows)
    print(f"client SDK, {calls} calls per figure, load average {os.getloadavg()[0]:.1f}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()

"""How long pausing, resuming and killing an agent's process tree takes, by tree size.

Measures, for trees of N sleeping processes (a chain of shells, some in sessions of their own):
the `pause()` call itself (walking /proc, opening pidfds, signalling), the time until every
process is seen in state T, the same for `resume()`, a `kill()` of the whole tree, and one bare
/proc scan with the number of processes on the machine. Median of --repeat runs.

    .venv/bin/python bench/processes.py [--sizes 1 10 50] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from tokenwatch.process import processes
from tokenwatch.process.processes import ProcessHandle, spawn

# argv: COUNT PIDFILE. Each process starts the next one (every third in a session of its own).
CHAIN = r"""
import os, signal, subprocess, sys
left, pidfile = int(sys.argv[1]), sys.argv[2]
if left % 3 == 0:
    os.setsid()
if left > 1:
    subprocess.Popen([sys.executable, __file__, str(left - 1), pidfile])
with open(pidfile, "a") as fh:
    fh.write(f"{os.getpid()}\n")
while True:
    signal.pause()
"""


def states(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/stat").read_bytes()
        except FileNotFoundError:
            out.append("gone")
            continue
        out.append(raw[raw.rindex(b")") + 2 :].split()[0].decode())
    return out


def wait_for(check: Callable[[], bool], timeout: float = 60.0) -> float:
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout:
            raise SystemExit("timed out: is the machine overloaded?")
        time.sleep(0.0005)
    return time.perf_counter() - start


def start_chain(directory: Path, size: int) -> tuple[ProcessHandle, list[int]]:
    script = directory / "chain.py"
    script.write_text(CHAIN)
    pidfile = directory / f"pids-{time.monotonic_ns()}"
    handle = spawn([sys.executable, str(script), str(size), str(pidfile)], env=dict(os.environ))

    def pids() -> list[int]:
        return [int(p) for p in pidfile.read_text().split()] if pidfile.exists() else []

    wait_for(lambda: len(pids()) == size)
    return handle, pids()


def measure(directory: Path, size: int) -> dict[str, float]:
    handle, pids = start_chain(directory, size)
    t0 = time.perf_counter()
    stopped = handle.pause()
    call = time.perf_counter() - t0
    settled = call + wait_for(lambda: all(s == "T" for s in states(pids)))
    if len(stopped) != size:
        raise SystemExit(f"paused {len(stopped)} of {size}")
    t0 = time.perf_counter()
    handle.resume()
    resume_call = time.perf_counter() - t0
    wait_for(lambda: all(s != "T" for s in states(pids)))
    t0 = time.perf_counter()
    report = anyio.run(handle.kill, 10.0)
    kill = time.perf_counter() - t0
    handle.close()
    if len(report.terminated) != size or report.killed:
        raise SystemExit(f"kill: {report}")
    return {"pause": call, "stopped": settled, "resume": resume_call, "kill": kill}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    machine = sum(1 for e in os.scandir("/proc") if e.name.isdigit())
    scans = []
    for _ in range(20):
        t0 = time.perf_counter()
        processes._children_by_parent()
        scans.append(time.perf_counter() - t0)
    load = os.getloadavg()[0]
    print(f"{machine} processes on the machine, load average {load:.1f}")
    print(f"one /proc scan: {statistics.median(scans) * 1e3:.1f} ms (median of 20)")
    print(f"{'tree':>5} {'pause()':>9} {'all T':>9} {'resume()':>9} {'kill()':>9}   ms, median")
    with tempfile.TemporaryDirectory(prefix="twb-") as tmp:
        for size in args.sizes:
            runs = [measure(Path(tmp), size) for _ in range(args.repeat)]
            med = {k: statistics.median(r[k] for r in runs) * 1e3 for k in runs[0]}
            print(
                f"{size:>5} {med['pause']:>9.1f} {med['stopped']:>9.1f} "
                f"{med['resume']:>9.1f} {med['kill']:>9.1f}"
            )


if __name__ == "__main__":
    main()

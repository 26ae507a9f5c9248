"""What attributing a stable-endpoint connection costs: finding the calling process through /proc.

Measures `find_peer` (the per-connection lookup the stable endpoint does once, in a thread) and
its parts: the socket's inode (one sock_diag netlink query; /proc/net/tcp, the fallback, also
timed, with the number of TCP sockets it prints), the process holding it from /proc/*/fd, its
lineage and name. Two cases: the caller is the newest process (the scan, newest pid first, stops
at once) and the caller is older than --extra sleeping processes started after it (the scan
reads all their fds first: the worst case, a long-lived agent on a busy machine). Later requests
on the same connection only look the cached route up in a dict. Median of --repeat lookups.

    .venv/bin/python bench/peer_lookup.py [--extra 200] [--repeat 50]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from tokenwatch.process.peers import (
    _diag_inode,
    _table_inode,
    find_peer,
    lineage,
    pid_of_inode,
    socket_inode,
)

CONNECT = "import socket, sys, time; s = socket.create_connection(('127.0.0.1', int(sys.argv[1]))); time.sleep(600)"


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def machine() -> tuple[int, int]:
    """Processes on the machine, and the fds of ours that a full scan reads."""
    pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
    with open("/proc/net/tcp", "rb") as f:
        sockets = f.read().count(b"\n") - 1
    print(f"/proc/net/tcp lists {sockets} sockets")
    fds = 0
    for pid in pids:
        try:
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return len(pids), fds


def measure(label: str, server: socket.socket, repeat: int) -> None:
    conn, _ = server.accept()
    with conn:
        here, there = conn.getsockname()[:2], conn.getpeername()[:2]
        peer = find_peer(here, there)
        assert peer is not None, "the caller was not found"
        inode = socket_inode(here, there)
        assert inode is not None
        whole = median_ms(lambda: find_peer(here, there), repeat)
        parts = {
            "inode by netlink": median_ms(lambda: _diag_inode(here, there), repeat),
            "inode by /proc/net/tcp (fallback)": median_ms(
                lambda: _table_inode(here, there), repeat
            ),
            "pid (/proc/*/fd)": median_ms(lambda: pid_of_inode(inode), repeat),
            "lineage": median_ms(lambda: lineage(peer.pid), repeat),
        }
    detail = ", ".join(f"{k} {v:.2f} ms" for k, v in parts.items())
    print(f"{label}: find_peer {whole:.2f} ms ({detail})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", type=int, default=200, help="sleepers started after the caller")
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    started: list[subprocess.Popen[bytes]] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = str(server.getsockname()[1])
        try:
            processes, fds = machine()
            print(f"machine: {processes} processes, {fds} fds readable by this user")
            started.append(subprocess.Popen([sys.executable, "-c", CONNECT, port]))
            measure("caller is the newest process", server, args.repeat)
            old = subprocess.Popen([sys.executable, "-c", CONNECT, port])
            started.append(old)
            time.sleep(0.5)  # the old caller is connected before the sleepers start
            started += [subprocess.Popen(["sleep", "600"]) for _ in range(args.extra)]
            processes, fds = machine()
            label = (
                f"caller older than {args.extra} newer processes ({processes} processes, {fds} fds)"
            )
            measure(label, server, args.repeat)
        finally:
            for proc in started:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()

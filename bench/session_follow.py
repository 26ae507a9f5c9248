"""What following coding agents' session logs costs per poll on a large tree: N project dirs of
Claude Code transcripts, all read once, then polled with nothing new and with one line added.
Prints the CPU time per poll and what it is at the default poll interval (0.5 s)."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from tokenwatch.supervisor.session_follow import SessionFollower, _Source


def line(i: int) -> str:
    message = {"id": f"msg_{i}", "model": "claude-haiku-4-5", "stop_reason": "end_turn",
               "usage": {"input_tokens": 5, "output_tokens": 9}, "content": "x" * 2000}  # fmt: skip
    return json.dumps({"type": "assistant", "message": message, "requestId": f"r{i}",
                       "timestamp": "2026-12-01T10:00:00Z", "cwd": "/w"}) + "\n"  # fmt: skip


def main(projects: int = 200, files: int = 25, lines: int = 10, polls: int = 20) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for p in range(projects):
            (root / f"p{p}").mkdir()
            for f in range(files):
                body = "".join(line(p * 100_000 + f * 100 + i) for i in range(lines))
                (root / f"p{p}" / f"s{f}.jsonl").write_text(body)
        follower = SessionFollower.__new__(SessionFollower)
        source = _Source("claude-code", root, looked=True)
        started = time.process_time()
        follower._read(source)
        first = time.process_time() - started
        started = time.process_time()
        for _ in range(polls):
            follower._read(source)
        idle = (time.process_time() - started) / polls
        target = root / "p0" / "s0.jsonl"
        started = time.process_time()
        for i in range(polls):
            with open(target, "a") as f:
                f.write(line(10**9 + i))
            follower._read(source)
        busy = (time.process_time() - started) / polls
        size = sum(p.stat().st_size for p in root.rglob("*.jsonl")) / 1e6
        print(f"{projects * files} logs, {size:.0f} MB; first read {first:.2f} s CPU")
        print(f"poll, nothing new: {idle * 1000:.1f} ms CPU ({idle / 0.5:.1%} of a core at 0.5 s)")
        print(f"poll, one new line: {busy * 1000:.1f} ms CPU ({busy / 0.5:.1%} of a core at 0.5 s)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))

"""The running coding-agent process a session log belongs to, found through /proc: the one with
the log open, else the newest one of that program working in the session's directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tokenwatch.process.processes import PROC, ProcessGone, process_info

PROGRAMS: Final = {
    "claude-code": ("claude", "@anthropic-ai/claude-code"),
    "codex": ("codex", "@openai/codex"),
    "gemini": ("gemini", "@google/gemini-cli"),
}
"""Per log source: the program's name, and the npm package a launcher's path names."""


@dataclass(frozen=True, slots=True)
class Candidate:
    pid: int
    ppid: int
    start_time: int


def find_owner(source: str, log: str, cwd: str) -> int | None:
    """The pid of the live agent process whose session `log` is: the topmost process of the
    agent's program (a launcher such as `node codex.js` over the native `codex`) above the one
    holding `log` open, else above the newest one whose working directory is `cwd`."""
    found = _candidates(source)
    if not found:
        return None
    holder = next((c for c in found.values() if _has_open(c.pid, log)), None)
    if holder is None and cwd:
        here = [c for c in found.values() if _cwd(c.pid) == cwd]
        holder = max(here, key=lambda c: c.start_time, default=None)
    if holder is None:
        return None
    while holder.ppid in found:  # the launcher above it runs the same agent
        holder = found[holder.ppid]
    return holder.pid


def ancestors(pid: int) -> list[int]:
    """`pid` and its parents up to init, nearest first (as far as they can be read)."""
    chain: list[int] = []
    while pid > 1 and pid not in chain:
        chain.append(pid)
        try:
            pid = process_info(pid).ppid
        except ProcessGone:
            break
    return chain


def _candidates(source: str) -> dict[int, Candidate]:
    name, package = PROGRAMS[source]
    found: dict[int, Candidate] = {}
    uid = os.getuid()
    with os.scandir(PROC) as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                if entry.stat().st_uid != uid or not _runs(pid, name, package):
                    continue
                info = process_info(pid)
            except (OSError, ProcessGone):
                continue
            found[pid] = Candidate(pid, info.ppid, info.start_time)
    return found


def _runs(pid: int, name: str, package: str) -> bool:
    """Whether the process runs the agent: its program, or an interpreter given its script."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")[:3]
    except OSError:
        return False
    for arg in argv:
        text = arg.decode(errors="replace")
        if Path(text).name == name or f"/{package}/" in text:
            return True
    return False


def _cwd(pid: int) -> str:
    try:
        return os.readlink(PROC / str(pid) / "cwd")
    except OSError:
        return ""


def _has_open(pid: int, path: str) -> bool:
    try:
        with os.scandir(PROC / str(pid) / "fd") as fds:
            for fd in fds:
                try:
                    if os.readlink(fd.path) == path:
                        return True
                except OSError:
                    continue
    except OSError:
        return False
    return False

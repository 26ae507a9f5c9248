"""Coding agents' session logs followed live: new lines read every poll, each call recorded once
through the engine (priced, budgets, rules, dashboard), attributed to the agent process the
session belongs to (so it can be paused and killed) or to an agent named after the tool; how far
each log was read is kept in the ledger, so a restart neither reads a line again nor skips one."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import anyio
import anyio.abc
import anyio.to_thread

from tokenwatch.config import SessionLogSettings
from tokenwatch.core.errors import EngineError, StoreUnavailable
from tokenwatch.core.models import Source, UsageEvent
from tokenwatch.ledger.session_logs import LogFile, log_paths, read_new
from tokenwatch.paths import agent_logs
from tokenwatch.process.session_owner import ancestors, find_owner

if TYPE_CHECKING:
    from tokenwatch.engine.engine import Engine
    from tokenwatch.ledger.store import Store

log = logging.getLogger("tokenwatch.supervisor")

FIRST_SEEN: Final = ""
"""The path of a source's marker row: its logs were looked at before (files found later are new)."""
PRIME_WITHIN: Final = 86_400.0
"""Logs already there at the very first look, changed within this many seconds: read through (not
counted) for what later lines need (Codex's session, model and running total)."""
REMEMBERED: Final = 100_000
"""Call ids remembered to count a call copied into another file once."""


@dataclass(slots=True)
class _Source:
    name: str
    root: Path
    logs: dict[str, LogFile] = field(default_factory=dict)
    looked: bool = False
    """Its logs were looked at before (this run or an earlier one)."""


class SessionFollower:
    """Reads the configured agents' logs every `poll_interval` into `engine.ingest`."""

    def __init__(
        self,
        engine: Engine,
        store: Store,
        settings: SessionLogSettings,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._engine = engine
        self._store = store
        self._interval = settings.poll_interval
        env = dict(os.environ if env is None else env)
        self._sources = [
            _Source(s, Path(settings.root(s) or agent_logs(s, env)).expanduser())
            for s in settings.follow
        ]
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._owners: dict[tuple[str, str], str] = {}
        """(source, session) -> the agent its calls are recorded as."""

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        for source in self._sources:
            await self._restore(source)
        task_status.started()
        while True:
            for source in self._sources:
                try:
                    await self.poll(source)
                except StoreUnavailable as exc:
                    # the engine says so already (and keeps the calls); read again next poll
                    log.debug("%s's session logs wait for the ledger: %s", source.name, exc)
                except Exception:
                    # a log it cannot make out must not stop the supervisor; the next poll tries again
                    log.exception("reading %s's session logs failed", source.name)
            await anyio.sleep(self._interval)

    async def _restore(self, source: _Source) -> None:
        for path, (inode, offset, state) in (await self._store.log_offsets(source.name)).items():
            if path == FIRST_SEEN:
                source.looked = True
            else:
                source.logs[path] = LogFile(Path(path), inode, offset, json.loads(state))

    async def poll(self, source: _Source) -> None:
        """Read what was written since the last poll; record it, then how far it was read."""
        if not source.looked and not source.root.is_dir():
            source.looked = True  # not there yet: whatever appears later is new
            await self._store.save_log_offsets(source.name, [(FIRST_SEEN, 0, 0, "{}")])
            return
        changed, found = await anyio.to_thread.run_sync(self._read, source)
        if not source.looked:
            source.looked = True
            changed.append(LogFile(Path(FIRST_SEEN)))
            found = []  # what was there before tokenwatch looked is history: `tokenwatch import`
        fresh = await self._fresh(found)
        if fresh:
            await self._attribute(source, fresh)
            await self._engine.ingest([e for _, e in fresh])  # returns once stored
        if changed:
            rows = [(str(f.path), f.inode, f.offset, json.dumps(f.state)) for f in changed]
            await self._store.save_log_offsets(source.name, rows)

    def _read(self, source: _Source) -> tuple[list[LogFile], list[tuple[LogFile, UsageEvent]]]:
        """(logs read further, calls found in them), in a thread: it reads files."""
        if not source.root.is_dir():
            return [], []
        changed: list[LogFile] = []
        found: list[tuple[LogFile, UsageEvent]] = []
        for path in log_paths(source.name, source.root):
            known = source.logs.get(path)
            if known is not None and _unchanged(path, known):
                continue
            f = known or LogFile(Path(path))
            if known is None:
                source.logs[path] = f
                if not source.looked:
                    _skip_history(f)
            before = (f.inode, f.offset, len(f.state.get("pending", ())))
            found += [(f, e) for e in read_new(source.name, f)]
            if known is None or (f.inode, f.offset, len(f.state.get("pending", ()))) != before:
                changed.append(f)
        return changed, found

    async def _fresh(
        self, found: list[tuple[LogFile, UsageEvent]]
    ) -> list[tuple[LogFile, UsageEvent]]:
        """The calls not recorded before: not seen in another file, nor stored already."""
        fresh: dict[str, tuple[LogFile, UsageEvent]] = {}
        for f, event in found:
            if event.call_id not in self._seen and event.call_id not in fresh:
                event.source = Source.LOG.value
                fresh[event.call_id] = (f, event)
        keys = [k for _, e in fresh.values() for k in (e.call_id, e.response_id) if k]
        stored = await self._store.stored_ids(keys) if keys else set()
        for call_id in fresh:
            self._seen[call_id] = None
        while len(self._seen) > REMEMBERED:
            self._seen.popitem(last=False)
        return [(f, e) for f, e in fresh.values() if not {e.call_id, e.response_id} & stored]

    async def _attribute(self, source: _Source, calls: list[tuple[LogFile, UsageEvent]]) -> None:
        """Name each call's agent: the supervised agent whose process runs the session, else the
        session's live process (attached, as `claude-code`, `codex-2`...), else the tool."""
        for f, event in calls:
            key = (source.name, event.session or str(f.path))
            name = self._owners.get(key, "")
            rec = self._engine.roster.get(name)
            if rec is None or not rec.live:
                name = self._owners[key] = await self._owner(source.name, f)
                rec = self._engine.roster.get(name)
            event.agent = name
            if rec is not None and rec.live and rec.agent.pid:
                event.pid = rec.agent.pid

    async def _owner(self, source: str, f: LogFile) -> str:
        cwd = str(f.state.get("cwd", ""))
        pid = await anyio.to_thread.run_sync(find_owner, source, str(f.path), cwd)
        if pid is None:
            return source
        for above in await anyio.to_thread.run_sync(ancestors, pid):
            rec = self._engine.roster.by_pid(above)
            if rec is not None:
                return rec.name  # started by tokenwatch (run, launch) or attached before
        try:
            return self._engine.attach(pid, source).name
        except EngineError as exc:
            log.info("%s session %s: its process %d not attached: %s", source, f.path, pid, exc)
            return source


def _unchanged(path: str, f: LogFile) -> bool:
    """A JSON-lines log read to its end, with nothing waiting: one stat, no read."""
    if not path.endswith(".jsonl") or f.state.get("pending"):
        return False
    try:
        st = os.stat(path)
    except OSError:
        return True
    return st.st_ino == f.inode and st.st_size == f.offset


def _skip_history(f: LogFile) -> None:
    """A JSON-lines log there at the very first look and quiet for long: start at its end (after
    its last complete line). A recent one is read through, for what its later lines need."""
    try:
        st = os.stat(f.path)
    except OSError:
        return
    if f.path.suffix != ".jsonl" or time.time() - st.st_mtime < PRIME_WITHIN:
        return
    try:
        f.inode, f.offset = st.st_ino, _last_line_end(f.path, st.st_size)
    except OSError:
        pass  # read from its start, then: what it holds is still not counted at the first look


def _last_line_end(path: Path, size: int) -> int:
    """The offset just after the last newline of the file (0 when it has none)."""
    with open(path, "rb") as handle:
        end = size
        while end > 0:
            start = max(0, end - 65536)
            handle.seek(start)
            at = handle.read(end - start).rfind(b"\n")
            if at >= 0:
                return start + at + 1
            end = start
    return 0

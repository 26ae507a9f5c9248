"""The ledger's writer process: it dies, is interrupted or is closed, and nothing is lost."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
from pathlib import Path

import anyio
import pytest

from tests.supervisor_fixtures import stop_serve, supervisor_process
from tokenwatch.core.errors import StoreUnavailable
from tokenwatch.core.models import UsageEvent
from tokenwatch.ledger.store import Store
from tokenwatch.ledger.transaction import Statement
from tokenwatch.ledger.writer_process import ChildCommitter


def writer_pid(store: Store) -> int:
    # A test-only reach: which process writes this store's batches.
    committer = store._writer._committer
    assert isinstance(committer, ChildCommitter)
    pid = committer.pid
    assert pid is not None
    return pid


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def wait_dead(pid: int) -> None:
    with anyio.fail_after(10):
        while alive(pid):
            await anyio.sleep(0.01)


def ev(n: int, **kw: object) -> UsageEvent:
    return UsageEvent(ts=1000.0 + n, agent="a", call_id=f"c{n}", input_tokens=n, **kw)  # type: ignore[arg-type]


async def test_batches_are_written_by_a_child_that_leaves_with_the_store(
    tokenwatch_home: Path,
) -> None:
    async with await Store.open(tokenwatch_home / "l.db", writer_process=True) as store:
        pid = writer_pid(store)
        assert pid != os.getpid()
        assert await store.append_many([ev(n) for n in range(1, 101)]) == 100
        assert store.statistics().cpu_seconds > 0, "the child's CPU is counted as the writer's"
    assert not alive(pid), "closing the store ends its writer process"
    with sqlite3.connect(tokenwatch_home / "l.db") as db:
        assert db.execute("SELECT COUNT(*), SUM(input_tokens) FROM events").fetchone() == (
            100,
            5050,
        )


async def test_a_killed_writer_is_replaced_and_nothing_is_lost(tokenwatch_home: Path) -> None:
    async with await Store.open(tokenwatch_home / "l.db", writer_process=True) as store:
        assert await store.append(ev(1))
        first = writer_pid(store)
        os.kill(first, signal.SIGKILL)
        await wait_dead(first)
        assert await store.append(ev(2)), "the next batch goes to a new writer"
        for n in range(3, 53):
            store.append_nowait(ev(n))
        await store.flush()
        assert writer_pid(store) != first
        assert (await store.totals(0)).requests == 52
        assert store.statistics().lost == 0


async def test_ctrl_c_in_the_terminal_does_not_stop_the_writer(tokenwatch_home: Path) -> None:
    async with await Store.open(tokenwatch_home / "l.db", writer_process=True) as store:
        pid = writer_pid(store)
        os.kill(pid, signal.SIGINT)
        assert await store.append(ev(1))
        assert writer_pid(store) == pid, "the same writer took the batch"


async def test_values_sqlite_cannot_hold_are_refused_one_event_at_a_time(
    tokenwatch_home: Path,
) -> None:
    async with await Store.open(tokenwatch_home / "l.db", writer_process=True) as store:
        # 2**63 crosses the pipe but not into SQLite; 2**64 cannot even cross the pipe.
        for n, tokens in ((1, 2**63), (2, 2**64)):
            with pytest.raises(ValueError, match=f"input_tokens={tokens}"):
                await store.append_many([ev(10 + n), UsageEvent(ts=1.0, input_tokens=tokens)])
        assert (await store.totals(0)).requests == 2, "the append's good event is stored"
        store.append_nowait(ev(20, output_tokens=2**70))
        store.append_nowait(ev(21))
        await store.flush()
        assert (await store.totals(0)).requests == 3
        assert store.statistics().rejected == 3


async def test_a_failing_statement_raises_what_sqlite_raised(tokenwatch_home: Path) -> None:
    async with await Store.open(tokenwatch_home / "l.db", writer_process=True) as store:
        insert = Statement("INSERT INTO agents (name, data, updated) VALUES ('x', '{}', 0)")
        assert await store._write(insert) == 1
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            await store._write(insert)
        assert await store._write(Statement("DELETE FROM agents")) == 1, "the batch went on"


async def test_a_writer_that_cannot_be_started_is_one_clear_error(
    tokenwatch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tokenwatch_home / "no-python"))
    with pytest.raises(StoreUnavailable, match="cannot start the ledger's writer process"):
        await Store.open(tokenwatch_home / "l.db", writer_process=True)


async def test_queued_events_wait_while_no_writer_can_start(
    tokenwatch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python = sys.executable
    async with await Store.open(tokenwatch_home / "l.db", writer_process=True) as store:
        writer = writer_pid(store)
        monkeypatch.setattr(sys, "executable", str(tokenwatch_home / "no-python"))
        os.kill(writer, signal.SIGKILL)
        await wait_dead(writer)
        for n in range(1, 11):
            store.append_nowait(ev(n))
        with pytest.raises(StoreUnavailable, match="cannot start the ledger's writer process"):
            await store.flush()
        monkeypatch.setattr(sys, "executable", python)
        await store.flush()
        assert (await store.totals(0)).requests == 10, "the queued events were kept, then written"
        assert store.statistics().lost == 0


def test_a_writer_that_cannot_open_the_file_says_why(tokenwatch_home: Path) -> None:
    blocker = tokenwatch_home / "file"
    blocker.write_text("not a directory")
    with pytest.raises(sqlite3.OperationalError, match="unable to open"):
        ChildCommitter(blocker / "l.db")


def writer_children(pid: int) -> list[int]:
    """The ledger writer processes among `pid`'s children."""
    children = [
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]
    return [c for c in children if b"writer_process" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
async def test_the_supervisors_writer_never_outlives_it(sig: int) -> None:
    with supervisor_process() as sp:
        writers = writer_children(sp.pid)
        assert len(writers) == 1, "the supervisor runs one ledger writer"
        stop_serve(sp, sig)
        await wait_dead(writers[0])

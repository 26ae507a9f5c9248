"""Commands that only read the ledger open it read-only: a read-only file or directory, a writer
holding the lock, and a damaged file all give the user their answer or one clear line."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tokenwatch.cli import main
from tokenwatch.core.errors import StoreUnavailable
from tokenwatch.core.models import UsageEvent
from tokenwatch.ledger.store import Store
from tokenwatch.paths import Paths

READ_COMMANDS = [["report"], ["export"], ["alerts"], ["budget", "list"], ["rules", "test"]]


@pytest.fixture
def db() -> Path:
    """A ledger with one event, closed cleanly (no -wal or -shm file left)."""
    path = Paths.discover().db

    async def write() -> None:
        async with await Store.open(path) as store:
            await store.append(UsageEvent(ts=time.time() - 60, agent="coder", input_tokens=7))

    anyio.run(write)
    return path


def without_override() -> list[str]:
    """How to run a command so file permissions bind. Root ignores them; when the tests run as
    root, drop the capabilities that let it (setpriv), which is what a non-root user lives with."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be made to bind")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


def tokenwatch(*argv: str) -> subprocess.CompletedProcess[str]:
    command = [*without_override(), sys.executable, "-m", "tokenwatch", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def read_only(db: Path) -> Iterator[None]:
    yield
    db.parent.chmod(0o700)
    db.chmod(0o600)


@pytest.mark.parametrize("what", ["file", "directory"])
def test_read_only_ledger_still_reports(db: Path, read_only: None, what: str) -> None:
    db.chmod(0o444)
    if what == "directory":
        db.parent.chmod(0o555)  # no -shm can be made: the ledger is read as immutable
    report = tokenwatch("report", "--format", "csv")
    assert (report.returncode, report.stderr) == (0, "")
    assert report.stdout.splitlines()[1].startswith("coder,1,7,")
    export = tokenwatch("export")
    assert export.returncode == 0
    assert '"agent":"coder"' in export.stdout
    for argv in (["alerts"], ["rules", "test"]):
        done = tokenwatch(*argv)
        assert (done.returncode, done.stderr) == (0, ""), argv
    imported = subprocess.run(
        [*without_override(), sys.executable, "-m", "tokenwatch", "import", "-"],
        input='{"ts": 1e9}\n',
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert imported.returncode == 1
    assert f"cannot write the ledger {db}: the file or its dir" in imported.stderr


def test_a_writer_holding_the_lock_does_not_stop_a_report(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Opening for writing takes the write lock (to migrate), so a report waited out the busy
    # timeout behind any writer and then failed; reading needs no lock.
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        code = main(["report", "--format", "csv"])
        elapsed = time.monotonic() - started
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out.splitlines()[1].startswith("coder,1,7,")
    assert elapsed < 5


@pytest.mark.parametrize("argv", READ_COMMANDS, ids=" ".join)
def test_damaged_ledger_is_one_line_saying_read(
    db: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    db.write_bytes(db.read_bytes()[:8192])  # truncated: the header is fine, the tables are not
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"tokenwatch: cannot read the ledger {db}: ")
    assert "database disk image is malformed" in err  # export adds how many it wrote
    assert "cannot write" not in err
    assert "internal error" not in err
    assert err.count("\n") == 1


def test_not_a_ledger_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    db = Paths.discover().db
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_bytes(b"this is not SQLite" * 100)
    assert main(["export"]) == 1
    err = capsys.readouterr().err
    assert err == f"tokenwatch: cannot read the ledger {db}: not a tokenwatch ledger (not SQLite)\n"


async def test_writes_on_a_read_only_store_say_so(db: Path) -> None:
    async with await Store.open_read_only(db) as store:
        assert (await store.totals(0)).input_tokens == 7
        with pytest.raises(StoreUnavailable, match=f"cannot write the ledger {db}: opened read"):
            await store.append(UsageEvent(ts=1.0))

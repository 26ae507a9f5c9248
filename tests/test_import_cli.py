"""`tokenwatch import`: good lines stored and priced, bad lines reported by number, idempotent."""

from __future__ import annotations

import io
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwatch.cli import main
from tokenwatch.core.models import MAX_CALL_TOKENS, UsageEvent
from tokenwatch.core.periods import zone
from tokenwatch.ledger.importer import parse_lines
from tokenwatch.ledger.store import Store
from tokenwatch.paths import Paths

UTC = zone("UTC")


def stored_events() -> list[UsageEvent]:
    async def read() -> list[UsageEvent]:
        async with await Store.open(Paths.discover().db) as store:
            return [e async for e in store.iter_events()]

    return anyio.run(read)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_good_lines_stored_bad_lines_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_lines(
        tmp_path / "usage.jsonl",
        [
            json.dumps({"ts": "2026-11-01T10:00:00+00:00", "agent": "coder", "model": "gpt-4o",
                        "input_tokens": 1000, "output_tokens": 100}),
            "",
            "{not json",
            json.dumps({"ts": 1_790_000_000, "agent": "coder", "input_tokens": -5}),
            json.dumps({"timestamp": 1_790_000_001, "agent": "r", "model": "house-llm",
                        "input_tokens": 10, "output_tokens": 1, "estimated": True}),
            json.dumps({"ts": 1_790_000_002, "agent": "r", "colour": "red"}),
            json.dumps({"ts": 1_790_000_003, "model": "gpt-4o", "cost_usd": 0.5,
                        "total_tokens": 3, "input_tokens": 2, "output_tokens": 1}),
            json.dumps({"ts": "9999-12-31T23:59:59", "agent": "late", "input_tokens": 1}),
            json.dumps({"ts": 1.79e12, "agent": "late", "input_tokens": 1}),
        ],
    )  # fmt: skip
    code = main(["import", str(source)])
    err = capsys.readouterr().err
    assert code == 1  # some lines were skipped (the good ones are stored)
    assert "line 3: not JSON" in err
    assert "line 4: input_tokens: must not be negative" in err
    assert "line 6: unknown field 'colour'" in err
    assert "line 8: ts: '9999-12-31T23:59:59' is in the future" in err
    assert "line 9: ts: 1790000000000.0 is too large for Unix seconds (milliseconds?)" in err
    assert err.strip().splitlines()[-1] == (
        "tokenwatch: imported 3 events, skipped 5 bad lines, 1 unpriced (model house-llm; "
        "price: estimated from claude-opus-4-5)"
    )
    events = {e.agent: e for e in stored_events()}
    coder = events["coder"]
    assert coder.source == "import"
    assert coder.ts == 1_793_527_200.0  # 2026-11-01T10:00:00Z
    # Priced at import: 1000 * 2.50 + 100 * 10 per 1M = $0.0035.
    assert coder.cost_usd == pytest.approx(0.0035)
    assert coder.price_version != ""
    # A model no table knows: at claude-opus-4-5's rates, marked: 10*5 + 1*25 = 75 per 1M.
    assert events["r"].cost_usd == pytest.approx(75e-6)
    assert events["r"].price_source == "estimated:claude-opus-4-5"
    assert events["r"].estimated is True
    assert events[""].cost_usd == 0.5  # a given cost is kept


def test_importing_twice_stores_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_lines(
        tmp_path / "u.jsonl",
        [
            json.dumps({"ts": 1_790_000_000 + i, "model": "gpt-4o", "input_tokens": i})
            for i in range(5)
        ]
        + [json.dumps({"ts": 1_790_000_100, "model": "o3", "call_id": "given"})],
    )
    assert main(["import", str(source)]) == 0
    assert main(["import", str(source)]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tokenwatch: imported 0 events, 6 already stored"
    )
    assert len(stored_events()) == 6


def test_stdin_and_export_round_trip(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    event = UsageEvent(
        ts=1_790_000_000.25,
        agent="x",
        task="t",
        model="claude-haiku-4-5",
        provider="anthropic",
        input_tokens=100,
        cache_read_tokens=60,
        output_tokens=7,
        latency_ms=12.5,
        http_status=200,
        pid=99,
        call_id="c-1",
    )
    line = json.dumps(event.to_dict())  # what `tokenwatch export` writes, total_tokens included
    monkeypatch.setattr(sys, "stdin", io.StringIO(line + "\n"))
    assert main(["import", "-"]) == 0
    [stored] = stored_events()
    # Priced on the way in: (100-60)*1 + 60*0.10 + 7*5 = 40 + 6 + 35 = 81 per 1M.
    assert stored.cost_usd == pytest.approx(81e-6)
    event.cost_usd, event.price_version = stored.cost_usd, stored.price_version
    event.price_source = stored.price_source
    assert stored == event


def test_no_price_flag_keeps_events_unpriced(tmp_path: Path) -> None:
    source = write_lines(tmp_path / "u.jsonl", [json.dumps({"ts": 1e9, "model": "gpt-4o"})])
    assert main(["import", "--no-price", str(source)]) == 0
    assert stored_events()[0].cost_usd is None


def test_missing_file_and_binary_input_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["import", str(tmp_path / "absent.jsonl")]) == 1
    err = capsys.readouterr().err
    assert (
        err == f"tokenwatch: cannot read {tmp_path / 'absent.jsonl'}: No such file or directory\n"
    )
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b'{"ts": 1}\n\xff\xfe\x00garbage\n')
    assert main(["import", str(binary)]) == 1
    assert "not UTF-8" in capsys.readouterr().err


def test_unusable_ledger_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = Paths.discover().db
    db.mkdir(parents=True)  # something that is not a database sits where the ledger goes
    source = write_lines(tmp_path / "u.jsonl", [json.dumps({"ts": 1e9})])
    assert main(["import", str(source)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"tokenwatch: cannot write the ledger {db}: ")


@given(
    ts=st.one_of(st.floats(0, 1.7e9), st.integers(0, 1_700_000_000)),  # times already past
    tokens=st.integers(0, MAX_CALL_TOKENS),
    agent=st.text(max_size=20),
)
def test_any_valid_event_line_parses_back(ts: float, tokens: int, agent: str) -> None:
    data = {"ts": ts, "agent": agent, "input_tokens": tokens, "output_tokens": tokens}
    [(number, event)] = list(parse_lines([json.dumps(data)], UTC))
    assert number == 1
    assert isinstance(event, UsageEvent)
    assert (event.ts, event.agent, event.input_tokens) == (float(ts), agent, tokens)


@given(st.text(max_size=200))
def test_arbitrary_text_never_crashes_the_parser(text: str) -> None:
    for _, item in parse_lines(text.splitlines(), UTC):
        assert isinstance(item, UsageEvent) or str(item).startswith("line ")


def stored_count(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # the tables are still being made
    finally:
        conn.close()


def test_ctrl_c_on_stdin_import_says_what_was_stored() -> None:
    db = Paths.discover().db
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenwatch", "import", "-"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    lines = [json.dumps({"ts": 1e9 + i, "agent": "a", "call_id": f"c{i}"}) for i in range(5003)]
    proc.stdin.write("\n".join(lines) + "\n")
    proc.stdin.flush()  # stdin stays open: the import waits for more, as from a slow producer
    deadline = time.monotonic() + 60
    while stored_count(db) < 5000:  # the first batch is in; the other 3 lines wait in memory
        assert time.monotonic() < deadline, "the first batch was never stored"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip(), "exited 130 without saying what was stored"
    last = err.splitlines()[-1]
    match = re.fullmatch(r"tokenwatch: interrupted, imported ([\d,]+) events.*", last)
    assert match, err
    stored = int(match.group(1).replace(",", ""))
    assert stored == stored_count(db)
    assert stored >= 5000


def test_a_file_of_no_events_is_one_line_with_a_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = write_lines(tmp_path / "notes.md", ["# Notes", *(f"- item {i}" for i in range(40))])
    assert main(["import", str(notes)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"tokenwatch: {notes}: no usage events in it, nothing imported (line 1: not JSON: "
        "Expecting value at column 1; 41 bad lines)\n"
    )
    assert not Paths.discover().db.exists() or stored_events() == []


def test_bad_lines_held_before_the_first_event_are_named_once_one_comes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    event = json.dumps({"ts": 1_790_000_000, "model": "gpt-4o", "input_tokens": 1})
    source = write_lines(tmp_path / "u.jsonl", ["oops", "{", event, "nope"])
    assert main(["import", str(source)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "tokenwatch: line 1: not JSON: Expecting value at column 1",
        "tokenwatch: line 2: not JSON: Expecting property name enclosed in double quotes at column 2",
        "tokenwatch: line 4: not JSON: Expecting value at column 1",
        "tokenwatch: imported 1 events, skipped 3 bad lines",
    ]

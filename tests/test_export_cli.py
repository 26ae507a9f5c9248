"""`tokenwatch export` writes what `tokenwatch import` reads: a round trip loses nothing."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EVENTS = [
    {
        "ts": "2026-11-20T09:00:00+00:00",
        "agent": "researcher",
        "model": "gpt-4o",
        "provider": "openai",
        "task": "t-1",
        "input_tokens": 1500,
        "cache_read_tokens": 1024,
        "output_tokens": 220,
        "latency_ms": 812.5,
        "call_id": "c1",
    },
    {
        "ts": 1795167060.25,
        "agent": "coder",
        "model": "claude-sonnet-4-5",
        "provider": "anthropic",
        "input_tokens": 9000,
        "cache_write_tokens": 8000,
        "output_tokens": 640,
        "reasoning_tokens": 0,
        "status": "ok",
        "call_id": "c2",
    },
    {
        "ts": 1795167100,
        "agent": "coder",
        "model": "my-private-model",
        "input_tokens": 10,
        "output_tokens": 3,
        "status": "error",
        "http_status": 500,
        "call_id": "c3",
    },
]


def tw(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOKENWATCH_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "tokenwatch", *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_export_then_import_round_trips_exactly(tmp_path: Path, tokenwatch_home: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    assert tw(tokenwatch_home, "import", str(source)).returncode == 0

    first = tw(tokenwatch_home, "export")
    assert first.returncode == 0, first.stderr
    assert "exported 3 events" in first.stderr
    exported = [json.loads(line) for line in first.stdout.splitlines()]
    assert [e["call_id"] for e in exported] == ["c1", "c2", "c3"]
    assert exported[0]["total_tokens"] == 1720
    # A model no table knows: at claude-opus-4-5's rates, marked, never $0: 10*5 + 3*25 per 1M.
    assert exported[2]["cost_usd"] == pytest.approx(125e-6)
    assert exported[2]["price_source"] == "estimated:claude-opus-4-5"

    other_home = tmp_path / "other"
    back = tw(other_home, "import", "-", stdin=first.stdout)
    assert back.returncode == 0, back.stderr
    second = tw(other_home, "export")
    assert [json.loads(line) for line in second.stdout.splitlines()] == exported


def test_csv_export_has_every_event_field(tmp_path: Path, tokenwatch_home: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    tw(tokenwatch_home, "import", str(source))
    out = tmp_path / "usage.csv"
    result = tw(tokenwatch_home, "export", "--format", "csv", "-o", str(out))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["agent"] for r in rows] == ["researcher", "coder", "coder"]
    assert rows[1]["cache_write_tokens"] == "8000"
    assert "cost_usd" in rows[0]
    assert "total_tokens" in rows[0]


def test_since_filters_and_errors_are_one_line(tmp_path: Path, tokenwatch_home: Path) -> None:
    empty = tw(tokenwatch_home, "export")
    assert empty.returncode == 1
    assert empty.stderr.count("\n") == 1
    assert "no usage recorded yet" in empty.stderr

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    tw(tokenwatch_home, "import", str(source))
    recent = tw(tokenwatch_home, "export", "--since", "2026-11-20T09:30:00+00:00")
    assert [json.loads(line)["call_id"] for line in recent.stdout.splitlines()] == ["c2", "c3"]

    bad = tw(tokenwatch_home, "export", "--since", "last tuesday")
    assert bad.returncode == 2
    assert bad.stderr.startswith("tokenwatch: --since: not a time")
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("target", ["/proc/forbidden.csv"])
def test_unwritable_output_is_a_clear_error(
    tmp_path: Path, tokenwatch_home: Path, target: str
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(EVENTS[0]) + "\n")
    tw(tokenwatch_home, "import", str(source))
    result = tw(tokenwatch_home, "export", "-o", target)
    assert result.returncode == 1
    assert result.stderr.startswith(f"tokenwatch: cannot write {target}")

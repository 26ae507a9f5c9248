"""`tokenwatch report --savings`: calls, share (the cache hit rate), tokens and dollars saved,
per lever and agent, from what the proxy recorded."""

from __future__ import annotations

import json
import time

import pytest

from tests.test_report_cli import run, seed
from tokenwatch.core.models import UsageEvent


@pytest.fixture
def savings() -> None:
    now = time.time()
    calls = [
        UsageEvent(ts=now - 60, agent="coder", model="gpt-4o", input_tokens=900, output_tokens=100),
        UsageEvent(ts=now - 50, agent="coder", model="gpt-4o", lever="cache", saved_tokens=1000, saved_usd=0.0032),
        UsageEvent(ts=now - 40, agent="coder", model="gpt-4o", lever="cache", saved_tokens=1000, saved_usd=0.0032),
        UsageEvent(ts=now - 30, agent="coder", model="gpt-4o", input_tokens=10),
        UsageEvent(ts=now - 30, agent="researcher", model="gpt-4o-mini", requested_model="gpt-4o",
                   lever="switch", input_tokens=5000, output_tokens=500, saved_usd=0.0165),
        UsageEvent(ts=now - 3 * 86400, agent="coder", lever="cache", saved_tokens=9, saved_usd=9.0),
    ]  # fmt: skip
    seed(calls)


def test_savings_table_per_lever_and_agent(
    savings: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "report", "--savings")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["LEVER", "AGENT", "CALLS", "SHARE", "TOKENS", "SAVED", "SAVED"]
    assert lines[1].split() == ["switch", "researcher", "1", "100%", "0", "$0.0165"]
    assert lines[2].split() == ["cache", "coder", "2", "50%", "2,000", "$0.0064"]
    assert lines[4].split() == ["TOTAL", "3", "2,000", "$0.0229"]


def test_savings_json(savings: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "report", "--savings", "--format", "json")
    rows = {(r["lever"], r["agent"]): r for r in json.loads(out)}
    assert code == 0
    assert rows["cache", "coder"]["share"] == 0.5
    assert rows["cache", "coder"]["saved_usd"] == pytest.approx(0.0064)


def test_savings_as_csv_is_one_line_refusal(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "report", "--savings", "--format", "csv")
    assert (code, out) == (2, "")
    assert err == "tokenwatch: report --savings prints a table or JSON (--format table|json)\n"


def test_no_savings_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    seed([UsageEvent(ts=time.time() - 5, agent="coder", input_tokens=1)])
    code, out, _ = run(capsys, "report", "--savings")
    assert code == 0
    assert "(no lever saved anything in this window" in out

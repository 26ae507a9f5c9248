"""`tokenwatch report` and `tokenwatch prices`: every format parses and shows hand-computed figures."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
from pathlib import Path

import anyio
import genai_prices
import pytest

from tokenwatch.cli import main
from tokenwatch.core.models import UsageEvent
from tokenwatch.ledger.store import Store
from tokenwatch.paths import Paths


def seed(events: list[UsageEvent]) -> None:
    async def write() -> None:
        async with await Store.open(Paths.discover().db) as store:
            await store.append_many(events)

    anyio.run(write)


@pytest.fixture
def ledger() -> float:
    """Two agents over the last hours, one unpriced model, one old event outside 24 h."""
    now = time.time()
    seed(
        [
            UsageEvent(ts=now - 600, agent="coder", task="t1", model="gpt-4o", user="ana",
                       provider="openai", input_tokens=1000, cache_read_tokens=400,
                       output_tokens=200, cost_usd=0.5),
            UsageEvent(ts=now - 1200, agent="coder", task="t2", model="gpt-4o", user="ana",
                       provider="openai", input_tokens=3000, output_tokens=600,
                       reasoning_tokens=100, cost_usd=1.5, status="error"),
            UsageEvent(ts=now - 7200, agent="researcher", task="t3", model="house-llm",
                       provider="local", input_tokens=500, output_tokens=500),
            UsageEvent(ts=now - 3 * 86400, agent="coder", model="gpt-4o", cost_usd=100.0,
                       input_tokens=1),
        ]
    )  # fmt: skip
    return now


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_report_uses_event_field_names(
    ledger: float, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "report", "--format", "json")
    assert code == 0
    data = json.loads(out)
    groups = {g["agent"]: g for g in data["groups"]}
    coder = groups["coder"]
    assert coder["requests"] == 2
    assert coder["input_tokens"] == 4000
    assert coder["cache_read_tokens"] == 400
    assert coder["output_tokens"] == 800
    assert coder["reasoning_tokens"] == 100
    assert coder["total_tokens"] == 4800
    assert coder["cost_usd"] == pytest.approx(2.0)
    assert coder["avg_tokens_per_call"] == pytest.approx(2400)
    assert coder["output_input_ratio"] == pytest.approx(0.2)
    assert coder["tasks"] == 2
    assert coder["cost_per_task"] == pytest.approx(1.0)
    assert coder["errors"] == 1
    researcher = groups["researcher"]
    assert researcher["cost_usd"] is None  # unknown model: unpriced, not $0
    assert researcher["unpriced_requests"] == 1
    assert data["total"]["requests"] == 3  # the 3-day-old call is outside the default 24 h
    assert data["unpriced_models"] == ["house-llm"]
    assert [g["agent"] for g in data["groups"]] == ["coder", "researcher"]  # dearest first


def test_csv_report_parses_with_one_row_per_group(
    ledger: float, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "report", "--by", "model", "--format", "csv", "--since", "7d")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    by_model = {r["model"]: r for r in rows}
    assert set(by_model) == {"gpt-4o", "house-llm"}
    assert int(by_model["gpt-4o"]["requests"]) == 3
    assert float(by_model["gpt-4o"]["cost_usd"]) == pytest.approx(102.0)
    assert by_model["house-llm"]["cost_usd"] == ""
    assert by_model["house-llm"]["cost_per_task"] == ""


def test_table_report_is_aligned_with_total_and_unpriced_note(
    ledger: float, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "report", "--by", "task")
    assert code == 0
    lines = out.splitlines()
    header, *rest = lines
    assert header.split()[:3] == ["TASK", "REQ", "INPUT"]
    total = next(line for line in rest if line.startswith("TOTAL"))
    assert total.split()[1:3] == ["3", "4,500"]
    assert "$2.00*" in total
    # Right-aligned columns: every data row ends its COST cell at the same place as the header.
    cost_end = header.index("COST") + len("COST")
    for line in rest[:3]:
        assert line[cost_end - 1] != " "
    assert lines[-1].startswith("* 1 call unpriced (unknown model: house-llm)")
    assert any(line.startswith("t3") and "unpriced*" in line for line in rest)


def test_report_shows_cache_writes_and_marks_every_estimate(
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = time.time()
    guessed = UsageEvent(
        ts=now - 60,
        agent="claude",
        model="acme-coder-7",
        provider="anthropic",
        input_tokens=20_000,
        cache_write_tokens=16_881,
        output_tokens=800,
        cost_usd=0.2,
        price_source="estimated:claude-opus-4-5",
    )
    counted = UsageEvent(
        ts=now - 30,
        agent="claude",
        model="claude-opus-4-5",
        provider="anthropic",
        input_tokens=1_000,
        output_tokens=100,
        cost_usd=0.1,
        price_source="genai-prices",
        estimated=True,
    )
    seed([guessed, counted])  # fmt: skip
    code, out, _ = run(capsys, "report")
    assert code == 0
    header, row, _, total, *notes = out.splitlines()
    assert header.split()[:6] == ["AGENT", "REQ", "INPUT", "CACHED", "WRITE", "OUTPUT"]
    assert row.split()[:7] == ["claude", "2", "21,000~", "0", "16,881", "900~", "0"]
    assert "$0.3000*" in total
    assert notes == [
        "* 1 call unpriced (unknown model: acme-coder-7): COST includes $0.2000 at an estimated "
        'price (`tokenwatch prices MODEL` shows from what). Price them with [prices."MODEL"] in '
        "tokenwatch.toml.",
        "~ 1 call with tokens counted locally (the provider reported no usage): an estimate",
    ]
    code, out, _ = run(capsys, "report", "--format", "json")
    [group] = json.loads(out)["groups"]
    assert (group["cost_usd"], group["estimated_usd"]) == (pytest.approx(0.3), 0.2)
    assert (group["cache_write_tokens"], group["unpriced_requests"]) == (16_881, 1)
    assert group["estimated_requests"] == 1
    code, out, _ = run(capsys, "report", "--format", "csv")
    [line] = list(csv.DictReader(io.StringIO(out)))
    assert (line["estimated_usd"], line["cache_write_tokens"]) == ("0.2", "16881")


def test_top_and_filters(ledger: float, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "report", "--by", "task", "--top", "1", "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert [g["task"] for g in data["groups"]] == ["t2"]
    assert data["total"]["requests"] == 3  # the total still covers every group
    code, out, _ = run(capsys, "report", "--agent", "res*", "--format", "json", "--by", "model")
    assert [g["model"] for g in json.loads(out)["groups"]] == ["house-llm"]


def test_by_day_over_a_week(ledger: float, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "report", "--by", "day", "--since", "7d", "--format", "json")
    assert code == 0
    days = json.loads(out)["groups"]
    assert sum(d["requests"] for d in days) == 4
    assert [d["day"] for d in days] == sorted(d["day"] for d in days)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "--since", "yesterday"], "not a time: 'yesterday'"),
        (["report", "--since", "1h", "--until", "2h"], "--until must be later than --since"),
    ],
)
def test_bad_windows_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert message in err


@pytest.mark.parametrize(
    "command", [["report"], ["export"], ["alerts"], ["rules", "test"]], ids=" ".join
)
def test_a_bad_since_is_the_same_line_and_exit_in_every_command(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, *command, "--since", "yesterday-ish")
    assert (code, out) == (2, "")
    assert err == (
        "tokenwatch: --since: not a time: 'yesterday-ish' "
        "(try 1h, 24h, 7d, today, 2026-11-01 or 2026-11-01T09:00)\n"
    )


def test_report_on_empty_ledger(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "report")
    assert code == 0
    assert "(no usage in this window)" in out
    assert out.splitlines()[-1].split()[:2] == ["TOTAL", "0"]


def test_prices_table_and_one_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "prices")
    assert code == 0
    assert out.startswith("prices version 20")
    assert any(line.split()[:2] == ["codestral", "mistral"] for line in out.splitlines())
    code, out, _ = run(capsys, "prices", "gpt-4o-mini-2024-07-18")
    assert code == 0
    version = genai_prices.__version__
    assert f"priced as gpt-4o-mini (openai) by genai-prices {version}" in out
    chain = [line.split() for line in out.splitlines()[2:5]]
    assert chain == [["tokenwatch.toml", "-"], ["tokenwatch", "2026-12-05", "-"],
                     ["genai-prices", version, "gpt-4o-mini", "(openai)"]]  # fmt: skip
    code, out, _ = run(capsys, "prices", "claude-sonnet-4-5-20250929", "--json")
    data = json.loads(out)
    assert (data["resolved"], data["source"]) == ("claude-sonnet-4-5", "genai-prices")
    assert data["price"]["cache_write"] == 3.75
    code, out, _ = run(capsys, "prices", "codestral")
    assert "priced as codestral (mistral) by tokenwatch 2026-12-05" in out
    assert "why tokenwatch prices it: genai-prices knows only dated" in out


def test_prices_of_a_model_no_table_knows_shows_the_estimate(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "prices", "gpt-99")
    assert code == 0
    assert out.startswith("gpt-99: no price table knows it; price: estimated from claude-opus-4-5")
    assert "fallback               claude-opus-4-5 (an estimate, marked as such)" in out
    code, out, _ = run(capsys, "prices", "gpt-99", "--json")
    assert json.loads(out)["estimated"] is True


def test_prices_shows_config_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "tokenwatch.toml").write_text(
        '[prices."llama3.1:8b"]\nfree = true\n\n[prices."gpt-4o"]\noutput = 12.0\n'
    )
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "prices", "--json")
    assert code == 0
    models = {m["model"]: m for m in json.loads(out)["models"]}
    assert models["llama3.1:8b"]["input"] == 0
    assert models["llama3.1:8b"]["overridden"] is True
    assert models["gpt-4o"]["output"] == 12.0
    assert models["gpt-4o"]["input"] == 2.5
    code, out, _ = run(capsys, "prices", "gpt-4o-2024-08-06")
    assert "rates set in tokenwatch.toml" in out


def test_bad_price_override_names_file_and_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "tokenwatch.toml").write_text('[prices."mine"]\ninput = 1.0\n')
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "prices")
    assert code == 2
    assert str(tmp_path / "tokenwatch.toml") in err
    assert 'prices."mine"' in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--since", "9999999999999999999999h"], "out of range: '9999999999999999999999h'"),
        (["--since", "1000000000000000000000s"], "out of range: '1000000000000000000000s'"),
        (["--by", "day", "--since", "99999999999d"], "out of range: '99999999999d'"),
        (["--since", "9999-12-31"], "'9999-12-31' is in the future"),
        (["--since", "1h", "--until", "2d"], "--until must be later than --since"),
    ],
)
def test_out_of_range_times_are_one_line_errors(
    ledger: float, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, "report", *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("tokenwatch: ")
    assert message in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("since", ["499d", "2000-01-01"])
def test_by_day_over_years_lists_each_day(
    ledger: float, capsys: pytest.CaptureFixture[str], since: str
) -> None:
    code, out, err = run(capsys, "report", "--by", "day", "--since", since, "--format", "json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert data["total"]["requests"] == 4
    assert sum(g["requests"] for g in data["groups"]) == 4


def utc(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


@pytest.fixture
def runs(tokenwatch_home: Path) -> None:
    """Two runs of researcher (one over two calls) and a coder reporting outside any run, in
    November and December 2026, reported in UTC."""
    (tokenwatch_home / "tokenwatch.toml").write_text('[supervisor]\ntimezone = "UTC"\n')
    seed(
        [
            UsageEvent(ts=utc("2026-11-02 09:00"), agent="researcher", run_id="aaaa1111bbbb",
                       model="gpt-4o", input_tokens=1000, cost_usd=0.25),
            UsageEvent(ts=utc("2026-11-02 09:30"), agent="researcher", run_id="aaaa1111bbbb",
                       model="gpt-4o", input_tokens=1000, cost_usd=0.25),
            UsageEvent(ts=utc("2026-11-08 23:59"), agent="coder", model="gpt-4o",
                       input_tokens=10, cost_usd=2.0),
            UsageEvent(ts=utc("2026-11-09 10:00"), agent="researcher", run_id="cccc2222dddd",
                       model="gpt-4o", input_tokens=500, cost_usd=0.1),
            UsageEvent(ts=utc("2026-12-01 00:00"), agent="coder", model="gpt-4o",
                       input_tokens=5, cost_usd=1.0),
        ]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        ("week", [("2026-11-02", 3), ("2026-11-09", 1), ("2026-11-30", 1)]),
        ("month", [("2026-11", 4), ("2026-12", 1)]),
    ],
)
def test_by_week_from_monday_and_by_month(
    runs: None, by: str, expected: list[tuple[str, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "report", "--by", by, "--since", "2026-11-02", "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert [(g[by], g["requests"]) for g in data["groups"]] == expected
    assert data["total"]["requests"] == 5


def test_by_session_a_run_of_an_agent_with_when_it_ran(
    runs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "report", "--by", "session", "--since", "2026-11-01")
    assert code == 0
    keys = [line.split("  ")[0] for line in out.splitlines()[1:-2]]
    assert keys == [
        "researcher aaaa1111 2026-11-02 09:00-09:30",
        "coder (no run) 2026-11-08 23:59-2026-12-01 00:00",
        "researcher cccc2222 2026-11-09 10:00-10:00",
    ]
    code, out, _ = run(capsys, "report", "--by", "session", "--since", "2026-11-01",
                       "--format", "json", "--top", "1")  # fmt: skip
    (dearest,) = json.loads(out)["groups"]
    assert (dearest["agent"], dearest["run_id"], dearest["requests"]) == ("coder", "", 2)
    assert dearest["started"] == "2026-11-08T23:59:00+00:00"
    assert dearest["last_activity"] == "2026-12-01T00:00:00+00:00"

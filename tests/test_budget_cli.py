"""`tokenwatch budget`, `alerts` and `rules test` as a user runs them, with and without a supervisor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from budget_fixtures import event
from supervisor_fixtures import running_supervisor
from test_detect import sent

from tokenwatch.cli import main
from tokenwatch.config import Config
from tokenwatch.core.models import Alert
from tokenwatch.ledger.store import Store
from tokenwatch.paths import OVERLAY_NAME, Paths
from tokenwatch.supervisor.policy import load_config


@pytest.fixture(autouse=True)
def in_empty_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from a directory without a tokenwatch.toml (the user's config applies)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def fill_ledger(events: list, alerts: list[Alert] = ()) -> None:  # type: ignore[type-arg,assignment]
    paths = Paths.discover()
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    async with await Store.open(paths.db) as store:
        await store.append_many(events)
        for alert in alerts:
            await store.add_alert(alert)
        await store.flush()


def test_set_list_and_remove_a_budget_without_a_supervisor(
    capsys: pytest.CaptureFixture[str], tokenwatch_home: Path
) -> None:
    code, out, _ = run(capsys, "budget", "set", "agent:researcher", "$5", "--action", "pause")
    assert code == 0
    assert out.startswith("budget agent:researcher:day: $5 per day, pause at the limit")
    assert "no supervisor is running" in out
    overlay = tokenwatch_home / "config" / OVERLAY_NAME
    assert f"saved to {overlay}; no supervisor is running" in out
    assert overlay.is_file()

    # Raising it keeps the action it had.
    run(capsys, "budget", "set", "agent:researcher", "$10")
    (budget,) = load_config().budget
    assert (budget.limit, budget.action) == ("$10", "pause")

    code, out, _ = run(capsys, "budget", "list")
    header, row = out.splitlines()
    assert header.split() == [
        "BUDGET",
        "TARGET",
        "PERIOD",
        "LIMIT",
        "USED",
        "LEFT",
        "RESETS",
        "RUNS",
        "OUT",
        "ACTION",
    ]
    assert row.split()[:4] == ["agent:researcher:day", "researcher", "day", "$10.00"]

    # Removed by the name `set` was given (its full name works too).
    code, out, _ = run(capsys, "budget", "rm", "agent:researcher")
    assert (code, out.split(" (")[0]) == (0, "budget agent:researcher:day removed")
    assert load_config().budget == []
    assert run(capsys, "budget", "list")[1].startswith("no budgets")


def test_budget_list_counts_what_the_ledger_holds_for_today(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import time

    anyio.run(fill_ledger, [event(time.time(), tokens=40_000, cost_usd=1.25)])
    run(capsys, "budget", "set", "global", "100k", "--name", "daily-tokens")
    run(capsys, "budget", "set", "agent:*", "$5")
    code, out, _ = run(capsys, "budget", "list", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["daily-tokens"]["used"] == 40_000
    assert rows["daily-tokens"]["remaining"] == 60_000
    assert rows["agent:*:day"]["target"] == "researcher"
    assert rows["agent:*:day"]["used"] == 1.25


def test_budget_list_marks_a_total_holding_estimated_prices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import time

    guessed = event(time.time(), tokens=1_000, cost_usd=0.5, model="acme-coder-7")
    guessed.price_source = "estimated:claude-opus-4-5"
    anyio.run(fill_ledger, [guessed, event(time.time(), tokens=1_000, cost_usd=0.25)])
    run(capsys, "budget", "set", "global", "$5", "--name", "daily")
    code, out, _ = run(capsys, "budget", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split()[:5] == ["daily", "*", "day", "$5.00", "$0.7500*"]
    assert lines[-1] == (
        "* daily (*) includes $0.5000 for models no price table knows, at an estimated price "
        '(price: estimated from claude-opus-4-5); declare them in tokenwatch.toml [prices."MODEL"]'
    )
    code, out, _ = run(capsys, "budget", "list", "--json")
    [row] = json.loads(out)
    assert (row["estimated_usd"], row["estimated_from"]) == (0.5, "claude-opus-4-5")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["budget", "set", "team:x", "5"], "unknown scope 'team'"),
        (["budget", "set", "agent", "5"], "say what the agent budget covers"),
        (["budget", "set", "agent:x", "lots"], "not a limit: 'lots'"),
        (["budget", "set", "global", "5k", "--warn", "half"], "--warn takes percentages"),
        (["budget", "rm", "nope"], "no budget named 'nope'"),
        (["budget", "set", "agent:x", "2k", "--name", "run:x"], "no supervisor is running, so no"),
        (["budget", "set", "global", "2k", "--name", "a\nb"], "cannot hold control characters"),
        (["budget", "rm", "run:x"], "no supervisor is running, so no run has the budget run:x"),
        (
            ["budget", "set", "agent:x", "2k", "--name", "run:x", "--action", "alert"],
            "run:x is a run's budget: only its limit can change (--action stays",
        ),
        (["alerts", "--since", "yesterday-ish"], "--since: not a time"),
        (
            ["budget", "set", "agent:x", "5"],
            "'5' has no unit: did you mean 5k (5,000 tokens) or $5",
        ),
        (["budget", "set", "agent:x"], "required: LIMIT (see `tokenwatch budget set --help`)"),
        (["budgte"], "invalid choice: 'budgte'"),
    ],
)
def test_bad_input_is_one_clear_line_and_a_failing_exit(argv: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tokenwatch", *argv], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("tokenwatch: ")
    assert message in line


def test_alerts_from_the_ledger_oldest_first_within_since(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import time

    now = time.time()
    alerts = [
        Alert(
            "runaway",
            "researcher",
            "researcher repeated the same prompt 3 times in 20 s; paused",
            "critical",
            "pause",
            ts=now - 60,
        ),
        Alert("budget:daily", "writer", "writer has used 80% of budget daily", ts=now - 30),
        Alert("spike", "old", "from last week", ts=now - 8 * 86400),
    ]
    anyio.run(fill_ledger, [], alerts)
    code, out, _ = run(capsys, "alerts", "--since", "1h")
    lines = out.splitlines()
    assert code == 0
    assert len(lines) == 3
    assert "researcher  runaway       pause   researcher repeated the same prompt" in lines[1]
    assert lines[2].endswith("writer has used 80% of budget daily")
    code, out, _ = run(capsys, "alerts", "--since", "30d", "--json")
    assert [a["agent"] for a in json.loads(out)] == ["old", "researcher", "writer"]


def test_rules_test_prints_what_would_have_fired_and_changes_nothing(
    capsys: pytest.CaptureFixture[str], in_empty_project: Path
) -> None:
    import time

    start = time.time() - 3600
    loop = [{"role": "user", "content": "again"}]
    events = [sent(start + 5 * i, loop, 500) for i in range(4)]  # not a poller: 5 s apart
    events += [
        sent(start + 100 + i, f"doc {i} about {chr(97 + i)}", 300, agent="ok") for i in range(5)
    ]
    anyio.run(fill_ledger, events)

    code, out, _ = run(capsys, "rules", "test", "--since", "2h")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "replayed 9 calls since 2h; nothing was changed"
    assert "researcher repeated the same prompt 3 times in a row in 10 s; paused" in lines[2]
    assert lines[-1] == "would have fired 1 times: runaway pause x1"

    custom = in_empty_project / "strict.toml"
    custom.write_text(
        '[[rule]]\nname = "loop2"\ndetector = "runaway"\nthreshold = 2\naction = "kill"\n'
    )
    code, out, _ = run(capsys, "rules", "test", "--since", "2h", "--config", str(custom), "--json")
    fired = json.loads(out)
    assert [(f["rule"], f["action"]) for f in fired] == [("loop2", "kill")]
    assert fired[0]["ts"] == start + 5

    code, out, _ = run(capsys, "alerts", "--since", "2h")
    assert out.startswith("no alerts")  # the replay stored nothing


async def test_edits_reach_a_running_supervisor_and_list_reads_from_it(
    capsys: pytest.CaptureFixture[str], in_empty_project: Path
) -> None:
    # The supervisor runs with the user's config; this directory has a project config of its
    # own. The edit goes beside the config in use, the supervisor's, and says where.
    (in_empty_project / "tokenwatch.toml").write_text("")
    async with running_supervisor(Paths.discover(), Config(), proxy=False, exporters=False) as sup:
        assert sup.engine is not None
        argv = ["budget", "set", "agent:researcher", "20k", "--action", "deny"]
        assert await anyio.to_thread.run_sync(main, argv) == 0
        assert f"(saved to {Paths.discover().overlay} and applied)" in capsys.readouterr().out
        assert not (in_empty_project / OVERLAY_NAME).exists()
        assert not (in_empty_project / f"{OVERLAY_NAME}.lock").exists()
        assert [s.name for s in sup.engine.budgets.statuses()] == ["agent:researcher:day"]

        import time

        await sup.engine.ingest([event(time.time(), tokens=15_000)])
        assert await anyio.to_thread.run_sync(main, ["budget", "list", "--json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert (row["name"], row["used"], row["action"]) == ("agent:researcher:day", 15_000, "deny")

        assert await anyio.to_thread.run_sync(main, ["budget", "rm", "agent:researcher"]) == 0
        assert f"(saved to {Paths.discover().overlay} and applied)" in capsys.readouterr().out
        assert sup.engine.budgets.statuses() == []


async def test_a_runs_budget_can_be_removed_for_the_rest_of_the_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tokenwatch.client.control import SupervisorClient

    async with running_supervisor(Paths.discover(), Config(), proxy=False, exporters=False) as sup:
        assert sup.engine is not None
        async with await SupervisorClient.connect(socket_path=sup.paths.socket) as ctl:
            await ctl.request("register", name="worker", budget="1k")
        assert [s.name for s in sup.engine.budgets.statuses()] == ["run:worker"]
        assert await anyio.to_thread.run_sync(main, ["budget", "rm", "run:worker"]) == 0
        assert "removed for the rest of the run" in capsys.readouterr().out
        assert sup.engine.budgets.statuses() == []
        assert await anyio.to_thread.run_sync(main, ["budget", "rm", "run:worker"]) == 1
        assert "no agent running now has a run budget named run:worker" in capsys.readouterr().err
    assert not Paths.discover().overlay.exists(), "a run's budget is never saved"


@pytest.mark.parametrize(
    ("rate", "why"),
    [
        ("bogus", "not a rate: 'bogus' (try 20k/min, $1/h, 50% or off)"),
        ("nan%", "not a rate: 'nan%' (try 20k/min, $1/h, 50% or off)"),
        ("150%", "a percentage must be above 0 and at most 100: '150%'"),
        ("0%", "a percentage must be above 0 and at most 100: '0%'"),
        ("1e400k/min", "not a token count: '1e400k' (try 200000, 200k or 1.5M)"),
    ],
)
def test_a_throttle_rate_that_cannot_work_is_refused_and_not_saved(
    capsys: pytest.CaptureFixture[str], rate: str, why: str
) -> None:
    code, out, err = run(
        capsys, "budget", "set", "global", "10k", "--action", "throttle", "--rate", rate
    )
    assert (code, out) == (1, "")
    assert err.strip() == f"tokenwatch: budget global:*:day: {why}"
    assert load_config().budget == []


def test_a_tag_budget_names_the_tag_and_may_pick_its_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(capsys, "budget", "set", "tag:team", "10k")[0] == 0
    assert run(capsys, "budget", "set", "tag:team=ml*", "10k")[0] == 0
    code, _, err = run(capsys, "budget", "set", "tag:*", "10k")
    assert code == 1
    assert err.strip() == (
        "tokenwatch: budget tag:*:day: a tag budget's target is KEY or KEY=VALUE (like team=ml), "
        "not '*'"
    )
    assert [b.target for b in load_config().budget] == ["team", "team=ml*"]


def test_budgets_that_cannot_be_saved_are_one_clear_line(
    tokenwatch_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tokenwatch_home / "config").write_text("")  # a file where the config dir should be
    code, out, err = run(capsys, "budget", "set", "global", "10k")
    assert code == 1
    assert out == ""
    overlay = tokenwatch_home / "config" / OVERLAY_NAME
    assert err == f"tokenwatch: cannot save budgets to {overlay}: File exists\n"


def test_rules_test_with_a_rule_that_cannot_work_names_it(
    capsys: pytest.CaptureFixture[str], in_empty_project: Path
) -> None:
    bad = in_empty_project / "bad.toml"
    bad.write_text('[[rule]]\nname = "x"\ndetector = "psychic"\n')
    code, out, err = run(capsys, "rules", "test", "--config", str(bad))
    assert code != 0
    assert out == ""
    assert err.strip() == (
        f"tokenwatch: {bad}: rule x: unknown detector 'psychic' (runaway, tool_loop, turn_loop, "
        "alternation, task_tokens, spike, huge_request, context_growth, drift, forecast)"
    )


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_alerts_limit_below_one_is_refused(capsys: pytest.CaptureFixture[str], limit: str) -> None:
    with pytest.raises(SystemExit) as exited:  # argparse's exit, as the process would
        main(["alerts", "--limit", limit])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.startswith("tokenwatch: ")
    assert f"must be at least 1, got {limit}" in err
    assert len(err.splitlines()) == 1


def test_alerts_limit_beyond_sqlite_means_no_limit(capsys: pytest.CaptureFixture[str]) -> None:
    anyio.run(fill_ledger, [], [Alert("spike", "a", "too fast")])
    code, out, err = run(capsys, "alerts", "--limit", "99999999999999999999999")
    assert (code, err) == (0, "")
    assert "too fast" in out

"""Budget edits land in tokenwatch's overlay; the user's tokenwatch.toml and its comments stay as written."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenwatch.config import BudgetSettings, Config, ConfigError
from tokenwatch.core.budgets import budget_name
from tokenwatch.paths import OVERLAY_NAME
from tokenwatch.supervisor.overlay import UnknownBudget, remove_budget, set_budget
from tokenwatch.supervisor.policy import load_config

USER_TOML = """\
# Our team's spending rules. Ask Ann before raising these.
[supervisor]
timezone = "UTC"  # the servers' zone

[[budget]]
name = "daily"
limit = "$20"      # hard cap agreed on 2026-11-01
action = "pause"

[[budget]]
scope = "agent"
target = "researcher"
limit = "200k"
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "tokenwatch.toml"
    path.write_text(USER_TOML)
    return path


def names(config: Config) -> list[str]:
    return [b.name or f"{b.scope}:{b.target}:{b.period}" for b in config.budget]


def test_setting_a_budget_writes_the_overlay_and_leaves_the_users_file_alone(
    project: Path,
) -> None:
    config = load_config(project)
    updated = set_budget(
        config, BudgetSettings(scope="model", target="o1*", limit="$5", action="deny", warn=[90])
    )
    assert project.read_text() == USER_TOML
    overlay = project.with_name(OVERLAY_NAME)
    assert "Written by tokenwatch" in overlay.read_text()

    reloaded = load_config(project)
    assert names(reloaded) == names(updated) == ["daily", "agent:researcher:day", "model:o1*:day"]
    added = reloaded.budget[-1]
    assert (added.limit, added.action, added.warn) == ("$5", "deny", [90])
    assert reloaded.supervisor.timezone == "UTC"


def test_setting_a_budget_by_an_existing_name_replaces_it_in_place(project: Path) -> None:
    config = load_config(project)
    set_budget(config, BudgetSettings(name="daily", limit="$50", action="pause"))
    set_budget(load_config(project), BudgetSettings(name="daily", limit="$60", action="pause"))
    reloaded = load_config(project)
    assert names(reloaded) == ["daily", "agent:researcher:day"]
    assert reloaded.budget[0].limit == "$60"
    assert project.read_text() == USER_TOML


def test_removing_a_budget_of_the_users_file_hides_it_until_it_is_set_again(
    project: Path,
) -> None:
    updated = remove_budget(load_config(project), "daily")
    assert names(updated) == names(load_config(project)) == ["agent:researcher:day"]
    assert project.read_text() == USER_TOML

    set_budget(load_config(project), BudgetSettings(name="daily", limit="$30"))
    assert names(load_config(project)) == ["daily", "agent:researcher:day"]


def test_removing_a_budget_tokenwatch_added_drops_it_from_the_overlay(project: Path) -> None:
    set_budget(load_config(project), BudgetSettings(scope="user", target="ann", limit="1M"))
    remove_budget(load_config(project), "user:ann:day")
    assert names(load_config(project)) == ["daily", "agent:researcher:day"]
    assert "ann" not in project.with_name(OVERLAY_NAME).read_text()


def test_an_unknown_name_or_a_bad_budget_is_a_clear_error_and_changes_nothing(
    project: Path,
) -> None:
    config = load_config(project)
    with pytest.raises(UnknownBudget, match=r"no budget named 'dialy'.*daily"):
        remove_budget(config, "dialy")
    with pytest.raises(ConfigError, match="budget agent:x:day: not a limit: 'lots'"):
        set_budget(config, BudgetSettings(scope="agent", target="x", limit="lots"))
    assert not project.with_name(OVERLAY_NAME).exists()
    assert names(load_config(project)) == ["daily", "agent:researcher:day"]


def test_without_a_project_file_edits_go_to_the_users_overlay(tokenwatch_home: Path) -> None:
    config = load_config(cwd=tokenwatch_home)
    assert config.budget == []
    updated = set_budget(config, BudgetSettings(limit="300k"))
    assert names(updated) == ["global:*:day"]
    assert (tokenwatch_home / "config" / OVERLAY_NAME).is_file()
    assert names(load_config(cwd=tokenwatch_home)) == ["global:*:day"]


budgets = st.builds(
    BudgetSettings,
    name=st.sampled_from(["", "daily", "team cap", "ml/é"]),
    scope=st.sampled_from(["global", "agent", "task", "model", "user", "tag"]),
    target=st.sampled_from(["*", "researcher", "gpt-4o*", "team=ml", 'odd "quoted" name']),
    period=st.sampled_from(["request", "task", "hour", "day", "week", "month", "total"]),
    limit=st.one_of(
        st.integers(1, 10**9),
        st.sampled_from(["200k", "1.5M", "$2", "$0.50", "12,000"]),
    ),
    action=st.sampled_from(["alert", "throttle", "pause", "kill", "deny"]),
    warn=st.lists(st.integers(1, 100), max_size=4),
    rate=st.sampled_from(["50%", "20k/min", "$1/h"]),
).filter(lambda b: b.scope != "tag" or "*" not in b.target.partition("=")[0])  # a tag is named


@settings(max_examples=40)
@given(budget=budgets)
def test_what_is_saved_reads_back_as_the_same_budget(budget: BudgetSettings) -> None:
    home = Path(tempfile.mkdtemp(prefix="tw-bf-"))
    try:
        project = home / "tokenwatch.toml"
        project.write_text(USER_TOML)
        set_budget(load_config(project), budget)
        name = budget_name(budget)
        (saved,) = [b for b in load_config(project).budget if budget_name(b) == name]
        assert saved == dataclasses.replace(budget, name=name)
    finally:
        shutil.rmtree(home, ignore_errors=True)

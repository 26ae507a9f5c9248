"""Budget edits land in tokenwatch's overlay; the user's tokenwatch.toml and its comments stay as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenwatch.config import BudgetSettings, Config, ConfigError, load_config
from tokenwatch.core.budget_file import UnknownBudget, remove_budget, set_budget
from tokenwatch.paths import OVERLAY_NAME

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

"""tokenwatch.toml: the example loads, errors name file/key/expectation, overlays keep the user's file."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
import tomli_w

from tokenwatch.config import (
    BudgetSettings,
    Config,
    ConfigError,
    load_config,
    parse_config,
)
from tokenwatch.core.pricing import PriceTable
from tokenwatch.paths import Paths

# In the example, a "#" directly followed by a key or table marks a line to uncomment.
EXAMPLE_LINE = re.compile(r"^#(?=[\[\w\"])")


def example(repo_root: Path) -> Path:
    return repo_root / "tokenwatch.toml"


def test_example_loads_and_its_values_are_the_defaults(repo_root: Path) -> None:
    cfg = load_config(example(repo_root))
    assert cfg.source == str(example(repo_root))
    # The active values document the defaults: they must not drift from config.py.
    assert dataclasses.replace(cfg, source="", overlay="") == Config()


def test_example_shows_every_setting(repo_root: Path) -> None:
    text = example(repo_root).read_text()
    uncommented = "\n".join(EXAMPLE_LINE.sub("", line) for line in text.splitlines())
    data = tomllib.loads(uncommented)
    cfg = parse_config(data, "example")
    shown = {
        "supervisor": data["supervisor"],
        "proxy": data["proxy"],
        "budget": data["budget"][0],
        "rule": data["rule"][0],
        "prices": data["prices"]["house-model"] | {"free": False},
        "agents": data["agents"]["researcher"],
        "alerts": data["alerts"],
        "export.prometheus": data["export"]["prometheus"],
        "export.otlp": data["export"]["otlp"],
    }
    sections = {
        "supervisor": cfg.supervisor,
        "proxy": cfg.proxy,
        "budget": cfg.budget[0],
        "rule": cfg.rule[0],
        "prices": cfg.prices["house-model"],
        "agents": cfg.agents["researcher"],
        "alerts": cfg.alerts,
        "export.prometheus": cfg.export.prometheus,
        "export.otlp": cfg.export.otlp,
    }
    for name, settings in sections.items():
        fields = {f.name for f in dataclasses.fields(settings)}
        missing = fields - set(shown[name])
        assert missing == set(), f"[{name}] in tokenwatch.toml does not show {sorted(missing)}"
    # The uncommented examples are usable as they stand.
    assert [b.limit for b in cfg.budget] == ["$20", "500k", "$1"]
    assert cfg.agents["researcher"].tags == {"team": "ml"}
    assert cfg.proxy.model_upstreams == {"llama3.1:8b": "http://127.0.0.1:11434/v1"}
    table = PriceTable.load(cfg.prices)
    assert table.lookup("llama3.1:8b") is not None
    assert table.lookup("gpt-4o").output == 12.0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            "[supervisor]\ntimezon = 'UTC'\n",
            r"unknown key 'supervisor\.timezon' \(expected one of: ",
        ),
        ("[proxy]\nport = '8080'\n", r"proxy\.port: expected an integer, got '8080'"),
        ("[[budget]]\nwarn = 50\n", r"budget\[0\]\.warn: expected a list of integers, got 50"),
        ("[prices.x]\nfree = 'yes'\n", r"prices\.x\.free: expected true or false, got 'yes'"),
        ("[agents.a]\ncommand = 'python x.py'\n", r"agents\.a\.command: expected a list"),
        ("[export.otlp]\nspans = 1\n", r"export\.otlp\.spans: expected true or false, got 1"),
        ("colour = 'red'\n", r"unknown key 'colour'"),
        ("[supervisor\n", r"not valid TOML"),
    ],
)
def test_errors_name_file_key_and_expectation(tmp_path: Path, toml: str, expected: str) -> None:
    path = tmp_path / "tokenwatch.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert re.search(expected, message), message
    assert "\n" not in message


def test_project_file_wins_over_user_file(tmp_path: Path) -> None:
    paths = Paths.discover()
    paths.config_dir.mkdir(parents=True)
    paths.user_config.write_text("[supervisor]\ntimezone = 'Asia/Tokyo'\n")
    project = tmp_path / "proj"
    project.mkdir()
    assert load_config(cwd=project).supervisor.timezone == "Asia/Tokyo"
    (project / "tokenwatch.toml").write_text("[supervisor]\ntimezone = 'UTC'\n")
    assert load_config(cwd=project).supervisor.timezone == "UTC"


def test_overlay_merges_budgets_and_leaves_the_users_file_untouched(tmp_path: Path) -> None:
    user_text = (
        "# my budgets, with comments I care about\n"
        "[[budget]]\n"
        'name = "daily"  # keep me\n'
        'limit = "$5"\n'
        "\n"
        "[[budget]]\n"
        'name = "old"\n'
        'limit = "100k"\n'
    )
    user = tmp_path / "tokenwatch.toml"
    user.write_text(user_text)
    overlay = tmp_path / "tokenwatch.local.toml"
    overlay.write_bytes(
        tomli_w.dumps(
            {
                "budget": [
                    {"name": "daily", "limit": "$8"},
                    {"name": "new", "scope": "agent", "target": "coder", "limit": "1M"},
                ],
                "removed_budgets": ["old"],
            }
        ).encode()
    )
    cfg = load_config(user)
    assert cfg.overlay == str(overlay)
    assert [(b.name, b.limit) for b in cfg.budget] == [("daily", "$8"), ("new", "1M")]
    assert cfg.budget[1] == BudgetSettings(name="new", scope="agent", target="coder", limit="1M")
    assert user.read_text() == user_text  # comments and all


def test_bad_overlay_is_named(tmp_path: Path) -> None:
    user = tmp_path / "tokenwatch.toml"
    user.write_text("")
    (tmp_path / "tokenwatch.local.toml").write_text("[supervisor]\ntimezone = 'UTC'\n")
    with pytest.raises(ConfigError, match=r"tokenwatch\.local\.toml: unknown key 'supervisor'"):
        load_config(user)

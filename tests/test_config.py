"""tokenwatch.toml: the example loads, errors name file/key/expectation, overlays keep the user's file."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
import tomli_w

from tokenwatch.config import BudgetSettings, Config, ConfigError, parse_config
from tokenwatch.config_file import find_config
from tokenwatch.core.pricing import PriceTable
from tokenwatch.paths import Paths
from tokenwatch.supervisor.policy import load_config

# In the example, a "#" directly followed by a key or table marks a line to uncomment.
EXAMPLE_LINE = re.compile(r"^#(?=[\[\w\"])")


def example(repo_root: Path) -> Path:
    return repo_root / "tokenwatch.toml"


def test_example_loads_and_its_values_are_the_defaults(
    repo_root: Path, tokenwatch_home: Path
) -> None:
    # A copy: budgets a user set while trying tokenwatch in the checkout (an overlay beside the
    # example) are theirs, not the example's.
    copy = tokenwatch_home / "tokenwatch.toml"
    copy.write_text(example(repo_root).read_text())
    cfg = load_config(copy)
    assert cfg.source == str(copy)
    # The active values document the defaults: they must not drift from config.py.
    assert dataclasses.replace(cfg, source="", overlay="") == Config()


def test_a_test_reads_no_config_it_did_not_write(repo_root: Path) -> None:
    # Tests run from the checkout, whose tokenwatch.toml (and a tour's overlay beside it) would
    # otherwise be every test's project config.
    assert Path.cwd() != repo_root
    assert find_config() is None


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
        "optimize.cache": data["optimize"]["cache"],
        "optimize.trim": data["optimize"]["trim"],
        "optimize.cache_health": data["optimize"]["cache_health"],
        "optimize.switch": data["optimize"]["switch"][0],
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
        "optimize.cache": cfg.optimize.cache,
        "optimize.trim": cfg.optimize.trim,
        "optimize.cache_health": cfg.optimize.cache_health,
        "optimize.switch": cfg.optimize.switch[0],
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


def load_error(tmp_path: Path, toml: str) -> str:
    """The one-line error loading `toml` from a tokenwatch.toml gives; it names the file."""
    path = tmp_path / "tokenwatch.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    return message


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
        ("[optimize.cache]\nttl = 0\n", r"optimize\.cache\.ttl: must be above 0"),
        (
            "[[optimize.switch]]\nbudget = 'x'\n",
            r"optimize\.switch\[0\]: needs a budget and a model",
        ),
        ("[supervisor\n", r"not valid TOML"),
    ],
)
def test_errors_name_file_key_and_expectation(tmp_path: Path, toml: str, expected: str) -> None:
    message = load_error(tmp_path, toml)
    assert re.search(expected, message), message


LIMIT = "[[budget]]\nlimit = 10\n"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[proxy]\nport = 99999\n", r"proxy\.port: must be from 0 to 65535, got 99999$"),
        ("[proxy]\nport = -1\n", r"proxy\.port: must be from 0 to 65535, got -1$"),
        ("[proxy]\nhost = '0.0.0.0'\n", r"proxy\.host: the proxy only listens on loopback"),
        ("[proxy]\nmax_body_bytes = -1\n", r"proxy\.max_body_bytes: must be from 1024 to "),
        ("[proxy]\nrequest_timeout = nan\n", r"proxy\.request_timeout: must be a finite number"),
        ("[proxy]\nread_timeout = 0\n", r"proxy\.read_timeout: must be above 0 and at most "),
        (
            "[proxy.model_upstreams]\nllama = 'ftp://box/v1'\n",
            r"proxy\.model_upstreams\.llama: expected an http:// or https:// URL, got 'ftp://box/v1'",
        ),
        ("[proxy]\nopenai_upstream = 'localhost:8080'\n", r"proxy\.openai_upstream: expected an"),
        ("[supervisor]\nkill_grace = nan\n", r"supervisor\.kill_grace: must be a finite number"),
        ("[supervisor]\nkill_grace = -1\n", r"supervisor\.kill_grace: must be from 0 to 3600"),
        ("[supervisor]\nsnapshot_interval = inf\n", r"snapshot_interval: must be a finite"),
        ("[[budget]]\nlimit = 1e400\n", r"budget global:\*:day: not a limit: inf"),
        ("[[budget]]\nlimit = nan\n", r"budget global:\*:day: not a limit: nan"),
        (LIMIT + "rate = 'bogus'\n", r"budget global:\*:day: not a rate: 'bogus'"),
        (LIMIT + "rate = 'nan%'\n", r"budget global:\*:day: not a rate: 'nan%'"),
        (LIMIT + "rate = '150%'\n", r"a percentage must be above 0 and at most 100: '150%'"),
        (LIMIT + "rate = '0%'\n", r"a percentage must be above 0 and at most 100: '0%'"),
        (LIMIT + "rate = '1e400k/min'\n", r"budget global:\*:day: not a token count: '1e400k'"),
        (LIMIT + "rate = '0/min'\n", r"budget global:\*:day: a rate must be above zero"),
        (LIMIT + "scope = 'tag'\n", r"budget tag:\*:day: a tag budget's target is KEY or KEY="),
        (LIMIT + "scope = 'tag'\ntarget = '=ml'\n", r"target is KEY or KEY=VALUE .*'=ml'"),
        (
            "[[rule]]\ndetector = 'spike'\nthreshold = nan\n",
            r"rule\[0\]\.threshold: must be a finite number, got nan",
        ),
        ("[[rule]]\ndetector = 'spike'\nrate = 'fast'\n", r"rule spike: not a rate: 'fast'"),
        ("[prices.x]\ninput = -1\n", r"prices\.x\.input: must be at least 0, got -1"),
        ("[prices.x]\noutput = nan\n", r"prices\.x\.output: must be a finite number, got nan"),
        ("[prices.x]\ninput = 1.0\n", r'prices\."x": a model the bundled table does not know'),
        ("[agents.a]\ncommand = []\n", r"agents\.a\.command: expected the program and its"),
        ("[alerts]\nwebhook = 'hooks.slack.com/x'\n", r"alerts\.webhook: expected an http"),
        (
            "[export.prometheus]\nlisten = 'garbage'\n",
            r"export\.prometheus\.listen: expected HOST:PORT \(port 0 to 65535\), got 'garbage'",
        ),
        ("[export.otlp]\nqueue_size = -1\n", r"export\.otlp\.queue_size: must be from 0 to"),
        ("[export.otlp]\ninterval = 0\n", r"export\.otlp\.interval: must be above 0 and at"),
        ("[export.otlp]\nendpoint = 'collector'\n", r"export\.otlp\.endpoint: expected an"),
    ],
)
def test_values_the_supervisor_cannot_run_with_are_refused_at_load(
    tmp_path: Path, toml: str, expected: str
) -> None:
    message = load_error(tmp_path, toml)
    assert re.search(expected, message), message


def test_a_tag_budget_may_name_just_the_tag(tmp_path: Path) -> None:
    path = tmp_path / "tokenwatch.toml"
    path.write_text(LIMIT + "scope = 'tag'\ntarget = 'team'\n")
    assert load_config(path).budget[0].target == "team"


def test_a_directory_where_the_config_would_be_is_an_error(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / "tokenwatch.toml").mkdir(parents=True)
    with pytest.raises(ConfigError) as info:
        load_config(cwd=project)
    assert (
        str(info.value)
        == f"{project / 'tokenwatch.toml'}: not a file; tokenwatch reads its settings from here"
    )


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

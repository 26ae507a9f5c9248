"""Budget edits (CLI, dashboard) saved to tokenwatch's own overlay file; tokenwatch.toml is never touched."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

from tokenwatch.config import BudgetSettings, Config, ConfigError, parse_config
from tokenwatch.config_file import merge_overlay, overlay_path_for, read_toml
from tokenwatch.core.budgets import budget_name, check_budget
from tokenwatch.paths import Paths

HEADER = (
    "# Written by tokenwatch (`tokenwatch budget set/rm`, the dashboard).\n"
    "# Budgets here replace those of tokenwatch.toml with the same name; removed_budgets hides\n"
    "# some of its budgets. Your tokenwatch.toml and its comments are left as they are.\n\n"
)
_KEEP = ("name", "scope", "target", "period", "limit", "action")
"""Written even when equal to the default, so the entry reads on its own."""


class UnknownBudget(ConfigError, LookupError):
    """No budget has that name."""


def overlay_file(config: Config) -> Path:
    """Where tokenwatch's own edits to this config go."""
    if config.overlay:
        return Path(config.overlay)
    source = Path(config.source) if config.source and Path(config.source).is_file() else None
    return overlay_path_for(source, Paths.discover())


def set_budget(config: Config, budget: BudgetSettings) -> Config:
    """Add or replace (by name) a budget in the overlay; returns the config as now in force."""
    check_budget(budget)
    name = budget_name(budget)
    entry = budget_entry(budget)
    with _editing(overlay_file(config)) as overlay:
        kept = [b for b in overlay.get("budget", []) if _name_of(b) != name]
        overlay["budget"] = [*kept, entry]
        removed = [n for n in overlay.get("removed_budgets", []) if n != name]
        _set_or_drop(overlay, "removed_budgets", removed)
    kept_settings = [b for b in config.budget if budget_name(b) != name]
    return _reloaded(config, [*kept_settings, dataclasses.replace(budget, name=name)])


def remove_budget(config: Config, name: str) -> Config:
    """Remove a budget (one set from tokenwatch or one of tokenwatch.toml); UnknownBudget if none."""
    if name not in {budget_name(b) for b in config.budget}:
        known = ", ".join(sorted(budget_name(b) for b in config.budget)) or "none"
        raise UnknownBudget(f"no budget named {name!r} (budgets: {known})")
    in_base = name in {_name_of(b) for b in _base(config).get("budget", [])}
    with _editing(overlay_file(config)) as overlay:
        kept = [b for b in overlay.get("budget", []) if _name_of(b) != name]
        _set_or_drop(overlay, "budget", kept)
        removed = [n for n in overlay.get("removed_budgets", []) if n != name]
        _set_or_drop(overlay, "removed_budgets", [*removed, name] if in_base else removed)
    return _reloaded(config, [b for b in config.budget if budget_name(b) != name])


def budget_entry(budget: BudgetSettings) -> dict[str, Any]:
    """The budget as a `[[budget]]` table (and `set_budget` message): named, defaults left out."""
    budget = dataclasses.replace(budget, name=budget_name(budget))
    defaults = BudgetSettings()
    entry: dict[str, Any] = {}
    for f in dataclasses.fields(BudgetSettings):
        value = getattr(budget, f.name)
        if f.name in _KEEP or value != getattr(defaults, f.name):
            entry[f.name] = value
    return entry


def _name_of(entry: dict[str, Any]) -> str:
    if entry.get("name"):
        return str(entry["name"])
    return f"{entry.get('scope', 'global')}:{entry.get('target', '*')}:{entry.get('period', 'day')}"


def _set_or_drop(table: dict[str, Any], key: str, values: list[Any]) -> None:
    if values:
        table[key] = values
    else:
        table.pop(key, None)


def _base(config: Config) -> dict[str, Any]:
    source = Path(config.source) if config.source else None
    if source is None or not source.is_file():
        return {}
    return read_toml(source)


def _reloaded(config: Config, edited: list[BudgetSettings]) -> Config:
    """The config read again from its files; one built in memory gets the edit applied."""
    path = overlay_file(config)
    source = Path(config.source) if config.source else None
    if source is None or not source.is_file():
        return dataclasses.replace(config, budget=edited, overlay=str(path))
    data = merge_overlay(read_toml(source), read_toml(path))
    return dataclasses.replace(parse_config(data, str(source)), overlay=str(path))


@contextmanager
def _editing(path: Path) -> Iterator[dict[str, Any]]:
    """Read-modify-write the overlay under a lock; written atomically, or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        overlay = read_toml(path) if path.is_file() else {}
        yield overlay
        _write_atomically(path, HEADER + tomli_w.dumps(overlay))


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

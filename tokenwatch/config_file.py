"""Finding and reading tokenwatch.toml, with tokenwatch's own overlay merged in, into the typed Config."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from tokenwatch.config import Config, ConfigError, parse_config
from tokenwatch.paths import OVERLAY_NAME, Paths


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: not a file; tokenwatch reads its settings from here") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def merge_overlay(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Apply tokenwatch's own edits: budgets by name (added, replaced, or removed)."""
    merged = dict(base)
    removed = set(overlay.get("removed_budgets", []))
    budgets = [b for b in base.get("budget", []) if _budget_name(b) not in removed]
    index = {_budget_name(b): i for i, b in enumerate(budgets)}
    for entry in overlay.get("budget", []):
        name = _budget_name(entry)
        if name in removed:
            continue
        if name in index:
            budgets[index[name]] = entry
        else:
            index[name] = len(budgets)
            budgets.append(entry)
    if budgets or "budget" in base:
        merged["budget"] = budgets
    return merged


def _budget_name(entry: dict[str, Any]) -> str:
    name = entry.get("name")
    if name:
        return str(name)
    return f"{entry.get('scope', 'global')}:{entry.get('target', '*')}:{entry.get('period', 'day')}"


def find_config(paths: Paths | None = None, cwd: Path | None = None) -> Path | None:
    paths = paths or Paths.discover()
    for candidate in paths.config_candidates(cwd):
        if candidate.is_file():
            return candidate
        if candidate.exists():  # skipping it would run on defaults the user did not choose
            raise ConfigError(f"{candidate}: not a file; tokenwatch reads its settings from here")
    return None


def overlay_path_for(config_file: Path | None, paths: Paths) -> Path:
    if config_file is None:
        return paths.overlay
    return config_file.with_name(OVERLAY_NAME)


def read_config(
    explicit: Path | None = None, paths: Paths | None = None, cwd: Path | None = None
) -> Config:
    """Read the project's (or user's, or an explicit) tokenwatch.toml plus its overlay, checking
    types and bounds; `supervisor.policy.load_config` also checks prices, budgets and rules."""
    paths = paths or Paths.discover()
    source = explicit if explicit is not None else find_config(paths, cwd)
    base: dict[str, Any] = {}
    if source is not None:
        base = read_toml(source)
    overlay_file = overlay_path_for(source, paths)
    data = base
    if overlay_file.exists():
        overlay = read_toml(overlay_file)
        unknown = set(overlay) - {"budget", "removed_budgets"}
        if unknown:
            raise ConfigError(f"{overlay_file}: unknown key '{sorted(unknown)[0]}'")
        data = merge_overlay(base, overlay)
    cfg = parse_config(data, str(source) if source else "<defaults>")
    return dataclasses.replace(cfg, overlay=str(overlay_file))

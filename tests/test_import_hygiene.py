"""Layer rules: core never loads the UI; the agent-side client never loads the supervisor."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CORE_MODULES = [
    "tokenwatch.core.models",
    "tokenwatch.core.protocol",
    "tokenwatch.core.admission",
    "tokenwatch.config",
    "tokenwatch.paths",
]


def loaded_after_import(modules: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ModuleNotFoundError as e:\n"
        "        if not e.name.startswith('tokenwatch'): raise\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out))


def core_modules() -> list[str]:
    import pkgutil

    import tokenwatch.core

    return [f"tokenwatch.core.{m.name}" for m in pkgutil.iter_modules(tokenwatch.core.__path__)]


def test_core_never_loads_textual_or_rich() -> None:
    modules = CORE_MODULES + core_modules()
    loaded = loaded_after_import(modules)
    assert "tokenwatch.core.models" in loaded
    ui = sorted(m for m in loaded if m.split(".")[0] in {"textual", "rich"})
    assert ui == [], f"core pulled in UI modules: {ui[:5]}"


@pytest.mark.parametrize("forbidden", ["textual", "rich", "aiosqlite", "tokenwatch.ledger.store"])
def test_client_never_loads_the_supervisor(forbidden: str) -> None:
    loaded = loaded_after_import(["tokenwatch.client"])
    hits = sorted(m for m in loaded if m == forbidden or m.startswith(forbidden + "."))
    assert hits == []


def test_cli_start_does_not_load_heavy_modules() -> None:
    loaded = loaded_after_import(["tokenwatch.cli"])
    heavy = {"textual", "openai", "tiktoken", "aiohttp", "httptools", "anthropic", "genai_prices"}
    heavy |= {"pydantic"}  # genai-prices loads it: only a command that prices a call may
    assert sorted(m for m in loaded if m.split(".")[0] in heavy) == []

"""Shared fixtures: every test runs with TOKENWATCH_HOME in a fresh temp dir."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.otlp_fixtures", "tests.postgres_fixtures"]

# No timing limits in tests (the machines are shared and noisy): a slow example on a loaded CI
# machine is not a failure.
settings.register_profile("tokenwatch", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tokenwatch")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def tokenwatch_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private TOKENWATCH_HOME per test, short enough for Unix socket paths, with HOME inside
    it, and the working directory: the checkout's tokenwatch.toml (and any overlay a tour left beside it) is never
    the config a test reads unless the test asks for it."""
    home = Path(tempfile.mkdtemp(prefix="tw-"))
    monkeypatch.setenv("TOKENWATCH_HOME", str(home))
    # the user's own coding agents' logs (~/.claude, ~/.codex, ~/.gemini) are never read
    (home / "user").mkdir()
    monkeypatch.setenv("HOME", str(home / "user"))
    for var in ("CLAUDE_CONFIG_DIR", "CODEX_HOME", "GEMINI_CLI_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(home)
    for var in ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "TOKENWATCH_SOCKET", "TOKENWATCH_AGENT"):
        monkeypatch.delenv(var, raising=False)
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir (pytest's tmp_path can exceed the 108-byte socket path limit)."""
    path = Path(tempfile.mkdtemp(prefix="tws-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


_OWN_TOKENIZER_CACHE = "TOKENWATCH_TEST_TOKENIZER_CACHE"
"""Set by the process that made the shared tokenizer cache (pytest-xdist workers inherit it)."""


def pytest_configure(config: pytest.Config) -> None:
    # No stable endpoint in any supervisor a test starts (in-process, `serve`, or started by
    # `tokenwatch run`) unless the test asks for one: its fixed port is one per machine.
    os.environ.setdefault("TOKENWATCH_ENDPOINT_PORT", "0")
    # One tokenizer cache for the whole run (each test's own home would convert o200k again),
    # made once, by the first process, and removed by it at the end.
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        os.environ["TIKTOKEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="tw-tk-")
        os.environ[_OWN_TOKENIZER_CACHE] = str(os.getpid())


def pytest_unconfigure(config: pytest.Config) -> None:
    if os.environ.get(_OWN_TOKENIZER_CACHE) == str(os.getpid()):
        shutil.rmtree(os.environ.pop("TIKTOKEN_CACHE_DIR"), ignore_errors=True)
        del os.environ[_OWN_TOKENIZER_CACHE]

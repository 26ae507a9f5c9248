"""Shared fixtures: every test runs with TOKENWATCH_HOME in a fresh temp dir."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.otlp_fixtures"]

# No timing limits in tests (the machines are shared and noisy): a slow example on a loaded CI
# machine is not a failure.
settings.register_profile("tokenwatch", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tokenwatch")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def tokenwatch_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private TOKENWATCH_HOME per test, short enough for Unix socket paths."""
    home = Path(tempfile.mkdtemp(prefix="tw-"))
    monkeypatch.setenv("TOKENWATCH_HOME", str(home))
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


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", tempfile.mkdtemp(prefix="tw-tk-"))

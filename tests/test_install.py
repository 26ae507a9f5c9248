"""What a fresh clone's two commands install: `make demo` only tokenwatch, quietly."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest


def planned(target: str, repo_root: Path, venv: Path) -> list[str]:
    """The commands `make TARGET` would run for a venv that does not exist yet (`make -n`)."""
    # as a person types it, not as a sub-make of `make test` (which says where it works)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", target, f"VENV={venv}"],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout.splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_installs_tokenwatch_without_the_test_toolchain(
    repo_root: Path, tmp_path: Path
) -> None:
    demo = planned("demo", repo_root, tmp_path / "venv")
    installs = [line for line in demo if "pip install" in line and "--upgrade pip" not in line]
    assert [line.split()[-1] for line in installs] == ["."]
    assert demo[-1].endswith("tokenwatch demo")
    test = planned("test", repo_root, tmp_path / "venv")
    assert any(line.endswith("-e '.[test]'") for line in test)


def test_the_licence_is_an_spdx_string_setuptools_takes_without_a_warning(
    repo_root: Path,
) -> None:
    # A `{ text = "MIT" }` table made setuptools print a deprecation warning twice per install.
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert "setuptools>=77" in project["build-system"]["requires"]  # SPDX strings from 77 on

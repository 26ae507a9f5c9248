"""A test run leaves nothing behind in the temp dir (each run used to leave a tw-tk-* dir)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_a_test_run_leaves_no_tokenizer_cache_behind(repo_root: Path, tmp_path: Path) -> None:
    # With workers: the first process makes the shared cache, each worker made one more.
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}
    env["TMPDIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "tests/test_periods.py", "-k", "month or week"],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("tw-tk-")) == []

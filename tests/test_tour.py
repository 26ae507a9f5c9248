"""docs/tour.md followed command by command, as a new user would, against fake-llm: it works, it
says what the page says, and it leaves the checkout as it found it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from tests.process_fixtures import wait_until

FENCE = re.compile(r"^```sh([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
TOUR_PORT = "8765"


EXPECTED_EXIT = re.compile(r"^(?P<command>.*?)\s+# exits (?P<code>\d+)\b")


def tour_script(page: str, port: int) -> str:
    """The page's `sh` blocks in order (not those meant for a second terminal), as one script
    that stops at the first command that fails (a line the page says `# exits N` may exit N);
    the fake LLM on a free port."""
    blocks = [body for info, body in FENCE.findall(page) if "second-terminal" not in info]
    lines = "\n".join(blocks).replace(TOUR_PORT, str(port)).splitlines()
    for i, line in enumerate(lines):
        if m := EXPECTED_EXIT.match(line):
            lines[i] = f"{m['command']} || [ $? -eq {m['code']} ]"
    return "set -eu -o pipefail\n" + "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def git_status(repo: Path) -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=repo, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def stop_what_is_left(home: Path) -> None:
    """A tour that failed half way leaves its supervisor up: end it (by its pid file)."""
    for pidfile in home.glob("tmp.*/run/supervisor.pid"):
        try:
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        except (ValueError, ProcessLookupError):
            pass


@pytest.mark.slow
@pytest.mark.timeout(280)  # the tour takes about a minute; its own limit is 180 s
def test_the_tour_can_be_followed_literally_and_leaves_the_checkout_clean(
    repo_root: Path, short_tmp: Path
) -> None:
    if not (repo_root / ".venv" / "bin" / "activate").is_file():
        pytest.skip("the tour starts from the checkout's .venv (made by make demo / make test)")
    script = tour_script((repo_root / "docs" / "tour.md").read_text(), free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENWATCH_", "OPENAI_"))}
    env["TMPDIR"] = str(short_tmp)  # where the tour's `mktemp -d` home goes
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    before = git_status(repo_root)
    # git ignores these (a user may make them in the checkout): looked for by name
    overlays = [repo_root / "tokenwatch.local.toml", repo_root / "tokenwatch.local.toml.lock"]
    overlays_before = [p for p in overlays if p.exists()]
    # Files, not pipes: the fake LLM it starts in the background would hold a pipe open.
    out_file, err_file = short_tmp / "out", short_tmp / "err"
    with out_file.open("w") as out_fh, err_file.open("w") as err_fh:
        tour = subprocess.Popen(
            ["bash", "-c", script], cwd=repo_root, env=env, stdin=subprocess.DEVNULL,
            stdout=out_fh, stderr=err_fh, start_new_session=True,
        )  # fmt: skip
        try:
            code = tour.wait(timeout=180)
        except subprocess.TimeoutExpired:
            code = -1
        finally:
            stop_what_is_left(short_tmp)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(tour.pid, signal.SIGTERM)  # what a tour stopped half way left
            tour.wait()
    out, err = out_file.read_text(), err_file.read_text()
    assert code == 0, f"the tour stopped:\n{out}\n{err}"
    (home,) = short_tmp.glob("tmp.*")
    anyio.run(wait_until, lambda: not (home / "run" / "supervisor.pid").exists(), "its end")

    # 1: a finite run sums itself up; status and report see it
    first = re.search(r"tokenwatch: researcher exited 0 · ([\d,]+) tokens · \S+ · 10 requests", err)
    assert first is not None, err
    assert re.search(r"^researcher\s+exited \(0\)", out, re.MULTILINE)
    # 2: the budget is saved in the scratch home, applied, warns, then refuses with a way out
    overlay = home / "config" / "tokenwatch.local.toml"
    assert f"(saved to {overlay} and applied)" in out
    assert "budget agent:researcher:day" in out  # its warnings, in `tokenwatch alerts`
    assert "Raise it with `tokenwatch budget set agent:researcher" in out
    # 3: the loop is paused by the runaway rule, then killed by the user
    assert "tokenwatch: looper paused by rule:runaway" in err
    assert re.search(r"looper exited 143 \(SIGTERM\) · .* · paused by rule:runaway", err)
    # 4: a session per run
    assert len(re.findall(r"^researcher [0-9a-f]{8} ", out, re.MULTILINE)) == 2
    # and nothing was left behind in the checkout
    assert git_status(repo_root) == before
    assert [p for p in overlays if p.exists()] == overlays_before

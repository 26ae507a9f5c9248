"""`tokenwatch run`'s notices: while no supervisor answers, its terminal is told once."""

from __future__ import annotations

import io

import anyio
import anyio.to_thread

from tests.supervisor_fixtures import quiet_config, running_supervisor
from tokenwatch.cli.notices import ActionNotices
from tokenwatch.paths import Paths

TIMEOUT = 30


async def said(out: io.StringIO, words: str, times: int = 1) -> list[str]:
    with anyio.fail_after(TIMEOUT):
        while out.getvalue().count(words) < times:
            await anyio.sleep(0.05)
    return out.getvalue().splitlines()


async def test_a_supervisor_gone_is_told_once_and_its_return_too() -> None:
    paths = Paths.discover()
    out = io.StringIO()
    notices = ActionNotices("researcher", out=out)
    try:
        async with running_supervisor(paths, quiet_config(), proxy=False, exporters=False):
            assert await anyio.to_thread.run_sync(notices.start)
        await said(out, "no supervisor answers")
        await anyio.sleep(2.5)  # a few more tries to reach one: still told only once
        async with running_supervisor(paths, quiet_config(), proxy=False, exporters=False):
            lines = await said(out, "answers again")
    finally:
        await anyio.to_thread.run_sync(notices.stop)
    assert lines == [
        "tokenwatch: no supervisor answers: researcher's LLM calls through tokenwatch fail "
        "until one runs again (`tokenwatch serve --detach` starts one)",
        "tokenwatch: a supervisor answers again: researcher's calls go through",
    ]

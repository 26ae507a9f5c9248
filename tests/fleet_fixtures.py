"""A team on this machine: `tokenwatch serve` processes with homes of their own sharing one
PostgreSQL database, agents calling fake-llm through their proxies, and what each side recorded
(tests/test_fleet_e2e.py and bench/fleet.py use them)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import openai

from tests.supervisor_fixtures import ServeProcess, start_serve, stop_serve, wait_answers
from tokenwatch.client.control import SupervisorClient, SupervisorError
from tokenwatch.core.pricing import PriceTable
from tokenwatch.core.request_tokens import CHAT, count_request

MODEL = "gpt-4o-mini"
MAX_TOKENS = 16
"""Small, so fake-llm's replies (8 to 48 words, cut at max_tokens) mostly use all of it: what a
call spends is close to what it reserved, and a race that admitted one call too many shows."""


def question(i: int) -> dict[str, str]:
    return {"role": "user", "content": f"Question {i}: why?"}


def worst_case_usd() -> float:
    """What the proxy reserves for one call before the agent has history: its prompt plus all
    of max_tokens, at the model's rates."""
    tokens = count_request(CHAT, {"messages": [question(0)]}, MODEL).tokens
    usd = PriceTable.load({}).worst_case(MODEL, tokens, MAX_TOKENS, "openai")
    assert usd is not None
    return usd


def team_toml(url: str, upstream: str, budgets: str, *, lease: float = 30, host: str = "") -> str:
    """A member's tokenwatch.toml: rules off (fifty similar prompts look like a loop)."""
    return f"""
[supervisor]
timezone = "UTC"

[proxy]
openai_upstream = "{upstream}/v1"

[fleet]
url = "{url}"
lease = {lease}
retry_interval = 0.2
connect_timeout = 2
{f'host = "{host}"' if host else ""}

[[rule]]
name = "off"
detector = "runaway"
enabled = false

{budgets}
"""


@dataclass
class Member:
    """One supervisor of the team."""

    name: str
    home: Path
    serve: ServeProcess

    def stop(self) -> None:
        """SIGTERM it and wait: its ledger flushed, its settlements sent (or kept)."""
        stop_serve(self.serve)

    def ledger_usd(self, agent: str | None = None) -> float:
        """What its SQLite ledger recorded as spent (by `agent`, or in all)."""
        with contextlib.closing(sqlite3.connect(self.serve.paths.db)) as db:
            where, args = ("WHERE agent = ?", (agent,)) if agent else ("", ())
            (total,) = db.execute(f"SELECT coalesce(sum(cost_usd), 0) FROM events {where}", args)
            return float(total[0])

    def ledger_calls(self) -> int:
        """How many calls its SQLite ledger holds (refused ones included)."""
        with contextlib.closing(sqlite3.connect(self.serve.paths.db)) as db:
            return int(db.execute("SELECT count(*) FROM events").fetchone()[0])


@contextlib.contextmanager
def team(
    names: Sequence[str], pg_env: dict[str, str], toml: str | dict[str, str]
) -> Iterator[list[Member]]:
    """`tokenwatch serve` per name, each in a home of its own with `toml` (or toml[name]),
    started together; SIGTERMed (flushing) at the end, their homes removed."""
    members: list[Member] = []
    try:
        for name in names:
            home = Path(tempfile.mkdtemp(prefix=f"twf-{name}-"))
            config = home / "tokenwatch.toml"
            config.write_text(toml if isinstance(toml, str) else toml[name])
            env = {**os.environ, **pg_env, "TOKENWATCH_HOME": str(home)}
            for var in ("OPENAI_BASE_URL", "TOKENWATCH_SOCKET", "TOKENWATCH_AGENT"):
                env.pop(var, None)
            members.append(Member(name, home, start_serve(env, "--config", str(config))))
        for member in members:
            wait_answers(member.serve)
        yield members
    finally:
        for member in members:
            stop_serve(member.serve)
        for member in members:
            shutil.rmtree(member.home, ignore_errors=True)


async def base_url(member: Member, agent: str) -> str:
    """The agent's proxy URL, registering it the first time (a second register of the same
    name would make another agent)."""
    async with await SupervisorClient.connect(socket_path=member.serve.paths.socket) as ctl:
        try:
            env = await ctl.request("env", agent=agent)
        except SupervisorError as exc:
            if exc.code != "unknown_agent":
                raise
            env = (await ctl.request("register", name=agent))["env"]
    return str(env["OPENAI_BASE_URL"])


async def fire(member: Member, agent: str, calls: int, outcomes: Counter[str],
               messages: list[str] | None = None) -> None:  # fmt: skip
    """`calls` concurrent chat calls by `agent` through the member's proxy; counts `ok`,
    `refused` (429) and `unreachable` (503), keeping the refusals' messages."""
    url = await base_url(member, agent)
    async with openai.AsyncOpenAI(base_url=url, api_key="sk-test", max_retries=0) as client:

        async def one(i: int) -> None:
            try:
                await client.chat.completions.create(
                    model=MODEL,
                    messages=[question(i)],  # type: ignore[list-item]
                    max_tokens=MAX_TOKENS,
                )
                outcomes["ok"] += 1
            except openai.RateLimitError as exc:
                outcomes["refused"] += 1
                _keep(messages, exc)
            except openai.InternalServerError as exc:
                outcomes["unreachable" if exc.status_code == 503 else "error"] += 1
                _keep(messages, exc)
            except openai.APIConnectionError:
                outcomes["lost"] += 1  # its supervisor was killed mid-call

        async with anyio.create_task_group() as tg:
            for i in range(calls):
                tg.start_soon(one, i)


def _keep(messages: list[str] | None, exc: openai.APIStatusError) -> None:
    if messages is not None:
        body: Any = exc.body
        messages.append(body.get("message", "") if isinstance(body, dict) else str(exc))


async def team_figures(url: str, budget: str) -> tuple[float, float]:
    """(spent, reserved) of a shared budget in the team's database, over its keys and periods."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT coalesce(sum(spent), 0), coalesce(sum(reserved), 0) FROM shared_budgets "
            "WHERE budget = %s",
            (budget,),
        )
        row = await cur.fetchone()
    assert row is not None
    return float(row[0]), float(row[1])


def report_fleet(member: Member, *args: str) -> subprocess.CompletedProcess[str]:
    """`tokenwatch report --fleet` as a user of that machine runs it (its tokenwatch.toml in
    the working directory)."""
    return subprocess.run(
        [sys.executable, "-m", "tokenwatch", "report", "--fleet", *args],
        env=member.serve.env, cwd=member.home, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

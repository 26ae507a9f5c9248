"""What a buggy or hostile agent sends, against a real supervisor: a line nested 1,000 deep or a
count no call can have is answered with a clear error, and the socket, the proxy and the ledger
go on as before."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import anyio
import openai
import pytest

from tests.proxy_fixtures import API_KEY
from tests.supervisor_fixtures import (
    RawClient,
    quiet_config,
    raw_client,
    running_supervisor,
    stored,
    usage_event,
)
from tokenwatch.config import Config, ProxySettings, SupervisorSettings
from tokenwatch.core import protocol
from tokenwatch.core.errors import StoreUnavailable
from tokenwatch.core.models import UsageEvent
from tokenwatch.core.nesting import MAX_NESTING
from tokenwatch.demo.fake_llm import running_fake_llm
from tokenwatch.ledger.transaction import Statement
from tokenwatch.paths import Paths
from tokenwatch.supervisor.service import Supervisor

pytestmark = pytest.mark.anyio

DEEP = b"[" * 1000 + b"]" * 1000
DEEP_USAGE = b'{"v":1,"type":"usage","event":{"x":' + DEEP + b"}}\n"
"""The line from the fault run that killed the supervisor (msgspec's RecursionError)."""
NESTED = {"code": "bad_message", "message": f"nested deeper than {MAX_NESTING} levels"}


@dataclass
class Rig:
    """A supervisor with its proxy in front of fake-llm, one agent registered and saying hello."""

    sup: Supervisor
    socket: RawClient
    openai_url: str
    agent: str

    async def proxied_call(self) -> str:
        async with openai.AsyncOpenAI(
            base_url=self.openai_url, api_key=API_KEY, max_retries=0
        ) as oai:
            reply = await oai.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "Say hello."}],
            )
        return reply.choices[0].message.content or ""

    async def post_raw(self, body: bytes) -> tuple[int, str]:
        """A request body no SDK would build (the SDKs' own JSON encoders recurse too)."""
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        url = self.openai_url + "/chat/completions"
        async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as r:
            return r.status, await r.text()

    async def stored(self, count: int) -> list[UsageEvent]:
        return await stored(self.sup, self.agent, count)

    async def break_ledger(self) -> None:
        """The real writer process finds its ledger unwritable, as on a full or read-only disk."""
        assert self.sup.store is not None
        # When the writer's batch holds other rows too, their commit fails on the switch itself
        # and the statement is answered with that failure: the ledger is just as broken.
        with contextlib.suppress(StoreUnavailable):
            await self.sup.store._write(Statement("PRAGMA query_only = ON"))

    async def wait_held(self, count: int) -> None:
        """Until the engine holds `count` recorded calls it could not store."""
        with anyio.fail_after(30):
            while self.sup.engine is None or self.sup.engine.statistics().pending_store < count:
                await anyio.sleep(0.02)


@asynccontextmanager
async def supervisor_in_an_outage(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    """`supervisor_with_proxy` that lets calls go while its ledger fails (fail_open) and stops
    trying to store what it holds 0.2 s into its shutdown."""
    monkeypatch.setattr("tokenwatch.engine.engine.SHUTDOWN_DRAIN_TIMEOUT", 0.2)
    async with supervisor_with_proxy(
        quiet_config(supervisor=SupervisorSettings(fail_open=True))
    ) as rig:
        yield rig


@asynccontextmanager
async def supervisor_with_proxy(base: Config | None = None) -> AsyncIterator[Rig]:
    async with running_fake_llm() as fake:
        proxy = ProxySettings(openai_upstream=fake.url + "/v1")
        config = dataclasses.replace(base or quiet_config(), proxy=proxy)
        async with (
            running_supervisor(Paths.discover(), config, exporters=False) as sup,
            raw_client(Path(sup.paths.socket)) as raw,
        ):
            registered = (await raw.call("register", name="prober"))["data"]
            await raw.call("hello", name=registered["name"])
            env = registered["env"]
            yield Rig(sup, raw, env["OPENAI_BASE_URL"], registered["name"])


async def test_a_line_nested_1000_deep_is_answered_and_everything_goes_on() -> None:
    async with supervisor_with_proxy() as rig:
        await rig.socket.send(DEEP_USAGE)  # the usage fast path
        fast = await rig.socket.reply_to(None)
        await rig.socket.send(b'{"v":1,"id":"s","type":"status","x":' + DEEP + b"}\n")
        generic = await rig.socket.reply_to("s")  # the generic path
        after = await rig.socket.call("usage", event=usage_event(rig.agent, "after-deep-lines"))
        answer = await rig.proxied_call()
        events = await rig.stored(2)
    assert fast["error"] == NESTED
    assert generic["error"] == NESTED
    assert after["ok"] is True
    assert answer
    assert [e.source for e in events] == ["sdk", "proxy"]


async def test_a_request_body_nested_1000_deep_is_a_logged_400(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tokenwatch")
    limit = b"[" * (MAX_NESTING - 1) + b"]" * (MAX_NESTING - 1)  # the body's object is one more
    async with supervisor_with_proxy() as rig:
        deep = await rig.post_raw(b'{"model":"gpt-4o-mini","messages":' + DEEP + b"}")
        at_limit = await rig.post_raw(
            b'{"model":"gpt-4o-mini","stream":true,"x":' + limit + b',"messages":'
            b'[{"role":"user","content":"Say hello."}]}'
        )
        answer = await rig.proxied_call()
        events = await rig.stored(2)
    assert deep[0] == 400
    assert f"request body nested deeper than {MAX_NESTING} levels" in deep[1]
    assert f"refused a call of agent {rig.agent}: its body nests deeper than" in caplog.text
    assert at_limit[0] == 200  # relayed, usage asked for and read: nothing recursed too far
    assert answer
    assert [e.status for e in events] == ["ok", "ok"]


async def test_counts_no_call_can_have_are_refused_and_the_ledger_goes_on() -> None:
    # The fault run's `tokenwatch.report(input_tokens=2**62)` twice: accepted, they overflowed
    # the ledger's sums, and every write after them failed (503 on every proxied call).
    huge = [usage_event("", f"huge-{i}", input_tokens=2**62) for i in range(2)]
    async with supervisor_with_proxy() as rig:
        with anyio.fail_after(30):
            # in one write, so they arrive as one batch (as the SDK sent them)
            lines = [protocol.request("usage", f"h{i}", event=e) for i, e in enumerate(huge)]
            await rig.socket.send(b"".join(map(protocol.dumps, lines)))
            refusals = [await rig.socket.reply_to(f"h{i}") for i in range(2)]
            # an unknown key takes the generic path, which refuses it in the same words
            slow = await rig.socket.call("usage", event={**huge[0], "future_field": 1})
            admit = await rig.socket.call("admit", model="gpt-4o-mini", input_tokens=2**62)
            after = await rig.socket.call("usage", event=usage_event("", "after"))
            answer = await rig.proxied_call()
            events = await rig.stored(2)
    for reply in [*refusals, slow]:
        assert reply["error"] == {
            "code": "bad_message",
            "message": "usage: 'input_tokens' is 4,611,686,018,427,387,904, over 100,000,000 "
            "(the most one call can use)",
        }
    assert admit["error"]["message"].startswith("admit: 'input_tokens' is 4,611,686,018,427,")
    assert after["ok"] is True
    assert answer
    assert [(e.call_id, e.source) for e in events][:1] == [("after", "sdk")]
    assert (events[0].input_tokens, events[1].source) == (100, "proxy")


async def test_usage_held_at_shutdown_is_kept_and_stored_by_the_next_start(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stopped while its ledger could not be written, the supervisor dropped the usage it held
    # in memory without a word (204 calls billed, 203 recorded).
    caplog.set_level(logging.INFO, logger="tokenwatch")
    paths = Paths.discover()
    async with supervisor_in_an_outage(monkeypatch) as rig:
        await rig.proxied_call()
        await rig.stored(1)
        await rig.break_ledger()
        for _ in range(3):
            await rig.proxied_call()
        await rig.wait_held(3)
    kept = paths.unstored.read_text().splitlines()
    said_at_stop = caplog.text
    caplog.clear()
    async with running_supervisor(paths, quiet_config(), proxy=False, exporters=False) as sup:
        events = await stored(sup, rig.agent, 4)
    assert len(kept) == 3
    assert f"3 recorded calls kept in {paths.unstored}; the next start stores them" in said_at_stop
    assert f"stored 3 calls kept at the last shutdown in {paths.unstored}" in caplog.text
    assert not paths.unstored.exists()
    assert [e.source for e in events] == ["proxy"] * 4
    assert all(e.input_tokens > 0 and e.output_tokens > 0 for e in events)


async def test_usage_that_can_be_kept_nowhere_is_counted_as_lost_in_the_log(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="tokenwatch")
    paths = Paths.discover()
    async with supervisor_in_an_outage(monkeypatch) as rig:
        await rig.break_ledger()
        paths.unstored.mkdir()  # nothing can be written there either
        await rig.proxied_call()
        await rig.wait_held(1)
    assert "1 recorded calls lost: the ledger could not be written (cannot write the ledger" in (
        caplog.text
    )
    assert f"nor {paths.unstored} (Is a directory)" in caplog.text

"""The proxy inside the real supervisor: usage stored as fake-llm billed it, the key nowhere."""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tests.process_fixtures import start_sleeper
from tests.proxy_fixtures import API_KEY
from tests.supervisor_fixtures import running_supervisor, stored
from tokenwatch.client.control import SupervisorClient
from tokenwatch.config import Config, ProxySettings
from tokenwatch.demo.fake_llm import running_fake_llm
from tokenwatch.paths import Paths

MESSAGES = [{"role": "user", "content": "Explain what a reverse proxy does, briefly."}]


async def calls_through(base_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as oai:
        await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
        stream = await oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        )
        async for _ in stream:
            pass
        with pytest.raises(openai.InternalServerError):
            await oai.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,  # type: ignore[arg-type]
                extra_headers={"x-fake-llm-fault": "500"},
            )


@dataclass
class Scan:
    scanned: list[str]
    leaks: list[str]


def files_with(home: Path, needle: bytes) -> Scan:
    """Every file under `home` (ledger, WAL, logs, sockets skipped) that contains `needle`."""
    files = [p for p in home.rglob("*") if p.is_file()]
    ledger = [p.name for p in files if "-wal" in p.name or p.suffix in {".db", ".sqlite"}]
    return Scan(ledger, [str(p) for p in files if needle in p.read_bytes()])


@pytest.mark.slow
async def test_canary_key_is_nowhere_on_disk_and_usage_is_exact(
    tokenwatch_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tokenwatch")
    async with running_fake_llm() as fake:
        config = Config(proxy=ProxySettings(openai_upstream=fake.url + "/v1"))
        async with running_supervisor(Paths.discover(), config, proxy=True, exporters=False) as sup:
            async with await SupervisorClient.connect(
                socket_path=Path(sup.paths.socket), start=False
            ) as ctl:
                registered = await ctl.request("register", name="canary")
            await calls_through(registered["env"]["OPENAI_BASE_URL"])
            events = await stored(sup, registered["name"], 3)
            live = files_with(tokenwatch_home, API_KEY.encode())  # the WAL is there now
        billed = list(fake.calls)
    assert [e.source for e in events] == ["proxy"] * 3
    assert [(e.input_tokens, e.output_tokens) for e in events[:2]] == [
        (c.input_tokens, c.output_tokens) for c in billed[:2]
    ]
    assert (events[2].status, events[2].http_status, events[2].total_tokens) == ("error", 500, 0)
    assert any("-wal" in name for name in live.scanned), live.scanned
    assert live.leaks == []
    after = files_with(tokenwatch_home, API_KEY.encode())
    assert after.leaks == []
    assert API_KEY not in caplog.text


@pytest.mark.slow
async def test_an_agent_that_outlives_its_supervisor_keeps_its_base_url() -> None:
    sleeper = start_sleeper()
    try:
        async with running_fake_llm() as fake:
            config = Config(proxy=ProxySettings(openai_upstream=fake.url + "/v1"))
            async with running_supervisor(Paths.discover(), config, proxy=True) as first:
                async with await SupervisorClient.connect(
                    socket_path=Path(first.paths.socket), start=False
                ) as ctl:
                    agent = await ctl.request("register", name="survivor", pid=sleeper.pid)
                first_url = first.proxy_url
            base_url = agent["env"]["OPENAI_BASE_URL"]
            # the agent still runs: the next supervisor recovers it and serves its old route
            async with running_supervisor(Paths.discover(), config, proxy=True) as second:
                await calls_through_once(base_url)
                (event,) = await stored(second, "survivor", 1)
                second_url = second.proxy_url
    finally:
        sleeper.kill()
        sleeper.wait()
    assert second_url == first_url
    assert (event.agent, event.run_id, event.source) == ("survivor", agent["run_id"], "proxy")
    assert event.total_tokens > 0


async def calls_through_once(base_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as oai:
        await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]


async def test_a_saved_port_now_taken_is_left_for_another() -> None:
    paths = Paths.discover()
    paths.ensure_private_runtime()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        paths.proxy_routes.write_text(json.dumps({"format": 1, "port": taken, "routes": {}}))
        async with running_supervisor(paths, Config(), proxy=True, exporters=False) as sup:
            url = sup.proxy_url
    assert url.startswith("http://127.0.0.1:")
    assert not url.endswith(f":{taken}")

"""The proxy's guards: loopback Host only, size limits, request deadlines, secrets kept secret."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import anthropic
import anyio
import anyio.abc
import openai
import pytest

from tests.proxy_fixtures import API_KEY, ProxyRig, running_proxy
from tokenwatch.config import ProxySettings
from tokenwatch.proxy.server import ProxyServer, RouteTable

MESSAGES = [{"role": "user", "content": "hello"}]
CHAT = {"model": "gpt-4o-mini", "messages": MESSAGES}


@pytest.fixture
async def rig() -> AsyncIterator[ProxyRig]:
    async with running_proxy(request_timeout=1.0) as r:
        yield r


def port_of(rig: ProxyRig) -> int:
    return rig.proxy.port


async def read_until_closed(conn: anyio.abc.ByteStream) -> bytes:
    received = b""
    try:
        while True:
            received += await conn.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return received


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes; for requests no HTTP client would send."""
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(data)
        with anyio.fail_after(30):
            return await read_until_closed(conn)


async def drain(oai: openai.AsyncOpenAI, fault: str) -> None:
    stream = await oai.chat.completions.create(  # type: ignore[call-overload]
        **CHAT, stream=True, extra_headers={"x-fake-llm-fault": fault}
    )
    async for _ in stream:
        pass


@pytest.mark.parametrize("host", ["evil.example.com", "localhost.evil.com", "10.0.0.1"])
async def test_bad_host_is_refused_before_the_upstream(rig: ProxyRig, host: str) -> None:
    headers = {"Host": f"{host}:{port_of(rig)}", "Authorization": f"Bearer {API_KEY}"}
    url = rig.openai_url + "/chat/completions"
    async with aiohttp.ClientSession() as http, http.post(url, json=CHAT, headers=headers) as r:
        assert r.status == 403
        body = await r.json()
    assert "localhost" in body["error"]["message"]
    assert rig.fake.statistics()["requests"] == 0
    assert rig.gate.requests == []
    stats = rig.proxy.statistics()
    assert (stats.total, stats.refused, stats.in_flight) == (1, 1, 0)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]"])
async def test_loopback_names_are_accepted(rig: ProxyRig, host: str) -> None:
    headers = {"Host": f"{host}:{port_of(rig)}", "Authorization": f"Bearer {API_KEY}"}
    url = rig.openai_url + "/chat/completions"
    async with aiohttp.ClientSession() as http, http.post(url, json=CHAT, headers=headers) as r:
        assert r.status == 200
    assert rig.fake.statistics()["requests"] == 1


async def test_unknown_route_gets_each_providers_404(rig: ProxyRig) -> None:
    base = f"http://127.0.0.1:{port_of(rig)}/a/not-a-token"
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0) as oai:
        with pytest.raises(openai.NotFoundError) as o_err:
            await oai.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert "route" in o_err.value.message
    async with anthropic.AsyncAnthropic(base_url=base, api_key=API_KEY, max_retries=0) as ant:
        with pytest.raises(anthropic.NotFoundError) as a_err:
            await ant.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=MESSAGES)  # type: ignore[arg-type]
    assert a_err.value.body["type"] == "error"  # type: ignore[index]
    assert rig.fake.statistics()["requests"] == 0


async def test_body_over_the_limit_is_413() -> None:
    async with running_proxy(max_body_bytes=1000) as rig:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
        async with openai.AsyncOpenAI(
            base_url=rig.openai_url, api_key=API_KEY, max_retries=0
        ) as oai:
            with pytest.raises(openai.APIStatusError) as caught:
                await oai.chat.completions.create(**big)  # type: ignore[call-overload]
        assert caught.value.status_code == 413
        assert rig.fake.statistics()["requests"] == 0


async def test_header_over_the_limit_is_431_and_not_logged(
    rig: ProxyRig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = port_of(rig)
    secret = API_KEY + "z" * 20_000
    request = (
        f"POST /a/{rig.token}/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {secret}\r\nContent-Length: 2\r\n\r\n{{}}"
    ).encode()
    reply = await raw_exchange(port, request)
    assert reply.split(b"\r\n", 1)[0].endswith(b" 431 Request Header Fields Too Large")
    assert API_KEY.encode() not in reply
    assert API_KEY not in caplog.text
    assert rig.fake.statistics()["requests"] == 0


async def test_slow_request_head_is_dropped_after_the_deadline(rig: ProxyRig) -> None:
    async with await anyio.connect_tcp("127.0.0.1", port_of(rig)) as conn:
        await conn.send(b"POST /a/x/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with anyio.fail_after(30):  # the proxy's 1 s deadline closes it long before
            received = await read_until_closed(conn)
    assert received == b""  # closed without an answer: nothing was forwarded


async def test_slow_request_body_gets_408(rig: ProxyRig) -> None:
    port = port_of(rig)
    head = (
        f"POST /a/{rig.token}/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    ).encode()
    reply = await raw_exchange(port, head)  # never sends the other 999 bytes
    assert reply.split(b"\r\n", 1)[0].endswith(b" 408 Request Timeout")
    assert rig.fake.statistics()["requests"] == 0


@pytest.mark.slow
async def test_long_stream_outlives_the_request_deadline() -> None:
    async with (
        running_proxy(request_timeout=0.3, fake_kwargs={"chunk_ms": 15}) as rig,
        openai.AsyncOpenAI(base_url=rig.openai_url, api_key=API_KEY, max_retries=0) as oai,
    ):
        long = [{"role": "user", "content": "tell me everything " * 20}]
        stream = await oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=long,  # type: ignore[arg-type]
            max_tokens=200,
            stream=True,
        )
        pieces = [c async for c in stream]
        (event,) = await rig.gate.wait_settled(1)
    assert event.status == "ok"
    assert event.estimated is False
    assert len(pieces) > 20  # 20+ chunks 15 ms apart: well past the 0.3 s request deadline


async def test_canary_key_never_leaks(rig: ProxyRig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with openai.AsyncOpenAI(base_url=rig.openai_url, api_key=API_KEY, max_retries=0) as oai:
        await oai.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        stream = await oai.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
        assert [c async for c in stream]
        for fault in ("500", "cut:2"):
            with pytest.raises(Exception) as caught:
                await drain(oai, fault)
            assert API_KEY not in str(caught.value)
    events = await rig.gate.wait_settled(4)
    recorded = json.dumps([dataclasses.asdict(e) for e in events])
    assert API_KEY not in recorded
    assert API_KEY not in caplog.text
    assert API_KEY not in repr(rig.proxy.statistics())
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("tokenwatch")]
    assert not [m for m in ours if rig.token in m]  # the route token is a credential too


async def test_call_id_header_is_used_and_not_sent_upstream(rig: ProxyRig) -> None:
    async with openai.AsyncOpenAI(
        base_url=rig.openai_url,
        api_key=API_KEY,
        max_retries=0,
        default_headers={"x-tokenwatch-call-id": "call-123"},
    ) as oai:
        await oai.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    (event,) = await rig.gate.wait_settled(1)
    assert event.call_id == "call-123"


async def call_with_retries(sdk: str, rig: ProxyRig, headers: dict[str, str]) -> None:
    """One call through the proxy with the SDK's default retries."""
    if sdk == "openai":
        async with openai.AsyncOpenAI(
            base_url=rig.openai_url, api_key=API_KEY, default_headers=headers
        ) as oai:
            await oai.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        return
    async with anthropic.AsyncAnthropic(
        base_url=rig.anthropic_url, api_key=API_KEY, default_headers=headers
    ) as claude:
        await claude.messages.create(
            model="claude-haiku-4-5",
            max_tokens=50,
            messages=MESSAGES,  # type: ignore[arg-type]
        )


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_each_sdk_retry_of_a_call_is_an_attempt_of_its_own(sdk: str) -> None:
    # every attempt gets a 429; the SDK resends the same headers, call id included
    faults = {"fail_every": 1, "fail_status": 429, "retry_after_s": 0.01}
    async with running_proxy(fake_kwargs=faults) as rig:
        with pytest.raises((openai.RateLimitError, anthropic.RateLimitError)):
            await call_with_retries(sdk, rig, {"x-tokenwatch-call-id": "call-7"})
        events = await rig.gate.wait_settled(3)
    # the SDKs' default two retries: three attempts, three records, the first under the call's id
    assert [e.call_id for e in events] == ["call-7", "call-7.retry1", "call-7.retry2"]
    assert [e.http_status for e in events] == [429, 429, 429]


async def test_non_loopback_bind_is_refused() -> None:
    proxy = ProxyServer(_NeverGate(), RouteTable(), ProxySettings(host="0.0.0.0"))
    with pytest.raises(ValueError, match="loopback"):
        await proxy.serve()


async def test_listens_on_ipv6_loopback_too(rig: ProxyRig) -> None:
    try:
        probe = await anyio.connect_tcp("::1", port_of(rig))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    await probe.aclose()
    url = f"http://[::1]:{port_of(rig)}/a/{rig.token}/v1/models"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        assert resp.status == 200
        models = await resp.json()
    assert models["data"]


class _NeverGate:
    async def admit(self, call: object) -> object:
        raise AssertionError("not reached")

    async def settle(self, admission: object, event: object) -> None:
        raise AssertionError("not reached")

"""Bytes in, bytes out: what the upstream sent reaches the agent unchanged, however it is shaped."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import anyio
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.proxy_fixtures import API_KEY, ProxyRig, running_proxy

# odd but valid: spaces, newlines, unicode escapes, a usage object with extra fields
ODD_JSON = (
    b'{ "id" : "chatcmpl-1",\n  "object": "chat.completion", "model": "odd-model",\n'
    b'  "choices": [ {"index": 0, "message": {"role": "assistant", "content": "caf\\u00e9"},'
    b' "finish_reason": "stop"} ],\n'
    b'  "usage": { "prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,'
    b' "prompt_tokens_details": {"cached_tokens": 4}, "future_field": [1, 2] }\n}\n'
)
# CRLF separators, a comment line, an event name, a multi-line data field
ODD_SSE = [
    b": keep-alive comment\r\n\r\n",
    b'event: chunk\r\ndata: {"choices":[{"index":0,"delta":{"content":"he"}}]}\r\n\r\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"llo"}}],\r\ndata: "x":1}\r\n\r\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}',
    b"\r\n\r\ndata: [DONE]\r\n\r\n",
]


RECEIVED: list[dict[str, object]] = []


async def odd_upstream(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    RECEIVED.append(body)
    if not body.get("stream"):
        return web.Response(
            body=ODD_JSON, content_type="application/json", headers={"x-request-id": "req-odd"}
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for piece in ODD_SSE:
        await response.write(piece)
    await response.write_eof()
    return response


@pytest.fixture
async def rig() -> AsyncIterator[ProxyRig]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", odd_upstream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    upstream = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        async with running_proxy(openai_upstream=upstream) as r:
            yield r
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()


async def post(rig: ProxyRig, body: dict[str, object]) -> tuple[bytes, CIMultiDict[str]]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = rig.openai_url + "/chat/completions"
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as r:
        return await r.read(), CIMultiDict(r.headers)


async def test_json_body_and_headers_arrive_unchanged(rig: ProxyRig) -> None:
    body, headers = await post(
        rig, {"model": "odd-model", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert body == ODD_JSON
    assert headers["x-request-id"] == "req-odd"
    (event,) = await rig.gate.wait_settled(1)
    assert (event.input_tokens, event.output_tokens, event.cache_read_tokens) == (11, 7, 4)
    assert event.estimated is False


async def test_sse_with_crlf_and_comments_arrives_unchanged(rig: ProxyRig) -> None:
    request = {
        "model": "odd-model",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body, _ = await post(rig, request)
    assert body == b"".join(ODD_SSE)
    (event,) = await rig.gate.wait_settled(1)
    assert (event.input_tokens, event.output_tokens) == (9, 2)
    assert event.estimated is False


async def test_usage_the_proxy_asked_for_is_cut_out_exactly(rig: ProxyRig) -> None:
    RECEIVED.clear()
    request = {
        "model": "odd-model",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    body, _ = await post(rig, request)
    assert RECEIVED[-1]["stream_options"] == {"include_usage": True}
    assert body == ODD_SSE[0] + ODD_SSE[1] + ODD_SSE[2] + b"data: [DONE]\r\n\r\n"
    (event,) = await rig.gate.wait_settled(1)
    assert (event.input_tokens, event.output_tokens) == (9, 2)


@pytest.mark.parametrize("figure", [b"-100", b"99999999999999999999999999", b"1.5e300", b'"lots"'])
async def test_usage_figures_that_are_not_counts_are_estimated_instead(figure: bytes) -> None:
    async def broken_upstream(request: web.Request) -> web.Response:
        return web.Response(
            body=ODD_JSON.replace(b'"prompt_tokens": 11', b'"prompt_tokens": ' + figure),
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", broken_upstream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        upstream = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        async with running_proxy(openai_upstream=upstream) as rig:
            prompt = {"model": "gpt-4o", "messages": [{"role": "user", "content": "count me"}]}
            body, _ = await post(rig, prompt)
            (event,) = await rig.gate.wait_settled(1)
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
    assert figure in body  # the agent gets the upstream's answer as it was
    assert event.estimated
    assert event.input_tokens > 0  # the prompt, counted here: never negative, never zero
    assert event.output_tokens > 0  # "café", counted here

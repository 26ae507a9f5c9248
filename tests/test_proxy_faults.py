"""The proxy when things go wrong: cut streams, hang-ups, upstream errors, budgets, a slow store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import anyio
import anyio.abc
import anyio.lowlevel
import openai
import pytest

from tests.proxy_fixtures import API_KEY, ProxyRig, RecordingGate, running_proxy
from tokenwatch.core.admission import Admission, CallRequest
from tokenwatch.core.tokens import count_messages, count_text

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
FAULT = "x-fake-llm-fault"


@pytest.fixture
async def rig() -> AsyncIterator[ProxyRig]:
    async with running_proxy() as r:
        yield r


def client(rig: ProxyRig, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=rig.openai_url, api_key=API_KEY, max_retries=0, default_headers=headers
    )


async def test_stream_cut_upstream_is_recorded_estimated_and_not_zero(rig: ProxyRig) -> None:
    async with client(rig, **{FAULT: "cut:3"}) as oai:
        stream = await oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        )
        with pytest.raises(Exception) as caught:  # the SDK's transport error for a cut body
            async for _ in stream:
                pass
        assert not isinstance(caught.value, AssertionError)
    (event,) = await rig.gate.wait_settled(1)
    assert event.estimated is True
    assert event.status == "error"
    assert event.input_tokens > 0
    assert event.output_tokens > 0  # the pieces relayed before the cut were counted
    (billed,) = rig.fake.calls
    assert billed.complete is False
    assert event.input_tokens == billed.input_tokens  # same tokenizer, same prompt


async def test_client_that_hangs_up_mid_stream_is_recorded_cancelled() -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "max_tokens": 400}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with (
        running_proxy(fake_kwargs={"chunk_ms": 20}) as rig,
        aiohttp.ClientSession() as http,
        http.post(rig.openai_url + "/chat/completions", json=body, headers=headers) as resp,
    ):
        assert resp.status == 200
        async for line in resp.content:
            if b'"content":"' in line and b'"content":""' not in line:
                break
        resp.close()  # hang up mid-stream
        (event,) = await rig.gate.wait_settled(1)
    assert event.status == "cancelled"
    assert event.estimated is True
    assert event.input_tokens > 0
    assert event.output_tokens > 0


async def test_upstream_errors_are_recorded_with_status_and_no_usage(rig: ProxyRig) -> None:
    for status in ("429", "500"):
        async with client(rig, **{FAULT: status}) as oai:
            with pytest.raises(openai.APIStatusError) as caught:
                await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
            assert caught.value.status_code == int(status)
    events = await rig.gate.wait_settled(2)
    assert [e.http_status for e in events] == [429, 500]
    assert all(e.status == "error" for e in events)
    assert all(e.total_tokens == 0 and not e.estimated for e in events)


async def test_unreachable_upstream_is_a_provider_shaped_502() -> None:
    async with running_proxy(openai_upstream="http://127.0.0.1:9/v1") as rig:
        async with client(rig) as oai:
            with pytest.raises(openai.APIStatusError) as caught:
                await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
        assert caught.value.status_code == 502
        assert "upstream" in str(caught.value.message)
        (event,) = await rig.gate.wait_settled(1)
        assert (event.status, event.http_status, event.total_tokens) == ("error", 502, 0)


async def test_silent_upstream_times_out_as_504() -> None:
    async def say_nothing(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            await anyio.sleep_forever()

    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(listener.serve, say_nothing)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        silent = f"http://127.0.0.1:{port}/v1"
        async with (
            running_proxy(openai_upstream=silent, read_timeout=0.5) as rig,
            client(rig) as oai,
        ):
            with pytest.raises(openai.APIStatusError) as caught:
                await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
            assert caught.value.status_code == 504
            (event,) = await rig.gate.wait_settled(1)
            assert event.http_status == 504
        tg.cancel_scope.cancel()


@pytest.mark.slow
async def test_fifty_concurrent_calls_against_a_budget_for_ten() -> None:
    prompt = [{"role": "user", "content": "hello there"}]
    worst = count_messages(prompt, "gpt-4o-mini").tokens + 100  # prompt plus max_tokens
    gate = RecordingGate(budget=worst * 10)
    async with running_proxy(gate) as rig, client(rig) as oai:
        statuses: list[int] = []
        messages: list[str] = []
        release = anyio.Event()

        async def one() -> None:
            await release.wait()
            try:
                await oai.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=prompt,  # type: ignore[arg-type]
                    max_tokens=100,
                )
                statuses.append(200)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)
                messages.append(exc.message)

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(one)
            await anyio.lowlevel.checkpoint()
            release.set()
        admitted = 10
        assert statuses.count(200) == admitted
        assert statuses.count(429) == 50 - admitted
        assert gate.peak_reserved <= (gate.budget or 0)
        assert all("budget 'test'" in m for m in messages)
        events = await gate.wait_settled(50)
        assert sum(e.status == "denied" for e in events) == 50 - admitted
        assert len(rig.fake.calls) == admitted  # refused calls never reached the upstream


async def test_refusal_is_provider_shaped_with_retry_after() -> None:
    class Closed(RecordingGate):
        async def admit(self, call: CallRequest) -> Admission:
            return Admission(
                False, status=429, message="budget 'day' is spent", budget="day", retry_after=42
            )

    async with running_proxy(Closed()) as rig, client(rig) as oai:
        with pytest.raises(openai.RateLimitError) as caught:
            await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
        assert caught.value.response.headers["retry-after"] == "42"
        assert caught.value.body["message"] == "budget 'day' is spent"  # type: ignore[index]
        assert rig.fake.calls == []


async def test_proxy_keeps_serving_while_settle_is_slow(rig: ProxyRig) -> None:
    rig.gate.settle_gate = anyio.Event()  # the store hangs: no settle returns
    async with client(rig) as oai:
        with anyio.fail_after(30):
            for _ in range(3):
                await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert rig.proxy.statistics().settling == 3
    assert rig.gate.events == []
    rig.gate.settle_gate.set()
    events = await rig.gate.wait_settled(3)
    assert len(events) == 3
    assert rig.proxy.statistics().settling == 0


async def test_stopping_the_proxy_waits_for_a_settlement_in_progress() -> None:
    gate = RecordingGate()
    gate.settle_gate = anyio.Event()  # the store hangs until the proxy is being stopped

    async def release_while_stopping(store: anyio.Event) -> None:
        for _ in range(50):
            await anyio.lowlevel.checkpoint()
        store.set()

    async with anyio.create_task_group() as outer:
        async with running_proxy(gate) as rig:
            async with client(rig) as oai:
                await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
            assert rig.proxy.statistics().settling == 1
            outer.start_soon(release_while_stopping, gate.settle_gate)
        # the proxy has stopped: the call it had answered is recorded, not dropped
        assert len(gate.settled) == 1
        assert rig.proxy.statistics().settling == 0


async def test_failing_settle_does_not_break_the_proxy(rig: ProxyRig) -> None:
    rig.gate.settle_error = RuntimeError("database is locked")
    async with client(rig) as oai:
        for _ in range(2):
            reply = await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
            assert reply.choices
    with anyio.fail_after(30):
        while rig.proxy.statistics().settle_failures < 2:
            await anyio.sleep(0.01)


class Paused(RecordingGate):
    """Holds every call until `resume` is set, as the engine does for a paused agent."""

    def __init__(self) -> None:
        super().__init__()
        self.resume = anyio.Event()

    async def admit(self, call: CallRequest) -> Admission:
        await self.resume.wait()
        admission = await super().admit(call)
        admission.waited_ms = 1234.0
        return admission


async def wait_held(rig: ProxyRig) -> None:
    with anyio.fail_after(30):
        while rig.proxy.statistics().held == 0:
            await anyio.sleep(0.01)


async def test_held_call_waits_for_admission_then_goes() -> None:
    gate = Paused()
    async with running_proxy(gate) as rig, client(rig) as oai, anyio.create_task_group() as tg:
        tg.start_soon(lambda: oai.chat.completions.create(model="gpt-4o", messages=MESSAGES))  # type: ignore[arg-type]
        await wait_held(rig)
        assert rig.fake.calls == []  # held, not failed, and not sent
        gate.resume.set()
        (event,) = await gate.wait_settled(1)
    assert event.status == "ok"
    assert event.wait_ms == 1234.0
    assert rig.proxy.statistics().held == 0


async def probe(rig: ProxyRig) -> None:
    """A request the proxy answers by itself (unknown route): it has handled what came before."""
    async with aiohttp.ClientSession() as http:
        port = rig.proxy.port
        async with http.get(f"http://127.0.0.1:{port}/a/nope/v1/models") as resp:
            assert resp.status == 404


async def test_held_call_whose_agent_hung_up_is_never_sent() -> None:
    gate = Paused()
    body = {"model": "gpt-4o", "messages": MESSAGES}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with running_proxy(gate) as rig:
        url = rig.openai_url + "/chat/completions"
        async with aiohttp.ClientSession() as http, anyio.create_task_group() as tg:
            tg.start_soon(lambda: http.post(url, json=body, headers=headers))
            await wait_held(rig)
            tg.cancel_scope.cancel()  # the agent gives up while held
        with anyio.fail_after(30):
            while rig.proxy.statistics().total < 2:  # the hang-up has reached the proxy once
                await probe(rig)
        gate.resume.set()
        (event,) = await gate.wait_settled(1)
        assert rig.fake.statistics()["requests"] == 0
    assert event.status == "cancelled"
    assert event.total_tokens == 0


async def test_per_model_upstream_is_used() -> None:
    from tokenwatch.demo.fake_llm import running_fake_llm

    async with running_fake_llm() as local:
        upstreams = {"llama*": local.url + "/v1"}
        async with running_proxy(model_upstreams=upstreams) as rig, client(rig) as oai:
            await oai.chat.completions.create(model="llama3", messages=MESSAGES)  # type: ignore[arg-type]
            await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
            events = await rig.gate.wait_settled(2)
    assert [c.model for c in local.calls] == ["llama3"]
    assert [c.model for c in rig.fake.calls] == ["gpt-4o"]
    assert [e.model for e in events] == ["llama3", "gpt-4o"]


async def test_anthropic_stream_cut_keeps_the_exact_input_from_message_start(
    rig: ProxyRig,
) -> None:
    import anthropic

    async with anthropic.AsyncAnthropic(
        base_url=rig.anthropic_url,
        api_key=API_KEY,
        max_retries=0,
        default_headers={FAULT: "cut:5"},
    ) as ant:
        with pytest.raises(Exception) as caught:  # the SDK's transport error for a cut body
            async with ant.messages.stream(
                model="claude-haiku-4-5",
                max_tokens=300,
                messages=MESSAGES,  # type: ignore[arg-type]
            ) as stream:
                await stream.get_final_message()
        assert not isinstance(caught.value, AssertionError)
    (event,) = await rig.gate.wait_settled(1)
    (billed,) = rig.fake.calls
    assert event.estimated is True
    assert event.status == "error"
    assert event.input_tokens == billed.input_tokens  # message_start said it exactly
    assert event.output_tokens > 0
    assert rig.proxy.statistics().errors == 1


async def test_stream_in_flight_at_shutdown_is_still_settled_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("tokenwatch.proxy.http.SHUTDOWN_GRACE", 0.2)
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "max_tokens": 2000}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    gate = RecordingGate()
    async with aiohttp.ClientSession() as http:
        async with running_proxy(gate, fake_kwargs={"chunk_ms": 300}) as rig:
            resp = await http.post(rig.openai_url + "/chat/completions", json=body, headers=headers)
            await resp.content.readany()  # streaming has begun
        # the proxy has stopped (after its grace period) with the stream unfinished
        resp.close()
    (event,) = gate.events
    assert event.status == "cancelled"
    assert event.estimated is True
    assert event.input_tokens > 0


async def test_responses_stream_cut_is_estimated_from_the_deltas_received(rig: ProxyRig) -> None:
    async with client(rig, **{FAULT: "cut:8"}) as oai:
        stream = await oai.responses.create(
            model="gpt-4o-mini", input="Tell me a long story.", stream=True
        )
        with pytest.raises(Exception) as caught:  # the SDK's transport error for a cut body
            async for _ in stream:
                pass
        assert not isinstance(caught.value, AssertionError)
    (event,) = await rig.gate.wait_settled(1)
    (billed,) = rig.fake.calls
    assert event.estimated is True
    assert event.endpoint == "/v1/responses"
    assert event.input_tokens == billed.input_tokens
    assert 0 < event.output_tokens <= billed.output_tokens


REPLY_TEXT = "The keeper climbed the stairs each night to light the lamp for ships far out at sea."
ARRIVED = REPLY_TEXT[:40]
"""How far the scripted upstream gets into its reply's text before the body is cut."""
_REPLY_HEAD = (
    '{"id":"chatcmpl-cut","object":"chat.completion","model":"gpt-4o-mini","choices":'
    '[{"index":0,"message":{"role":"assistant","content":"'
)
_REPLY_TAIL = '"},"finish_reason":"stop"}],"usage":{"prompt_tokens":17,"completion_tokens":44}}'


async def cutting_upstream(framing: str) -> tuple[asyncio.Server, str]:
    """An upstream that answers 200 with a JSON body and hangs up after ARRIVED of its text:
    `length` declares the whole body's Content-Length, `chunked` sends it in chunks."""
    whole = (_REPLY_HEAD + REPLY_TEXT + _REPLY_TAIL).encode()
    sent = (_REPLY_HEAD + ARRIVED).encode()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )  # fmt: skip
        await reader.readexactly(length)
        status = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        if framing == "length":
            writer.write(status + b"Content-Length: %d\r\n\r\n" % len(whole) + sent)
        else:
            writer.write(status + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(sent) + sent)
        await writer.drain()
        writer.close()  # mid-body

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_json_body_cut_short_is_estimated_like_a_cut_stream(framing: str) -> None:
    # The upstream billed the call (17 + 44 here); it was recorded as 0 tokens.
    server, url = await cutting_upstream(framing)
    async with server, running_proxy(openai_upstream=url) as rig, client(rig) as oai:
        with pytest.raises(openai.APIError):  # a 502 (length), or a cut connection (chunked)
            await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
        (event,) = await rig.gate.wait_settled(1)
    assert (event.status, event.http_status, event.estimated) == ("error", 200, True)
    assert event.input_tokens == count_messages(MESSAGES, "gpt-4o-mini").tokens
    assert event.output_tokens == count_text(ARRIVED, "gpt-4o-mini").tokens
    assert rig.proxy.statistics().errors == 1

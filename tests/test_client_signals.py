"""The SDK path reports the conversation signals the proxy records: a tool loop's calls carry the
same tool hash and label, answers hash alike from JSON and streams, copies in flight are marked."""

from __future__ import annotations

from typing import Any

import anyio
import httpx2
import openai

from tests.client_fixtures import FakeSupervisor
from tests.test_client_openai import aclient, fake, one_event, sdk_instrumented, sup
from tokenwatch.core import conversation
from tokenwatch.demo.fake_llm import FakeLLM

__all__ = ["aclient", "fake", "sdk_instrumented", "sup"]  # fixtures

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "search_files",
            "parameters": {
                "type": "object",
                "properties": {"pattern": {"type": "string", "enum": ["payment*.yaml"]}},
            },
        },
    }
]


async def test_a_tool_loop_reports_its_tool_calls_and_answers(
    aclient: openai.AsyncOpenAI, fake: FakeLLM, sup: FakeSupervisor
) -> None:
    messages: list[Any] = [{"role": "user", "content": "Find the payment config."}]
    for i in range(3):
        if i == 1:  # streamed: the answer is read from the chunks
            stream = await aclient.chat.completions.create(
                model="gpt-4o-mini", messages=messages, tools=TOOLS, tool_choice="required",
                stream=True,
            )  # fmt: skip
            call_id = ""
            async for chunk in stream:
                for delta in chunk.choices[0].delta.tool_calls or []:
                    call_id = delta.id or call_id
            message: Any = {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": "search_files", "arguments": '{"pattern":"payment*.yaml"}'}}
            ]}  # fmt: skip
        else:
            answer = await aclient.chat.completions.create(
                model="gpt-4o-mini", messages=messages, tools=TOOLS, tool_choice="required"
            )
            message = answer.choices[0].message  # SDK objects, as agents append them
            call_id = message.tool_calls[0].id
        messages += [message, {"role": "tool", "tool_call_id": call_id, "content": "none"}]
    events = [await one_event(sup, n) for n in (1, 2, 3)]
    assert events[0]["tool_hash"] == ""
    assert events[0]["turn_hash"] == ""  # no history yet
    assert events[1]["tool_hash"] == events[2]["tool_hash"] != ""
    assert events[2]["tool_call"] == 'search_files(pattern="payment*.yaml")'
    assert len({e["answer_hash"] for e in events}) == 1  # JSON, stream, JSON
    proxy_side = conversation.request_signals(
        conversation.CHAT,
        {"messages": [m if isinstance(m, dict) else m.model_dump() for m in messages[:-2]]},
    )
    assert proxy_side.tool_hash == events[2]["tool_hash"]


class _Together(httpx2.AsyncBaseTransport):
    """Answers no request until `n` have arrived: they are surely in flight at once."""

    def __init__(self, n: int) -> None:
        self.n, self.arrived = n, 0
        self.all_in = anyio.Event()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.arrived += 1
        if self.arrived == self.n:
            self.all_in.set()
        await self.all_in.wait()
        usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
        message = {"role": "assistant", "content": "Fix the parser."}
        body = {"id": "c", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage}  # fmt: skip
        return httpx2.Response(200, json=body)


async def test_identical_requests_in_flight_at_once_are_marked_as_copies(
    sup: FakeSupervisor,
) -> None:
    transport = _Together(3)
    client = openai.AsyncOpenAI(
        base_url="http://127.0.0.1:9/v1", api_key="sk-test", max_retries=0,
        http_client=httpx2.AsyncClient(transport=transport),
    )  # fmt: skip
    messages: list[Any] = [{"role": "user", "content": "Write a commit message for this diff."}]

    async def sample() -> None:
        await client.chat.completions.create(model="gpt-4o-mini", messages=messages)

    async with client, anyio.create_task_group() as tg:
        for n in range(3):
            tg.start_soon(sample, name=f"sample-{n}")
    await one_event(sup, 3)
    assert sorted(e["overlap"] for e in sup.events()) == [0, 1, 2]

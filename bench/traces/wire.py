"""Agents' conversations in the real wire formats (Chat Completions with tools, Responses,
Anthropic Messages with tool_use / tool_result), turned into the usage events the proxy records:
the request body and the answer go through tokenwatch.core.conversation as the proxy's do."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tokenwatch.core import conversation
from tokenwatch.core.models import UsageEvent
from tokenwatch.core.tokens import prompt_hashes

WIRES = (conversation.CHAT, conversation.RESPONSES, conversation.ANTHROPIC)


@dataclass
class Talk:
    """One conversation: its history in `wire`'s shape, grown call by call as an agent grows it."""

    wire: str
    system: str = "You are a coding agent. Use the tools."
    history: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 0

    def user(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})

    def body(self) -> dict[str, Any]:
        """The request body the agent's SDK sends now."""
        if self.wire == conversation.RESPONSES:
            return {"model": "gpt-4o", "instructions": self.system, "input": list(self.history)}
        if self.wire == conversation.ANTHROPIC:
            return {
                "model": "claude-sonnet-4-5",
                "max_tokens": 1024,
                "system": self.system,
                "messages": _merged(self.history),
            }
        return {
            "model": "gpt-4o",
            "messages": [{"role": "system", "content": self.system}, *self.history],
        }

    def tool_answer(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """The model answers with a tool call: the response document; the history takes it in."""
        self.calls += 1
        call_id = f"call_{self.calls:04d}x"
        text = json.dumps(args)
        if self.wire == conversation.RESPONSES:
            item = {"type": "function_call", "call_id": call_id, "name": name, "arguments": text}
            self.history.append(item)
            return {"output": [item]}
        if self.wire == conversation.ANTHROPIC:
            block = {"type": "tool_use", "id": call_id, "name": name, "input": args}
            self.history.append({"role": "assistant", "content": [block]})
            return {"type": "message", "content": [block]}
        function = {"name": name, "arguments": text}
        message = {"role": "assistant", "content": None,
                   "tool_calls": [{"id": call_id, "type": "function", "function": function}]}  # fmt: skip
        self.history.append(message)
        return {"choices": [{"message": message}]}

    def tool_result(self, output: str) -> None:
        """The agent runs the tool the model asked for and adds its output."""
        call_id = f"call_{self.calls:04d}x"
        if self.wire == conversation.RESPONSES:
            self.history.append(
                {"type": "function_call_output", "call_id": call_id, "output": output}
            )
        elif self.wire == conversation.ANTHROPIC:
            block = {"type": "tool_result", "tool_use_id": call_id, "content": output}
            self.history.append({"role": "user", "content": [block]})
        else:
            self.history.append({"role": "tool", "tool_call_id": call_id, "content": output})

    def text_answer(self, text: str) -> dict[str, Any]:
        if self.wire == conversation.RESPONSES:
            item = {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text}],
            }
            self.history.append(item)
            return {"output": [item]}
        if self.wire == conversation.ANTHROPIC:
            self.history.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
            return {"type": "message", "content": [{"type": "text", "text": text}]}
        message = {"role": "assistant", "content": text}
        self.history.append(message)
        return {"choices": [{"message": message}]}


def _merged(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic alternates roles: a tool result and the text after it share one user message."""
    out: list[dict[str, Any]] = []
    for m in history:
        if out and out[-1]["role"] == m["role"] == "user":
            out[-1] = {
                "role": "user",
                "content": _blocks(out[-1]["content"]) + _blocks(m["content"]),
            }
        else:
            out.append(m)
    return out


def _blocks(content: Any) -> list[Any]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def recorded(
    talk_wire: str,
    body: dict[str, Any],
    answer: dict[str, Any] | None,
    *,
    agent: str,
    ts: float,
    latency: float,
    tokens: int,
    overlap: int = 0,
    task: str = "",
    out: int = 150,
) -> UsageEvent:
    """The event the proxy records for this request and answer (hashes only)."""
    if talk_wire == conversation.RESPONSES:
        prompt: Any = [body.get("instructions"), body["input"]]
    elif talk_wire == conversation.ANTHROPIC:
        prompt = [body.get("system"), body["messages"]]
    else:
        prompt = body["messages"]
    exact, shape = prompt_hashes(prompt)
    signals = conversation.request_signals(talk_wire, body)
    answered = conversation.answer_hash(conversation.answer_of(talk_wire, answer)) if answer else ""
    return UsageEvent(
        ts=ts,
        agent=agent,
        task=task,
        model=str(body["model"]),
        provider="anthropic" if talk_wire == conversation.ANTHROPIC else "openai",
        input_tokens=tokens,
        output_tokens=out,
        cost_usd=(tokens * 2.5 + out * 10) / 1e6,
        latency_ms=latency * 1000,
        prompt_hash=exact,
        prompt_shape=shape,
        turn_hash=signals.turn_hash,
        turn_shape=signals.turn_shape,
        tool_hash=signals.tool_hash,
        tool_call=signals.tool_call,
        answer_hash=answered,
        overlap=overlap,
    )

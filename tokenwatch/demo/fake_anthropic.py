"""Anthropic wire shapes for the fake LLM: Messages (JSON and SSE) and count_tokens."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tokenwatch.core.tokens import count_anthropic, count_text
from tokenwatch.demo.fake_exchange import BadRequest, Exchange, Usage, new_id, reply_seed
from tokenwatch.demo.fake_reply import Reply, Segment, ToolCall, compose_reply, compose_tool_call

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def error_body(status: int, message: str, param: str = "") -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def headers(ex: Exchange) -> dict[str, str]:
    return {
        "request-id": ex.request_id,
        "anthropic-ratelimit-requests-limit": "4000",
        "anthropic-ratelimit-requests-remaining": "3999",
    }


def _blocks(content: Any) -> list[Any]:
    return content if isinstance(content, list) else [content]


def _segments(ex: Exchange) -> list[Segment]:
    """Tools, then system blocks, then message blocks: Anthropic's cache prefix order."""
    segs: list[Segment] = []
    for tool in ex.body.get("tools") or []:
        marked = isinstance(tool, dict) and "cache_control" in tool
        segs.append(Segment(repr(tool), count_text(repr(tool), ex.model).tokens, marked))
    system = ex.body.get("system")
    for block in _blocks(system) if system else []:
        segs.append(_block_segment(block, ex.model))
    for message in ex.body.get("messages") or []:
        for block in _blocks(message.get("content")):
            segs.append(_block_segment(block, ex.model))
    return segs


def _block_segment(block: Any, model: str) -> Segment:
    if isinstance(block, dict):
        text = block.get("text")
        body = text if isinstance(text, str) else repr(block.get("content", block))
        return Segment(repr(block), count_text(body, model).tokens, "cache_control" in block)
    return Segment(repr(block), count_text(str(block), model).tokens)


def _validate(ex: Exchange) -> tuple[Any, list[dict[str, Any]]]:
    ex.require("model", str)
    messages = ex.require("messages", list)
    if not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise BadRequest("messages: at least one message with a role is required")
    system = ex.body.get("system")
    if not isinstance(system, (str, list, type(None))):
        raise BadRequest("system: must be a string or a list of text blocks")
    return system, messages


def _input_tokens(ex: Exchange) -> int:
    system, messages = _validate(ex)
    tools = ex.body.get("tools")
    extra = count_text(repr(tools), ex.model).tokens if tools else 0
    return count_anthropic(system, messages, ex.model).tokens + extra


async def count_tokens(ex: Exchange) -> web.StreamResponse:
    return await ex.json({"input_tokens": _input_tokens(ex)}, headers(ex))


def _wire_usage(u: Usage) -> dict[str, Any]:
    """Anthropic's own split: input_tokens EXCLUDES cache reads and writes."""
    return {
        "input_tokens": u.input_tokens - u.cache_read_tokens - u.cache_write_tokens,
        "cache_creation_input_tokens": u.cache_write_tokens,
        "cache_read_input_tokens": u.cache_read_tokens,
        "output_tokens": u.output_tokens,
        "service_tier": "standard",
    }


def _forced_tool(ex: Exchange) -> ToolCall | None:
    """The tool call `tool_choice` {"type": "any"} or {"type": "tool", "name": ...} forces."""
    schemas = {
        t["name"]: t.get("input_schema")
        for t in ex.body.get("tools") or []
        if isinstance(t, dict) and isinstance(t.get("name"), str)
    }
    choice = ex.body.get("tool_choice")
    if not schemas or not isinstance(choice, dict) or choice.get("type") not in ("any", "tool"):
        return None
    name = choice.get("name") if choice.get("type") == "tool" else next(iter(schemas))
    if not isinstance(name, str) or name not in schemas:
        raise BadRequest(f"tool_choice.name: tool '{name}' not found in tools")
    return compose_tool_call(repr(ex.body.get("messages")), str(name), schemas[name])


MIN_THINKING_BUDGET = 1024


@dataclass(frozen=True, slots=True)
class _Block:
    """One content block: as it ends up, as a stream opens it, and the deltas between."""

    final: dict[str, Any]
    opening: dict[str, Any]
    deltas: list[dict[str, Any]]


async def messages(ex: Exchange) -> web.StreamResponse:
    total = _input_tokens(ex)
    limit = ex.limit("max_tokens")
    if limit is None:
        raise BadRequest("max_tokens: Field required")
    read, write = ex.cache.anthropic_cached(_segments(ex))
    read, write = min(read, total), min(write, total - min(read, total))
    seed = reply_seed(ex.settings, ex.body.get("messages"))
    blocks, thinking = [], 0
    budget = _thinking_budget(ex, limit)
    if budget:
        thought = compose_reply(seed + "\x00thinking", budget, ex.model)
        thinking = count_text(thought.text, ex.model).tokens
        blocks.append(_thinking_block(thought))
    tool = _forced_tool(ex)
    reply = Reply((), False) if tool else compose_reply(seed, limit - thinking, ex.model)
    blocks.append(_tool_block(tool) if tool else _text_block(reply))
    said = tool.name + tool.arguments if tool else reply.text
    output = thinking + count_text(said, ex.model).tokens
    # Anthropic's usage does not split thinking out of output_tokens; the normalised call does
    ex.usage = Usage(total, output, read, write, thinking)
    message = {
        "id": new_id("msg_01", 22),
        "type": "message",
        "role": "assistant",
        "model": ex.model,
        "content": [b.final for b in blocks],
        "stop_reason": "tool_use" if tool else "max_tokens" if reply.truncated else "end_turn",
        "stop_sequence": None,
        "usage": _wire_usage(ex.usage),
    }
    if not ex.stream:
        return await ex.json(message, headers(ex))
    return await _stream(ex, message, blocks)


def _thinking_budget(ex: Exchange, limit: int) -> int | None:
    """The extended-thinking budget the request enables, checked as the real API does."""
    thinking = ex.body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < MIN_THINKING_BUDGET:
        raise BadRequest(
            f"thinking.enabled.budget_tokens: Input should be greater than or equal to {MIN_THINKING_BUDGET}"
        )
    if budget >= limit:
        raise BadRequest("`max_tokens` must be greater than `thinking.budget_tokens`")
    return budget


def _thinking_block(thought: Reply) -> _Block:
    signature = base64.b64encode(hashlib.sha256(thought.text.encode()).digest()).decode()
    final = {"type": "thinking", "thinking": thought.text, "signature": signature}
    deltas = [{"type": "thinking_delta", "thinking": p} for p in thought.pieces]
    deltas.append({"type": "signature_delta", "signature": signature})
    return _Block(final, {**final, "thinking": "", "signature": ""}, deltas)


def _text_block(reply: Reply) -> _Block:
    deltas = [{"type": "text_delta", "text": p} for p in reply.pieces]
    return _Block({"type": "text", "text": reply.text}, {"type": "text", "text": ""}, deltas)


def _tool_block(tool: ToolCall) -> _Block:
    final = {
        "type": "tool_use",
        "id": new_id("toolu_01", 22),
        "name": tool.name,
        "input": json.loads(tool.arguments),
    }
    deltas = [{"type": "input_json_delta", "partial_json": p} for p in tool.pieces]
    return _Block(final, {**final, "input": {}}, deltas)


async def _stream(
    ex: Exchange, message: dict[str, Any], blocks: list[_Block]
) -> web.StreamResponse:
    """The Messages event sequence, usage split as Anthropic does (output only at the end)."""
    await ex.open_stream(headers(ex))
    start_usage = {**message["usage"], "output_tokens": 1}
    start = {**message, "content": [], "stop_reason": None, "usage": start_usage}
    await _send(ex, "message_start", message=start)
    for index, block in enumerate(blocks):
        await _send(ex, "content_block_start", index=index, content_block=block.opening)
        if index == 0:
            await _send(ex, "ping")
        for delta in block.deltas:
            await _send(ex, "content_block_delta", index=index, delta=delta)
        await _send(ex, "content_block_stop", index=index)
    end = {"stop_reason": message["stop_reason"], "stop_sequence": None}
    usage = {"output_tokens": message["usage"]["output_tokens"]}
    await _send(ex, "message_delta", delta=end, usage=usage)
    await _send(ex, "message_stop")
    return await ex.close_stream()


async def _send(ex: Exchange, kind: str, **fields: Any) -> None:
    await ex.send({"type": kind, **fields}, event=kind)


def new_request_id() -> str:
    return new_id("req_011", 21)

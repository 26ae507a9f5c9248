"""Anthropic wire shapes for the fake LLM: Messages (JSON and SSE) and count_tokens."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from tokenwatch.core.tokens import count_anthropic, count_text
from tokenwatch.demo.fake_exchange import BadRequest, Exchange, Usage, new_id
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
    if name not in schemas:
        raise BadRequest(f"tool_choice.name: tool '{name}' not found in tools")
    return compose_tool_call(repr(ex.body.get("messages")), str(name), schemas[name])


async def messages(ex: Exchange) -> web.StreamResponse:
    total = _input_tokens(ex)
    limit = ex.limit("max_tokens")
    if limit is None:
        raise BadRequest("max_tokens: Field required")
    read, write = ex.cache.anthropic_cached(_segments(ex))
    read, write = min(read, total), min(write, total - min(read, total))
    tool = _forced_tool(ex)
    reply = (
        Reply((), False) if tool else compose_reply(repr(ex.body.get("messages")), limit, ex.model)
    )
    output = count_text(tool.name + tool.arguments if tool else reply.text, ex.model).tokens
    ex.usage = Usage(total, output, read, write, 0)
    stop = "tool_use" if tool else "max_tokens" if reply.truncated else "end_turn"
    message = {
        "id": new_id("msg_01", 22),
        "type": "message",
        "role": "assistant",
        "model": ex.model,
        "content": [_block(tool, reply)],
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": _wire_usage(ex.usage),
    }
    if not ex.stream:
        return await ex.json(message, headers(ex))
    deltas = (
        [{"type": "input_json_delta", "partial_json": p} for p in tool.pieces]
        if tool
        else [{"type": "text_delta", "text": p} for p in reply.pieces]
    )
    return await _stream(ex, message, deltas)


def _block(tool: ToolCall | None, reply: Reply) -> dict[str, Any]:
    if tool is None:
        return {"type": "text", "text": reply.text}
    arguments = json.loads(tool.arguments)
    return {"type": "tool_use", "id": new_id("toolu_01", 22), "name": tool.name, "input": arguments}


async def _stream(
    ex: Exchange, message: dict[str, Any], deltas: list[dict[str, Any]]
) -> web.StreamResponse:
    """The Messages event sequence for a one-block reply, usage split as Anthropic does."""
    await ex.open_stream(headers(ex))
    start_usage = {**message["usage"], "output_tokens": 1}
    start = {**message, "content": [], "stop_reason": None, "usage": start_usage}
    await _send(ex, "message_start", message=start)
    block = message["content"][0]
    opening = {**block, "input": {}} if block["type"] == "tool_use" else {**block, "text": ""}
    await _send(ex, "content_block_start", index=0, content_block=opening)
    await _send(ex, "ping")
    for delta in deltas:
        await _send(ex, "content_block_delta", index=0, delta=delta)
    await _send(ex, "content_block_stop", index=0)
    end = {"stop_reason": message["stop_reason"], "stop_sequence": None}
    usage = {"output_tokens": message["usage"]["output_tokens"]}
    await _send(ex, "message_delta", delta=end, usage=usage)
    await _send(ex, "message_stop")
    return await ex.close_stream()


async def _send(ex: Exchange, kind: str, **fields: Any) -> None:
    await ex.send({"type": kind, **fields}, event=kind)


def new_request_id() -> str:
    return new_id("req_011", 21)

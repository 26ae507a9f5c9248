"""OpenAI wire shapes for the fake LLM: chat completions, Responses, legacy completions, embeddings."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

from aiohttp import web

from tokenwatch.core.tokens import count_messages, count_responses_input, count_text
from tokenwatch.demo.fake_exchange import BadRequest, Exchange, Usage, new_id, reply_seed
from tokenwatch.demo.fake_reply import (
    Reply,
    Segment,
    ToolCall,
    compose_reply,
    compose_tool_call,
    embedding,
    reasoning_tokens,
)

SYSTEM_FINGERPRINT = "fp_fake0llm01"
OBFUSCATION_WIDTH = 16
MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-5",
    "gpt-5-mini",
    "o3",
    "o4-mini",
    "gpt-3.5-turbo-instruct",
    "text-embedding-3-small",
    "text-embedding-3-large",
)
EMBEDDING_DIMENSIONS = {"text-embedding-3-large": 3072}
DEFAULT_EMBEDDING_DIMENSIONS = 1536

_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


def error_body(status: int, message: str, param: str = "") -> dict[str, Any]:
    kind, code = _ERROR_TYPES.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": param or None, "code": code}}


def headers(ex: Exchange) -> dict[str, str]:
    return {
        "x-request-id": ex.request_id,
        "openai-processing-ms": "1",
        "openai-version": "2020-10-01",
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-remaining-requests": "9999",
        "x-ratelimit-limit-tokens": "30000000",
        "x-ratelimit-remaining-tokens": "29999000",
    }


def _segments(items: list[Any], model: str, *, extra: Any = None) -> list[Segment]:
    """Each message (and the tool list first) as a cacheable prefix unit."""
    segs = [Segment(repr(extra), count_text(repr(extra), model).tokens)] if extra else []
    for item in items:
        key = repr(item)
        tokens = count_messages([item], model).tokens - 3 if isinstance(item, dict) else 0
        segs.append(Segment(key, tokens or count_text(key, model).tokens))
    return segs


def _tools_tokens(ex: Exchange) -> int:
    tools = ex.body.get("tools")
    return count_text(repr(tools), ex.model).tokens if tools else 0


def _bill(
    ex: Exchange,
    prompt_tokens: int,
    segments: list[Segment],
    limit: int | None,
    tool: ToolCall | None = None,
) -> Reply:
    """Compose the reply and set the exchange's usage: cache hits, reasoning, output."""
    cached = ex.cache.openai_cached(segments, prompt_tokens)
    reasoning = reasoning_tokens(ex.model, prompt_tokens, limit)
    visible_limit = None if limit is None else max(limit - reasoning, 0)
    items = ex.body.get("messages") or ex.body.get("input") or ex.body.get("prompt")
    seed = reply_seed(ex.settings, items)
    reply = Reply((), False) if tool else compose_reply(seed, visible_limit, ex.model)
    said = tool.name + tool.arguments if tool else reply.text
    output = count_text(said, ex.model).tokens + reasoning
    ex.usage = Usage(prompt_tokens, output, cached, 0, reasoning)
    return reply


def _forced_tool(ex: Exchange, *, nested: bool) -> ToolCall | None:
    """The tool call the request forces (`tool_choice` "required" or a named function), if any.

    Chat completions nest each tool's name under "function"; the Responses API does not.
    """
    schemas: dict[str, Any] = {}
    for tool in ex.body.get("tools") or []:
        spec = tool.get("function") if nested and isinstance(tool, dict) else tool
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            schemas[spec["name"]] = spec.get("parameters")
    choice = ex.body.get("tool_choice")
    if not schemas or choice is None or (isinstance(choice, str) and choice != "required"):
        return None
    name = next(iter(schemas))
    if isinstance(choice, dict):
        named = choice.get("function") if nested else choice
        name = named.get("name", name) if isinstance(named, dict) else name
    if not isinstance(name, str) or name not in schemas:
        raise BadRequest(f"tool_choice names '{name}', which is not in 'tools'")
    return compose_tool_call(
        repr(ex.body.get("messages") or ex.body.get("input")), name, schemas[name]
    )


def _chat_usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cache_read_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": u.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


async def chat_completions(ex: Exchange) -> web.StreamResponse:
    messages = ex.require("messages", list)
    ex.require("model", str)
    if not messages:
        raise BadRequest("'messages' must contain at least one message")
    try:
        prompt = count_messages(messages, ex.model).tokens + _tools_tokens(ex)
    except TypeError as exc:
        raise BadRequest(str(exc)) from None
    limit = ex.limit("max_completion_tokens", "max_tokens")
    tool = _forced_tool(ex, nested=True)
    segments = _segments(messages, ex.model, extra=ex.body.get("tools"))
    reply = _bill(ex, prompt, segments, limit, tool)
    finish = "tool_calls" if tool else "length" if reply.truncated else "stop"
    head = {
        "id": new_id("chatcmpl-", 29),
        "created": ex.created,
        "model": ex.model,
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    call_id = new_id("call_", 24)
    if not ex.stream:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if tool else reply.text,
            "refusal": None,
            "annotations": [],
        }
        if tool:
            message["tool_calls"] = [_chat_tool_call(call_id, tool.name, tool.arguments)]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        payload = {"object": "chat.completion", "choices": [choice], "usage": _chat_usage(ex.usage)}
        return await ex.json({**head, **payload}, headers(ex))
    deltas = _chat_deltas(call_id, tool, reply)
    choices = [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
    last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}
    return await _stream_chunks(ex, {**head, "object": "chat.completion.chunk"}, [*choices, last])


def _chat_deltas(call_id: str, tool: ToolCall | None, reply: Reply) -> list[dict[str, Any]]:
    """A stream's deltas: the role first, then the text or the tool call's arguments in pieces."""
    if tool is None:
        opening: dict[str, Any] = {"role": "assistant", "content": "", "refusal": None}
        return [opening, *({"content": piece} for piece in reply.pieces)]
    first = _chat_tool_call(call_id, tool.name, "")
    opening = {"role": "assistant", "content": None, "tool_calls": [first], "refusal": None}
    pieces = ({"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in tool.pieces)
    return [opening, *pieces]


def _chat_tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    function = {"name": name, "arguments": arguments}
    return {"index": 0, "id": call_id, "type": "function", "function": function}


def _text_delta(piece: str, finish: str | None) -> dict[str, Any]:
    return {"text": piece, "index": 0, "logprobs": None, "finish_reason": finish}


async def _stream_chunks(
    ex: Exchange, head: dict[str, Any], choices: list[dict[str, Any]]
) -> web.StreamResponse:
    """One SSE chunk per choice delta, then the usage chunk if asked for, then [DONE]."""
    options = ex.body.get("stream_options") or {}
    with_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    tail = {"usage": None} if with_usage else {}
    await ex.open_stream(headers(ex))
    for choice in choices:
        padding = _obfuscation(ex, json.dumps(choice))
        await ex.send({**head, "choices": [choice], **tail, **padding})
    if with_usage:
        await ex.send({**head, "choices": [], "usage": _chat_usage(ex.usage)})
    await ex.send("[DONE]")
    return await ex.close_stream()


def _obfuscation(ex: Exchange, payload: str) -> dict[str, str]:
    """OpenAI pads streamed deltas to hide their sizes, unless told `include_obfuscation: false`."""
    options = ex.body.get("stream_options")
    if isinstance(options, dict) and options.get("include_obfuscation") is False:
        return {}
    return {"obfuscation": "x" * (OBFUSCATION_WIDTH - len(payload) % OBFUSCATION_WIDTH)}


def _strings(ex: Exchange, key: str) -> list[str]:
    """A field that is a string or a non-empty list of strings, as a list."""
    raw = ex.body.get(key)
    items: list[Any] = raw if isinstance(raw, list) else [raw]
    texts = [t for t in items if isinstance(t, str)]
    if not texts or len(texts) != len(items):
        raise BadRequest(f"'{key}' must be a string or a non-empty list of strings")
    return texts


async def completions(ex: Exchange) -> web.StreamResponse:
    ex.require("model", str)
    texts = _strings(ex, "prompt")
    prompt_tokens = sum(count_text(t, ex.model).tokens for t in texts)
    limit = ex.limit("max_tokens") or 16  # the legacy endpoint's documented default
    reply = _bill(ex, prompt_tokens, _segments(texts, ex.model), limit)
    finish = "length" if reply.truncated else "stop"
    head = {
        "id": new_id("cmpl-", 29),
        "object": "text_completion",
        "created": ex.created,
        "model": ex.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    if not ex.stream:
        choice = _text_delta(reply.text, finish)
        return await ex.json(
            {**head, "choices": [choice], "usage": _chat_usage(ex.usage)}, headers(ex)
        )
    choices = [_text_delta(piece, None) for piece in reply.pieces]
    return await _stream_chunks(ex, head, [*choices, _text_delta("", finish)])


async def embeddings(ex: Exchange) -> web.StreamResponse:
    ex.require("model", str)
    texts = _strings(ex, "input")
    dims = ex.body.get("dimensions") or EMBEDDING_DIMENSIONS.get(
        ex.model, DEFAULT_EMBEDDING_DIMENSIONS
    )
    if not isinstance(dims, int) or dims < 1:
        raise BadRequest("'dimensions' must be a positive integer")
    as_base64 = ex.body.get("encoding_format") == "base64"
    tokens = sum(count_text(t, ex.model).tokens for t in texts)
    ex.usage = Usage(input_tokens=tokens)
    data = [
        {"object": "embedding", "index": i, "embedding": _vector(t, dims, as_base64)}
        for i, t in enumerate(texts)
    ]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return await ex.json(
        {"object": "list", "data": data, "model": ex.model, "usage": usage}, headers(ex)
    )


def _vector(text: str, dims: int, as_base64: bool) -> list[float] | str:
    values = embedding(text, dims)
    if not as_base64:
        return values
    return base64.b64encode(struct.pack(f"<{dims}f", *values)).decode()


def models_list() -> dict[str, Any]:
    data = [
        {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "system"} for m in MODELS
    ]
    return {"object": "list", "data": data}


def _responses_usage(u: Usage) -> dict[str, Any]:
    return {
        "input_tokens": u.input_tokens,
        "input_tokens_details": {"cached_tokens": u.cache_read_tokens},
        "output_tokens": u.output_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.input_tokens + u.output_tokens,
    }


async def responses(ex: Exchange) -> web.StreamResponse:
    ex.require("model", str)
    raw = ex.body.get("input")
    instructions = ex.body.get("instructions")
    if not isinstance(raw, (str, list)) or not isinstance(instructions, (str, type(None))):
        raise BadRequest("'input' must be a string or a list of input items")
    try:
        prompt = count_responses_input(raw, instructions, ex.model).tokens + _tools_tokens(ex)
    except TypeError as exc:
        raise BadRequest(str(exc)) from None
    items = [instructions, *(raw if isinstance(raw, list) else [raw])]
    limit = ex.limit("max_output_tokens")
    tool = _forced_tool(ex, nested=False)
    segments = _segments(items, ex.model, extra=ex.body.get("tools"))
    reply = _bill(ex, prompt, segments, limit, tool)
    response = _response_object(ex, limit, instructions)
    reasoning = (
        [{"id": new_id("rs_", 48), "type": "reasoning", "summary": []}]
        if ex.usage.reasoning_tokens
        else []
    )
    status = "incomplete" if reply.truncated else "completed"
    item = _function_call_item(tool) if tool else _message_item(reply.text, status)
    done = {
        **response,
        "status": status,
        "incomplete_details": {"reason": "max_output_tokens"} if reply.truncated else None,
        "output": [*reasoning, item],
        "usage": _responses_usage(ex.usage),
    }
    if not ex.stream:
        return await ex.json(done, headers(ex))
    events = _ResponseEvents(ex)
    await ex.open_stream(headers(ex))
    await events.emit("response.created", response=response)
    await events.emit("response.in_progress", response=response)
    for thought in reasoning:
        await events.emit("response.output_item.added", output_index=0, item=thought)
        await events.emit("response.output_item.done", output_index=0, item=thought)
    if tool:
        await events.function_call(len(reasoning), item, tool)
    else:
        await events.message(len(reasoning), item, reply)
    await events.emit(f"response.{status}", response=done)
    return await ex.close_stream()


def _message_item(text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "id": new_id("msg_", 48),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [part],
    }


def _function_call_item(tool: ToolCall) -> dict[str, Any]:
    return {
        "id": new_id("fc_", 48),
        "type": "function_call",
        "status": "completed",
        "call_id": new_id("call_", 24),
        "name": tool.name,
        "arguments": tool.arguments,
    }


class _ResponseEvents:
    """Writes the Responses API's SSE events, numbering them with `sequence_number`."""

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.seq = 0

    async def emit(self, kind: str, **fields: Any) -> None:
        await self.ex.send({"type": kind, "sequence_number": self.seq, **fields}, event=kind)
        self.seq += 1

    async def message(self, index: int, item: dict[str, Any], reply: Reply) -> None:
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        opening = {**item, "status": "in_progress", "content": []}
        await self.emit("response.output_item.added", output_index=index, item=opening)
        await self.emit("response.content_part.added", **where, part=empty)
        for piece in reply.pieces:
            await self.emit(
                "response.output_text.delta",
                **where,
                delta=piece,
                logprobs=[],
                **_obfuscation(self.ex, piece),
            )
        await self.emit("response.output_text.done", **where, text=reply.text, logprobs=[])
        await self.emit("response.content_part.done", **where, part=item["content"][0])
        await self.emit("response.output_item.done", output_index=index, item=item)

    async def function_call(self, index: int, item: dict[str, Any], tool: ToolCall) -> None:
        where = {"item_id": item["id"], "output_index": index}
        opening = {**item, "status": "in_progress", "arguments": ""}
        await self.emit("response.output_item.added", output_index=index, item=opening)
        for piece in tool.pieces:
            padding = _obfuscation(self.ex, piece)
            await self.emit(
                "response.function_call_arguments.delta", **where, delta=piece, **padding
            )
        await self.emit(
            "response.function_call_arguments.done",
            **where,
            name=tool.name,
            arguments=tool.arguments,
        )
        await self.emit("response.output_item.done", output_index=index, item=item)


def _response_object(ex: Exchange, limit: int | None, instructions: str | None) -> dict[str, Any]:
    body = ex.body
    return {
        "id": new_id("resp_", 48),
        "object": "response",
        "created_at": ex.created,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": instructions,
        "max_output_tokens": limit,
        "model": ex.model,
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []),
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": None,
        "user": None,
        "metadata": body.get("metadata") or {},
    }

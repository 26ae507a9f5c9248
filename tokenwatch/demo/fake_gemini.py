"""Gemini API wire shapes for the fake LLM: generateContent, streamGenerateContent (SSE) and
countTokens, as Google's `v1beta/models/MODEL:METHOD` endpoints answer them."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tokenwatch.core.tokens import count_text
from tokenwatch.demo.fake_exchange import BadRequest, Exchange, Usage, new_id, reply_seed
from tokenwatch.demo.fake_reply import compose_reply

ENDPOINT = "/v1beta/models:generateContent"
"""The endpoint a counted Gemini call is listed under (streamed or not)."""
METHODS = ("generateContent", "streamGenerateContent", "countTokens")
_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND",
           429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}  # fmt: skip


def error_body(status: int, message: str, param: str = "") -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}}


def headers(ex: Exchange) -> dict[str, str]:
    return {"x-goog-request-id": ex.request_id}


def _prompt(ex: Exchange) -> str:
    contents = ex.body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise BadRequest("contents is not specified")
    parts = [ex.body.get("systemInstruction"), ex.body.get("tools"), contents]
    return repr([p for p in parts if p])


def _input_tokens(ex: Exchange) -> int:
    return count_text(_prompt(ex), ex.model).tokens


async def count_tokens(ex: Exchange) -> web.StreamResponse:
    return await ex.json({"totalTokens": _input_tokens(ex)}, headers(ex))


def _usage(u: Usage) -> dict[str, Any]:
    """Gemini's split: the prompt count includes cached tokens; candidates exclude thoughts."""
    return {
        "promptTokenCount": u.input_tokens,
        "candidatesTokenCount": u.output_tokens,
        "totalTokenCount": u.input_tokens + u.output_tokens,
    }


def _chunk(ex: Exchange, text: str, done: bool, response_id: str) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"},
                                 "index": 0}  # fmt: skip
    if done:
        candidate["finishReason"] = "STOP"
    return {"candidates": [candidate], "usageMetadata": _usage(ex.usage),
            "modelVersion": ex.model, "responseId": response_id}  # fmt: skip


async def generate(ex: Exchange) -> web.StreamResponse:
    """A reply billed by its prompt and text; streamed as one SSE event per piece of text."""
    prompt = _input_tokens(ex)
    config = ex.body.get("generationConfig")
    limit = config.get("maxOutputTokens") if isinstance(config, dict) else None
    reply = compose_reply(reply_seed(ex.settings, ex.body.get("contents")),
                          limit if isinstance(limit, int) and limit > 0 else None, ex.model)  # fmt: skip
    ex.usage = Usage(prompt, count_text(reply.text, ex.model).tokens)
    response_id = new_id("", 22)
    if not ex.stream:
        return await ex.json(_chunk(ex, reply.text, True, response_id), headers(ex))
    await ex.open_stream(headers(ex))
    pieces = reply.pieces or ("",)
    for i, piece in enumerate(pieces):
        chunk = _chunk(ex, piece, i == len(pieces) - 1, response_id)
        if i < len(pieces) - 1:
            del chunk["usageMetadata"]  # the figures come with the last chunk
        await ex.send(chunk)
    return await ex.close_stream()


async def dispatch(ex: Exchange) -> web.StreamResponse:
    """`models/MODEL:METHOD`: the model and the method are in the path, not the body."""
    model, _, method = ex.request.match_info.get("target", "").partition(":")
    if method not in METHODS or not model:
        raise BadRequest(f"unknown method {method!r}", 404)
    ex.model, ex.stream = model, method == "streamGenerateContent"
    return await (count_tokens(ex) if method == "countTokens" else generate(ex))


def billed(path: str) -> bool:
    return not path.endswith(":countTokens")


def new_request_id() -> str:
    return new_id("", 16)

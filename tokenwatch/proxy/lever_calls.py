"""The proxy's side of the levers (docs/optimize.md): prepare a call, replay a cache hit, and
learn from a finished call. A part of ProxyServer, kept apart so the server stays readable."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any

import anyio.to_thread

from tokenwatch.config import ProxySettings
from tokenwatch.core.models import Status, UsageEvent
from tokenwatch.core.nesting import nested_deeper_than
from tokenwatch.core.tokens import TokenCount
from tokenwatch.proxy import anthropic_usage, openai_usage
from tokenwatch.proxy.cache import HIT_HEADER
from tokenwatch.proxy.http import ClientGone, Incoming
from tokenwatch.proxy.levers import Levers, Prepared
from tokenwatch.proxy.routes import ANTHROPIC, AgentRoute, Target, upstream_url
from tokenwatch.proxy.usage import INLINE_CHARS, CallFacts, count_prompt

CALL_ID_HEADER = "x-tokenwatch-call-id"
RETRY_COUNT_HEADER = "x-stainless-retry-count"


class LeverCalls:
    _levers: Levers
    _settings: ProxySettings
    _flying: dict[tuple[str, str], int]

    def _take_off(self, event: UsageEvent) -> tuple[str, str]:
        """Count the call in flight; its event says how many identical ones already were."""
        key = (event.agent, event.prompt_hash)
        if not event.prompt_hash:
            return key  # nothing to compare (a body that is not JSON)
        event.overlap = self._flying.get(key, 0)
        self._flying[key] = event.overlap + 1
        return key

    def _land(self, key: tuple[str, str]) -> None:
        if not key[1]:
            return
        left = self._flying.pop(key, 1) - 1
        if left > 0:
            self._flying[key] = left

    async def _prepare(
        self,
        req: Incoming,
        target: Target,
        route: AgentRoute,
        body: bytes,
        doc: dict[str, Any],
        facts: CallFacts,
    ) -> Prepared:
        url = upstream_url(self._settings, route, target, facts.model, req.query)
        scope = (route.user, target.provider, target.endpoint, url)
        return await self._levers.prepare(
            route.agent, scope, req.headers, body, doc, facts, lambda d: read_request(target, d)
        )

    async def _planned(self, call: Any, plan: Prepared, prompt: TokenCount) -> None:
        """Note what trimming cut (the prompt counted before and after) and whether the answer
        is to be kept for the cache."""
        if plan.trimmed is not None:
            before = await count_prompt(plan.trimmed, len(plan.body))
            call.trimmed_tokens = max(0, before.tokens - prompt.tokens)
        if plan.cache_key is not None and plan.hit is None:
            call.capture = []

    async def _replay(self, req: Incoming, call: Any, plan: Prepared) -> None:
        """Answer from the cache, byte for byte what the first agent received."""
        assert plan.hit is not None
        call.started = asyncio.get_running_loop().time()
        call.event.http_status = plan.hit.status
        try:
            await req.respond(
                plan.hit.status, [*plan.hit.headers, (HIT_HEADER, "hit")], plan.hit.body
            )
        except ClientGone:
            call.event.status = Status.CANCELLED.value
        call.first_byte = asyncio.get_running_loop().time()

    def _after(self, call: Any) -> None:
        """What the levers learn from a finished call: its answer, its prompt's cache use."""
        plan, answer = call.plan, call.answer_headers
        if plan is not None and plan.cache_key and call.capture is not None and answer is not None:
            self._levers.keep(plan.cache_key, call.event, answer, b"".join(call.capture))
        health = self._levers.health
        if health is not None and call.doc is not None:
            health.observe_call(call.event, call.doc, call.prompt.tokens)


def read_request(target: Target, doc: dict[str, Any] | None) -> CallFacts:
    if doc is None:
        metered = target.endpoint in openai_usage.METERED or target.endpoint == "/v1/messages"
        return CallFacts(metered=metered)
    if target.provider == ANTHROPIC:
        return anthropic_usage.read_request(target.endpoint, doc)
    return openai_usage.read_request(target.endpoint, doc)


def looks_json(body: bytes) -> bool:
    return body.lstrip()[:1] == b"{"


async def nested_too_deep(body: bytes) -> bool:
    """Whether a JSON body nests deeper than MAX_NESTING; a big one is scanned off the loop."""
    if len(body) < INLINE_CHARS:
        return nested_deeper_than(body)
    return await anyio.to_thread.run_sync(nested_deeper_than, body)


def call_id(headers: Mapping[str, str]) -> str:
    """The event's call id: the agent's own, so a call its SDK reports too is stored once; each
    retry of it is an attempt of its own (an SDK resends the same headers), recorded apart."""
    given = headers.get(CALL_ID_HEADER)
    if not given:
        return os.urandom(16).hex()
    attempt = headers.get(RETRY_COUNT_HEADER) or "0"
    if attempt == "0":
        return given
    if not (attempt.isdigit() and len(attempt) <= 4):
        return os.urandom(16).hex()  # an attempt it cannot name is still its own call
    return f"{given}.retry{int(attempt)}"

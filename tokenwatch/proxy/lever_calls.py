"""The proxy's side of the levers (docs/optimize.md): prepare a call, replay a cache hit, and
learn from a finished call. A part of ProxyServer, kept apart so the server stays readable."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.to_thread
import orjson

from tokenwatch.config import ProxySettings
from tokenwatch.core.admission import Gate
from tokenwatch.core.models import Status, UsageEvent
from tokenwatch.core.nesting import nested_deeper_than
from tokenwatch.core.tokens import TokenCount
from tokenwatch.proxy import anthropic_usage, openai_usage
from tokenwatch.proxy.cache import HIT_HEADER
from tokenwatch.proxy.call import call_event, call_request
from tokenwatch.proxy.http import ClientGone, Incoming, relayable
from tokenwatch.proxy.levers import Levers, Prepared
from tokenwatch.proxy.routes import ANTHROPIC, AgentRoute, Target, upstream_url
from tokenwatch.proxy.summary import MAX_SUMMARY_TOKENS, Made, SummaryFailed, answer_text
from tokenwatch.proxy.upstream import (
    UpstreamClient,
    UpstreamCut,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tokenwatch.proxy.usage import INLINE_CHARS, CallFacts, count_prompt, fill_event, json_object

CALL_ID_HEADER = "x-tokenwatch-call-id"
RETRY_COUNT_HEADER = "x-stainless-retry-count"
_SUMMARY_DROP = frozenset({CALL_ID_HEADER, "accept-encoding", "content-type", "content-length"})
"""The agent's headers not sent with a summary request (its credentials and API version are)."""


class LeverCalls:
    _levers: Levers
    _settings: ProxySettings
    _flying: dict[tuple[str, str], int]
    _gate: Gate
    _client: UpstreamClient | None
    _clock: Callable[[], float]

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
        summarise = None
        if self._levers.summarising:
            summarise = functools.partial(self._summary_call, req, target, route)
        return await self._levers.prepare(
            route.agent,
            scope,
            req.headers,
            body,
            doc,
            facts,
            lambda d: read_request(target, d),
            summarise,
        )

    async def _summary_call(
        self, req: Incoming, target: Target, route: AgentRoute, doc: dict[str, Any]
    ) -> Made:
        """Ask for a summary of trimmed turns through the agent's upstream, with its credentials:
        a call of the agent's own, admitted, recorded and charged like any other (`lever`
        "summary"). Raises SummaryFailed."""
        body = orjson.dumps(doc)
        facts = read_request(target, doc)
        prompt = await count_prompt(facts, len(body))
        ask = call_request(route, target, facts, (prompt.tokens, MAX_SUMMARY_TOKENS))
        admission = await self._gate.admit(ask)
        call = os.urandom(16).hex()
        event = call_event(self._clock(), route, target, facts, admission.waited_ms, call)
        event.lever = "summary"
        try:
            if not admission.allowed:
                event.status, event.http_status = Status.DENIED.value, admission.status
                raise SummaryFailed(admission.message or "refused")
            text = await self._summary_exchange(req, target, route, body, (event, prompt.tokens))
        except BaseException:
            if event.status == Status.OK.value and event.http_status is None:
                event.status = Status.CANCELLED.value  # timed out or stopped before an answer
                _sent_unanswered(event, prompt.tokens)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._gate.settle(admission, event)
        return Made(text, event)

    async def _summary_exchange(
        self,
        req: Incoming,
        target: Target,
        route: AgentRoute,
        body: bytes,
        record: tuple[UsageEvent, int],
    ) -> str:
        assert self._client is not None
        event, prompt_tokens = record
        headers = relayable(req.header_items(), _SUMMARY_DROP)
        headers += [("Content-Type", "application/json"), ("Accept-Encoding", "identity")]
        url = upstream_url(self._settings, route, target, event.model, req.query)
        try:
            async with self._client.open("POST", url, headers, body) as answer:
                event.http_status = answer.status
                data = await answer.read(lambda: None)
        except (UpstreamUnreachable, UpstreamTimeout, UpstreamCut) as exc:
            event.status = Status.ERROR.value
            if not isinstance(exc, UpstreamUnreachable):
                _sent_unanswered(event, prompt_tokens)
            raise SummaryFailed(f"its upstream failed: {type(exc).__name__}") from None
        reader = read_answer(target, data)
        if reader.usage is not None:
            fill_event(event, reader.usage)
        if event.http_status != 200:
            event.status = Status.ERROR.value
            raise SummaryFailed(f"HTTP {event.http_status}")
        text = answer_text(target.provider == ANTHROPIC, json_object(data))
        if not text:
            raise SummaryFailed("an answer without text")
        return text

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


def read_answer(target: Target, body: bytes) -> Any:
    """A reader that has read a whole JSON answer (its usage, when it reports one)."""
    reader: Any
    if target.provider == ANTHROPIC:
        reader = anthropic_usage.AnthropicReader()
    else:
        reader = openai_usage.OpenAIReader(target.endpoint)
    reader.read_json(body)
    return reader


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


def _sent_unanswered(event: UsageEvent, prompt_tokens: int) -> None:
    """A summary request that went out and got no answer may still be billed for its prompt:
    counted, and marked estimated, as the proxy does for an agent's call cut short."""
    event.input_tokens = prompt_tokens
    event.estimated = True

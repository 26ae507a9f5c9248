"""The levers that make a call cost less (docs/optimize.md): which apply to a request, what they
change in it, and what they saved."""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import orjson

from tokenwatch.config import OptimizeSettings
from tokenwatch.core.models import BudgetStatus, UsageEvent
from tokenwatch.proxy.cache import CachedAnswer, ResponseCache, cache_key, storable_headers
from tokenwatch.proxy.cache_health import CacheHealth
from tokenwatch.proxy.routes import ANTHROPIC
from tokenwatch.proxy.summary import (
    Summaries,
    Summarise,
    length_key,
    summary_message,
    summary_request,
    transcript,
)
from tokenwatch.proxy.switch import STATUS_TTL, BudgetFractions, ModelSwitch
from tokenwatch.proxy.trim import Cut, cut_request
from tokenwatch.proxy.usage import CallFacts

log = logging.getLogger("tokenwatch.proxy")

Price = Callable[[UsageEvent], float | None]
"""USD a call with these figures costs at today's prices; None when the model is unknown."""
CACHED_ENDPOINTS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages"}
)
"""Responses (`/v1/responses`) are left out: they can name server-side state by id."""
SUMMARY_ALERT_EVERY = 600.0
"""Seconds between two alerts about an agent's summaries failing (each failure is logged)."""


@dataclass(slots=True)
class Prepared:
    """A request after the levers: what is sent, and what each lever did to it."""

    body: bytes
    doc: dict[str, Any]
    facts: CallFacts
    requested_model: str = ""
    trimmed: CallFacts | None = None
    """The request's facts before trimming (its prompt is counted to know what was cut)."""
    cache_key: bytes | None = None
    """Set when the answer may be kept for the next identical request."""
    hit: CachedAnswer | None = None
    summary_usd: float = 0.0
    """What summarising the trimmed turns cost (counted against what trimming saved)."""

    @property
    def lever(self) -> str:
        names = [n for n, on in (("switch", self.requested_model), ("trim", self.trimmed)) if on]
        return "+".join(names)


class Levers:
    """Cache, model switch, trimming and prompt-cache health for one proxy. `rewrites` is False
    while none can change a request, so the proxy's hot path checks one attribute."""

    def __init__(
        self,
        settings: OptimizeSettings | None = None,
        *,
        cache_path: Path | None = None,
        price: Price = lambda event: None,
        statuses: Callable[[], list[BudgetStatus]] = list,
        alert: Callable[[str, str], None] = lambda agent, message: None,
        trim_alert: Callable[[str, str], None] = lambda agent, message: None,
        clock: Callable[[], float] = time.time,
        status_ttl: float = STATUS_TTL,
    ) -> None:
        settings = settings or OptimizeSettings()
        self.settings = settings
        self.price = price
        self.fractions = BudgetFractions(statuses, clock, status_ttl)
        self.switch = ModelSwitch(settings.switch, self.fractions)
        self.cache: ResponseCache | None = None
        if settings.cache.enabled and cache_path is not None:
            self.cache = ResponseCache(cache_path, settings.cache, clock)
        self.trim = settings.trim if settings.trim.enabled else None
        self.summarising = self.trim is not None and bool(self.trim.summary_model)
        self.summaries = Summaries()
        self._trim_alert = trim_alert
        self._clock = clock
        self._alerted: dict[str, float] = {}
        self.health: CacheHealth | None = None
        if settings.cache_health.enabled:
            self.health = CacheHealth(settings.cache_health, alert, price, clock)
        self._fixed = self.cache is not None or self.trim is not None

    @property
    def rewrites(self) -> bool:
        return self._fixed or self.switch.active

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the cache's file written until cancelled (nothing to do without a cache)."""
        if self.cache is None:
            task_status.started()
            return
        await self.cache.run(task_status=task_status)

    async def prepare(
        self,
        agent: str,
        scope: tuple[str, ...],
        headers: Mapping[str, str],
        body: bytes,
        doc: dict[str, Any],
        facts: CallFacts,
        read: Callable[[dict[str, Any]], CallFacts],
        summarise: Summarise | None = None,
    ) -> Prepared:
        """Apply the switch and trimming to a request, then look it up in the cache. `scope` is
        who may share a cached answer (user, provider, endpoint, upstream URL); `summarise`
        makes a summary of trimmed turns (given when `summarising`)."""
        plan = Prepared(body, doc, facts)
        served = self.switch.model_for(agent, facts.model) if self.switch.active else ""
        if served:
            plan.requested_model = facts.model
            self._rewrite(plan, {**plan.doc, "model": served}, read)
        if self.trim is not None and self._trimming(agent):
            cut = cut_request(plan.doc, self.trim.keep_turns)
            if cut is not None:
                plan.trimmed = plan.facts
                doc = cut.doc
                if summarise is not None and self.summarising:
                    doc = await self._summarised(agent, scope[1] == ANTHROPIC, cut, summarise, plan)
                self._rewrite(plan, doc, read)
        if self.cache is not None and self._cacheable(agent, scope[1:3], headers, plan.doc):
            who = scope if self.cache.settings.shared else (agent, *scope)
            plan.cache_key = cache_key(who, headers, plan.body)
            if "no-cache" not in headers.get("cache-control", ""):
                plan.hit = await self.cache.get(plan.cache_key)
        return plan

    async def _summarised(
        self, agent: str, anthropic: bool, cut: Cut, summarise: Summarise, plan: Prepared
    ) -> dict[str, Any]:
        """The trimmed request with one message summarising the dropped turns in their place;
        the plainly trimmed one when no summary can be made (an alert says so): a summary never
        stops the call. Only turns no earlier summary covers are sent to the model."""
        assert self.trim is not None
        model = self.trim.summary_model
        try:
            covered, text = self.summaries.best(agent, model, cut.dropped)
            if covered < len(cut.dropped):
                new = transcript(cut.dropped[covered:])
                limit = length_key(cut.doc, model)
                ask = summary_request(anthropic, model, new, text, limit)
                with anyio.fail_after(self.trim.summary_timeout):
                    made = await summarise(ask)
                text = made.text
                plan.summary_usd += self.price(made.event) or 0.0
                self.summaries.keep(agent, model, cut.dropped, text)
        except Exception as exc:  # whatever went wrong, the call goes on without a summary
            self._summary_failed(agent, model, str(exc) or type(exc).__name__)
            return cut.doc
        return cut.summarised(summary_message(text))

    def _summary_failed(self, agent: str, model: str, why: str) -> None:
        log.warning("%s's trimmed turns were not summarised by %s: %s", agent, model, why)
        now = self._clock()
        if now - self._alerted.get(agent, -SUMMARY_ALERT_EVERY) < SUMMARY_ALERT_EVERY:
            return
        self._alerted[agent] = now
        self._trim_alert(
            agent, f"{agent}'s trimmed turns were dropped without a summary: {model} failed ({why})"
        )

    @staticmethod
    def _rewrite(
        plan: Prepared, doc: dict[str, Any], read: Callable[[dict[str, Any]], CallFacts]
    ) -> None:
        plan.doc, plan.body, plan.facts = doc, orjson.dumps(doc), read(doc)

    def _trimming(self, agent: str) -> bool:
        trim = self.trim
        if trim is None or not fnmatch.fnmatchcase(agent, trim.agents):
            return False
        return not trim.budget or self.fractions.fraction(trim.budget, agent) * 100 >= trim.at

    def _cacheable(
        self, agent: str, where: tuple[str, ...], headers: Mapping[str, str], doc: dict[str, Any]
    ) -> bool:
        """Cached: the endpoints above, agents the config names, never a `no-store` request, and
        only temperature 0 (or embeddings) unless the user opted into sampled answers."""
        assert self.cache is not None
        settings = self.cache.settings
        endpoint = where[1] if len(where) > 1 else ""
        if endpoint not in CACHED_ENDPOINTS or not fnmatch.fnmatchcase(agent, settings.agents):
            return False
        if "no-store" in headers.get("cache-control", "").lower():
            return False
        if settings.any_temperature or endpoint == "/v1/embeddings":
            return True
        temperature = doc.get("temperature")
        return type(temperature) in (int, float) and temperature == 0

    def keep(
        self, key: bytes, event: UsageEvent, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        """Store a fresh answer for the next identical request (only a clean, measured one)."""
        if self.cache is None or event.estimated or event.status != "ok":
            return
        usage = (
            event.input_tokens,
            event.output_tokens,
            event.cache_read_tokens,
            event.cache_write_tokens,
            event.reasoning_tokens,
        )
        if event.http_status == 200:
            answer = CachedAnswer(200, storable_headers(headers), body, event.model, usage)
            self.cache.put_nowait(key, answer)

    def hit_event(self, event: UsageEvent, answer: CachedAnswer) -> None:
        """A call answered from the cache: nothing billed, the original call's cost saved."""
        inp, out, read, write, reasoning = answer.usage
        original = UsageEvent(
            model=answer.model,
            provider=event.provider,
            input_tokens=inp,
            output_tokens=out,
            cache_read_tokens=read,
            cache_write_tokens=write,
            reasoning_tokens=reasoning,
        )
        event.model = answer.model
        event.lever = "cache"
        event.saved_tokens = inp + out
        event.saved_usd = self.price(original)

    def account(self, event: UsageEvent, plan: Prepared, trimmed_tokens: int) -> None:
        """What the switch and trimming saved on a call that went upstream."""
        event.lever = plan.lever
        event.requested_model = plan.requested_model
        saved: float | None = None
        if plan.requested_model:
            asked = self.price(_as(event, model=plan.requested_model))
            served = self.price(event)
            if asked is not None and served is not None:
                saved = asked - served
        if trimmed_tokens > 0:
            event.saved_tokens = trimmed_tokens
            cut = self.price(UsageEvent(model=event.model, input_tokens=trimmed_tokens))
            if cut is not None:
                saved = (saved or 0.0) + cut
        if plan.summary_usd:
            saved = (saved or 0.0) - plan.summary_usd
        event.saved_usd = saved


def _as(event: UsageEvent, *, model: str) -> UsageEvent:
    return UsageEvent(
        model=model,
        provider=event.provider,
        input_tokens=event.input_tokens,
        output_tokens=event.output_tokens,
        cache_read_tokens=event.cache_read_tokens,
        cache_write_tokens=event.cache_write_tokens,
        reasoning_tokens=event.reasoning_tokens,
    )

"""Prompt-cache health: calls that re-send a long prefix seen recently and read none of it from
the provider's cache, added up into one alert with what a warm cache would have billed."""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from tokenwatch.config import CacheHealthSettings
from tokenwatch.core.models import UsageEvent

MAX_PREFIXES = 20_000
"""Prefix hashes remembered per agent; the oldest go first beyond it."""

Price = Callable[[UsageEvent], float | None]


@dataclass(slots=True)
class _Resend:
    ts: float
    tokens: int
    cold_usd: float
    warm_usd: float


@dataclass(slots=True)
class _AgentPrefixes:
    seen: dict[bytes, float] = field(default_factory=dict)
    """Prefix hash -> when it was last sent."""
    resends: deque[_Resend] = field(default_factory=deque)


def prefix_hashes(parts: list[Any]) -> list[tuple[bytes, int]]:
    """(hash of parts[:i+1], bytes of parts[:i+1]) for each i: the prompt's prefixes."""
    digest = hashlib.sha256()
    out: list[tuple[bytes, int]] = []
    size = 0
    for part in parts:
        data = orjson.dumps(part, option=orjson.OPT_SORT_KEYS)
        digest.update(data)
        size += len(data)
        out.append((digest.copy().digest()[:16], size))
    return out


def prompt_parts(doc: dict[str, Any]) -> list[Any]:
    """What a provider caches as a prefix, in order: tools, system, then each message."""
    parts: list[Any] = []
    for name in ("tools", "system"):
        if doc.get(name):
            parts.append(doc[name])
    messages = doc.get("messages")
    if isinstance(messages, list):
        parts.extend(messages)
    return parts


class CacheHealth:
    """Feed it every settled call with a long prompt; it raises an alert through `alert`."""

    def __init__(
        self,
        settings: CacheHealthSettings,
        alert: Callable[[str, str], None],
        price: Price,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self._alert = alert
        self._price = price
        self._clock = clock
        self._agents: dict[str, _AgentPrefixes] = {}

    def observe_call(self, event: UsageEvent, doc: dict[str, Any], prompt_tokens: int) -> None:
        """`observe` for a settled call whose prompt is long enough to matter."""
        if event.status == "ok" and prompt_tokens >= self.settings.min_prefix_tokens:
            self.observe(event, doc)

    def observe(self, event: UsageEvent, doc: dict[str, Any]) -> None:
        """One call's prompt and what the provider read from its cache."""
        parts = prompt_parts(doc)
        if len(parts) < 2 or event.input_tokens <= 0:
            return
        now = self._clock()
        state = self._agents.setdefault(event.agent, _AgentPrefixes())
        self._forget_old(state, now)
        hashes = prefix_hashes(parts)
        total = hashes[-1][1] or 1
        reused = 0
        for digest, size in hashes[:-1]:  # the last part is the new turn: not a prefix
            if digest in state.seen:
                reused = size
        for digest, _ in hashes:
            state.seen[digest] = now
        while len(state.seen) > MAX_PREFIXES:
            del state.seen[next(iter(state.seen))]
        tokens = event.input_tokens * reused // total
        if tokens >= self.settings.min_prefix_tokens and event.cache_read_tokens == 0:
            state.resends.append(self._resend(event, tokens, now))
            if len(state.resends) >= self.settings.repeats:
                self._raise(event.agent, state)

    def _resend(self, event: UsageEvent, tokens: int, now: float) -> _Resend:
        cold = UsageEvent(model=event.model, provider=event.provider, input_tokens=tokens)
        warm = UsageEvent(
            model=event.model,
            provider=event.provider,
            input_tokens=tokens,
            cache_read_tokens=tokens,
        )
        return _Resend(now, tokens, self._price(cold) or 0.0, self._price(warm) or 0.0)

    def _forget_old(self, state: _AgentPrefixes, now: float) -> None:
        since = now - self.settings.window
        while state.resends and state.resends[0].ts < since:
            state.resends.popleft()
        for digest in [d for d, ts in state.seen.items() if ts < since]:
            del state.seen[digest]

    def _raise(self, agent: str, state: _AgentPrefixes) -> None:
        resends = list(state.resends)
        state.resends.clear()  # each alert counts its own re-sends: no repeat for the same ones
        biggest = max(r.tokens for r in resends)
        minutes = max(1, round((resends[-1].ts - resends[0].ts) / 60)) if len(resends) > 1 else 1
        cold = sum(r.cold_usd for r in resends)
        warm = sum(r.warm_usd for r in resends)
        self._alert(
            agent,
            f"{agent} re-sent a {_tokens(biggest)}-token prefix uncached {len(resends)} times in "
            f"{minutes} min: ${cold:.2f} that a warm cache would have billed at ${warm:.2f}",
        )


def _tokens(n: int) -> str:
    return f"{n // 1000}k" if n >= 10_000 else f"{n:,}"

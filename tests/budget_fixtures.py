"""Helpers for budget and rule tests: a settable clock, calls and events, wall-clock times in a zone."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from tokenwatch.core.admission import CallRequest
from tokenwatch.core.models import UsageEvent


@dataclass
class Clock:
    """A clock tests move by hand."""

    now: float

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def at(text: str, tz: str = "UTC") -> float:
    """Unix time of a wall-clock time (`2026-11-23 23:59`) in a zone."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


def call(agent: str = "researcher", **kw: object) -> CallRequest:
    return CallRequest(agent=agent, provider="openai", model=str(kw.pop("model", "gpt-4o")), **kw)  # type: ignore[arg-type]


def event(ts: float, agent: str = "researcher", tokens: int = 1000, **kw: object) -> UsageEvent:
    """A call that used `tokens` (three quarters prompt, one quarter output)."""
    out = tokens // 4
    fields: dict[str, object] = {"model": "gpt-4o", "provider": "openai"}
    fields.update(kw)
    return UsageEvent(ts=ts, agent=agent, input_tokens=tokens - out, output_tokens=out, **fields)  # type: ignore[arg-type]

"""The maintained price table underneath ours: genai-prices, read offline from the installed package."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

log = logging.getLogger(__name__)

SOURCE: Final = "genai-prices"
_OPENROUTER: Final = "openrouter"


@dataclass(frozen=True, slots=True)
class Rates:
    """Flat USD-per-1M rates of one model at one time and prompt size (tiers resolved)."""

    input: float
    output: float
    cache_read: float
    cache_write: float
    reasoning: float | None


@dataclass(frozen=True, slots=True)
class Found:
    """A model genai-prices knows: its id there, who bills it, and its (possibly dated) prices."""

    model: str
    provider: str
    info: Any
    """genai_prices.types.ModelInfo (typed loosely: the package is imported only when needed)."""

    def rates(self, ts: float | None = None, input_tokens: int = 0) -> Rates | None:
        """The rates in force at `ts` for a prompt of `input_tokens` (a tier applies to the whole
        call once the prompt passes its start); None when the model has no token prices."""
        when = dt.datetime.fromtimestamp(ts, dt.UTC) if ts is not None else dt.datetime.now(dt.UTC)
        prices = self.info.get_prices(when)
        inp = _rate(prices.input_mtok, input_tokens)
        out = _rate(prices.output_mtok, input_tokens)
        if inp is None and out is None:
            return None
        inp = inp or 0.0
        read = _rate(prices.cache_read_mtok, input_tokens)
        write = _rate(prices.cache_write_mtok, input_tokens)
        return Rates(
            input=inp,
            output=out or 0.0,
            cache_read=inp if read is None else read,
            cache_write=inp if write is None else write,
            reasoning=_rate(prices.output_reasoning_mtok, input_tokens),
        )


def _rate(price: Any, input_tokens: int) -> float | None:
    if price is None:
        return None
    if isinstance(price, Decimal):
        return float(price)
    chosen = price.base  # TieredPrices: the highest tier the prompt passes applies to it all
    for tier in price.tiers:
        if input_tokens > tier.start:
            chosen = tier.price
    return float(chosen)


class MaintainedPrices:
    """genai-prices' bundled snapshot (never its network updater); imported on first use, since
    loading its data costs about 0.2 s that commands which price nothing should not pay."""

    def __init__(self) -> None:
        self._snapshot: Any = None
        self._version = ""
        self._broken = ""

    @property
    def version(self) -> str:
        self._load()
        return self._version

    @property
    def available(self) -> bool:
        self._load()
        return self._snapshot is not None

    def warm(self) -> None:
        """Import the package and load its data now (in a worker thread), not on a first call."""
        self._load()

    def _load(self) -> None:
        if self._snapshot is not None or self._broken:
            return
        try:
            import genai_prices
            from genai_prices import data_snapshot

            self._snapshot = data_snapshot.get_snapshot()
            self._version = str(genai_prices.__version__)
        except Exception as exc:  # a broken install leaves our own table and the fallback
            self._broken = f"{type(exc).__name__}: {exc}"
            log.warning("genai-prices cannot be loaded (%s); pricing without it", self._broken)

    def find(self, model: str) -> Found | None:
        """The model as genai-prices matches it, by name; OpenRouter's `vendor/model` ids too."""
        self._load()
        if self._snapshot is None or not model:
            return None
        tries: list[str | None] = [None, _OPENROUTER] if "/" in model else [None]
        for provider in tries:
            try:
                prov, info = self._snapshot.find_provider_model(model, None, provider, None)
            except (LookupError, ValueError):
                continue
            return Found(str(info.id), str(prov.id), info)
        return None


INSTALLED = MaintainedPrices()
"""The installed genai-prices, shared by every price table of the process (loaded once)."""

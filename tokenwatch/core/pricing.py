"""The dated price table (bundled prices.toml plus `[prices."MODEL"]` overrides) and call costs."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

from tokenwatch.config import PriceSettings
from tokenwatch.core.models import UsageEvent

PER_TOKENS = 1_000_000
"""Rates are USD per this many tokens."""
_MAX_ALIAS_HOPS = 4
_CACHE_LIMIT = 4096


class PriceError(ValueError):
    """A price table or override that cannot be used; the message names the model and field."""


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per 1M tokens for one model family."""

    model: str
    provider: str
    input: float
    """Uncached input tokens."""
    output: float
    """Output tokens, reasoning included unless `reasoning` is set."""
    cache_read: float
    cache_write: float
    reasoning: float | None = None
    """Reasoning tokens when billed apart from output; None bills them as output."""
    note: str = ""

    @property
    def free(self) -> bool:
        return not (self.input or self.output or self.cache_read or self.cache_write)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "provider": self.provider,
            "input": self.input,
            "output": self.output,
            "cache_read": self.cache_read,
            "cache_write": self.cache_write,
            "reasoning": self.reasoning,
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class AliasRule:
    """`pattern` (a full-match regex) rewrites a model name to `model` (may use \\1 groups)."""

    pattern: re.Pattern[str]
    model: str
    why: str = ""


@dataclass(frozen=True, slots=True)
class Resolution:
    """How a model name found its price: the name asked, the family priced, the rules used."""

    asked: str
    price: ModelPrice
    via: tuple[str, ...] = ()
    """Each alias step as `name -> name (why)`; empty for an exact match."""
    overridden: bool = False
    """True when tokenwatch.toml's `[prices."MODEL"]` set or changed the rates."""


def cost_of(price: ModelPrice, event: UsageEvent) -> float:
    """USD for one call, following DESIGN.md's normalised token fields (no double counting)."""
    cached = event.cache_read_tokens + event.cache_write_tokens
    uncached = max(0, event.input_tokens - cached)
    total = (
        uncached * price.input
        + event.cache_read_tokens * price.cache_read
        + event.cache_write_tokens * price.cache_write
    )
    if price.reasoning is None:
        total += event.output_tokens * price.output
    else:
        reasoning = min(event.reasoning_tokens, event.output_tokens)
        total += (event.output_tokens - reasoning) * price.output + reasoning * price.reasoning
    return total / PER_TOKENS


class PriceTable:
    """Bundled dated prices with the user's overrides; resolves dated snapshots by explicit rules."""

    def __init__(
        self,
        version: str,
        prices: Mapping[str, ModelPrice],
        aliases: Mapping[str, str],
        rules: list[AliasRule],
        overridden: frozenset[str] = frozenset(),
        source: str = "",
    ) -> None:
        self.version = version
        self.source = source
        self._prices = dict(prices)
        self._aliases = {k.lower(): v for k, v in aliases.items()}
        self._rules = rules
        self._overridden = overridden
        self._resolved: dict[str, Resolution | None] = {}

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, PriceSettings] | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> PriceTable:
        """The bundled table (or `data` shaped like prices.toml) with overrides applied."""
        if data is None:
            text = resources.files("tokenwatch.core").joinpath("prices.toml").read_text("utf-8")
            data = tomllib.loads(text)
        table = cls._from_data(data)
        for model, settings in (overrides or {}).items():
            table = table._with_override(model, settings)
        return table

    @classmethod
    def _from_data(cls, data: Mapping[str, Any]) -> PriceTable:
        version = str(data.get("version", ""))
        if not version:
            raise PriceError("price table has no version date")
        prices = {
            name.lower(): _model_price(name, entry)
            for name, entry in dict(data.get("models", {})).items()
        }
        aliases: dict[str, str] = dict(data.get("aliases", {}))
        for alias, target in aliases.items():
            if target.lower() not in prices:
                raise PriceError(f"alias {alias!r} points at unknown model {target!r}")
        rules = [_alias_rule(i, entry) for i, entry in enumerate(data.get("rules", []))]
        return cls(version, prices, aliases, rules, source=str(data.get("source", "")))

    def _with_override(self, model: str, settings: PriceSettings) -> PriceTable:
        key = model.lower()
        resolved = self.resolve(model)
        base = resolved.price if resolved is not None else None
        price = _overridden(model, base, settings)
        prices = dict(self._prices)
        prices[key] = price
        return PriceTable(
            self.version,
            prices,
            self._aliases,
            self._rules,
            self._overridden | {key},
            self.source,
        )

    def resolve(self, model: str) -> Resolution | None:
        """Exact name, then an explicit alias, then the ordered pattern rules; None if unknown.

        A rule only applies when its result resolves too: nothing is guessed.
        """
        if model in self._resolved:
            return self._resolved[model]
        found = self._resolve(model.strip().lower(), _MAX_ALIAS_HOPS)
        resolution = None
        if found is not None:
            price, via = found
            overridden = price.model.lower() in self._overridden
            resolution = Resolution(model, price, tuple(via), overridden)
        if len(self._resolved) >= _CACHE_LIMIT:
            self._resolved.clear()  # model names are few; this only bounds a flood of junk
        self._resolved[model] = resolution
        return resolution

    def _resolve(self, name: str, hops: int) -> tuple[ModelPrice, list[str]] | None:
        price = self._prices.get(name)
        if price is not None:
            return price, []
        if hops == 0:
            return None
        for target, why in self._candidates(name):
            if target == name:
                continue
            found = self._resolve(target, hops - 1)
            if found is not None:
                return found[0], [f"{name} -> {target} ({why})", *found[1]]
        return None

    def _candidates(self, name: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        alias = self._aliases.get(name)
        if alias is not None:
            out.append((alias.lower(), "alias"))
        for rule in self._rules:
            match = rule.pattern.fullmatch(name)
            if match is not None:
                out.append((match.expand(rule.model).lower(), rule.why or rule.pattern.pattern))
        return out

    def lookup(self, model: str) -> ModelPrice | None:
        resolved = self.resolve(model)
        return resolved.price if resolved is not None else None

    def cost(self, event: UsageEvent) -> float | None:
        """USD for the call; None when the model is unknown (unpriced, never a silent 0)."""
        price = self.lookup(event.model)
        return None if price is None else cost_of(price, event)

    def price(self, event: UsageEvent) -> UsageEvent:
        """Set `cost_usd` and `price_version` on the event (in place) and return it."""
        cost = self.cost(event)
        event.cost_usd = cost
        event.price_version = self.version if cost is not None else ""
        return event

    def worst_case(self, model: str, input_tokens: int, max_output_tokens: int) -> float | None:
        """Most a call can cost: all input uncached, all output at the dearest output rate."""
        price = self.lookup(model)
        if price is None:
            return None
        out_rate = max(price.output, price.reasoning or 0.0)
        in_rate = max(price.input, price.cache_write)
        return (input_tokens * in_rate + max_output_tokens * out_rate) / PER_TOKENS

    def models(self) -> list[ModelPrice]:
        return sorted(self._prices.values(), key=lambda p: (p.provider, p.model))

    def is_overridden(self, model: str) -> bool:
        return model.lower() in self._overridden


def _number(model: str, entry: Mapping[str, Any], key: str, default: float | None) -> float:
    value = entry.get(key, default)
    if value is None:
        raise PriceError(f"model {model!r}: missing {key!r} (USD per 1M tokens)")
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise PriceError(f"model {model!r}: {key!r} must be a number >= 0, got {value!r}")
    return float(value)


def _model_price(name: str, entry: Mapping[str, Any]) -> ModelPrice:
    known = {"provider", "input", "output", "cache_read", "cache_write", "reasoning", "note"}
    unknown = set(entry) - known
    if unknown:
        raise PriceError(f"model {name!r}: unknown key {sorted(unknown)[0]!r}")
    inp = _number(name, entry, "input", None)
    reasoning = entry.get("reasoning")
    return ModelPrice(
        model=name,
        provider=str(entry.get("provider", "")),
        input=inp,
        output=_number(name, entry, "output", None),
        # A provider without separate cache rates bills those tokens as plain input.
        cache_read=_number(name, entry, "cache_read", inp),
        cache_write=_number(name, entry, "cache_write", inp),
        reasoning=None if reasoning is None else _number(name, entry, "reasoning", None),
        note=str(entry.get("note", "")),
    )


def _alias_rule(index: int, entry: Mapping[str, Any]) -> AliasRule:
    try:
        pattern = re.compile(str(entry["pattern"]))
        return AliasRule(pattern, str(entry["model"]), str(entry.get("why", "")))
    except KeyError as exc:
        raise PriceError(f"rules[{index}]: missing {exc.args[0]!r}") from None
    except re.error as exc:
        raise PriceError(f"rules[{index}]: bad pattern: {exc}") from None


def _overridden(model: str, base: ModelPrice | None, s: PriceSettings) -> ModelPrice:
    where = f'prices."{model}"'
    if s.free:
        return ModelPrice(model, s.provider or (base.provider if base else "local"), 0, 0, 0, 0)
    if base is None:
        if s.input is None or s.output is None:
            raise PriceError(
                f"{where}: a model the bundled table does not know needs input and output "
                "(USD per 1M tokens), or free = true"
            )
        base = ModelPrice(model, s.provider, s.input, s.output, s.input, s.input)
    rates = {
        k: v
        for k, v in {
            "input": s.input,
            "output": s.output,
            "cache_read": s.cache_read,
            "cache_write": s.cache_write,
            "reasoning": s.reasoning,
        }.items()
        if v is not None
    }
    for key, value in rates.items():
        if value < 0:
            raise PriceError(f"{where}: {key} must be >= 0, got {value}")
    return replace(base, model=model, provider=s.provider or base.provider, note="", **rates)

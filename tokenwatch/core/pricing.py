"""Call costs from a chain of price tables: tokenwatch.toml's `[prices."MODEL"]`, then the bundled
prices.toml, then genai-prices, then a marked fallback estimate (never a silent $0)."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, Final

from tokenwatch.config import PriceSettings
from tokenwatch.core.maintained_prices import INSTALLED, Found, MaintainedPrices
from tokenwatch.core.maintained_prices import SOURCE as MAINTAINED
from tokenwatch.core.models import UsageEvent

PER_TOKENS = 1_000_000
"""Rates are USD per this many tokens."""
_MAX_ALIAS_HOPS = 4
_CACHE_LIMIT = 4096

CONFIG: Final = "tokenwatch.toml"
"""`price_source` of a call priced by the user's `[prices."MODEL"]`."""
BUNDLED: Final = "tokenwatch"
"""... by tokenwatch's own prices.toml (what the maintained table lacks)."""
PROVIDER: Final = "provider"
"""... by the cost the provider (or a gateway) reported with the response, stored as reported."""
ESTIMATED: Final = "estimated:"
"""Prefix of the `price_source` of a call to a model no table knows, priced as the model named
after it (`estimated:claude-opus-4-5`): a partial total, marked wherever it is shown."""


def is_estimated(price_source: str) -> bool:
    """True for a call priced by the fallback: its cost is an estimate, not a price."""
    return price_source.startswith(ESTIMATED)


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
    why: str = ""
    """For a bundled entry: why tokenwatch prices it rather than genai-prices."""

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
            "why": self.why,
        }


@dataclass(frozen=True, slots=True)
class AliasRule:
    """`pattern` (a full-match regex) rewrites a model name to `model` (may use \\1 groups)."""

    pattern: re.Pattern[str]
    model: str
    why: str = ""


@dataclass(frozen=True, slots=True)
class Resolution:
    """How a model name found its price: the name asked, the rates, the table and steps used."""

    asked: str
    price: ModelPrice
    """The rates in force now (for a tiered price, those of a prompt under the first tier)."""
    via: tuple[str, ...] = ()
    """Each alias step as `name -> name (why)`; empty for an exact match."""
    overridden: bool = False
    """True when tokenwatch.toml's `[prices."MODEL"]` set or changed the rates."""
    source: str = BUNDLED
    """The table that priced it: tokenwatch.toml, tokenwatch (bundled) or genai-prices."""
    version: str = ""
    """That table's version (date of the bundled table, release of genai-prices)."""
    estimated_from: str = ""
    """For a model no table knows: the fallback model whose rates stand in."""
    found: Found | None = None
    """A genai-prices entry: its rates change with the date and the prompt's size (tiers)."""

    @property
    def estimated(self) -> bool:
        return bool(self.estimated_from)

    @property
    def price_source(self) -> str:
        """What a call priced this way stores in `price_source`."""
        return f"{ESTIMATED}{self.estimated_from}" if self.estimated else self.source

    def rates(self, ts: float | None = None, input_tokens: int = 0) -> ModelPrice:
        """The rates for a call at `ts` with a prompt of `input_tokens`."""
        if self.found is None:
            return self.price
        rates = self.found.rates(ts, input_tokens)
        if rates is None:
            return self.price
        return replace(
            self.price,
            input=rates.input,
            output=rates.output,
            cache_read=rates.cache_read,
            cache_write=rates.cache_write,
            reasoning=rates.reasoning,
        )


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
    """The price chain: overrides, the bundled table (explicit aliases and snapshot rules), the
    maintained table, and a fallback for the rest. Every model gets a price; a fallback one is
    marked estimated."""

    def __init__(
        self,
        version: str,
        prices: Mapping[str, ModelPrice],
        aliases: Mapping[str, str],
        rules: list[AliasRule],
        overridden: frozenset[str] = frozenset(),
        source: str = "",
        *,
        fallback: Mapping[str, str] | None = None,
        maintained: MaintainedPrices | None = None,
    ) -> None:
        self.version = version
        self.source = source
        self._prices = dict(prices)
        self._aliases = {k.lower(): v for k, v in aliases.items()}
        self._rules = rules
        self._overridden = overridden
        self._fallback = {k.lower(): v for k, v in (fallback or {}).items()}
        self.maintained = maintained
        self._resolved: dict[str, Resolution | None] = {}

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, PriceSettings] | None = None,
        data: Mapping[str, Any] | None = None,
        *,
        maintained: MaintainedPrices | None = None,
    ) -> PriceTable:
        """The bundled table (or `data` shaped like prices.toml) over genai-prices (`maintained`;
        by default the installed package, loaded on first use), with overrides applied."""
        if data is None:
            text = resources.files("tokenwatch.core").joinpath("prices.toml").read_text("utf-8")
            data = tomllib.loads(text)
            maintained = maintained or INSTALLED
        table = cls._from_data(data, maintained)
        for model, settings in (overrides or {}).items():
            table = table._with_override(model, settings)
        return table

    @classmethod
    def _from_data(cls, data: Mapping[str, Any], maintained: MaintainedPrices | None) -> PriceTable:
        version = str(data.get("version", ""))
        if not version:
            raise PriceError("price table has no version date")
        prices = {
            name.lower(): _model_price(name, entry)
            for name, entry in dict(data.get("models", {})).items()
        }
        aliases: dict[str, str] = dict(data.get("aliases", {}))
        for alias, target in aliases.items():
            if target.lower() not in prices and maintained is None:
                raise PriceError(f"alias {alias!r} points at unknown model {target!r}")
        rules = [_alias_rule(i, entry) for i, entry in enumerate(data.get("rules", []))]
        fallback = {str(k): str(v) for k, v in dict(data.get("fallback", {})).items()}
        return cls(
            version,
            prices,
            aliases,
            rules,
            source=str(data.get("source", "")),
            fallback=fallback,
            maintained=maintained,
        )

    def _with_override(self, model: str, settings: PriceSettings) -> PriceTable:
        key = model.lower()
        # The rates an override leaves alone stay (this may load genai-prices; free needs none).
        resolved = None if settings.free else self.resolve(model)
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
            fallback=self._fallback,
            maintained=self.maintained,
        )

    def resolve(self, model: str) -> Resolution | None:
        """The model's price from the first table that knows it: an exact name, an explicit alias,
        then the ordered pattern rules; None if no table does (see `estimate`).

        A rule only applies when its result resolves too: nothing is guessed.
        """
        if model in self._resolved:
            return self._resolved[model]
        found = self._resolve(model.strip().lower(), _MAX_ALIAS_HOPS)
        resolution = None if found is None else replace(found, asked=model)
        if len(self._resolved) >= _CACHE_LIMIT:
            self._resolved.clear()  # model names are few; this only bounds a flood of junk
        self._resolved[model] = resolution
        return resolution

    def _resolve(self, name: str, hops: int, ours_only: bool = False) -> Resolution | None:
        """`ours_only`: ask only tokenwatch.toml and the bundled table."""
        found = self._known(name, ours_only=True)
        if found is None and not ours_only:
            found = self._overriding(name, hops) or self._known(name)
        if found is not None or hops == 0:
            return found
        for target, why in self._candidates(name):
            if target == name:
                continue
            found = self._resolve(target, hops - 1, ours_only)
            if found is not None:
                return replace(found, via=(f"{name} -> {target} ({why})", *found.via))
        return None

    def _overriding(self, name: str, hops: int) -> Resolution | None:
        """An override of a family (`claude-sonnet-4`) found through our aliases and rules: it
        wins for the family's snapshots before genai-prices' own match is asked."""
        if not self._overridden:
            return None
        mine = self._resolve(name, hops, ours_only=True)
        return mine if mine is not None and mine.overridden else None

    def _known(self, name: str, ours_only: bool = False) -> Resolution | None:
        price = self._prices.get(name)
        if price is not None:
            if name in self._overridden:
                return Resolution(name, price, overridden=True, source=CONFIG)
            return Resolution(name, price, source=BUNDLED, version=self.version)
        if ours_only or not name or self.maintained is None:
            return None
        entry = self.maintained.find(name)
        rates = entry.rates() if entry is not None else None
        if entry is None or rates is None:
            return None
        price = ModelPrice(
            entry.model,
            entry.provider,
            rates.input,
            rates.output,
            rates.cache_read,
            rates.cache_write,
            rates.reasoning,
        )
        overridden = entry.model.lower() in self._overridden
        if overridden:  # an override of the family applies to the names genai-prices maps to it
            return Resolution(
                name, self._prices[entry.model.lower()], overridden=True, source=CONFIG
            )
        return Resolution(
            name, price, source=MAINTAINED, version=self.maintained.version, found=entry
        )

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

    def fallback_model(self, provider: str = "") -> str:
        """The model whose rates stand in for one no table knows (per provider, else default)."""
        return self._fallback.get(provider.lower()) or self._fallback.get("default", "")

    def estimate(self, model: str, provider: str = "") -> Resolution | None:
        """The model's price, or the fallback's marked as an estimate for it; None only when
        even the fallback model is unknown (a broken install)."""
        known = self.resolve(model)
        if known is not None:
            return known
        stand_in = self.fallback_model(provider)
        found = self.resolve(stand_in) if stand_in else None
        if found is None:
            return None
        return replace(found, asked=model, via=(), estimated_from=found.price.model)

    def lookup(self, model: str) -> ModelPrice | None:
        resolved = self.resolve(model)
        return resolved.price if resolved is not None else None

    def estimated_from(self, model: str, provider: str = "") -> str:
        """The fallback model whose rates price `model` when no table knows it, else ""."""
        if self.known(model):
            return ""
        resolved = self.estimate(model, provider)
        return resolved.estimated_from if resolved is not None else ""

    def known(self, model: str) -> bool:
        """True when some table prices the model (not the fallback)."""
        return self.resolve(model) is not None

    def cost(self, event: UsageEvent) -> float | None:
        """USD for the call, at the fallback's rates for an unknown model; None only when the
        fallback is missing too."""
        resolved = self.estimate(event.model, event.provider)
        if resolved is None:
            return None
        return cost_of(resolved.rates(event.ts, event.input_tokens), event)

    def price(self, event: UsageEvent) -> UsageEvent:
        """Set `cost_usd`, `price_source` and `price_version` on the event (in place) and return
        it. A cost the provider reported (`price_source == "provider"`) is kept as reported."""
        if event.price_source == PROVIDER and event.cost_usd is not None:
            return event
        resolved = self.estimate(event.model, event.provider)
        if resolved is None:
            event.cost_usd, event.price_source, event.price_version = None, "", ""
            return event
        event.cost_usd = cost_of(resolved.rates(event.ts, event.input_tokens), event)
        event.price_source = resolved.price_source
        event.price_version = resolved.version
        return event

    def worst_case(
        self, model: str, input_tokens: int, max_output_tokens: int, provider: str = ""
    ) -> float | None:
        """Most a call can cost: all input uncached, all output at the dearest output rate (at
        the fallback's rates for an unknown model)."""
        resolved = self.estimate(model, provider)
        if resolved is None:
            return None
        price = resolved.rates(None, input_tokens)
        out_rate = max(price.output, price.reasoning or 0.0)
        in_rate = max(price.input, price.cache_write)
        return (input_tokens * in_rate + max_output_tokens * out_rate) / PER_TOKENS

    def models(self) -> list[ModelPrice]:
        """The bundled table with the overrides (genai-prices' models are looked up by name)."""
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
    known = {"provider", "input", "output", "cache_read", "cache_write", "reasoning", "note", "why"}
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
        why=str(entry.get("why", "")),
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
    return replace(
        base, model=model, provider=s.provider or base.provider, note="", why="", **rates
    )

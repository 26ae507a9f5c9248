"""Pricing: per-provider costs against hand arithmetic, explicit aliases, overrides, the data file."""

from __future__ import annotations

import re
import tomllib
from importlib import resources

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwatch.config import PriceSettings, parse_config
from tokenwatch.core.models import UsageEvent
from tokenwatch.core.pricing import PriceError, PriceTable

TABLE = PriceTable.load()


def usage(model: str, **kw: int) -> UsageEvent:
    return UsageEvent(model=model, **kw)  # type: ignore[arg-type]


def test_openai_cached_prompt_tokens_are_part_of_input() -> None:
    # OpenAI: prompt_tokens=10000 with prompt_tokens_details.cached_tokens=4000, completion 2000.
    # gpt-4o: $2.50 in, $1.25 cached, $10 out per 1M.
    # (10000-4000)*2.50 + 4000*1.25 + 2000*10 = 15000 + 5000 + 20000 = 40000 -> $0.04
    event = usage("gpt-4o", input_tokens=10_000, cache_read_tokens=4_000, output_tokens=2_000)
    assert TABLE.cost(event) == pytest.approx(0.04)


def test_openai_reasoning_tokens_bill_inside_output() -> None:
    # o3 ($2 in, $0.50 cached, $8 out): completion_tokens=3000 of which reasoning 2500.
    # (5000-1000)*2 + 1000*0.5 + 3000*8 = 8000 + 500 + 24000 = 32500 -> $0.0325
    event = usage(
        "o3-2025-04-16",
        input_tokens=5_000,
        cache_read_tokens=1_000,
        output_tokens=3_000,
        reasoning_tokens=2_500,
    )
    assert TABLE.cost(event) == pytest.approx(0.0325)


def test_anthropic_cache_reads_and_writes_each_at_their_rate() -> None:
    # Anthropic reports input_tokens=200 (uncached), cache_read_input_tokens=5000,
    # cache_creation_input_tokens=1000; normalised input_tokens = 6200.
    # claude-sonnet-4-5: $3 in, $0.30 cache read, $3.75 cache write, $15 out.
    # 200*3 + 5000*0.30 + 1000*3.75 + 400*15 = 600 + 1500 + 3750 + 6000 = 11850 -> $0.01185
    event = usage(
        "claude-sonnet-4-5-20250929",
        input_tokens=6_200,
        cache_read_tokens=5_000,
        cache_write_tokens=1_000,
        output_tokens=400,
    )
    assert TABLE.cost(event) == pytest.approx(0.01185)


def test_gemini_thinking_tokens_bill_as_output() -> None:
    # gemini-2.5-flash: $0.30 in, $0.03 cached, $2.50 out; 1500 output incl. 1000 thinking.
    # (20000-8000)*0.30 + 8000*0.03 + 1500*2.50 = 3600 + 240 + 3750 = 7590 -> $0.00759
    event = usage(
        "gemini-2.5-flash",
        input_tokens=20_000,
        cache_read_tokens=8_000,
        output_tokens=1_500,
        reasoning_tokens=1_000,
    )
    assert TABLE.cost(event) == pytest.approx(0.00759)


def test_separate_reasoning_rate_splits_output() -> None:
    table = PriceTable.load(
        {"thinker": PriceSettings(input=1.0, output=2.0, reasoning=4.0, provider="acme")}
    )
    # 1000*1 + (500-200)*2 + 200*4 = 1000 + 600 + 800 = 2400 -> $0.0024
    event = usage("thinker", input_tokens=1_000, output_tokens=500, reasoning_tokens=200)
    assert table.cost(event) == pytest.approx(0.0024)


def test_unknown_model_is_unpriced_never_zero() -> None:
    event = usage("gpt-9-ultra", input_tokens=100, output_tokens=100)
    assert TABLE.cost(event) is None
    TABLE.price(event)
    assert event.cost_usd is None
    assert event.priced is False
    assert event.price_version == ""
    assert TABLE.worst_case("gpt-9-ultra", 10, 10) is None


def test_price_stamps_cost_and_table_version() -> None:
    event = TABLE.price(usage("gpt-4o-mini", input_tokens=1_000_000, output_tokens=1_000_000))
    assert event.cost_usd == pytest.approx(0.15 + 0.60)
    assert event.price_version == TABLE.version


def test_worst_case_assumes_nothing_cached() -> None:
    # gpt-4o: 1000*2.50 + 500*10 = 7500 -> $0.0075
    assert TABLE.worst_case("gpt-4o", 1_000, 500) == pytest.approx(0.0075)
    # Anthropic: cache writes cost more than input, so the worst case uses them.
    # claude-haiku-4-5: 1000*1.25 + 500*5 = 3750 -> $0.00375
    assert TABLE.worst_case("claude-haiku-4-5", 1_000, 500) == pytest.approx(0.00375)


@pytest.mark.parametrize(
    ("asked", "family"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4-1106-preview", "gpt-4-turbo"),
        ("GPT-4o", "gpt-4o"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("claude-3-7-sonnet-20250219", "claude-3-7-sonnet"),
        ("anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet"),
        ("claude-opus-4-1@20250805", "claude-opus-4-1"),
        ("gemini-2.5-flash-preview-05-20", "gemini-2.5-flash"),
        ("models/gemini-2.0-flash-001", "gemini-2.0-flash"),
        ("openai/gpt-4o-mini", "gpt-4o-mini"),
        ("meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo", "llama-3.1-8b-instruct"),
        ("mistral-large-latest", "mistral-large"),
    ],
)
def test_snapshots_map_to_their_family_by_explicit_rules(asked: str, family: str) -> None:
    resolved = TABLE.resolve(asked)
    assert resolved is not None
    assert resolved.price.model == family
    if asked.lower() != family:
        assert resolved.via  # the path taken is shown, never silent


@pytest.mark.parametrize(
    "asked",
    ["gpt-4o-minix", "gpt-9-2025-01-01", "claude-sonnet-5-20260101", "my-gpt-4o", "gpt4o", ""],
)
def test_no_fuzzy_guessing(asked: str) -> None:
    assert TABLE.resolve(asked) is None


def test_overrides_change_rates_add_models_and_declare_free() -> None:
    cfg = parse_config(
        tomllib.loads(
            """
            [prices."gpt-4o"]
            input = 2.0
            [prices."llama3.1:8b"]
            free = true
            [prices."house-model"]
            provider = "acme"
            input = 0.5
            output = 1.5
            """
        )
    )
    table = PriceTable.load(cfg.prices)
    gpt = table.lookup("gpt-4o-2024-08-06")
    assert gpt is not None
    assert (gpt.input, gpt.output, gpt.cache_read) == (2.0, 10.0, 1.25)
    resolved = table.resolve("gpt-4o-2024-08-06")
    assert resolved is not None
    assert resolved.overridden
    local = usage("llama3.1:8b", input_tokens=10**6, output_tokens=10**6)
    assert table.cost(local) == 0.0
    # 1000*0.5 + 1000*1.5 = 2000 -> $0.002 (cache rates default to input)
    house = usage("house-model", input_tokens=1_000, output_tokens=1_000, cache_read_tokens=0)
    assert table.cost(house) == pytest.approx(0.002)
    assert TABLE.lookup("house-model") is None  # the bundled table is untouched


def test_override_for_unknown_model_needs_rates() -> None:
    with pytest.raises(PriceError, match=r'prices\."mystery".*input and output'):
        PriceTable.load({"mystery": PriceSettings(input=1.0)})


def test_bad_price_data_is_named() -> None:
    with pytest.raises(PriceError, match=r"'m'.*'output'"):
        PriceTable.load(data={"version": "2026-01-01", "models": {"m": {"input": 1}}})
    with pytest.raises(PriceError, match="unknown model"):
        PriceTable.load(data={"version": "2026-01-01", "models": {}, "aliases": {"a": "nowhere"}})


def test_bundled_table_covers_the_families_people_use() -> None:
    data = tomllib.loads(
        resources.files("tokenwatch.core").joinpath("prices.toml").read_text("utf-8")
    )
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", data["version"])
    wanted = {
        "openai": ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o1",
                   "o3", "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano",
                   "text-embedding-3-small", "text-embedding-3-large"],
        "anthropic": ["claude-opus-4-1", "claude-opus-4", "claude-sonnet-4-5", "claude-sonnet-4",
                      "claude-haiku-4-5", "claude-3-5-haiku", "claude-3-7-sonnet"],
        "google": ["gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite",
                   "gemini-2.0-flash"],
    }  # fmt: skip
    for provider, models in wanted.items():
        for model in models:
            price = TABLE.lookup(model)
            assert price is not None, model
            assert price.provider == provider
    assert {p.provider for p in TABLE.models()} >= {"deepseek", "meta", "mistral", "qwen"}


@given(
    model=st.sampled_from([p.model for p in TABLE.models()]),
    uncached=st.integers(0, 10**7),
    cache_read=st.integers(0, 10**7),
    cache_write=st.integers(0, 10**7),
    output=st.integers(0, 10**7),
    reasoning=st.integers(0, 10**7),
)
def test_cache_hits_never_cost_more_than_uncached_input(
    model: str, uncached: int, cache_read: int, cache_write: int, output: int, reasoning: int
) -> None:
    common = {"output_tokens": output, "reasoning_tokens": min(reasoning, output)}
    total_in = uncached + cache_read + cache_write
    cached = usage(
        model,
        input_tokens=total_in,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        **common,
    )
    as_plain = usage(model, input_tokens=total_in - cache_write, **common)
    cost = TABLE.cost(cached)
    plain = TABLE.cost(as_plain)
    assert cost is not None
    assert plain is not None
    assert cost >= 0
    # Same tokens with the reads uncached instead: never cheaper (cache writes aside).
    write_rate = TABLE.lookup(model).cache_write  # type: ignore[union-attr]
    assert cost - cache_write * write_rate / 1e6 <= plain + 1e-9

"""Pricing: per-provider costs against hand arithmetic, explicit aliases, overrides, the data file."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
import tomllib
from importlib import resources

import genai_prices
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwatch.config import PriceSettings, parse_config
from tokenwatch.core.maintained_prices import MaintainedPrices
from tokenwatch.core.models import UsageEvent
from tokenwatch.core.pricing import PriceError, PriceTable, is_estimated

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


def test_unknown_model_is_priced_by_the_fallback_and_marked() -> None:
    event = usage("acme-coder-7", input_tokens=1_000, output_tokens=1_000)
    TABLE.price(event)
    # claude-opus-4-5 stands in: 1000*5 + 1000*25 = 30000 -> $0.03, never a silent $0
    assert event.cost_usd == pytest.approx(0.03)
    assert event.price_source == "estimated:claude-opus-4-5"
    assert is_estimated(event.price_source)
    assert TABLE.resolve("acme-coder-7") is None
    assert TABLE.worst_case("acme-coder-7", 1_000, 1_000) == pytest.approx(
        (1_000 * 6.25 + 1_000 * 25) / 1e6
    )
    # The provider's own fallback when it has one.
    openai = TABLE.price(usage("acme-coder-7", input_tokens=1_000, output_tokens=1_000))
    openai_call = UsageEvent(model="acme-coder-7", provider="openai", output_tokens=1_000)
    assert TABLE.price(openai_call).price_source == "estimated:gpt-5.5"
    assert openai.cost_usd == pytest.approx(0.03)


def test_declared_free_models_cost_zero_on_purpose() -> None:
    table = PriceTable.load({"llama3.1:8b": PriceSettings(free=True)})
    event = table.price(usage("llama3.1:8b", input_tokens=10**6, output_tokens=10**6))
    assert event.cost_usd == 0.0
    assert event.price_source == "tokenwatch.toml"


def test_a_cost_the_provider_reported_wins_and_is_kept_as_reported() -> None:
    event = usage("gpt-4o", input_tokens=10**6, output_tokens=10**6)
    event.cost_usd, event.price_source = 0.1234, "provider"
    TABLE.price(event)
    assert (event.cost_usd, event.price_source) == (0.1234, "provider")


def test_price_sources_are_stamped_with_their_version() -> None:
    maintained = TABLE.price(usage("gpt-4o-mini", input_tokens=10))
    assert maintained.price_source == "genai-prices"
    assert maintained.price_version == genai_prices.__version__
    bundled = TABLE.price(usage("text-embedding-3-small", input_tokens=10))
    assert (bundled.price_source, bundled.price_version) == ("tokenwatch", TABLE.version)


def test_tiered_and_historic_prices_follow_the_call() -> None:
    # claude-sonnet-4-6 billed prompts over 200k at $6 in / $22.50 out until 2026-03-13, then
    # one rate ($3 / $15) at any length. 300k in, 1k out:
    before = usage("claude-sonnet-4-6", input_tokens=300_000, output_tokens=1_000)
    before.ts = dt.datetime(2026, 2, 1, tzinfo=dt.UTC).timestamp()
    after = usage("claude-sonnet-4-6", input_tokens=300_000, output_tokens=1_000)
    after.ts = dt.datetime(2026, 6, 1, tzinfo=dt.UTC).timestamp()
    # 300000*6 + 1000*22.5 = 1822500 -> $1.8225; 300000*3 + 1000*15 = 915000 -> $0.915
    assert TABLE.cost(before) == pytest.approx(1.8225)
    assert TABLE.cost(after) == pytest.approx(0.915)
    # Under the tier's start the base rate applies: 100000*6 ... no: 100000*3 + 1000*15
    short = usage("claude-sonnet-4-6", input_tokens=100_000, output_tokens=1_000)
    short.ts = before.ts
    assert TABLE.cost(short) == pytest.approx(0.315)


def test_pricing_needs_no_network() -> None:
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network used')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from tokenwatch.core.models import UsageEvent\n"
        "from tokenwatch.core.pricing import PriceTable\n"
        "e = PriceTable.load().price(UsageEvent(model='claude-opus-4-5', output_tokens=10**6))\n"
        "print(e.cost_usd, e.price_source)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["25.0", "genai-prices"]


# Twenty current models from five providers, each call 10,000 prompt tokens of which 4,000 cache
# reads (and, for Anthropic, 1,000 cache writes), 2,000 output tokens of which 1,500 reasoning
# (billed as output by every one of them). Rates (USD per 1M) from the providers' pricing pages:
# (prompt - reads - writes) x input + reads x cache read + writes x cache write + output x output.
TWENTY = [
    ("gpt-5", 0, 0.028),  # 6000*1.25 + 4000*0.125 + 2000*10
    ("gpt-5-mini", 0, 0.0056),  # 6000*0.25 + 4000*0.025 + 2000*2
    ("gpt-5-codex", 0, 0.028),  # 6000*1.25 + 4000*0.125 + 2000*10
    ("gpt-5.1-codex", 0, 0.028),  # 6000*1.25 + 4000*0.125 + 2000*10
    ("gpt-5.2", 0, 0.0392),  # 6000*1.75 + 4000*0.175 + 2000*14
    ("gpt-4.1", 0, 0.03),  # 6000*2 + 4000*0.5 + 2000*8
    ("gpt-4o-mini-2024-07-18", 0, 0.0024),  # 6000*0.15 + 4000*0.075 + 2000*0.6
    ("o4-mini", 0, 0.0165),  # 6000*1.1 + 4000*0.275 + 2000*4.4
    ("claude-opus-4-5-20251101", 1000, 0.08325),  # 5000*5 + 4000*0.5 + 1000*6.25 + 2000*25
    ("claude-sonnet-4-5-20250929", 1000, 0.04995),  # 5000*3 + 4000*0.3 + 1000*3.75 + 2000*15
    ("claude-haiku-4-5-20251001", 1000, 0.01665),  # 5000*1 + 4000*0.1 + 1000*1.25 + 2000*5
    ("claude-opus-4-1", 1000, 0.24975),  # 5000*15 + 4000*1.5 + 1000*18.75 + 2000*75
    ("claude-sonnet-4-6", 1000, 0.04995),  # 5000*3 + 4000*0.3 + 1000*3.75 + 2000*15
    ("gemini-2.5-pro", 0, 0.028),  # 6000*1.25 + 4000*0.125 + 2000*10
    ("gemini-2.5-flash", 0, 0.00692),  # 6000*0.3 + 4000*0.03 + 2000*2.5
    ("gemini-2.5-flash-lite", 0, 0.00144),  # 6000*0.1 + 4000*0.01 + 2000*0.4
    ("gemini-3-pro-preview", 0, 0.0368),  # 6000*2 + 4000*0.2 + 2000*12
    ("deepseek-chat", 0, 0.002632),  # 6000*0.28 + 4000*0.028 + 2000*0.42
    ("deepseek-reasoner", 0, 0.002632),  # 6000*0.28 + 4000*0.028 + 2000*0.42
    ("mistral-large-latest", 0, 0.032),  # 6000*2 + 4000*2 + 2000*6 (no cache discount)
]


@pytest.mark.parametrize(("model", "cache_write", "expected"), TWENTY)
def test_twenty_current_models_against_hand_arithmetic(
    model: str, cache_write: int, expected: float
) -> None:
    event = usage(
        model,
        input_tokens=10_000,
        cache_read_tokens=4_000,
        cache_write_tokens=cache_write,
        output_tokens=2_000,
        reasoning_tokens=1_500,
    )
    TABLE.price(event)
    assert event.cost_usd == pytest.approx(expected)
    assert not is_estimated(event.price_source)


def test_price_stamps_cost_and_table_version() -> None:
    event = TABLE.price(usage("gpt-4o-mini", input_tokens=1_000_000, output_tokens=1_000_000))
    assert event.cost_usd == pytest.approx(0.15 + 0.60)
    assert event.price_version == genai_prices.__version__


def test_worst_case_assumes_nothing_cached() -> None:
    # gpt-4o: 1000*2.50 + 500*10 = 7500 -> $0.0075
    assert TABLE.worst_case("gpt-4o", 1_000, 500) == pytest.approx(0.0075)
    # Anthropic: cache writes cost more than input, so the worst case uses them.
    # claude-haiku-4-5: 1000*1.25 + 500*5 = 3750 -> $0.00375
    assert TABLE.worst_case("claude-haiku-4-5", 1_000, 500) == pytest.approx(0.00375)


@pytest.mark.parametrize(
    ("asked", "family", "source"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o", "genai-prices"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini", "genai-prices"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini", "genai-prices"),
        ("GPT-4o", "gpt-4o", "genai-prices"),
        ("gpt-5-codex", "gpt-5", "genai-prices"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5", "genai-prices"),
        ("claude-opus-4-1@20250805", "claude-opus-4-1", "genai-prices"),
        ("chatgpt-4o-latest", "gpt-4o", "genai-prices"),
        ("anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet", "genai-prices"),
        ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5", "genai-prices"),
        ("models/gemini-2.5-flash", "gemini-2.5-flash", "genai-prices"),
        ("openai/gpt-4o-mini", "openai/gpt-4o-mini", "genai-prices"),
        ("meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo", "llama-3.1-8b-instruct", "tokenwatch"),
        ("codestral", "codestral", "tokenwatch"),
    ],
)
def test_names_resolve_through_the_chain(asked: str, family: str, source: str) -> None:
    resolved = TABLE.resolve(asked)
    assert resolved is not None
    assert (resolved.price.model, resolved.source) == (family, source)


@pytest.mark.parametrize("asked", ["gpt-4o-minix", "my-gpt-4o", "gpt4o", "acme-coder-7", ""])
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


def test_an_override_of_a_family_wins_for_its_snapshots() -> None:
    # genai-prices maps claude-sonnet-4-20250514 to its own id (claude-sonnet-4-0); the user's
    # override of the family name still applies, found through the Anthropic snapshot rule.
    table = PriceTable.load({"claude-sonnet-4": PriceSettings(output=30.0)})
    resolved = table.resolve("claude-sonnet-4-20250514")
    assert resolved is not None
    assert (resolved.source, resolved.price.output, resolved.price.input) == (
        "tokenwatch.toml",
        30.0,
        3.0,
    )
    other = table.resolve("claude-sonnet-4-5-20250929")
    assert other is not None
    assert other.source == "genai-prices"  # another family is untouched


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


def test_bundled_table_holds_only_what_genai_prices_lacks_each_saying_why() -> None:
    maintained = MaintainedPrices()
    for price in TABLE.models():
        assert price.why, f"{price.model}: a bundled entry says why it is here"
        theirs = maintained.find(price.model)
        rates = theirs.rates() if theirs is not None else None
        if rates is not None:  # a correction: it must differ, or it is a duplicate to drop
            assert (rates.input, rates.output) != (price.input, price.output), price.model


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

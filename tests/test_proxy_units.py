"""Proxy parts on their own: SSE splitting, Host names, upstream URLs, usage normalisation."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwatch.config import ProxySettings
from tokenwatch.proxy import anthropic_usage, openai_usage
from tokenwatch.proxy.partial import cut_text
from tokenwatch.proxy.routes import (
    AgentRoute,
    RouteTable,
    load_routes,
    loopback_host,
    save_routes,
    split_path,
    upstream_url,
)
from tokenwatch.proxy.sse import SseSplitter, parse_event
from tokenwatch.proxy.usage import cost_from_headers

EVENT_TEXT = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=40
)


def sse_stream(payloads: list[str]) -> bytes:
    return b"".join(b"data: " + p.encode() + b"\n\n" for p in payloads)


@given(st.lists(EVENT_TEXT, max_size=12), st.lists(st.integers(1, 64), max_size=30))
def test_any_chunking_yields_the_same_events_and_bytes(
    payloads: list[str], cuts: list[int]
) -> None:
    stream = sse_stream(payloads)
    splitter = SseSplitter()
    events = []
    at = 0
    for size in [*cuts, len(stream)]:
        events += splitter.feed(stream[at : at + size])
        at += size
    assert [e.data.decode() for e in events] == payloads
    assert b"".join(e.raw for e in events) + splitter.rest() == stream


def test_event_names_and_multiline_data() -> None:
    event = parse_event(b'event: message_delta\ndata: {"a":\ndata: 1}\n\n')
    assert event.name == "message_delta"
    assert orjson.loads(event.data) == {"a": 1}


@given(st.sampled_from(["localhost", "127.0.0.1", "[::1]", "LOCALHOST"]), st.integers(1, 65535))
def test_loopback_names_with_our_port_pass(name: str, port: int) -> None:
    assert loopback_host(f"{name}:{port}", port)
    assert loopback_host(name, port)
    assert not loopback_host(f"{name}:{port % 65535 + 1}", port)


@given(st.text(max_size=30))
def test_other_hosts_fail(host: str) -> None:
    name = host.split(":")[0].lower().strip()
    if name not in {"localhost", "127.0.0.1", "[::1]"}:
        assert not loopback_host(host, 8080)


def test_upstream_precedence_model_then_agent_then_proxy_then_public() -> None:
    settings = ProxySettings(
        openai_upstream="http://proxy-default/v1",
        model_upstreams={"llama*": "http://127.0.0.1:11434/v1"},
    )
    target = split_path("/a/tok/v1/chat/completions", {})
    assert target is not None
    mine = AgentRoute(agent="a", openai_upstream="http://agent-own/v1")
    bare = AgentRoute(agent="b")
    assert upstream_url(settings, mine, target, "llama3", "") == (
        "http://127.0.0.1:11434/v1/chat/completions"
    )
    assert upstream_url(settings, mine, target, "gpt-4o", "x=1") == (
        "http://agent-own/v1/chat/completions?x=1"
    )
    assert upstream_url(settings, bare, target, "gpt-4o", "") == (
        "http://proxy-default/v1/chat/completions"
    )
    assert upstream_url(ProxySettings(), bare, target, "gpt-4o", "") == (
        "https://api.openai.com/v1/chat/completions"
    )
    messages = split_path("/a/tok/v1/messages", {})
    assert messages is not None
    assert messages.provider == "anthropic"
    assert upstream_url(ProxySettings(), bare, messages, "claude", "") == (
        "https://api.anthropic.com/v1/messages"
    )


def test_an_upstream_query_string_comes_after_the_path_with_the_agents_own() -> None:
    settings = ProxySettings(openai_upstream="https://az.example/openai/v1?api-version=2024-10-21")
    target = split_path("/a/tok/v1/chat/completions", {})
    assert target is not None
    bare = AgentRoute(agent="b")
    assert upstream_url(settings, bare, target, "gpt-4o", "") == (
        "https://az.example/openai/v1/chat/completions?api-version=2024-10-21"
    )
    assert upstream_url(settings, bare, target, "gpt-4o", "x=1") == (
        "https://az.example/openai/v1/chat/completions?api-version=2024-10-21&x=1"
    )


def test_models_list_goes_to_the_provider_that_asked() -> None:
    openai_side = split_path("/a/tok/v1/models", {})
    anthropic_side = split_path("/a/tok/v1/models", {"anthropic-version": "2023-06-01"})
    assert openai_side is not None
    assert anthropic_side is not None
    assert (openai_side.provider, anthropic_side.provider) == ("openai", "anthropic")


def test_route_tokens_are_unique_and_tasks_follow_the_agent() -> None:
    table = RouteTable()
    one = table.add(AgentRoute(agent="coder"))
    two = table.add(AgentRoute(agent="coder"))
    assert one != two
    table.set_task("coder", "fix-bug")
    assert {table.get(one).task, table.get(two).task} == {"fix-bug"}  # type: ignore[union-attr]
    table.remove(one)
    assert table.get(one) is None


def test_anthropic_usage_counts_cache_inside_input() -> None:
    start = {
        "input_tokens": 10,
        "cache_read_input_tokens": 1000,
        "cache_creation_input_tokens": 50,
        "output_tokens": 1,
    }
    first = anthropic_usage.usage_from(start)
    final = anthropic_usage.usage_from({"output_tokens": 321}, first)
    assert final is not None
    assert (final.input_tokens, final.cache_read_tokens, final.cache_write_tokens) == (
        1060,
        1000,
        50,
    )
    assert final.output_tokens == 321


def test_a_cost_the_provider_reports_is_read_as_reported() -> None:
    # OpenRouter's usage carries what the call was billed.
    doc = {"prompt_tokens": 10, "completion_tokens": 2, "cost": 0.000123}
    usage = openai_usage.usage_from(doc, "/v1/chat/completions")
    assert usage is not None
    assert usage.cost_usd == 0.000123
    for bad in ("lots", -1, True, float("nan"), None):
        usage = openai_usage.usage_from({**doc, "cost": bad}, "/v1/chat/completions")
        assert usage is not None
        assert usage.cost_usd is None, bad
    assert cost_from_headers([("X-LiteLLM-Response-Cost", "0.0042")]) == 0.0042
    assert cost_from_headers([("x-litellm-response-cost", "free")]) is None
    assert cost_from_headers([("content-type", "application/json")]) is None


def test_ask_for_usage_only_when_the_client_did_not() -> None:
    body = {"model": "m", "messages": [], "stream": True}
    asked = openai_usage.ask_for_usage("/v1/chat/completions", body)
    assert asked is not None
    assert orjson.loads(asked)["stream_options"] == {"include_usage": True}
    already = {**body, "stream_options": {"include_usage": True}}
    assert openai_usage.ask_for_usage("/v1/chat/completions", already) is None
    assert openai_usage.ask_for_usage("/v1/chat/completions", {**body, "stream": False}) is None
    assert openai_usage.ask_for_usage("/v1/embeddings", body) is None


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


PIECES = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=8)


@given(PIECES, st.integers(0, 10_000), st.integers(0, 5000), st.lists(st.integers(0, 10**6)))
def test_chat_stream_usage_and_text_survive_any_chunking(
    pieces: list[str], prompt: int, cached: int, cuts: list[int]
) -> None:
    usage = {
        "prompt_tokens": prompt + cached,
        "completion_tokens": len(pieces),
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    chunks = [{"choices": [{"index": 0, "delta": {"content": p}}], "usage": None} for p in pieces]
    docs = [*chunks, {"choices": [], "usage": usage}]
    stream = b"".join(b"data: " + orjson.dumps(d) + b"\n\n" for d in docs) + b"data: [DONE]\n\n"
    reader = openai_usage.OpenAIReader("/v1/chat/completions", strip_usage=True)
    splitter = SseSplitter()
    kept = b"".join(
        e.raw
        for part in split_at(stream, cuts)
        for e in splitter.feed(part)
        if reader.read_event(e)
    )
    assert reader.complete
    assert reader.usage == openai_usage.usage_from(usage, "/v1/chat/completions")
    assert reader.usage is not None
    assert reader.usage.cache_read_tokens == cached
    assert reader.output_text() == "".join(pieces)
    assert b'"usage":{' not in kept  # the asked-for usage chunk is cut out, nothing else
    assert kept.count(b"\n\n") == len(pieces) + 1


@given(PIECES, st.integers(0, 10_000), st.integers(0, 5000), st.lists(st.integers(0, 10**6)))
def test_anthropic_stream_usage_survives_any_chunking(
    pieces: list[str], fresh: int, reads: int, cuts: list[int]
) -> None:
    start_usage = {"input_tokens": fresh, "cache_read_input_tokens": reads, "output_tokens": 1}
    events = [
        ("message_start", {"type": "message_start", "message": {"usage": start_usage}}),
        *[
            ("content_block_delta", {"type": "content_block_delta", "delta": {"text": p}})
            for p in pieces
        ],
        ("message_delta", {"type": "message_delta", "usage": {"output_tokens": len(pieces)}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    stream = b"".join(
        b"event: " + name.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"
        for name, doc in events
    )
    reader = anthropic_usage.AnthropicReader()
    splitter = SseSplitter()
    for part in split_at(stream, cuts):
        for event in splitter.feed(part):
            reader.read_event(event)
    assert reader.complete
    assert reader.usage is not None
    assert (reader.usage.input_tokens, reader.usage.cache_read_tokens) == (fresh + reads, reads)
    assert reader.usage.output_tokens == len(pieces)
    assert reader.output_text() == "".join(pieces)


def test_saved_routes_come_back_private_and_without_credentials(short_tmp: Path) -> None:
    table = RouteTable()
    kept = table.add(
        AgentRoute("coder", run_id="r1", tags={"team": "a"}, openai_upstream="http://h/v1")
    )
    table.add(AgentRoute("keyed", openai_upstream="https://sk-secret@gateway.example/v1"))
    table.add(AgentRoute("queried", anthropic_upstream="https://gw.example/?key=sk-secret2"))
    table.add(AgentRoute("broken", openai_upstream="http://[::1/v1"))
    path = short_tmp / "proxy-routes.json"
    save_routes(path, 4321, table)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"sk-secret" not in path.read_bytes()
    saved = load_routes(path)
    assert saved.port == 4321
    assert saved.routes == {kept: table.get(kept)}


def test_unreadable_saved_routes_are_ignored_with_a_warning(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = short_tmp / "proxy-routes.json"
    assert load_routes(path).routes == {}  # none yet: nothing to say
    path.write_text('{"format": 1, "port": "x", "routes": [')
    with caplog.at_level(logging.WARNING, logger="tokenwatch.proxy"):
        assert load_routes(path).port == 0
    assert f"ignoring the saved proxy routes in {path}" in caplog.text


def chat_reply(text: str, arguments: str) -> bytes:
    message = {"role": "assistant", "content": text, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}]}  # fmt: skip
    return orjson.dumps({"choices": [{"message": message}], "usage": {"prompt_tokens": 1}})


@given(text=st.text(max_size=30), arguments=st.text(max_size=30), cut=st.integers(0, 400))
def test_the_text_of_a_json_body_cut_anywhere_is_read_up_to_the_cut(
    text: str, arguments: str, cut: int
) -> None:
    body = chat_reply(text, arguments)
    assert cut_text(body) == text + arguments
    partial = cut_text(body[:cut])  # never raises, whatever the cut splits
    if cut >= body.index(b'"tool_calls"'):
        assert partial.startswith(text)  # what arrived whole is read exactly


def test_text_values_of_every_shape_are_read_and_keys_inside_strings_are_not() -> None:
    anthropic = b'{"content":[{"type":"thinking","thinking":"hmm"},{"type":"text","text":"Hi'
    assert cut_text(anthropic) == "hmmHi"
    escaped = orjson.dumps({"output": [{"arguments": '{"content": "not a key"}'}]})
    assert cut_text(escaped) == '{"content": "not a key"}'
    assert cut_text(b'{"choices":[{"text":"caf\\u00e9 \\n') == "café \n"

"""Benchmark: encoding load time, token counting throughput, and the fake LLM's request rate.

Run: .venv/bin/python bench/bench_tokens.py
Each figure is the median of several runs on this machine, printed with how it was measured.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import aiohttp
import anyio

from tokenwatch.core.tokens import count_messages, count_text
from tokenwatch.demo.fake_llm import running_fake_llm

RUNS = 5


def median_seconds(fn: Callable[[], object], runs: int = RUNS) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_time(model: str, cold: bool) -> float:
    """Seconds for a fresh interpreter to import tokens.py and count one word for `model`."""
    cache = tempfile.mkdtemp(prefix="tw-bench-") if cold else ""
    env_code = f"import os; os.environ['TIKTOKEN_CACHE_DIR'] = {cache!r}\n" if cold else ""
    code = (
        env_code + "import time\n"
        "from tokenwatch.core.tokens import count_text\n"
        "t = time.perf_counter()\n"
        f"count_text('x', {model!r})\n"
        "print(time.perf_counter() - t)\n"
    )
    outs = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(3)
    ]
    return statistics.median(outs)


def bench_counting() -> None:
    text = "The quick brown fox jumps over the lazy dog; tokenwatch counts tokens. " * 14_000
    megabytes = len(text.encode()) / 1e6
    for model in ("gpt-4", "gpt-4o"):
        count_text("warm", model)
        seconds = median_seconds(lambda m=model: count_text(text, m))  # type: ignore[misc]
        print(f"  count_text {model:7} {megabytes:.1f} MB: {megabytes / seconds:6.1f} MB/s")
    convo = [
        {"role": "user" if i % 2 else "assistant", "content": f"Please refactor module {i}." * 20}
        for i in range(100)
    ]
    per_call = median_seconds(lambda: count_messages(convo, "gpt-4o"), runs=21)
    print(f"  count_messages, 100 messages of ~100 tokens: {per_call * 1e3:.2f} ms a call")


async def bench_fake_llm() -> None:
    body = json.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "Benchmark me."}]}
    )
    stream_body = json.dumps(
        {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "Stream."}]}
    )
    headers = {"Authorization": "Bearer bench", "Content-Type": "application/json"}
    async with running_fake_llm() as fake, aiohttp.ClientSession() as session:
        url = fake.url + "/v1/chat/completions"
        for label, payload in (("JSON", body), ("SSE stream", stream_body)):
            n = 300
            start = time.perf_counter()
            for _ in range(n):
                async with session.post(url, data=payload, headers=headers) as resp:
                    await resp.read()
            rate = n / (time.perf_counter() - start)
            print(f"  fake-llm chat completions, {label:10}: {rate:6.0f} requests/s (sequential)")


def main() -> None:
    print("Encoding load (fresh interpreter, median of 3):")
    print(f"  cl100k_base: {load_time('gpt-4', cold=False) * 1e3:.0f} ms")
    print(f"  o200k_base, cache warm: {load_time('gpt-4o', cold=False) * 1e3:.0f} ms")
    print(
        f"  o200k_base, cache empty (rebuilt from quicktok): {load_time('gpt-4o', cold=True) * 1e3:.0f} ms"
    )
    print(f"Counting (median of {RUNS}):")
    bench_counting()
    print("fake-llm (in-process server, one aiohttp client, 300 requests each):")
    anyio.run(bench_fake_llm)


if __name__ == "__main__":
    main()

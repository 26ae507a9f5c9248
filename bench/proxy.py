"""Benchmark: what tokenwatch's proxy adds to latency and time to first token, against calling the
same trivial upstream directly, at concurrency 1, at a fixed offered rate, and at the highest rate
it sustains with p99 under 50 ms.

Method: the upstream (bench/trivial_upstream.py: a raw asyncio protocol answering a fixed chat
completion, or 50 SSE chunks plus a usage chunk, for a few microseconds of CPU each) and the proxy
(ProxyServer with a gate that admits everything, so the figure is the proxy's own cost) each run in
their own process, like the supervisor does. `--pin` puts the proxy on a CPU of its own (the last)
and the rest on CPU 0; on the 2-core VM this was measured slower at every load (each hop becomes
a cross-CPU wake-up), so by default the scheduler places them. Latency, p50/p99 and TTFT come from a Python
aiohttp client (open loop, here): direct and proxied runs interleaved in blocks so machine noise
hits both alike; latency from the scheduled send time to the last body byte (time queued behind
the in-flight cap counts), TTFT to the first body byte. The sustained rate is a closed-loop ramp
with Debian's `wrk` (`apt-get install wrk`; C, costs microseconds per request) at 1 to 32
connections, p99 from `wrk --latency`; without wrk it falls back, saying so, to the Python open-loop
ramp, whose own CPU caps the figure at a few thousand requests/s.

    .venv/bin/python bench/proxy.py            # full run (about two minutes)
    .venv/bin/python bench/proxy.py --quick    # smaller samples
    .venv/bin/python bench/proxy.py --in-process   # one loop: the proxy's own CPU cost
    .venv/bin/python bench/proxy.py --quick --cache-miss   # response cache on, every call a miss

`--cache-miss` goes with either mode; alternate runs with and without it to see its cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import trivial_upstream
import wrk

BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    "max_tokens": 64,
}


# -- the proxy (own process) ------------------------------------------------------------------


class _OpenGate:
    """Admits everything and records nothing: the benchmark measures the proxy alone."""

    async def admit(self, call: Any) -> Any:
        from tokenwatch.core.admission import Admission

        return Admission(True)

    async def settle(self, admission: Any, event: Any) -> None:
        return None


def _cache_on_miss_path(directory: str) -> Any:
    """Levers with the response cache on, every lookup a miss: the benchmark's requests are all
    alike, so a TTL of a microsecond makes each stored answer stale before the next call. The
    miss path is then paid in full: key, lookup, capture, and the store's write (batched in its
    thread)."""
    from tokenwatch.config import CacheSettings, OptimizeSettings
    from tokenwatch.proxy.levers import Levers

    cache = CacheSettings(enabled=True, any_temperature=True, ttl=1e-6)
    return Levers(OptimizeSettings(cache=cache), cache_path=Path(directory) / "cache.db")


async def run_proxy(upstream: str, cache_dir: str = "") -> None:
    import anyio

    from tokenwatch.config import ProxySettings
    from tokenwatch.proxy.server import AgentRoute, ProxyServer, RouteTable

    routes = RouteTable()
    token = routes.add(AgentRoute(agent="bench"))
    levers = _cache_on_miss_path(cache_dir) if cache_dir else None
    proxy = ProxyServer(_OpenGate(), routes, ProxySettings(openai_upstream=upstream), levers=levers)
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        print(proxy.base_urls(token)["OPENAI_BASE_URL"], flush=True)


# -- the load generator -----------------------------------------------------------------------


@dataclass
class Sample:
    latency_ms: list[float]
    ttft_ms: list[float]
    errors: int
    seconds: float

    def pct(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _one(
    http: aiohttp.ClientSession, url: str, payload: bytes, start: float, sample: Sample
) -> None:
    first: float | None = None
    try:
        async with http.post(url, data=payload, headers=HEADERS) as resp:
            async for _ in resp.content.iter_any():
                if first is None:
                    first = time.perf_counter()
            ok = resp.status == 200
    except aiohttp.ClientError:
        ok = False
    end = time.perf_counter()
    if not ok or first is None:
        sample.errors += 1
        return
    sample.latency_ms.append((end - start) * 1000)
    sample.ttft_ms.append((first - start) * 1000)


HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}


async def sequential(http: aiohttp.ClientSession, url: str, payload: bytes, n: int) -> Sample:
    sample = Sample([], [], 0, 0.0)
    began = time.perf_counter()
    for _ in range(n):
        await _one(http, url, payload, time.perf_counter(), sample)
    sample.seconds = time.perf_counter() - began
    return sample


async def open_loop(
    http: aiohttp.ClientSession, url: str, payload: bytes, rate: float, n: int, cap: int = 32
) -> Sample:
    """`n` requests scheduled `1/rate` apart; at most `cap` in flight, the rest wait their turn."""
    sample = Sample([], [], 0, 0.0)
    slots = asyncio.Semaphore(cap)
    began = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []

    async def fire(at: float) -> None:
        async with slots:
            await _one(http, url, payload, at, sample)

    for i in range(n):
        at = began + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(fire(at)))
    await asyncio.gather(*tasks)
    sample.seconds = time.perf_counter() - began
    return sample


def _merge(samples: list[Sample]) -> Sample:
    return Sample(
        [v for s in samples for v in s.latency_ms],
        [v for s in samples for v in s.ttft_ms],
        sum(s.errors for s in samples),
        sum(s.seconds for s in samples),
    )


Runner = Callable[[str], Awaitable[Sample]]


async def paired(direct: str, proxied: str, run: Runner, blocks: int) -> tuple[Sample, Sample]:
    """Direct and proxied runs interleaved block by block."""
    a: list[Sample] = []
    b: list[Sample] = []
    for _ in range(blocks):
        a.append(await run(direct))
        b.append(await run(proxied))
    return _merge(a), _merge(b)


def report(title: str, direct: Sample, proxied: Sample, ttft: bool) -> dict[str, float]:
    d50, d99 = direct.pct(direct.latency_ms, 0.5), direct.pct(direct.latency_ms, 0.99)
    p50, p99 = proxied.pct(proxied.latency_ms, 0.5), proxied.pct(proxied.latency_ms, 0.99)
    row = {"direct_p50": d50, "direct_p99": d99, "proxy_p50": p50, "proxy_p99": p99}
    line = (
        f"{title:<38} direct p50 {d50:7.3f} p99 {d99:7.3f} | proxy p50 {p50:7.3f} p99 {p99:7.3f}"
        f" | added p50 {p50 - d50:+7.3f} p99 {p99 - d99:+7.3f} ms"
    )
    if ttft:
        t_d = direct.pct(direct.ttft_ms, 0.5)
        t_p = proxied.pct(proxied.ttft_ms, 0.5)
        row["added_ttft_p50"] = t_p - t_d
        line += f" | added TTFT p50 {t_p - t_d:+7.3f} ms"
    if direct.errors or proxied.errors:
        line += f" | errors {direct.errors}/{proxied.errors}"
    print(line, flush=True)
    return row


async def max_rate(http: aiohttp.ClientSession, url: str, payload: bytes, seconds: float) -> float:
    """Highest offered rate whose p99 stays under 50 ms and that is delivered at >= 95 %."""
    best = 0.0
    for rate in (500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000, 6000):
        n = int(rate * seconds)
        sample = await open_loop(http, url, payload, rate, n)
        achieved = len(sample.latency_ms) / sample.seconds
        p99 = sample.pct(sample.latency_ms, 0.99)
        ok = p99 < 50 and achieved >= 0.95 * rate and not sample.errors
        print(
            f"  offered {rate:5d}/s achieved {achieved:7.0f}/s p99 {p99:7.2f} ms {'ok' if ok else 'X'}"
        )
        if not ok:
            break
        best = float(rate)
    return best


def _spawn(script: str, *args: str, cpu: int | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start a helper process and read the one line it prints once it listens."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(Path(__file__).with_name(script)), *args]
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        raise SystemExit(f"{script} {' '.join(args)} did not start")
    return proc, line


async def cpu_per_request(upstream: str, proxied: str, n: int) -> None:
    """Process CPU time per sequential request, direct and proxied: the difference is what the
    proxy itself costs, and it barely moves with the machine's load (wall-clock figures do)."""
    direct_url, proxy_url = upstream + "/chat/completions", proxied + "/chat/completions"
    async with aiohttp.ClientSession() as http:
        for name, body in (("JSON", _json_body()), ("50-chunk stream", _stream_body())):
            spent: dict[str, float] = {}
            for label, url in (("direct", direct_url), ("proxy", proxy_url)) * 2:
                await sequential(http, url, body, 50)
                began = time.process_time()
                await sequential(http, url, body, n)
                ms = (time.process_time() - began) / n * 1000
                spent[label] = min(spent.get(label, ms), ms)
            added = spent["proxy"] - spent["direct"]
            print(
                f"{name:<16} CPU per request: direct {spent['direct']:.3f} ms, "
                f"proxied {spent['proxy']:.3f} ms, proxy's own {added:.3f} ms "
                f"(at most {1000 / added:.0f} requests/s per core)"
            )


def _json_body() -> bytes:
    return json.dumps(BODY).encode()


def _stream_body() -> bytes:
    return json.dumps({**BODY, "stream": True, "stream_options": {"include_usage": True}}).encode()


async def bench_in_process(quick: bool, cache_dir: str = "") -> None:
    """Upstream, proxy and client on one event loop: the difference is the proxy's own CPU time,
    free of the scheduler delays a loaded machine adds to every extra process hop (with
    `cache_dir`, the response cache's miss path is paid on every call)."""
    import anyio

    from tokenwatch.config import ProxySettings
    from tokenwatch.proxy.server import AgentRoute, ProxyServer, RouteTable

    server = await trivial_upstream.serve()
    upstream = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    routes = RouteTable()
    token = routes.add(AgentRoute(agent="bench"))
    levers = _cache_on_miss_path(cache_dir) if cache_dir else None
    proxy = ProxyServer(_OpenGate(), routes, ProxySettings(openai_upstream=upstream), levers=levers)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(proxy.serve)
            proxied = proxy.base_urls(token)["OPENAI_BASE_URL"]
            await cpu_per_request(upstream, proxied, 300 if quick else 1000)
            await _measure(upstream, proxied, quick)
            await _ramps(upstream, proxied, quick, None, None)
            tg.cancel_scope.cancel()
    finally:
        server.close()


def _runqueue_ms(pid: int | None) -> float:
    """Milliseconds a process has spent runnable but waiting for a CPU (Linux schedstat); 0 when
    there is no separate process. A tail that follows this figure is the scheduler's, not the code's."""
    if pid is None:
        return 0.0
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e6


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU of a process, from /proc (Linux)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def proxy_cpu(pid: int, proxied: str, n: int) -> None:
    """CPU the proxy's own process spends per call, kernel time included: the cost that decides
    how many calls a core can carry, whatever else the machine is doing."""
    url = proxied + "/chat/completions"
    async with aiohttp.ClientSession() as http:
        for name, body in (("JSON", _json_body()), ("50-chunk stream", _stream_body())):
            await sequential(http, url, body, 50)
            began = _cpu_seconds(pid)
            await sequential(http, url, body, n)
            ms = (_cpu_seconds(pid) - began) / n * 1000
            print(f"{name:<16} proxy process CPU per call: {ms:.3f} ms")


def _cpus(pin: bool) -> tuple[int | None, int | None]:
    """(the proxy's CPU, everyone else's): the last CPU for the proxy, CPU 0 for the rest."""
    count = os.cpu_count() or 1
    if not pin or count < 2:
        return None, None
    return count - 1, 0


async def bench(quick: bool, nice: int | None, pin: bool, loop: str, cache_dir: str) -> None:
    proxy_cpu_no, others = _cpus(pin)
    if others is not None:
        os.sched_setaffinity(0, {others})
        print(f"pinned: proxy on CPU {proxy_cpu_no}; upstream, client and wrk on CPU {others}")
    upstream_proc, port = _spawn("trivial_upstream.py", cpu=others)
    upstream = f"http://127.0.0.1:{port}/v1"
    extra = ("--cache-dir", cache_dir) if cache_dir else ()
    proxy_proc, proxied_base = _spawn(
        "proxy.py", "--serve-proxy", upstream, "--loop", loop, *extra, cpu=proxy_cpu_no
    )
    if cache_dir:
        print("response cache on, every lookup a miss (the miss path)")
    print(f"proxy process on the {loop} event loop")
    if nice is not None:
        os.setpriority(os.PRIO_PROCESS, proxy_proc.pid, nice)
        print(f"proxy process at nice {nice}")
    try:
        await proxy_cpu(proxy_proc.pid, proxied_base, 300 if quick else 1000)
        await _measure(upstream, proxied_base, quick, proxy_proc.pid)
        await _ramps(upstream, proxied_base, quick, proxy_proc.pid, others)
    finally:
        for proc in (proxy_proc, upstream_proc):
            proc.terminate()
            proc.wait(10)


async def _measure(
    upstream: str, proxied_base: str, quick: bool, proxy_pid: int | None = None
) -> None:
    direct, proxied = upstream + "/chat/completions", proxied_base + "/chat/completions"
    json_body, stream_body = _json_body(), _stream_body()
    seq_n, rate_n, blocks = (200, 1000, 3) if quick else (1000, 5000, 5)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"python {sys.version.split()[0]}, aiohttp {aiohttp.__version__} (proxy's server, "
        f"load generator), httptools {_version('httptools')} (proxy's upstream client), "
        f"{os.cpu_count()} cpus, load average {load}"
    )
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as http:
        for warm in (direct, proxied):
            await sequential(http, warm, json_body, 200)
        for name, body, ttft in (
            ("JSON", json_body, False),
            ("50-chunk stream", stream_body, True),
        ):

            async def seq(url: str, body: bytes = body) -> Sample:
                return await sequential(http, url, body, seq_n // blocks)

            async def rate500(url: str, body: bytes = body) -> Sample:
                return await open_loop(http, url, body, 500, rate_n // blocks)

            report(f"{name}, concurrency 1", *await paired(direct, proxied, seq, blocks), ttft)
            waited = _runqueue_ms(proxy_pid)
            report(
                f"{name}, 500/s open loop, <=32",
                *await paired(direct, proxied, rate500, blocks),
                ttft,
            )
            if proxy_pid is not None:
                waited = _runqueue_ms(proxy_pid) - waited
                print(f"  proxy process waited {waited:.0f} ms for a CPU during these runs")


async def _ramps(
    upstream: str, proxied_base: str, quick: bool, proxy_pid: int | None, cpu: int | None
) -> None:
    """The highest rate with p99 under 50 ms, direct and through the proxy: wrk if it is there."""
    direct, proxied = upstream + "/chat/completions", proxied_base + "/chat/completions"
    if not wrk.available():
        print("wrk not found (apt-get install wrk): falling back to the Python open-loop ramp,")
        print("whose own CPU caps the figure (direct and proxied alike)")
        return await _python_ramps(direct, proxied, quick, proxy_pid)
    seconds = 1 if quick else 2
    for name, body in (("JSON", _json_body()), ("50-chunk stream", _stream_body())):
        await _wrk_concurrency_1(name, direct, proxied, body, seconds)
    for name, body in (("JSON", _json_body()), ("50-chunk stream", _stream_body())):
        print(f"highest sustained rate, {name}, closed loop with wrk (p99 < 50 ms):")
        ceiling = await _wrk_ramp("direct", direct, body, seconds, cpu, None)
        best = await _wrk_ramp("proxy", proxied, body, seconds, cpu, proxy_pid)
        print(f"sustained {name}: {best:.0f} requests/s through the proxy, {ceiling:.0f} direct")


async def _wrk_concurrency_1(
    name: str, direct: str, proxied: str, body: bytes, seconds: int
) -> None:
    """Added latency at concurrency 1 with a load generator that costs almost nothing: one wrk
    connection, direct and proxied runs interleaved, the median of each percentile over runs."""
    runs: dict[str, list[wrk.WrkResult]] = {"direct": [], "proxy": []}
    for _ in range(3):
        for label, url in (("direct", direct), ("proxy", proxied)):
            runs[label].append(await wrk.run(url, body, 1, seconds))

    def median(label: str, field: str) -> float:
        values: list[float] = sorted(getattr(r, field) for r in runs[label])
        return values[len(values) // 2]

    d50, d99 = median("direct", "p50_ms"), median("direct", "p99_ms")
    p50, p99 = median("proxy", "p50_ms"), median("proxy", "p99_ms")
    print(
        f"{name + ', concurrency 1 (wrk)':<38} direct p50 {d50:7.3f} p99 {d99:7.3f} | proxy p50 "
        f"{p50:7.3f} p99 {p99:7.3f} | added p50 {p50 - d50:+7.3f} p99 {p99 - d99:+7.3f} ms",
        flush=True,
    )


async def _wrk_ramp(
    label: str, url: str, body: bytes, seconds: int, cpu: int | None, pid: int | None
) -> float:
    best = 0.0
    for connections in (1, 2, 4, 8, 16, 32):
        spent, waited = (_cpu_seconds(pid) if pid else 0.0), _runqueue_ms(pid)
        run = await wrk.run(url, body, connections, seconds, "" if cpu is None else str(cpu))
        ok = run.p99_ms < 50 and not run.errors
        line = (
            f"  {label:<6} {connections:2d} connections: {run.rate:7.0f}/s "
            f"p50 {run.p50_ms:6.2f} p99 {run.p99_ms:6.2f} ms {'ok' if ok else 'X'}"
        )
        if pid is not None:
            cpu_ms = (_cpu_seconds(pid) - spent) / max(1, run.requests) * 1000
            line += f" | proxy CPU {cpu_ms:.3f} ms/call, waited {_runqueue_ms(pid) - waited:.0f} ms"
        if run.errors:
            line += f" | errors {run.errors}"
        print(line, flush=True)
        if ok:
            best = max(best, run.rate)
    return best


async def _python_ramps(direct: str, proxied: str, quick: bool, proxy_pid: int | None) -> None:
    seconds = 1.0 if quick else 2.0
    json_body = _json_body()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
        # the same ramp direct: how much of the ceiling is the load generator and the upstream
        print("highest sustained rate direct (JSON, p99 < 50 ms):")
        ceiling = await max_rate(http, direct, json_body, seconds)
        print("highest sustained rate through the proxy (JSON, p99 < 50 ms):")
        waited = _runqueue_ms(proxy_pid)
        best = await max_rate(http, proxied, json_body, seconds)
        if proxy_pid is not None:
            waited = _runqueue_ms(proxy_pid) - waited
            print(f"  proxy process waited {waited:.0f} ms for a CPU during the ramp")
        print(f"sustained: {best:.0f} requests/s through the proxy, {ceiling:.0f} direct")


def _run_loop(main: Coroutine[Any, Any, None], loop: str) -> None:
    if loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller samples")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="upstream, proxy and client on one loop (the proxy's own CPU cost)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        metavar="N",
        help="run the proxy process at this nice value (negative needs root): how much of the "
        "tail is the proxy waiting for a CPU",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the proxy to a CPU of its own, the upstream and load generators to CPU 0",
    )
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the proxy process's event loop (uvloop must be installed)",
    )
    parser.add_argument(
        "--cache-miss",
        action="store_true",
        help="response cache on in the proxy, every request a miss: its added cost",
    )
    parser.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--serve-proxy", metavar="UPSTREAM", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_proxy:
        _run_loop(run_proxy(args.serve_proxy, args.cache_dir), args.loop)
        return
    if args.cache_miss:
        print("response cache on, every request a miss (TTL of a microsecond)")
    with tempfile.TemporaryDirectory(prefix="tw-bench-") as directory:
        cache_dir = directory if args.cache_miss else ""
        if args.in_process:
            print("mode: in-process (one event loop for client, proxy and upstream)")
            asyncio.run(bench_in_process(args.quick, cache_dir))
        else:
            print("mode: three processes (client here, proxy and upstream each in their own)")
            asyncio.run(bench(args.quick, args.nice, args.pin, args.loop, cache_dir))


if __name__ == "__main__":
    main()

"""Closed-loop load with Debian's `wrk` (C, epoll): requests/s and p99 at N connections.

`wrk` costs a few microseconds per request, so the rate it reaches is the server's, not the load
generator's. Install it with `apt-get install wrk`; `available()` says whether it is on PATH.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_SCRIPT = """wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
"""


@dataclass(frozen=True)
class WrkResult:
    connections: int
    requests: int
    rate: float
    """Completed requests per second."""
    p50_ms: float
    p99_ms: float
    errors: int
    """Socket errors, timeouts and non-2xx answers."""


def available() -> bool:
    return shutil.which("wrk") is not None


def _lua_string(body: bytes) -> str:
    return "[==[" + body.decode() + "]==]"


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if match is None:
        raise ValueError(f"cannot read wrk's latency {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse(output: str, connections: int) -> WrkResult:
    """The figures of one `wrk --latency` run."""
    requests = int(re.search(r"(\d+) requests in", output)[1])  # type: ignore[index]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])  # type: ignore[index]
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", output, re.MULTILINE))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors += int(non_2xx[1]) if non_2xx else 0
    return WrkResult(
        connections, requests, rate, _ms(percentiles["50"]), _ms(percentiles["99"]), errors
    )


async def run(url: str, body: bytes, connections: int, seconds: int, cpus: str = "") -> WrkResult:
    """One closed-loop run: `connections` clients, each sending its next request on the answer.
    `cpus` pins wrk with taskset (e.g. "0"). Async, so a server on the caller's loop keeps serving."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(_SCRIPT.format(body=_lua_string(body)))
        command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
        command += ["-s", str(script), url]
        if cpus:
            command = ["taskset", "-c", cpus, *command]
        proc = await asyncio.create_subprocess_exec(
            *command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode().strip()}")
    return parse(out.decode(), connections)

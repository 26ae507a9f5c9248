"""Fuzzed protocol lines against a real supervisor process: it never crashes, answers every request,
and valid usage sent after the garbage is stored exactly once."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.supervisor_fixtures import ServeProcess, supervisor_process, tokenwatch_env
from tokenwatch.core import protocol
from tokenwatch.core.models import MAX_CALL_TOKENS, UsageEvent
from tokenwatch.core.protocol import ProtocolError
from tokenwatch.core.usage_wire import usage_from_wire

# Messages that would act on real processes or stop the supervisor are left out of the fuzz.
UNSAFE = {"shutdown", "attach", "started", "kill", "pause", "pause_all", "resume", "resume_all",
          "throttle", "launch", "adopt", "register", "set_budget", "remove_budget", "exited"}  # fmt: skip
SAFE_TYPES = sorted(set(protocol.SCHEMAS) - UNSAFE)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.text(max_size=20),
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
event_fields = st.dictionaries(
    st.sampled_from([*protocol.SCHEMAS["usage"], "agent", "input_tokens", "output_tokens", "ts",
                     "model", "cost_usd", "pid", "estimated", "call_id", "total_tokens"]),
    json_values,
    max_size=6,
)  # fmt: skip
messages = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 1, 2, None, "1"]),
        "type": st.sampled_from([*SAFE_TYPES, "usage", "usage", "nonsense"]),
        "id": st.one_of(st.integers(), st.text(max_size=5), st.none(), st.booleans()),
    },
    optional={
        "event": event_fields,
        "name": json_values,
        "state": json_values,
        "interval": json_values,
        "limit": json_values,
    },
)
lines = st.one_of(
    messages.map(lambda m: json.dumps(m).encode()),
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" ")),
    st.text(max_size=100).map(lambda t: t.replace("\n", " ").encode()),
)


@pytest.fixture(scope="module")
def supervisor() -> Iterator[ServeProcess]:
    home = Path(tempfile.mkdtemp(prefix="twf-"))
    try:
        with supervisor_process(tokenwatch_env(home)) as sp:
            yield sp
    finally:
        shutil.rmtree(home, ignore_errors=True)


def read_replies(
    sock: socket.socket, mid: str, count: int, errors: list[str]
) -> list[dict[str, Any]]:
    """The next `count` replies to `mid`; error codes of the others go to `errors`."""
    buf, found = b"", []
    while len(found) < count:
        chunk = sock.recv(65536)
        assert chunk, "the supervisor closed a connection that sent only short lines"
        buf += chunk
        *complete, buf = buf.split(b"\n")
        for line in complete:
            msg: dict[str, Any] = json.loads(line)
            assert msg["v"] == 1
            if msg.get("type") == "reply" and msg.get("re") == mid:
                found.append(msg)
            elif msg.get("type") == "reply" and not msg["ok"]:
                errors.append(msg["error"]["code"])
    return found


def count_stored(db: Path, call_id: str) -> int:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT COUNT(*) FROM events WHERE call_id = ?", (call_id,)).fetchone()
    return int(row[0])


@pytest.mark.slow
@settings(
    max_examples=60,
    suppress_health_check=[
        *settings.default.suppress_health_check,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(garbage=st.lists(lines, max_size=12), repeats=st.integers(1, 3))
def test_fuzzed_lines_never_break_the_server(
    supervisor: ServeProcess, garbage: list[bytes], repeats: int
) -> None:
    call_id = uuid.uuid4().hex
    valid = protocol.request(
        "usage", "final",
        event={"agent": "fuzz", "call_id": call_id, "model": "gpt-4o-mini",
               "input_tokens": 10, "output_tokens": 5},
    )  # fmt: skip
    payload = b"".join(line + b"\n" for line in garbage) + protocol.dumps(valid) * repeats
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(supervisor.paths.socket))
        sock.sendall(payload)
        errors: list[str] = []
        replies = read_replies(sock, "final", repeats, errors)
    assert all(r["ok"] for r in replies)
    assert "internal" not in errors, "bad input is refused by name, never by a crash"
    assert count_stored(supervisor.paths.db, call_id) == 1
    assert supervisor.proc.poll() is None


@given(data=st.dictionaries(st.sampled_from(UsageEvent.field_names()), json_values, max_size=10))
def test_usage_objects_are_taken_whole_or_refused(data: dict[str, Any]) -> None:
    code = ""
    try:
        event = usage_from_wire(data)
    except ProtocolError as exc:
        code = exc.code
    else:
        check_types(event)
        assert {k: getattr(event, k) for k in data} == data
        assert min(event.input_tokens, event.output_tokens, event.cache_read_tokens) >= 0
    assert code in ("", "bad_message")


def check_types(event: UsageEvent) -> None:
    """Every field holds what its annotation says (ints never bools, floats may be ints)."""
    for f in dataclasses.fields(UsageEvent):
        value, declared = getattr(event, f.name), str(f.type)
        if value is None:
            assert "None" in declared
        elif declared.startswith("int"):
            assert type(value) is int
        elif declared.startswith("float"):
            assert type(value) in (int, float)
        else:
            assert type(value).__name__ == declared


@given(
    tokens=st.integers(0, MAX_CALL_TOKENS),
    model=st.text(max_size=30),
    cost=st.none() | st.floats(0, 1e6),
)
def test_a_valid_usage_object_keeps_every_value(
    tokens: int, model: str, cost: float | None
) -> None:
    data = {"input_tokens": tokens, "output_tokens": tokens // 3, "model": model, "cost_usd": cost,
            "call_id": "x", "estimated": True}  # fmt: skip
    event = usage_from_wire(data)
    assert (event.input_tokens, event.output_tokens, event.model) == (tokens, tokens // 3, model)
    assert (event.cost_usd, event.call_id, event.estimated) == (cost, "x", True)

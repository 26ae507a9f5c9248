"""The supervisor's socket as a peer sees it: permissions, framing, errors, limits, subscribers."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import uuid
from pathlib import Path

import anyio
import pytest

from tests.supervisor_fixtures import (
    RawClient,
    quiet_config,
    raw_client,
    running_supervisor,
    usage_event,
)
from tokenwatch.core import protocol
from tokenwatch.paths import Paths
from tokenwatch.supervisor import server
from tokenwatch.supervisor.server import AddressInUse, SocketServer

pytestmark = pytest.mark.anyio


def stored_call_ids(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT call_id FROM events ORDER BY id")]


async def test_socket_is_private_from_birth() -> None:
    paths = Paths.discover()
    async with running_supervisor(paths, quiet_config(), proxy=False, exporters=False):
        sock_mode = stat.S_IMODE(os.stat(paths.socket).st_mode)
        dir_mode = stat.S_IMODE(os.stat(paths.runtime_dir).st_mode)
    assert (sock_mode, dir_mode) == (0o600, 0o700)
    assert not paths.socket.exists(), "a clean exit removes its socket"


async def test_malformed_lines_get_error_replies_and_the_connection_goes_on() -> None:
    paths = Paths.discover()
    async with (
        running_supervisor(paths, quiet_config(), proxy=False, exporters=False),
        raw_client(paths.socket) as c,
    ):
        await c.send(b"this is not json\n")
        bad_json = await c.receive()
        await c.send(b'{"v": 1, "id": 7, "type": "no-such-thing"}\n')
        unknown = await c.receive()
        await c.send(b'{"v": 2, "id": 8, "type": "list"}\n')
        version = await c.receive()
        await c.send(b'{"v": 1, "id": 9, "type": "pause"}\n')
        missing = await c.receive()
        ok = await c.call("list")
    assert bad_json["ok"] is False
    assert bad_json["error"]["code"] == "bad_json"
    assert (unknown["re"], unknown["error"]["code"]) == (7, "unknown_type")
    assert (version["re"], version["error"]["code"]) == (8, "unsupported_version")
    assert (missing["re"], missing["error"]["code"]) == (9, "bad_message")
    assert ok["ok"] is True
    assert ok["data"] == []


async def drain(c: RawClient) -> None:
    while True:
        await c.receive()


async def test_a_line_over_the_limit_closes_only_that_connection() -> None:
    paths = Paths.discover()
    async with (
        running_supervisor(paths, quiet_config(), proxy=False, exporters=False),
        raw_client(paths.socket) as other,
        raw_client(paths.socket) as c,
    ):
        await c.send(b"x" * (protocol.MAX_LINE_BYTES + 10))
        error = await c.receive()
        with anyio.fail_after(30), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await drain(c)
        still = await other.call("list")
    assert error["error"]["code"] == "too_large"
    assert still["ok"] is True


async def test_usage_is_acknowledged_once_stored_and_counted_once() -> None:
    paths = Paths.discover()
    call_id = uuid.uuid4().hex
    async with running_supervisor(paths, quiet_config(), proxy=False, exporters=False) as sup:
        async with raw_client(paths.socket) as c:
            hello = await c.call("hello", name="sdk-agent", pid=os.getpid())
            first = await c.call("usage", event=usage_event("", call_id))
            in_db_at_ack = stored_call_ids(paths.db)
            again = await c.call("usage", event=usage_event("", call_id))
            status = await c.call("status")
        assert sup.engine is not None
    row = next(a for a in status["data"]["agents"] if a["agent"]["name"] == "sdk-agent")
    assert hello["data"]["name"] == "sdk-agent"
    assert first["ok"]
    assert again["ok"]
    assert in_db_at_ack == [call_id]
    assert stored_call_ids(paths.db) == [call_id]
    assert row["summary"]["requests"] == 1
    assert row["summary"]["tokens"] == 120


async def test_a_long_pipelined_stream_is_acked_in_order_each_line_once_after_storing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Small batches, so the stream crosses many of them with two in flight at a time.
    monkeypatch.setattr(server._Ingestor, "BATCH", 7)
    paths = Paths.discover()
    count = 500
    lines = b"".join(
        protocol.dumps(protocol.request("usage", n, event=usage_event("piped", f"p{n}")))
        for n in range(count)
    )
    async with (
        running_supervisor(paths, quiet_config(), proxy=False, exporters=False),
        raw_client(paths.socket) as c,
    ):
        await c.send(lines)
        replies = [await c.receive() for _ in range(count)]
        at_last_ack = stored_call_ids(paths.db)
        with anyio.move_on_after(0.2):
            extra = await c.receive()
            pytest.fail(f"a reply beyond one per line: {extra}")
    assert [r["re"] for r in replies] == list(range(count))
    assert all(r["ok"] for r in replies)
    assert at_last_ack == [f"p{n}" for n in range(count)]


async def test_bad_usage_fields_are_refused_and_nothing_is_stored() -> None:
    paths = Paths.discover()
    async with (
        running_supervisor(paths, quiet_config(), proxy=False, exporters=False),
        raw_client(paths.socket) as c,
    ):
        negative = await c.call("usage", event=usage_event("a", "x1", input_tokens=-5))
        wrong = await c.call("usage", event=usage_event("a", "x2", output_tokens="many"))
        bad_ts = await c.call("usage", event=usage_event("a", "x3", ts=-1))
    assert [r["error"]["code"] for r in (negative, wrong, bad_ts)] == ["bad_message"] * 3
    assert stored_call_ids(paths.db) == []


async def test_sixty_four_agents_reporting_at_once_lose_nothing() -> None:
    paths = Paths.discover()
    per_agent = 80

    async def agent(i: int) -> int:
        async with raw_client(paths.socket) as c:
            await c.call("hello", name=f"agent-{i}")
            for n in range(per_agent):  # pipelined: all sent before any ack is read
                event = usage_event("", f"{i}-{n}", input_tokens=i + 1, output_tokens=n)
                await c.send(protocol.request("usage", n, event=event))
            acked = 0
            for n in range(per_agent):
                reply = await c.reply_to(n)
                acked += reply["ok"]
            return acked

    acks: list[int] = []
    async with running_supervisor(paths, quiet_config(), proxy=False, exporters=False):
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(64):

                    async def run(i: int = i) -> None:
                        acks.append(await agent(i))

                    tg.start_soon(run)
    with sqlite3.connect(paths.db) as conn:
        rows = conn.execute(
            "SELECT agent, COUNT(*), SUM(input_tokens), SUM(output_tokens) FROM events GROUP BY agent"
        ).fetchall()
    assert sum(acks) == 64 * per_agent
    assert sorted(rows) == sorted(
        (f"agent-{i}", per_agent, (i + 1) * per_agent, sum(range(per_agent))) for i in range(64)
    )


async def test_a_subscriber_that_never_reads_does_not_hold_up_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "MAX_PUSHES", 64)
    paths = Paths.discover()
    async with (
        running_supervisor(paths, quiet_config(), proxy=False, exporters=False) as sup,
        raw_client(paths.socket) as stuck,
        raw_client(paths.socket) as reporter,
    ):
        await stuck.call("subscribe", interval=0.1)
        await reporter.call("hello", name="busy")
        sent = 2000  # more than the bound, the socket buffer and one write can hold
        acked = []

        async def read_acks() -> None:
            for n in range(sent):
                acked.append((await reporter.reply_to(n))["ok"])

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_acks)
                for n in range(sent):
                    event = usage_event("", f"c{n}", task="t" * 200)
                    await reporter.send(protocol.request("usage", n, event=event))
        assert acked == [True] * sent
        assert sup.server is not None
        dropped = sup.server.statistics().dropped_pushes
    assert dropped > 0, "the stuck subscriber's pushes were bounded, not queued without end"


async def test_subscriber_gets_a_snapshot_then_usage_pushes() -> None:
    paths = Paths.discover()
    async with (
        running_supervisor(paths, quiet_config(), proxy=False, exporters=False),
        raw_client(paths.socket) as sub,
        raw_client(paths.socket) as agent,
    ):
        reply = await sub.call("subscribe", interval=5)
        first = await sub.receive()
        await agent.call("hello", name="pushy")
        await agent.call("usage", event=usage_event("", "p1"))
        kinds: dict[str, dict[str, object]] = {}
        with anyio.fail_after(30):
            while "usage" not in kinds:
                msg = await sub.receive()
                kinds[msg["kind"]] = msg["data"]
    assert reply["data"]["interval"] == 5
    assert (first["type"], first["kind"]) == ("push", "snapshot")
    assert kinds["usage"]["call_id"] == "p1"
    assert (kinds["usage"]["input_tokens"], kinds["usage"]["output_tokens"]) == (100, 20)
    assert kinds["agent"]["name"] == "pushy"


async def test_a_subscriber_gets_only_the_kinds_it_asked_for() -> None:
    paths = Paths.discover()
    async with (
        running_supervisor(paths, quiet_config(), proxy=False, exporters=False),
        raw_client(paths.socket) as picky,
        raw_client(paths.socket) as everything,
        raw_client(paths.socket) as agent,
    ):
        refused = await picky.call("subscribe", kinds=["snapshot", "gossip"])
        await picky.call("subscribe", interval=0.1, kinds=["agent", "alert"])
        await everything.call("subscribe", interval=0.1)
        await agent.call("hello", name="quiet")
        await agent.call("usage", event=usage_event("", "q1"))
        await agent.call("hello", name="second")  # a second agent: one more "agent" push
        seen: dict[str, list[str]] = {"picky": [], "everything": []}
        with anyio.fail_after(30):
            while seen["picky"].count("agent") < 2 or "usage" not in seen["everything"]:
                for name, client in (("picky", picky), ("everything", everything)):
                    with anyio.move_on_after(0.05):
                        seen[name].append((await client.receive())["kind"])
    assert refused["ok"] is False
    assert "gossip" in refused["error"]["message"]
    assert set(seen["picky"]) == {"agent"}
    assert {"snapshot", "usage", "agent"} <= set(seen["everything"])


async def test_a_second_server_never_takes_over_a_live_socket() -> None:
    paths = Paths.discover()
    async with running_supervisor(paths, quiet_config(), proxy=False, exporters=False) as sup:
        assert sup.engine is not None
        second = SocketServer(paths.socket, handler=None)  # type: ignore[arg-type]
        with pytest.raises(AddressInUse):
            await second.serve()
        async with raw_client(paths.socket) as c:
            assert (await c.call("list"))["ok"]


async def test_a_stale_socket_is_replaced() -> None:
    paths = Paths.discover()
    paths.ensure_private_runtime()
    import socket

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(paths.socket))
    stale.close()  # the file stays; nothing listens
    async with (
        running_supervisor(paths, quiet_config(), proxy=False, exporters=False),
        raw_client(paths.socket) as c,
    ):
        assert (await c.call("list"))["ok"]


FOREIGN_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect_error": e.errno}))
    raise SystemExit
data = b""
try:
    while chunk := s.recv(65536):
        data += chunk
except ConnectionResetError:
    pass
print(json.dumps({"lines": [json.loads(l) for l in data.splitlines()]}))
"""


def run_as_nobody(socket_path: Path) -> dict[str, object]:
    out = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         "/usr/bin/python3", "-c", FOREIGN_CLIENT, str(socket_path)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as nobody")
async def test_a_foreign_uid_is_refused(tokenwatch_home: Path) -> None:
    paths = Paths.discover()
    async with running_supervisor(paths, quiet_config(), proxy=False, exporters=False):
        blocked = await anyio.to_thread.run_sync(run_as_nobody, paths.socket)
        # Only for this test: open the way so the peer-credential check itself is what refuses.
        os.chmod(tokenwatch_home, 0o711)
        os.chmod(paths.runtime_dir, 0o711)
        os.chmod(paths.socket, 0o666)
        refused = await anyio.to_thread.run_sync(run_as_nobody, paths.socket)
        async with raw_client(paths.socket) as c:
            mine = await c.call("list")
    assert blocked == {"connect_error": 13}, "0700 dir + 0600 socket: permission denied"
    lines = refused["lines"]
    assert isinstance(lines, list)
    assert len(lines) == 1, "one error reply, then closed"
    assert lines[0]["ok"] is False
    assert lines[0]["error"]["code"] == "forbidden"
    assert mine["ok"] is True

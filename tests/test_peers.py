"""The process at the other end of a loopback connection, found through /proc, and the agent name
its program gives."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwatch.engine.agents import check_name
from tokenwatch.process.peers import _table_inode, find_peer, program_name, socket_inode

CONNECT = "import socket, sys, time; s = socket.create_connection((sys.argv[1], int(sys.argv[2]))); print('on', flush=True); time.sleep(30)"


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_the_peer_of_a_connection_is_the_process_that_opened_it(family: int, host: str) -> None:
    with socket.socket(family) as server:
        server.bind((host, 0))
        server.listen()
        port = server.getsockname()[1]
        child = subprocess.Popen([sys.executable, "-c", CONNECT, host, str(port)])
        try:
            conn, _ = server.accept()
            with conn:
                ends = conn.getsockname()[:2], conn.getpeername()[:2]
                peer = find_peer(*ends)
                by_table = _table_inode(*ends)  # the fallback where netlink is refused
                by_netlink = socket_inode(*ends)
                ours = find_peer(conn.getpeername()[:2], conn.getsockname()[:2])
        finally:
            child.kill()
            child.wait()
    assert peer is not None
    assert by_netlink is not None
    assert by_table == by_netlink
    assert peer.pid == child.pid
    assert [pid for pid, _ in peer.lineage[:2]] == [child.pid, os.getpid()]
    assert peer.name == os.path.basename(sys.executable)  # `python -c`: the interpreter's name
    assert ours is not None
    assert ours.pid == os.getpid(), "the server's end is this process"


def test_a_connection_that_is_not_there_has_no_peer() -> None:
    assert socket_inode(("127.0.0.1", 1), ("127.0.0.1", 2)) is None
    assert _table_inode(("127.0.0.1", 1), ("127.0.0.1", 2)) is None
    assert find_peer(("::1", 1), ("::1", 2)) is None


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["/usr/bin/curl", "-s", "x"], "curl"),
        (["codex", "exec"], "codex"),
        (["/usr/bin/python3.12", "agents/coder.py", "--fast"], "coder"),
        (["python", "-u", "-m", "pkg.bot"], "pkg.bot"),
        (["python3", "-c", "print(1)"], "python3"),
        (["node", "/usr/lib/node_modules/@openai/codex/bin/codex.js", "exec"], "codex"),
        (["node", "/opt/node_modules/@anthropic-ai/claude-code/cli.js"], "claude-code"),
        (["node", "bin/index.js"], "index"),
        (["claude"], "claude"),
        (["/weird path/my tool!"], "my-tool"),
        ([], ""),
    ],
)
def test_a_program_is_named_by_its_executable_or_its_script(argv: list[str], name: str) -> None:
    assert program_name(argv) == name


@given(st.lists(st.text(max_size=30), max_size=5))
def test_a_program_name_is_a_valid_agent_name_or_nothing(argv: list[str]) -> None:
    name = program_name(argv)
    if name:
        assert check_name(name) == name
